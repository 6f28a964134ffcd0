"""``metergate webhooks listen --forward-to URL``: a mode's notifications forwarded to a local app, for
development (like ``stripe listen``).

It follows the outbox over the admin API (``GET /admin/v1/webhooks/follow``, a long poll by cursor) with
an admin key, whose prefix chooses the mode, and POSTs each notification to the local URL with the body and
the signed headers metergate produced (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``, and
``Metergate-Signature`` with ``notify_secret``), so the app verifies them with the secret it will use in
production. It starts after the newest notification (``--from-start``: with the oldest kept) and forwards
each one once, in order; a forward the local app refuses or cannot take is reported and not retried —
``POST /admin/v1/webhooks/{id}/redeliver`` resends one through the real delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

_WAIT_S = 25  # the long poll; the server's limit is 30
_TIMEOUT_S = 10.0  # one forward to the local app
_BACKOFF_S = 2.0  # after metergate could not be reached


def add_command(sub: Any) -> None:
    """Register ``metergate webhooks ...`` on the top-level subparsers."""
    webhooks = sub.add_parser("webhooks", help="work with operator notifications (webhooks)")
    actions = webhooks.add_subparsers(dest="webhooks_command", required=True)
    listen = actions.add_parser("listen", help="forward a mode's notifications to a local app")
    listen.add_argument("--forward-to", required=True, help="local URL that receives them, e.g. "
                                                            "http://localhost:3000/hooks")
    listen.add_argument("--url", default=os.environ.get("METERGATE_URL", "http://127.0.0.1:8080"),
                        help="metergate's address (else METERGATE_URL; default http://127.0.0.1:8080)")
    listen.add_argument("--admin-key", default=os.environ.get("METERGATE_ADMIN_KEY", ""),
                        help="admin key, mg_test_... or mg_live_... (else METERGATE_ADMIN_KEY)")
    listen.add_argument("--from-start", action="store_true", help="forward the notifications kept so far too")


def run(args: argparse.Namespace) -> int:
    if not args.admin_key:
        print("metergate: webhooks listen needs --admin-key or METERGATE_ADMIN_KEY", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(listen(args.url, args.admin_key, args.forward_to, from_start=args.from_start))
    return 0


async def listen(url: str, admin_key: str, forward_to: str, *, from_start: bool = False,
                 wait_s: float = _WAIT_S, until: Callable[[int], bool] = lambda _forwarded: False,
                 say: Callable[[str], None] = print) -> int:
    """Forward notifications until ``until(count forwarded)`` is true (never, from the command line);
    returns how many were forwarded."""
    import aiohttp  # here, not at the top: ``metergate`` starts without it for every other command

    follow = f"{url.rstrip('/')}/admin/v1/webhooks/follow"
    auth = {"Authorization": f"Bearer {admin_key}"}
    cursor: str | None = "0:" if from_start else None
    forwarded = 0
    async with aiohttp.ClientSession() as session:
        say(f"Forwarding notifications from {url} to {forward_to} (Ctrl-C to stop)")
        while not until(forwarded):
            params: dict[str, str] = {"wait_s": f"{wait_s:g}", **({"after": cursor} if cursor else {})}
            try:
                async with session.get(follow, params=params, headers=auth,
                                       timeout=aiohttp.ClientTimeout(total=wait_s + 30)) as response:
                    page = await response.json(content_type=None)
                    if response.status != 200:
                        error = (page.get("error") or {}) if isinstance(page, dict) else {}
                        raise SystemExit(f"metergate: {response.status} {error.get('message', '')}".rstrip())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                say(f"metergate unreachable ({type(exc).__name__}); retrying")
                await asyncio.sleep(_BACKOFF_S)
                continue
            for event in page["data"]:
                await _forward(session, forward_to, event, say)
                forwarded += 1
            cursor = page["next_cursor"]
    return forwarded


async def _forward(session: aiohttp.ClientSession, forward_to: str, event: dict[str, Any],
                   say: Callable[[str], None]) -> None:
    import aiohttp

    try:
        async with session.post(forward_to, data=event["body"].encode(), headers=event["headers"],
                                timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S)) as response:
            say(f"{event['type']} {event['id']} -> {response.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        say(f"{event['type']} {event['id']} -> not forwarded ({type(exc).__name__})")
