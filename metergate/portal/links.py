"""Signed, expiring portal links: HMAC-SHA256 over (key id, mode, customer, expiry).

The first configured key signs; every configured key verifies, so a key can be rotated by adding
the new one first and removing the old one after the longest link lifetime. A link is scoped to one
customer in one mode, and comparing signatures is constant-time.

A signer has a scope. Portal links are signed with the configured secrets as they are; any other scope
(the operator dashboard's links and sessions) signs with keys derived from them for that scope alone,
``HMAC(secret, "metergate link scope\n" + scope)``, so a signature made for one scope never verifies in
another: a customer's portal link cannot open the operator dashboard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from metergate.errors import Forbidden
from metergate.wallet.models import Mode


@dataclass(frozen=True, slots=True)
class PortalGrant:
    mode: Mode
    customer_id: str
    expires_at: int


def _scoped(secret: bytes, scope: str) -> bytes:
    if scope == "portal":
        return secret  # the original scheme: portal links issued before scopes existed stay valid
    return hmac.new(secret, b"metergate link scope\n" + scope.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class LinkSigner:
    def __init__(self, keys: dict[str, str], *, ttl_s: int, base_url: str, scope: str = "portal") -> None:
        if not keys:
            keys = {"ephemeral": secrets.token_urlsafe(32)}
        self.scope = scope
        self._keys = {kid: _scoped(secret.encode(), scope) for kid, secret in keys.items()}
        self._signing_kid = next(iter(self._keys))
        self.ephemeral = "ephemeral" in keys and len(keys) == 1
        self.ttl_s = ttl_s
        self.base_url = base_url.rstrip("/")

    def _sign(self, kid: str, mode: str, customer_id: str, expires_at: int) -> str:
        message = f"{kid}\n{mode}\n{customer_id}\n{expires_at}".encode()
        return _b64(hmac.new(self._keys[kid], message, hashlib.sha256).digest())

    def query(self, mode: Mode, customer_id: str, *, now: float | None = None) -> str:
        expires_at = int((now if now is not None else time.time()) + self.ttl_s)
        sig = self._sign(self._signing_kid, mode, customer_id, expires_at)
        return urlencode({"c": customer_id, "m": mode, "e": expires_at, "k": self._signing_kid, "s": sig})

    def url(self, mode: Mode, customer_id: str, *, now: float | None = None) -> str:
        return f"{self.base_url}/portal/?{self.query(mode, customer_id, now=now)}"

    def verify(self, params: dict[str, str], *, now: float | None = None) -> PortalGrant:
        try:
            customer_id, mode, kid, sig = params["c"], params["m"], params["k"], params["s"]
            expires_at = int(params["e"])
        except (KeyError, ValueError):
            raise Forbidden("This billing link is incomplete.", code="invalid_portal_link") from None
        if kid not in self._keys or mode not in ("test", "live"):
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        expected = self._sign(kid, mode, customer_id, expires_at)
        # Bytes, not str: compare_digest raises TypeError on a non-ASCII str, which would be a 500.
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogatepass")):
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        if expires_at < (now if now is not None else time.time()):
            raise Forbidden("This billing link has expired; request a new one from the application.",
                            code="expired_portal_link")
        return PortalGrant(mode=mode, customer_id=customer_id, expires_at=expires_at)  # type: ignore[arg-type]
