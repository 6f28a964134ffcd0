"""Admin API: assets, conversions, grants, consumption order, plans and subscriptions.

* ``GET|POST /admin/v1/assets`` — the assets of this mode (those in settings first, marked ``configured``);
  create one ``{"code", "name", "scale", "value_per_unit"?, "value_currency"?}`` (the same again is a no-op);
* ``GET|POST /admin/v1/conversions`` — allowed conversions; define or replace one
  ``{"from_asset", "to_asset", "rate", "purpose"?}`` (``rate``: major units of ``to_asset`` per major unit of
  ``from_asset``, a decimal string);
* ``POST /admin/v1/customers/{id}/convert`` ``{"from_asset", "to_asset", "amount"|"amount_decimal",
  "idempotency_key"}`` — debit one asset and grant the other at the configured rate, rounded down;
* ``GET|POST /admin/v1/customers/{id}/grants`` — list (``?asset``, ``limit``, ``cursor``) or create a grant
  ``{"asset", "amount"|"amount_decimal", "purpose", "priority", "effective_at_ms", "expires_at_ms", "memo",
  "idempotency_key"}``; ``GET /admin/v1/grants/{id}``; ``POST /admin/v1/grants/{id}/void``;
* ``GET|PUT /admin/v1/customers/{id}/consumption-order`` ``{"order": "priority"|"expiry"|"fifo"}``;
* ``GET|POST /admin/v1/plans``, ``GET /admin/v1/plans/{id}`` — ``{"id", "name", "period": "month"|"week"|
  "days", "period_days"?, "entitlements": [{"asset", "amount"|"amount_decimal", "rollover_cap"?, "priority"?}]}``;
* ``GET|POST /admin/v1/customers/{id}/subscriptions`` ``{"id", "plan_id", "anchor_ms"?}``;
  ``GET /admin/v1/subscriptions/{id}``, ``POST .../cancel``, ``POST .../tick`` (the sweeper ticks too).

Times are epoch milliseconds. Every object is scoped to the admin key's mode.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.config.settings import Settings
from metergate.errors import BadRequest, NotFound
from metergate.http import json_response
from metergate.money import format_minor, parse_major
from metergate.proxy.identify import valid_customer_id
from metergate.wallet.assets import AssetRegistry, converted_amount, parse_decimal
from metergate.wallet.errors import GrantNotFound
from metergate.wallet.grants import ORDERS, PURPOSES
from metergate.wallet.models import Asset, Entitlement, Grant, Mode, Plan, Subscription, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.subscriptions import Subscriptions

MAX_AMOUNT = 10**15
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_PERIOD_DAYS = 3660

# The fields each call takes (see ``only``).
_ASSET_FIELDS = ("code", "name", "scale", "value_per_unit", "value_currency")
_CONVERSION_FIELDS = ("from_asset", "to_asset", "rate", "purpose")
_CONVERT_FIELDS = ("from_asset", "to_asset", "amount", "amount_decimal", "idempotency_key")
_GRANT_FIELDS = ("asset", "amount", "amount_decimal", "purpose", "priority", "effective_at_ms", "expires_at_ms",
                 "memo", "idempotency_key")
_ORDER_FIELDS = ("order",)
_PLAN_FIELDS = ("id", "name", "period", "period_days", "entitlements")
_SUBSCRIBE_FIELDS = ("id", "plan_id", "anchor_ms")


def key_of(request: web.Request, body: dict[str, Any]) -> str:
    key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
    if not isinstance(key, str) or not 1 <= len(key) <= 128:
        raise BadRequest("'idempotency_key' (or the Idempotency-Key header) is required, 1-128 characters.",
                         param="idempotency_key")
    return key


def amount_of(body: dict[str, Any], asset: Asset, *, name: str = "amount", allow_zero: bool = False) -> int:
    """``amount`` in the smallest unit, or ``amount_decimal`` in the major unit (never rounded)."""
    amount = body.get(name)
    decimal_name = f"{name}_decimal"
    if decimal_name in body:
        text = body[decimal_name]
        if not isinstance(text, str):
            raise BadRequest(f"'{decimal_name}' must be a decimal string.", code="invalid_amount", param=decimal_name)
        try:
            amount = parse_major(text, asset.scale)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_amount", param=decimal_name) from None
    low = 0 if allow_zero else 1
    if isinstance(amount, bool) or not isinstance(amount, int) or not low <= amount <= MAX_AMOUNT:
        raise BadRequest(f"'{name}' must be an integer from {low} to {MAX_AMOUNT} in the asset's smallest unit "
                         f"(or give '{decimal_name}').", code="invalid_amount", param=name)
    return amount


def only(body: dict[str, Any], *names: str) -> dict[str, Any]:
    """The body, if it names no field but ``names``: a misspelt or unsupported field (``expires_at`` for
    ``expires_at_ms``, say) is refused rather than silently ignored — a grant must not lose its expiry."""
    for name in body:
        if name not in names:
            raise BadRequest(f"Unknown field {name!r}; this call takes {', '.join(sorted(names))}.",
                             code="unknown_field", param=name)
    return body


def int_field(body: dict[str, Any], name: str, *, low: int, high: int, default: int | None = None,
              required: bool = False) -> int | None:
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"'{name}' is required.", param=name)
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def str_field(body: dict[str, Any], name: str, *, max_len: int, default: str = "") -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise BadRequest(f"'{name}' must be a string of at most {max_len} characters.", param=name)
    return value


def id_field(body: dict[str, Any], name: str = "id") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not valid_customer_id(value):
        raise BadRequest(f"'{name}' must be 1-128 characters: letters, digits, '.', '_', ':', '@', '-'.", param=name)
    return value


class WalletsApi:
    def __init__(self, settings: Settings, store: SqlWalletStore, admin: AdminApi) -> None:
        self._settings = settings
        self._store = store
        self._admin = admin
        self.assets = AssetRegistry(store, settings.assets)
        self.subscriptions = Subscriptions(store)

    def routes(self) -> list[web.RouteDef]:
        c = f"{PREFIX}/customers/{{customer_id}}"
        return [
            web.get(f"{PREFIX}/assets", self.list_assets),
            web.post(f"{PREFIX}/assets", self.create_asset),
            web.get(f"{PREFIX}/conversions", self.list_conversions),
            web.post(f"{PREFIX}/conversions", self.set_conversion),
            web.post(f"{c}/convert", self.convert),
            web.get(f"{c}/grants", self.list_grants),
            web.post(f"{c}/grants", self.create_grant),
            web.get(f"{PREFIX}/grants/{{grant_id}}", self.get_grant),
            web.post(f"{PREFIX}/grants/{{grant_id}}/void", self.void_grant),
            web.get(f"{c}/consumption-order", self.get_order),
            web.put(f"{c}/consumption-order", self.put_order),
            web.get(f"{PREFIX}/plans", self.list_plans),
            web.post(f"{PREFIX}/plans", self.create_plan),
            web.get(f"{PREFIX}/plans/{{plan_id}}", self.get_plan),
            web.get(f"{c}/subscriptions", self.list_subscriptions),
            web.post(f"{c}/subscriptions", self.subscribe),
            web.get(f"{PREFIX}/subscriptions/{{subscription_id}}", self.get_subscription),
            web.post(f"{PREFIX}/subscriptions/{{subscription_id}}/cancel", self.cancel_subscription),
            web.post(f"{PREFIX}/subscriptions/{{subscription_id}}/tick", self.tick_subscription),
        ]

    async def _customer(self, request: web.Request) -> tuple[Mode, str]:
        return await self._admin.customer(request)

    async def _grant_view(self, g: Grant) -> dict[str, Any]:
        asset = await self.assets.get(g.mode, g.asset)
        scale = asset.scale if asset is not None else 0
        return {**asdict(g), "free": g.free, "amount_decimal": format_minor(g.amount, scale),
                "free_decimal": format_minor(g.free, scale)}

    # ------------------------------------------------------------------ assets and conversions

    async def list_assets(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        return json_response({"data": [asdict(a) for a in await self.assets.all(mode)]})

    async def create_asset(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = only(await self._admin.read_json(request), *_ASSET_FIELDS)
        code = body.get("code")
        if not isinstance(code, str):
            raise BadRequest("'code' is required.", code="invalid_asset", param="code")
        scale = int_field(body, "scale", low=0, high=12, required=True)
        assert scale is not None
        value, currency = body.get("value_per_unit"), body.get("value_currency")
        if value is not None and not isinstance(value, str):
            raise BadRequest("'value_per_unit' must be a decimal string.", code="invalid_asset", param="value_per_unit")
        if currency is not None and not isinstance(currency, str):
            raise BadRequest("'value_currency' must be a string.", code="invalid_asset", param="value_currency")
        asset = await self.assets.create(mode, code=code, name=str_field(body, "name", max_len=256), scale=scale,
                                         value_per_unit=value, value_currency=currency)
        return json_response(asdict(asset), status=201)

    async def list_conversions(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        return json_response({"data": [asdict(c) for c in await self.assets.conversions(mode)]})

    async def set_conversion(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = only(await self._admin.read_json(request), *_CONVERSION_FIELDS)
        rate = parse_decimal(body.get("rate"), "rate")
        purpose = body.get("purpose", "paid")
        if purpose not in PURPOSES:
            raise BadRequest(f"'purpose' must be one of {list(PURPOSES)}.", param="purpose")
        conversion = await self.assets.set_conversion(mode, str(body.get("from_asset")), str(body.get("to_asset")),
                                                      rate, purpose)
        return json_response(asdict(conversion), status=201)

    async def convert(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = only(await self._admin.read_json(request), *_CONVERT_FIELDS)
        source = await self.assets.require(mode, body.get("from_asset"))
        target = await self.assets.require(mode, body.get("to_asset"))
        conversion = await self.assets.conversion(mode, source.code, target.code)
        if conversion is None:
            raise BadRequest(f"No conversion from {source.code} to {target.code} is configured.",
                             code="conversion_not_allowed", param="to_asset")
        amount = amount_of(body, source)
        key = key_of(request, body)
        received = converted_amount(amount, from_scale=source.scale, to_scale=target.scale,
                                    rate=parse_decimal(conversion.rate, "rate"))
        if received <= 0:
            raise BadRequest("The amount converts to less than one smallest unit of the target asset.",
                             code="invalid_amount", param="amount")
        entry, paid, got = await self._store.convert(mode, customer_id, source.code, target.code, amount, received,
                                                     idempotency_key=key, purpose=conversion.purpose)
        balances = {source.code: {"available": paid.available}, target.code: {"available": got.available}}
        return json_response({"from_asset": source.code, "to_asset": target.code, "debited": amount,
                              "granted": received, "rate": conversion.rate, "grant_id": entry.grant_id,
                              "entry_seq": entry.seq, "balances": balances}, status=201)

    # ------------------------------------------------------------------ grants

    async def list_grants(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        limit, before = AdminApi._page(request)
        asset = request.query.get("asset")
        grants = await self._store.grants(mode, customer_id, asset=asset, limit=limit, before_seq=before)
        data = [await self._grant_view(g) for g in grants]
        cursor = await self._store.grant_seq(grants[-1].id) if len(grants) == limit else None
        return json_response({"data": data, "next_cursor": cursor})

    async def create_grant(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = only(await self._admin.read_json(request), *_GRANT_FIELDS)
        asset = await self.assets.require(mode, body.get("asset", self._settings.pricing.asset))
        amount = amount_of(body, asset)
        purpose = body.get("purpose", "paid")
        if purpose not in PURPOSES:
            raise BadRequest(f"'purpose' must be one of {list(PURPOSES)}.", param="purpose")
        priority = int_field(body, "priority", low=-1000, high=1000, default=0)
        now = now_ms()
        effective = int_field(body, "effective_at_ms", low=0, high=MAX_TIME_MS)
        expires = int_field(body, "expires_at_ms", low=0, high=MAX_TIME_MS)
        if expires is not None and expires <= max(now, effective or 0):
            raise BadRequest("'expires_at_ms' must be in the future and after 'effective_at_ms'.",
                             param="expires_at_ms")
        entry = await self._store.credit(mode, customer_id, asset.code, amount, idempotency_key=key_of(request, body),
                                         memo=str_field(body, "memo", max_len=500), purpose=purpose,
                                         priority=priority or 0, effective_at_ms=effective, expires_at_ms=expires)
        assert entry.grant_id is not None
        grant = await self._store.get_grant(mode, entry.grant_id)
        assert grant is not None
        return json_response(await self._grant_view(grant), status=201)

    async def get_grant(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        grant = await self._store.get_grant(mode, request.match_info["grant_id"])
        if grant is None:
            raise GrantNotFound(request.match_info["grant_id"])
        return json_response(await self._grant_view(grant))

    async def void_grant(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        grant = await self._store.void_grant(mode, request.match_info["grant_id"])
        if grant is None:
            raise GrantNotFound(request.match_info["grant_id"])
        return json_response(await self._grant_view(grant))

    async def get_order(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        order = await self._store.consumption_order(mode, customer_id)
        return json_response({"customer_id": customer_id, "order": order, "orders": ORDERS})

    async def put_order(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = only(await self._admin.read_json(request), *_ORDER_FIELDS)
        order = body.get("order")
        if order not in ORDERS:
            raise BadRequest(f"'order' must be one of {sorted(ORDERS)}.", param="order")
        await self._store.set_consumption_order(mode, customer_id, order)
        return json_response({"customer_id": customer_id, "order": order, "orders": ORDERS})

    # ------------------------------------------------------------------ plans and subscriptions

    def _plan_view(self, plan: Plan) -> dict[str, Any]:
        return {**asdict(plan), "entitlements": [asdict(e) for e in plan.entitlements]}

    async def list_plans(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        return json_response({"data": [self._plan_view(p) for p in await self.subscriptions.plans(mode)]})

    async def create_plan(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = only(await self._admin.read_json(request), *_PLAN_FIELDS)
        plan_id = id_field(body)
        period = body.get("period")
        if period not in ("month", "week", "days"):
            raise BadRequest("'period' must be \"month\", \"week\" or \"days\".", param="period")
        days = int_field(body, "period_days", low=1, high=MAX_PERIOD_DAYS, required=period == "days")
        if period != "days" and days is not None:
            raise BadRequest("'period_days' goes only with \"period\": \"days\".", param="period_days")
        raw = body.get("entitlements")
        if not isinstance(raw, list) or not 1 <= len(raw) <= 20 or not all(isinstance(e, dict) for e in raw):
            raise BadRequest("'entitlements' must be a list of 1-20 objects.", param="entitlements")
        entitlements: list[Entitlement] = []
        for e in raw:
            asset = await self.assets.require(mode, e.get("asset"))
            cap = int_field(e, "rollover_cap", low=1, high=MAX_AMOUNT)
            priority = int_field(e, "priority", low=-1000, high=1000, default=100)
            entitlements.append(Entitlement(asset.code, amount_of(e, asset), cap, priority or 0))
        if len({e.asset for e in entitlements}) != len(entitlements):
            raise BadRequest("One entitlement per asset.", param="entitlements")
        plan = await self.subscriptions.create_plan(mode, plan_id, name=str_field(body, "name", max_len=256),
                                                    period=period, period_days=days,
                                                    entitlements=tuple(entitlements))
        return json_response(self._plan_view(plan), status=201)

    async def get_plan(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        plan = await self.subscriptions.get_plan(mode, request.match_info["plan_id"])
        if plan is None:
            raise NotFound("No such plan in this mode.", code="plan_not_found")
        return json_response(self._plan_view(plan))

    async def list_subscriptions(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        found = await self.subscriptions.of_customer(mode, customer_id)
        return json_response({"data": [asdict(s) for s in found]})

    async def subscribe(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = only(await self._admin.read_json(request), *_SUBSCRIBE_FIELDS)
        subscription_id = id_field(body)
        plan_id = id_field(body, "plan_id")
        anchor = int_field(body, "anchor_ms", low=0, high=MAX_TIME_MS)
        if anchor is not None and anchor > now_ms():
            raise BadRequest("'anchor_ms' cannot be in the future.", param="anchor_ms")
        sub = await self.subscriptions.subscribe(mode, subscription_id, customer_id=customer_id, plan_id=plan_id,
                                                 anchor_ms=anchor)
        return json_response(asdict(sub), status=201)

    async def _subscription(self, request: web.Request) -> tuple[Mode, Subscription]:
        mode = self._admin.authenticate(request)
        sub = await self.subscriptions.get(mode, request.match_info["subscription_id"])
        if sub is None:
            raise NotFound("No such subscription in this mode.", code="subscription_not_found")
        return mode, sub

    async def get_subscription(self, request: web.Request) -> web.Response:
        _mode, sub = await self._subscription(request)
        return json_response(asdict(sub))

    async def cancel_subscription(self, request: web.Request) -> web.Response:
        mode, sub = await self._subscription(request)
        canceled = await self.subscriptions.cancel(mode, sub.id)
        return json_response(asdict(canceled or sub))

    async def tick_subscription(self, request: web.Request) -> web.Response:
        mode, sub = await self._subscription(request)
        granted = await self.subscriptions.tick(mode, sub.id, now_ms=now_ms())
        after = await self.subscriptions.get(mode, sub.id)
        return json_response({"periods_granted": granted, "subscription": asdict(after or sub)})
