"""Signed, expiring links: HMAC-SHA256 over (key id, mode, customer, expiry, access, link id).

The first configured key signs; every configured key verifies, so a key can be rotated by adding
the new one first and removing the old one after the longest link lifetime. A link is scoped to one
customer in one mode, and comparing signatures is constant-time.

A link carries what it allows (``a``), inside the signature: ``view_topup`` (balances, usage, history and a
one-off top-up through Checkout: what a 402 hands to whoever caused it) or ``billing_admin`` (also auto
top-up, spend caps and payment methods: issued only through the admin API, for a bounded time). It may
carry an id (``n``), which the receipts of what it did name and which a single-use link is remembered by.
Links from before access existed (no ``a``, no ``n``) verify under the original message and allow
``view_topup`` only. The two messages are signed under different keys, so neither can stand for the other.

A signer has a scope. Portal links are signed with the configured secrets as they are; any other scope
(the operator dashboard's links and sessions) signs with keys derived from them for that scope alone,
``HMAC(secret, "metergate link scope\\n" + scope)``, so a signature made for one scope never verifies in
another: a customer's portal link cannot open the operator dashboard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from metergate.errors import Forbidden
from metergate.wallet.models import Mode

Access = Literal["view_topup", "billing_admin"]
VIEW_TOPUP: Access = "view_topup"
BILLING_ADMIN: Access = "billing_admin"
ACCESS: tuple[Access, ...] = (VIEW_TOPUP, BILLING_ADMIN)
#: The longest a billing-administration link lives, whatever ``portal_link_ttl_s`` says: it can change how
#: the saved card is charged.
BILLING_ADMIN_TTL_S = 900
#: The query parameters that make up a link (everything else in a query is the page's own).
LINK_PARAMS = ("c", "m", "e", "k", "a", "n", "s")
_LINK_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


@dataclass(frozen=True, slots=True)
class PortalGrant:
    mode: Mode
    customer_id: str
    expires_at: int
    access: Access = VIEW_TOPUP
    link_id: str | None = None

    @property
    def billing_admin(self) -> bool:
        return self.access == BILLING_ADMIN


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
        # Links that carry access and an id are signed under a key of their own (see the module docstring).
        self._keys_v2 = {kid: hmac.new(key, b"metergate link v2", hashlib.sha256).digest()
                         for kid, key in self._keys.items()}
        self._signing_kid = next(iter(self._keys))
        self.ephemeral = "ephemeral" in keys and len(keys) == 1
        self.ttl_s = ttl_s
        self.base_url = base_url.rstrip("/")

    def _sign(self, kid: str, mode: str, customer_id: str, expires_at: int,
              extra: tuple[str, str] | None = None) -> str:
        if extra is None:
            message = f"{kid}\n{mode}\n{customer_id}\n{expires_at}".encode()
            return _b64(hmac.new(self._keys[kid], message, hashlib.sha256).digest())
        access, link_id = extra
        message = f"{kid}\n{mode}\n{customer_id}\n{expires_at}\n{access}\n{link_id}".encode()
        return _b64(hmac.new(self._keys_v2[kid], message, hashlib.sha256).digest())

    def ttl_for(self, access: Access | None) -> int:
        return min(self.ttl_s, BILLING_ADMIN_TTL_S) if access == BILLING_ADMIN else self.ttl_s

    def query(self, mode: Mode, customer_id: str, *, access: Access | None = None, link_id: str | None = None,
              now: float | None = None) -> str:
        """A signed query string. Without ``access`` and ``link_id``: the original four-field link (the
        dashboard's session cookie is one); with either, a link that carries both (a fresh id if none)."""
        expires_at = int((now if now is not None else time.time()) + self.ttl_for(access))
        fields: dict[str, str | int] = {"c": customer_id, "m": mode, "e": expires_at, "k": self._signing_kid}
        extra: tuple[str, str] | None = None
        if access is not None or link_id is not None:
            extra = (access or VIEW_TOPUP, link_id or new_link_id())
            fields.update(a=extra[0], n=extra[1])
        fields["s"] = self._sign(self._signing_kid, mode, customer_id, expires_at, extra)
        return urlencode(fields)

    def url(self, mode: Mode, customer_id: str, *, access: Access = VIEW_TOPUP, now: float | None = None) -> str:
        """A portal link; by default the one a 402 carries, which views and tops up and changes nothing else."""
        return f"{self.base_url}/portal/?{self.query(mode, customer_id, access=access, now=now)}"

    def verify(self, params: dict[str, str], *, now: float | None = None) -> PortalGrant:
        try:
            customer_id, mode, kid, sig = params["c"], params["m"], params["k"], params["s"]
            expires_at = int(params["e"])
        except (KeyError, ValueError):
            raise Forbidden("This billing link is incomplete.", code="invalid_portal_link") from None
        if kid not in self._keys or mode not in ("test", "live"):
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        access: Access = VIEW_TOPUP
        link_id: str | None = None
        extra: tuple[str, str] | None = None
        if "a" in params or "n" in params:
            found = next((a for a in ACCESS if a == params.get("a")), None)
            link_id = params.get("n", "")
            if found is None or not _LINK_ID.fullmatch(link_id):
                raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
            access, extra = found, (found, link_id)
        expected = self._sign(kid, mode, customer_id, expires_at, extra)
        # Bytes, not str: compare_digest raises TypeError on a non-ASCII str, which would be a 500.
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogatepass")):
            raise Forbidden("This billing link is not valid.", code="invalid_portal_link")
        if expires_at < (now if now is not None else time.time()):
            raise Forbidden("This billing link has expired; request a new one from the application.",
                            code="expired_portal_link")
        return PortalGrant(mode=mode, customer_id=customer_id, expires_at=expires_at,  # type: ignore[arg-type]
                           access=access, link_id=link_id)


def new_link_id() -> str:
    return "lnk_" + secrets.token_hex(12)
