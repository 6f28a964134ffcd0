"""Who is paying: a trusted customer header, or a per-customer proxy API key.

The customer header is a credential, so it is trusted only from configured source networks (by default
127.0.0.1 and ::1: the app in the same pod). Proxy keys look like ``mgk_<mode>_<secret>`` and are accepted
wherever a provider's SDK puts its own key: ``Authorization: Bearer`` (OpenAI), ``x-api-key`` (Anthropic),
``api-key`` (Azure OpenAI) and ``x-goog-api-key`` (Gemini; on a Gemini route also the ``key`` query parameter,
Google's other place for a key); none of them reaches the upstream. Only a key's SHA-256 is stored. Lookups
are cached briefly (``key_cache_ttl_s``) so that a revoked key, or a change of its attributes, takes effect
within that bound without a database read on every request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from metergate.config.settings import Settings
from metergate.errors import BadRequest, Forbidden, Unauthorized
from metergate.wallet.models import ApiKey, Mode
from metergate.wallet.store import WalletStore

# Matched with fullmatch: ``$`` would also accept a trailing newline.
CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_KEY = re.compile(r"mgk_(test|live)_[A-Za-z0-9_-]{20,100}")
# Besides Authorization: Anthropic's, Azure OpenAI's and Google's key headers.
_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")
_KEY_QUERY = "key"  # Google's key query parameter (metergate.config.gemini never forwards it)
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Identity:
    mode: Mode
    customer_id: str
    via: str  # "header" or "api_key"
    key_id: str | None = None
    # A proxy key's pricing attributes, set through the admin API (never by the key's client).
    attributes: Mapping[str, str] = field(default_factory=dict)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(mode: Mode) -> str:
    return f"mgk_{mode}_{secrets.token_urlsafe(30)}"


def valid_customer_id(value: str) -> bool:
    return CUSTOMER_ID.fullmatch(value) is not None


class Identifier:
    def __init__(self, settings: Settings, store: WalletStore) -> None:
        self._store = store
        self._header = settings.customer_header
        self._mode_header = settings.mode_header
        self._default_mode: Mode = settings.default_mode
        self._trusted = list(settings.trusted_networks)
        self._key_ttl_s = settings.key_cache_ttl_s
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        self._known: set[tuple[str, str]] = set()  # customers are never deleted, so positives are kept
        self._remotes: dict[str, bool] = {}  # trusted() per peer address: the networks are fixed at start-up

    def trusted(self, remote: str | None) -> bool:
        if not remote:
            return False
        verdict = self._remotes.get(remote)
        if verdict is None:
            if len(self._remotes) >= _CACHE_MAX:
                self._remotes.clear()
            verdict = self._remotes[remote] = self._trusted_uncached(remote)
        return verdict

    def _trusted_uncached(self, remote: str) -> bool:
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1, which no IPv4 network contains.
            return any(address.ipv4_mapped in network for network in self._trusted)
        return any(address in network for network in self._trusted)

    async def identify(self, request: web.Request, *, query_key: bool = False) -> Identity:
        """Who pays for ``request``; ``query_key``: a proxy key may also come as the ``key`` query parameter
        (a Gemini route, which strips it from what goes upstream)."""
        claimed = request.headers.get(self._header)
        if claimed is not None:
            if not self.trusted(request.remote):
                raise Forbidden(f"The {self._header} header is only accepted from the application's own "
                                "address; authenticate with a proxy API key instead.",
                                code="untrusted_customer_header")
            if not valid_customer_id(claimed):
                raise BadRequest(f"The {self._header} header is not a valid customer id.",
                                 code="invalid_customer", param=self._header)
            mode = request.headers.get(self._mode_header, self._default_mode)
            if mode not in ("test", "live"):
                raise BadRequest(f"{self._mode_header} must be 'test' or 'live'.", code="invalid_request",
                                 param=self._mode_header)
            await self._require_customer(mode, claimed)  # type: ignore[arg-type]
            return Identity(mode, claimed, "header")  # type: ignore[arg-type]
        token = _presented_key(request, query_key=query_key)
        if token is not None:
            return await self._by_key(token)
        raise Unauthorized(f"Say who is paying: send the {self._header} header from the application, or a "
                           "proxy API key as 'Authorization: Bearer mgk_...' (or in x-api-key, api-key or "
                           "x-goog-api-key).",
                           code="missing_customer")

    async def _require_customer(self, mode: Mode, customer_id: str) -> None:
        if (mode, customer_id) in self._known:
            return
        if await self._store.get_customer(mode, customer_id) is None:
            raise Forbidden(f"Unknown customer {customer_id!r} in {mode} mode.", code="unknown_customer")
        if len(self._known) >= _CACHE_MAX:
            self._known.clear()
        self._known.add((mode, customer_id))

    async def _by_key(self, token: str) -> Identity:
        if not _KEY.fullmatch(token):
            raise Unauthorized("That is not a metergate proxy API key.", code="invalid_api_key")
        digest = hash_key(token)
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and now - cached[0] < self._key_ttl_s:
            key = cached[1]
        else:
            key = await self._store.find_api_key(digest)
            if len(self._keys) >= _CACHE_MAX:
                self._keys.clear()
            self._keys[digest] = (now, key)
        if key is None or key.revoked_at_ms is not None:
            raise Unauthorized("This proxy API key is unknown or revoked.", code="invalid_api_key")
        return Identity(key.mode, key.customer_id, "api_key", key.id, key.attributes)


def _presented_key(request: web.Request, *, query_key: bool = False) -> str | None:
    """The proxy key a request presents, from whichever of the SDKs' key headers carries one: a bearer token,
    ``x-api-key``, ``api-key``, ``x-goog-api-key`` or (``query_key``) the ``key`` query parameter. A credential
    that is no proxy key is returned (to be refused as such) only when no header carries a proxy key; two
    different proxy keys are refused, since either could be meant."""
    presented: list[str] = []
    for value in request.headers.getall("Authorization", []):
        if value[:7].lower() == "bearer ":
            presented.append(value[7:].strip())
    for name in _KEY_HEADERS:
        presented.extend(value.strip() for value in request.headers.getall(name, []))
    if query_key:
        presented.extend(value.strip() for value in request.query.getall(_KEY_QUERY, []))
    proxy_keys = {token for token in presented if token.startswith("mgk_")}
    if len(proxy_keys) > 1:
        raise Unauthorized("The request presents more than one proxy API key.", code="invalid_api_key")
    if proxy_keys:
        return proxy_keys.pop()
    return presented[0] if presented else None
