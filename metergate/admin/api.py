"""Admin API v1: customers, proxy API keys, credits, balances, ledger and usage, as JSON over HTTP.

Authenticated by a bearer admin key whose prefix is its mode: ``mg_test_...`` sees and changes only
test-mode objects, ``mg_live_...`` only live ones. Amounts are integers in the asset's smallest unit
(``amount``), shown beside a decimal string (``amount_decimal``) for people. Lists are newest first
and paginated by an opaque ``next_cursor``.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from dataclasses import asdict
from typing import Any

from aiohttp import web

from metergate.admin import validation
from metergate.admin.views import BalanceView
from metergate.config.settings import Settings
from metergate.errors import BadRequest, NotFound, Unauthorized
from metergate.http import json_response
from metergate.money import format_minor, parse_major
from metergate.portal.links import ACCESS, BILLING_ADMIN, LinkSigner
from metergate.proxy.identify import hash_key, new_key, valid_customer_id
from metergate.wallet.errors import CustomerNotFound, UnknownAsset
from metergate.wallet.models import Balance, LedgerEntry, Mode, UsageRecord
from metergate.wallet.store import WalletStore

PREFIX = "/admin/v1"
_MAX_PAGE = 200
_DECIMAL = re.compile(r"[0-9]{1,16}(\.[0-9]{1,18})?")  # plain notation: no sign, no exponent
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
_ATTRIBUTE_VALUE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
# Attributes every request has of its own; a key cannot set them (``feature`` it can).
_RESERVED_ATTRIBUTES = frozenset({"type", "model", "endpoint", "route", "provider", "customer", "path"})
_ATTRIBUTES_MAX = 16


class AdminApi:
    def __init__(self, settings: Settings, store: WalletStore, signer: LinkSigner) -> None:
        self._settings = settings
        self._store = store
        self._signer = signer
        self._keys = [(k.get_secret_value(), k.get_secret_value()[3:7]) for k in settings.admin_keys]
        self._scales = {asset.code: asset.scale for asset in settings.assets}
        from metergate.admin.openapi import document

        # Every admin request passes this before its handler (metergate/admin/validation.py).
        self.validation = validation.middleware(document(), self._mode, validation.AuthThrottle(
            settings.admin_auth_max_failures, settings.admin_auth_window_s, settings.admin_auth_tracked_addresses))

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/openapi.json", self.openapi),
            web.post(f"{PREFIX}/customers", self.create_customer),
            web.get(f"{PREFIX}/customers", self.list_customers),
            web.get(f"{PREFIX}/customers/{{customer_id}}", self.get_customer),
            web.post(f"{PREFIX}/customers/{{customer_id}}/api-keys", self.create_api_key),
            web.delete(f"{PREFIX}/api-keys/{{key_id}}", self.revoke_api_key),
            web.patch(f"{PREFIX}/api-keys/{{key_id}}", self.update_api_key),
            web.post(f"{PREFIX}/customers/{{customer_id}}/credits", self.credit),
            web.get(f"{PREFIX}/customers/{{customer_id}}/balance", self.balance),
            web.get(f"{PREFIX}/customers/{{customer_id}}/ledger", self.ledger),
            web.get(f"{PREFIX}/customers/{{customer_id}}/usage", self.usage),
            web.post(f"{PREFIX}/customers/{{customer_id}}/portal-link", self.portal_link),
        ]

    # ------------------------------------------------------------------ plumbing

    def authenticate(self, request: web.Request) -> Mode:
        """The mode of the request's admin key (401 without a valid one); for the other admin modules."""
        return self._mode(request)

    async def read_json(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object body (400 otherwise); for the other admin modules."""
        return await self._body(request)

    def _mode(self, request: web.Request) -> Mode:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        for key, mode in self._keys:
            if token and hmac.compare_digest(token.encode(), key.encode()):
                return mode  # type: ignore[return-value]
        raise Unauthorized("A valid admin key is required: 'Authorization: Bearer mg_test_...' or "
                           "mg_live_....", code="invalid_admin_key")

    async def customer(self, request: web.Request, customer_id: str | None = None) -> tuple[Mode, str]:
        """The request's mode and the customer its path names (or ``customer_id``); 404 when that customer
        does not exist in the key's mode. For every admin module."""
        mode = self._mode(request)
        if customer_id is None:
            customer_id = request.match_info["customer_id"]
        if not valid_customer_id(customer_id) or await self._store.get_customer(mode, customer_id) is None:
            raise CustomerNotFound(customer_id)
        return mode, customer_id

    _customer = customer

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise BadRequest("Send a JSON object with Content-Type: application/json.", code="invalid_json")
        try:
            payload = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise BadRequest("The request body must be a JSON object.", code="invalid_json")
        return validation.body_of(request, payload)

    @staticmethod
    def _limit(request: web.Request) -> int:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise BadRequest("'limit' must be an integer.", code="invalid_request", param="limit") from None
        if not 1 <= limit <= _MAX_PAGE:
            raise BadRequest(f"'limit' must be between 1 and {_MAX_PAGE}.", code="invalid_request",
                             param="limit")
        return limit

    @classmethod
    def _page(cls, request: web.Request) -> tuple[int, int | None]:
        """``limit`` and a sequence-number ``cursor`` (ledger and usage lists)."""
        limit = cls._limit(request)
        try:
            before = int(request.query["cursor"]) if "cursor" in request.query else None
        except ValueError:
            raise BadRequest("'cursor' must be a next_cursor value from a previous page.",
                             code="invalid_request", param="cursor") from None
        return limit, before

    def _money(self, asset: str, amount: int) -> str:
        return format_minor(amount, self._scales.get(asset, 0))

    def _balance(self, b: Balance) -> BalanceView:
        return BalanceView(asset=b.asset, available=b.available, available_decimal=self._money(b.asset, b.available),
                           posted=b.posted, pending=b.debits_pending, credits_posted=b.credits_posted,
                           debits_posted=b.debits_posted)

    # ------------------------------------------------------------------ handlers

    async def openapi(self, _request: web.Request) -> web.Response:
        from metergate.admin.openapi import document

        return json_response(document())

    async def create_customer(self, request: web.Request) -> web.Response:
        mode = self._mode(request)
        body = await self._body(request)
        customer_id, name = body.get("id"), body.get("name", "")
        if not isinstance(customer_id, str) or not valid_customer_id(customer_id):
            raise BadRequest("'id' must be 1-128 characters: letters, digits, '.', '_', ':', '@', '-'.",
                             code="invalid_customer", param="id")
        if not isinstance(name, str) or len(name) > 256:
            raise BadRequest("'name' must be a string of at most 256 characters.", param="name")
        customer = await self._store.create_customer(mode, customer_id, name)
        return json_response(asdict(customer), status=201)

    async def list_customers(self, request: web.Request) -> web.Response:
        mode = self._mode(request)
        limit = self._limit(request)  # the cursor here is a customer id, not a sequence number
        after = request.query.get("cursor")
        customers = await self._store.list_customers(mode, limit=limit, after=after)
        return json_response({"data": [asdict(c) for c in customers],
                              "next_cursor": customers[-1].id if len(customers) == limit else None})

    async def get_customer(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        customer = await self._store.get_customer(mode, customer_id)
        balances = await self._store.balances(mode, customer_id)
        return json_response({**asdict(customer), "balances": [self._balance(b) for b in balances]})  # type: ignore[arg-type]

    async def create_api_key(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._body(request) if request.body_exists else {}
        attributes = _attributes(body.get("attributes", {}))
        secret = new_key(mode)
        key = await self._store.create_api_key(mode, customer_id, key_id="key_" + uuid.uuid4().hex[:20],
                                               key_hash=hash_key(secret), prefix=secret[:13], attributes=attributes)
        return json_response({**asdict(key), "key": secret}, status=201)

    async def update_api_key(self, request: web.Request) -> web.Response:
        """Replace a key's pricing attributes; its requests are priced by them within ``key_cache_ttl_s``."""
        mode = self._mode(request)
        body = await self._body(request)
        if "attributes" not in body:
            raise BadRequest("Send {\"attributes\": {...}}: the key's pricing attributes, which replace its current "
                             "ones.", code="invalid_request", param="attributes")
        key = await self._store.set_api_key_attributes(mode, request.match_info["key_id"],
                                                       _attributes(body["attributes"]))
        if key is None:
            raise NotFound("No such API key in this mode.", code="not_found", param="key_id")
        return json_response(asdict(key))

    async def revoke_api_key(self, request: web.Request) -> web.Response:
        mode = self._mode(request)
        key = await self._store.revoke_api_key(mode, request.match_info["key_id"])
        if key is None:
            raise NotFound("No such API key in this mode.", code="not_found", param="key_id")
        return json_response(asdict(key))

    async def credit(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._body(request)
        asset = body.get("asset", self._settings.pricing.asset)
        if asset not in self._scales:
            raise UnknownAsset(str(asset))
        key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise BadRequest("'idempotency_key' (or the Idempotency-Key header) is required, "
                             "1-128 characters.", code="invalid_request", param="idempotency_key")
        amount = body.get("amount")
        if "amount_decimal" in body:
            text = body["amount_decimal"]
            if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
                raise BadRequest("'amount_decimal' must be a plain decimal string such as \"12.50\".",
                                 code="invalid_amount", param="amount_decimal")
            try:
                amount = parse_major(text, self._scales[asset])
            except ValueError as exc:
                raise BadRequest(str(exc), code="invalid_amount", param="amount_decimal") from None
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= 10**15:
            raise BadRequest("'amount' must be a positive integer in the asset's smallest unit "
                             "(or give 'amount_decimal').", code="invalid_amount", param="amount")
        memo = body.get("memo", "")
        if not isinstance(memo, str) or len(memo) > 500:
            raise BadRequest("'memo' must be a string of at most 500 characters.", param="memo")
        entry = await self._store.credit(mode, customer_id, asset, amount, idempotency_key=key, memo=memo)
        balance = await self._store.balance(mode, customer_id, asset)
        return json_response({"entry": self._entry(entry), "balance": self._balance(balance)}, status=201)

    async def balance(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        balances = await self._store.balances(mode, customer_id)
        return json_response({"customer_id": customer_id, "balances": [self._balance(b) for b in balances]})

    def _entry(self, e: LedgerEntry) -> dict[str, Any]:
        return {**asdict(e), "amount_decimal": self._money(e.asset, e.amount)}

    async def ledger(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        limit, before = self._page(request)
        entries = await self._store.ledger(mode, customer_id, limit=limit, before=before)
        return json_response({"data": [self._entry(e) for e in entries],
                              "next_cursor": entries[-1].seq if len(entries) == limit else None})

    def _usage(self, u: UsageRecord) -> dict[str, Any]:
        return {**asdict(u), "charged_decimal": self._money(u.asset, u.charged_amount)}

    async def usage(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        limit, before = self._page(request)
        rows = await self._store.usage(mode, customer_id, limit=limit, before=before)
        return json_response({"data": [self._usage(u) for _, u in rows],
                              "next_cursor": rows[-1][0] if len(rows) == limit else None})

    async def portal_link(self, request: web.Request) -> web.Response:
        """A signed portal link; by default one for billing administration (auto top-up, spend caps, payment
        methods as well as what a 402's link shows), for the operator's application to hand to its signed-in
        customer. ``{"access": "view_topup"}`` asks for the 402's kind instead. No body, or an empty one, is
        the default."""
        mode, customer_id = await self._customer(request)
        access = BILLING_ADMIN
        if request.can_read_body:
            body = await self._body(request)
            requested = body.get("access", BILLING_ADMIN)
            found = next((a for a in ACCESS if a == requested), None)
            if found is None:
                raise BadRequest(f"'access' must be one of {', '.join(ACCESS)}.", code="invalid_request",
                                 param="access")
            access = found
        return json_response({"url": self._signer.url(mode, customer_id, access=access), "access": access,
                              "expires_in_s": self._signer.ttl_for(access)})


def _attributes(value: object) -> dict[str, str]:
    """A key's pricing attributes from an admin request: at most 16, each a free attribute name (``feature``
    included, the request's own ``model``, ``route``... excluded) with a string of 1-128 characters."""
    if not isinstance(value, dict) or len(value) > _ATTRIBUTES_MAX:
        raise BadRequest(f"'attributes' must be an object of at most {_ATTRIBUTES_MAX} entries.",
                         code="invalid_request", param="attributes")
    for name, item in value.items():
        if name in _RESERVED_ATTRIBUTES or not _ATTRIBUTE_NAME.fullmatch(name):
            raise BadRequest(f"attributes: {name[:64]!r} is not an attribute name a key can set.",
                             code="invalid_request", param="attributes")
        if not isinstance(item, str) or not _ATTRIBUTE_VALUE.fullmatch(item):
            raise BadRequest(f"attributes.{name}: the value must be a string of 1-128 characters without "
                             "control characters.", code="invalid_request", param="attributes")
    return dict(value)
