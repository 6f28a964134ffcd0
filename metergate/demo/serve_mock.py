"""``metergate mock-upstream``: the demo's mock OpenAI-compatible upstream as a process of its own.

It lets anyone try metergate from an empty directory — the README's walkthrough points a route at it — with
no provider key and no network: it answers chat completions (plain and streaming), completions and
embeddings in OpenAI's wire format, with usage counted by tiktoken (:mod:`metergate.demo.mock_upstream`).
"""

from __future__ import annotations

import sys

from aiohttp import web

from metergate.demo.mock_upstream import build_mock_upstream


def serve_mock(host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM; exit code 0, or 2 when the address cannot be listened on."""
    def listening(_banner: str) -> None:  # aiohttp calls it once the socket is bound
        print(f"metergate mock-upstream: an OpenAI-compatible mock on http://{host}:{port}/v1", file=sys.stderr,
              flush=True)

    try:
        web.run_app(build_mock_upstream(), host=host, port=port, print=listening, handle_signals=True)
    except OSError as exc:
        print(f"metergate mock-upstream: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
