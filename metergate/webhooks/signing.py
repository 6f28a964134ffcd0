"""How a notification is signed: Standard Webhooks, and metergate's earlier Stripe-style header.

* Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` (unix seconds
  of the attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``, the
  key being the base64 after ``whsec_`` in ``webhooks.signing_secret``. The project's libraries (the
  ``standardwebhooks`` package on PyPI and its siblings) verify it.
* ``Metergate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(notify_secret, "<t>.<body>")>``, kept for
  receivers written against it, sent when ``notify_secret`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

SIGNATURE_HEADER = "Metergate-Signature"


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Metergate-Signature`` value."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(body: bytes, header: str, secret: str, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver of ``Metergate-Signature`` does: recompute, compare in constant time, refuse stale."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(body, secret, timestamp).encode()
    fresh = abs((now if now is not None else time.time()) - timestamp) <= tolerance_s
    return fresh and hmac.compare_digest(expected, header.encode())


def standard_signature(body: bytes, secret: str, msg_id: str, timestamp: int) -> str:
    """The ``webhook-signature`` value for a ``whsec_...`` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(body: bytes, msg_id: str, *, signing_secret: str | None, legacy_secret: str | None,
            timestamp: int | None = None) -> dict[str, str]:
    """Every header of one attempt (or of one forward by ``metergate webhooks listen``)."""
    at = int(time.time()) if timestamp is None else timestamp
    out = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(at)}
    if signing_secret:
        out["webhook-signature"] = standard_signature(body, signing_secret, msg_id, at)
    if legacy_secret:
        out[SIGNATURE_HEADER] = sign(body, legacy_secret, at)
    return out
