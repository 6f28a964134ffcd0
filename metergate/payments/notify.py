"""Signed notifications to the operator: low balance, top-up succeeded or failed, wallet depleted, and a
change of a wallet's billing settings (``billing_settings.changed``: auto top-up, spend caps, or a session
opened to change its payment methods — who changed it, through which link, from what to what).

Each notification is one JSON ``POST`` to ``notify_url`` with the header
``Metergate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(notify_secret, "<t>.<raw body>")>`` — Stripe's
scheme, so a receiver checks it the same way and refuses stale timestamps. Delivery runs in the background
with a bounded number of attempts; it never blocks nor fails the operation that caused it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import aiohttp

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Metergate-Signature"
BILLING_SETTINGS_CHANGED = "billing_settings.changed"
_ATTEMPTS = 3
_TIMEOUT_S = 10.0


def sign(body: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(body: bytes, header: str, secret: str, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, refuse a stale timestamp."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(body, secret, timestamp).encode()
    fresh = abs((now if now is not None else time.time()) - timestamp) <= tolerance_s
    return fresh and hmac.compare_digest(expected, header.encode())


class Notifier:
    def __init__(self, url: str, secret: str | None) -> None:
        self.url = url
        self._secret = secret or ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url and self._secret)

    def notify(self, event_type: str, mode: str, customer_id: str, data: dict[str, Any]) -> None:
        """Queue one notification (nothing when no URL is configured)."""
        if not self.enabled:
            return
        body = json.dumps({"id": f"ntf_{uuid.uuid4().hex}", "type": event_type, "created": int(time.time()),
                           "mode": mode, "customer_id": customer_id, "data": data}).encode()
        task = asyncio.create_task(self._deliver(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: bytes) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S))
        for attempt in range(_ATTEMPTS):
            headers = {"Content-Type": "application/json",
                       SIGNATURE_HEADER: sign(body, self._secret, int(time.time()))}
            try:
                async with self._session.post(self.url, data=body, headers=headers) as response:
                    if response.status < 300:
                        return
                    log.warning("notification answered %d (attempt %d)", response.status, attempt + 1)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("notification failed (attempt %d): %s", attempt + 1, type(exc).__name__)
            await asyncio.sleep(0.5 * 2 ** attempt)
        log.error("notification dropped after %d attempts", _ATTEMPTS)

    async def flush(self) -> None:
        """Wait for the notifications queued so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _plain(value: object) -> object:
    """A setting as the notification shows it: its own fields, without the wallet it belongs to."""
    if is_dataclass(value) and not isinstance(value, type):
        fields = asdict(value)
        return {k: v for k, v in fields.items() if k not in ("mode", "customer_id", "updated_at_ms")}
    return value


def settings_changed(notifier: Notifier, mode: str, customer_id: str, setting: str, before: object, after: object,
                     *, changed_by: Literal["portal"], link_id: str | None = None) -> None:
    """Tell the operator that a wallet's billing setting changed (``before`` / ``after``: ``None`` for off)."""
    if _plain(before) == _plain(after):
        return  # saved as it was: nothing changed
    # Also logged, so that the change is on record where no notify_url is configured.
    log.info("billing setting %s of %s customer %s changed through the %s (link %s)", setting, mode, customer_id,
             changed_by, link_id or "-")
    notifier.notify(BILLING_SETTINGS_CHANGED, mode, customer_id, {
        "setting": setting, "changed_by": changed_by, "link_id": link_id,
        "before": _plain(before), "after": _plain(after)})
