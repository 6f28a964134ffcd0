"""``metergate mcp``: the MCP server of :mod:`metergate.mcp_server` on stdio (what desktop assistants launch) or,
with ``--http``, on streamable HTTP at ``http://HOST:PORT/mcp``.

The control plane and admin key come as for the admin commands (``--url`` / ``METERGATE_URL``,
``METERGATE_ADMIN_KEY``, ``--profile``). Over HTTP, ``METERGATE_MCP_TOKEN`` (required when ``--host`` is not
loopback) is the bearer token every request must carry: whoever reaches the port acts with the admin key.
On stdio nothing but the protocol is written to stdout; errors go to stderr in one line. Exit codes: 0 the
transport ended; 2 usage or configuration error (no key, the ``mcp`` extra not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any

DEFAULT_HTTP_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_command(sub: Any) -> None:
    """Register ``metergate mcp`` on the top-level subparsers."""
    mcp = sub.add_parser("mcp", help="an MCP server over the admin API (stdio; --http for streamable HTTP)")
    mcp.add_argument("--url", help="control plane URL (else METERGATE_URL, the profile, http://127.0.0.1:8080)")
    mcp.add_argument("--profile", help="profile in ~/.config/metergate/profiles.toml (else METERGATE_PROFILE)")
    mcp.add_argument("--operator", action="store_true",
                     help="also offer the credit and grant tools (they move money; off by default)")
    mcp.add_argument("--http", action="store_true", help="serve streamable HTTP at http://HOST:PORT/mcp "
                                                        "instead of stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="with --http: the address to listen on (default "
                                                         "127.0.0.1; anyone who reaches it acts with the admin key)")
    mcp.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help=f"with --http (default {DEFAULT_HTTP_PORT})")


def run(args: argparse.Namespace) -> int:
    from metergate_client import ProfileError, load_profile

    try:
        profile = load_profile(args.profile, url=args.url)
    except ProfileError as exc:
        print(f"metergate mcp: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"metergate mcp: --port must be 1-65535, not {args.port}", file=sys.stderr)
        return 2
    token = os.environ.get("METERGATE_MCP_TOKEN") or None
    if args.http and token is None and args.host not in LOOPBACK:
        print(f"metergate mcp: --host {args.host} is reachable from elsewhere: set METERGATE_MCP_TOKEN, the bearer "
              "token its clients must send", file=sys.stderr)
        return 2
    try:
        import mcp  # noqa: F401 - the optional extra

        from metergate.mcp_server import serve
    except ImportError:
        print("metergate mcp: the MCP SDK is not installed; install metergate[mcp]", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(profile.url, profile.admin_key, operator=args.operator,
                          http_port=args.port if args.http else None, host=args.host, token=token))
    return 0
