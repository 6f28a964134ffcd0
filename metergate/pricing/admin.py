"""Admin API: price versions, quotes, the dry-run simulator and usage events (all scoped to the key's mode).

* ``POST /admin/v1/price-versions`` ``{"rules": [...], "note"}`` — validate a rule set and store it as a draft
  (201); under an ``Idempotency-Key`` header (or ``idempotency_key``), once: the same key again answers the
  first draft (200, published or not), the same key with other rules 409 ``idempotency_conflict``; an invalid
  one is refused with 422, a stable ``code`` (``duplicate_rule``, ``ambiguous_rules``, ``unknown_asset``,
  ``invalid_tiers``, ``negative_rate``, ``invalid_rule``) and the rule path in ``param``;
* ``POST /admin/v1/price-versions/validate`` ``{"rules": [...]}`` — the same validation, nothing stored;
* ``GET /admin/v1/price-versions?limit&cursor`` — versions, newest first, and the one in force now;
* ``GET /admin/v1/price-versions/{id}`` — one version with its rules (``config``: the configuration's);
* ``POST /admin/v1/price-versions/{id}/publish`` ``{"effective_at"}`` — publish a draft from ``effective_at``
  (ISO 8601 or epoch ms, default now, not in the past); published versions never change;
* ``POST /admin/v1/price-versions/{id}/simulate`` ``{"from", "to"}`` — re-price recorded usage
  (:mod:`metergate.pricing.simulate`); ``POST /admin/v1/price-versions/simulate`` ``{"rules", "from", "to"}``
  the same for a rule set that is validated but not stored (its ``version`` is ``"draft"``);
* ``POST /admin/v1/quote`` — price a hypothetical request or event for a customer without touching the wallet;
* ``POST /admin/v1/events`` — ingest usage events (:mod:`metergate.pricing.events`).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.admin.reports import parse_time
from metergate.config.settings import Settings
from metergate.errors import BadRequest, NotFound
from metergate.http import json_response
from metergate.metering.usage import Usage
from metergate.money import COST_SCALE, format_minor, to_minor
from metergate.payments.spendcaps import SpendCapGuard
from metergate.pricing.engine import CostUnknown, request_quantities
from metergate.pricing.events import EventIngest, parse_batch
from metergate.pricing.rules import RuleSet, parse_rule_set
from metergate.pricing.service import PricingService
from metergate.pricing.simulate import simulate
from metergate.pricing.store import PricingStore
from metergate.pricing.versions import CONFIG_VERSION_ID, PriceVersion
from metergate.proxy.adapters.base import adapter_for
from metergate.wallet.errors import CustomerNotFound
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.store import WalletStore

UNSTORED_VERSION_ID = "draft"  # names the rule set of a simulation that is not stored
_PAST_TOLERANCE_MS = 1000  # clocks of the operator and the server may differ a little
_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")
_QUOTE_KEYS = {"customer_id", "type", "model", "endpoint", "route", "feature", "attributes", "usage", "payload",
               "quantities", "cost_usd", "version", "at"}
_USD = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9})?$")


class PricingApi:
    def __init__(self, settings: Settings, pricing: PricingService, store: PricingStore, wallet: WalletStore,
                 admin: AdminApi, *, spend_caps: SpendCapGuard | None = None) -> None:
        self._settings = settings
        self._pricing = pricing
        self._store = store
        self._wallet = wallet
        self._admin = admin
        self._providers = {r.prefix: r.provider_id for r in settings.routes}
        self._routes = {r.prefix: r for r in settings.routes}
        self._events = EventIngest(pricing, wallet, hold_ttl_s=settings.hold_ttl_s, spend_caps=spend_caps)

    def routes(self) -> list[web.RouteDef]:
        versions = f"{PREFIX}/price-versions"
        return [
            web.post(versions, self.create),
            web.post(f"{versions}/validate", self.validate),
            web.post(f"{versions}/simulate", self.simulate_rules),
            web.get(versions, self.list_versions),
            web.get(f"{versions}/{{version_id}}", self.get_version),
            web.post(f"{versions}/{{version_id}}/publish", self.publish),
            web.post(f"{versions}/{{version_id}}/simulate", self.simulate),
            web.post(f"{PREFIX}/quote", self.quote),
            web.post(f"{PREFIX}/events", self.events),
        ]

    # ---------------------------------------------------------------- versions

    async def _version(self, mode: Mode, version_id: str) -> PriceVersion:
        if version_id == CONFIG_VERSION_ID:
            return self._pricing.config
        version = await self._store.get(mode, version_id)
        if version is None:
            raise NotFound(f"No price version {version_id!r} in this mode.", code="not_found", param="version_id")
        return version

    async def _rules(self, mode: Mode, body: dict[str, Any]) -> RuleSet:
        return parse_rule_set({"rules": body.get("rules")}, set(await self._pricing.asset_scales(mode)))

    async def create(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        unknown = sorted(set(body) - {"rules", "note", "idempotency_key"})
        if unknown:
            raise BadRequest(f"Unknown field {unknown[0]!r}.", param=unknown[0])
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > 500:
            raise BadRequest("'note' must be a string of at most 500 characters.", param="note")
        key = body.get("idempotency_key", request.headers.get("Idempotency-Key"))
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 128):
            raise BadRequest("'idempotency_key' (or the Idempotency-Key header) must be 1-128 characters.",
                             param="idempotency_key")
        version, created = await self._store.create_draft(mode, await self._rules(mode, body), note, key)
        return json_response(version.as_json(), status=201 if created else 200)

    async def validate(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        rules = await self._rules(mode, await self._admin.read_json(request))
        return json_response({"valid": True, "rules": rules.source["rules"]})

    async def list_versions(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        limit = _limit(request)
        before = parse_time(request.query["cursor"], "cursor") if "cursor" in request.query else None
        versions = await self._store.list_versions(mode, limit=limit, before_ms=before)
        return json_response({"data": [v.summary() for v in versions],
                              "in_force": self._pricing.version_at(mode, now_ms()).summary(),
                              "next_cursor": versions[-1].created_at_ms if len(versions) == limit else None})

    async def get_version(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        version = await self._version(mode, request.match_info["version_id"])
        return json_response(version.as_json())

    async def publish(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        version_id = request.match_info["version_id"]
        existing = await self._version(mode, version_id)
        if existing.mode is None:
            raise BadRequest("The configuration's version is always in force where nothing is published.",
                             code="already_published", param="version_id")
        now = now_ms()
        effective_at = now
        if body.get("effective_at") is not None:
            value = body["effective_at"]
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise BadRequest("'effective_at' is an ISO 8601 time or epoch milliseconds.", param="effective_at")
            effective_at = parse_time(str(value), "effective_at")
        elif existing.effective_at_ms is not None:
            effective_at = existing.effective_at_ms  # publishing a published version again: idempotent
        if existing.state == "draft" and effective_at < now - _PAST_TOLERANCE_MS:
            raise BadRequest("'effective_at' is in the past: requests already priced are never re-priced.",
                             code="invalid_effective_at", param="effective_at")
        version = await self._store.publish(mode, version_id, effective_at)
        self._pricing.apply(version)
        return json_response(version.as_json())

    async def simulate(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        version = await self._version(mode, request.match_info["version_id"])
        return json_response(await self._simulate(mode, version, body))

    async def simulate_rules(self, request: web.Request) -> web.Response:
        """Re-price recorded usage under a rule set that is not stored (``metergate prices diff``'s draft):
        validated as a draft is, then simulated as a draft would be; nothing is written."""
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        unknown = sorted(set(body) - {"rules", "from", "to"})
        if unknown:
            raise BadRequest(f"Unknown field {unknown[0]!r}.", param=unknown[0])
        rules = await self._rules(mode, body)
        draft = PriceVersion(UNSTORED_VERSION_ID, mode, "draft", rules, "", now_ms())
        return json_response(await self._simulate(mode, draft, body))

    async def _simulate(self, mode: Mode, version: PriceVersion, body: dict[str, Any]) -> dict[str, Any]:
        for name in ("from", "to"):
            if not isinstance(body.get(name), int | str) or isinstance(body.get(name), bool):
                raise BadRequest(f"'{name}' is required: an ISO 8601 time or epoch milliseconds.", param=name)
        from_ms, to_ms = parse_time(str(body["from"]), "from"), parse_time(str(body["to"]), "to")
        if from_ms >= to_ms:
            raise BadRequest("'from' must be before 'to'.", param="from")
        scales = await self._pricing.asset_scales(mode)
        return await simulate(self._store, version, mode, from_ms=from_ms, to_ms=to_ms, scales=scales,
                              providers=self._providers)

    # ---------------------------------------------------------------- quote and events

    async def quote(self, request: web.Request) -> web.Response:
        """Price a hypothetical request or event: reads versions, rules and tier counters, writes nothing."""
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        await self._pricing.refresh()  # as the events API does: what any replica published is quoted
        unknown = sorted(set(body) - _QUOTE_KEYS)
        if unknown:
            raise BadRequest(f"Unknown field {unknown[0]!r}.", param=unknown[0])
        customer_id = body.get("customer_id")
        if not isinstance(customer_id, str) or await self._wallet.get_customer(mode, customer_id) is None:
            raise CustomerNotFound(str(customer_id))
        at = parse_time(str(body["at"]), "at") if body.get("at") is not None else now_ms()
        version = await self._version(mode, _text(body, "version")) if body.get("version") is not None else None
        kind = _text(body, "type") if "type" in body else "request"
        attributes = body.get("attributes", {})
        if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
            raise BadRequest("'attributes' must be an object of strings.", param="attributes")
        attributes = {**attributes, "type": kind}
        cost_nanos = None
        if body.get("cost_usd") is not None:
            if not isinstance(body["cost_usd"], str) or not _USD.match(body["cost_usd"]):
                raise BadRequest("'cost_usd' is a decimal string with at most 9 places.", param="cost_usd")
            cost_nanos = to_minor(Decimal(body["cost_usd"]), COST_SCALE)
        usage: Usage | None = None
        if kind == "request":
            model, estimated = self._quote_request(body, attributes)
            usage = estimated
            quantities = request_quantities(usage)
        else:
            try:
                event = parse_batch({"events": [{"id": "quote", "customer_id": customer_id, "type": kind,
                                                 "quantities": body.get("quantities")}]}, now=at)[0]
            except BadRequest as bad:  # name the quote's own field, not the batch's
                bad.param = (bad.param or "").replace("events[0].", "") or None
                raise
            quantities = event.quantities
            model = ""
        resolved = await self._pricing.resolve(mode, customer_id, attributes, at_ms=at, version=version)
        if resolved is None:
            raise BadRequest("No price rule matches this request.", code="no_matching_rule", param="attributes")
        if cost_nanos is None and usage is not None and resolved.rule.markup is not None:
            route = attributes.get("route", "")
            cost_nanos = self._pricing.costs.cost(self._providers.get(route, attributes.get("provider", "openai")),
                                                  model, usage).nanos
        try:
            price = resolved.price(quantities, cost_nanos)
        except CostUnknown:
            raise BadRequest("The matching rule is cost-plus and the provider cost is unknown; give 'cost_usd'.",
                             code="unknown_cost", param="cost_usd") from None
        return json_response({
            "customer_id": customer_id, "asset": price.asset, "amount": price.amount,
            "amount_decimal": format_minor(price.amount, resolved.scale),
            "quantities": {k: str(v) for k, v in quantities.items()}, "attributes": resolved.attributes,
            **resolved.as_detail(), "price": price.as_detail()})

    def _quote_request(self, body: dict[str, Any], attributes: dict[str, str]) -> tuple[str, Usage]:
        """The model and usage of a hypothetical proxy request: given token counts, or estimated from a payload
        (``{"payload": {...chat request...}}``: its prompt tokens and maximum output, as the proxy estimates)."""
        payload = body.get("payload")
        if payload is not None:
            if not isinstance(payload, dict):
                raise BadRequest("'payload' must be a request body object.", param="payload")
            endpoint = _text(body, "endpoint") if "endpoint" in body else "chat.completions"
            route = self._routes.get(attributes.get("route", ""))
            # An azure route's quote names a deployment as the model.
            adapter = (adapter_for(route.provider, deployments=route.deployments, media=self._settings.media,
                                   bedrock=route.bedrock)
                       if route is not None else adapter_for("openai", media=self._settings.media))
            prepared = adapter.prepare(endpoint, b"", payload, self._settings.default_max_output_tokens)
            model, endpoint = prepared.model, prepared.endpoint
            usage = Usage(prepared.input_tokens, prepared.max_output_tokens, source="estimated")
        else:
            model = _text(body, "model")
            endpoint = _text(body, "endpoint") if "endpoint" in body else "chat.completions"
            raw = body.get("usage", {})
            if not isinstance(raw, dict) or set(raw) - set(_TOKEN_FIELDS):
                raise BadRequest(f"'usage' is an object of {', '.join(_TOKEN_FIELDS)}.", param="usage")
            counts = {}
            for name in _TOKEN_FIELDS:
                value = raw.get(name, 0)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**10:
                    raise BadRequest(f"'usage.{name}' must be a non-negative integer.", param=f"usage.{name}")
                counts[name] = value
            # Quoted counts are disjoint, like the engine's quantities: input_tokens are the uncached ones.
            try:
                usage = Usage(input_tokens=counts["input_tokens"] + counts["cached_input_tokens"]
                              + counts["cache_write_tokens"],
                              output_tokens=counts["output_tokens"] + counts["reasoning_tokens"],
                              cached_input_tokens=counts["cached_input_tokens"],
                              cache_write_tokens=counts["cache_write_tokens"],
                              reasoning_tokens=counts["reasoning_tokens"], source="estimated")
            except ValueError as exc:  # pragma: no cover - the sums above keep the subsets within the totals
                raise BadRequest(str(exc), param="usage") from None
        attributes.setdefault("model", model)
        attributes.setdefault("endpoint", endpoint)
        if "route" in body:
            attributes["route"] = _text(body, "route")
            attributes.setdefault("provider", self._providers.get(attributes["route"], ""))
        if "feature" in body:
            attributes["feature"] = _text(body, "feature")
        return model, usage

    async def events(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        body = await self._admin.read_json(request)
        # The versions another replica published since this one's last refresh (one read of new ids): an
        # operator who publishes through one replica and then posts events through another is priced by
        # what they published, not refused for a rule this replica has not loaded yet.
        await self._pricing.refresh()
        return json_response(await self._events.ingest(mode, body))


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise BadRequest(f"'{name}' must be a string of 1-128 characters.", param=name)
    return value


def _limit(request: web.Request) -> int:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise BadRequest("'limit' must be an integer.", param="limit") from None
    if not 1 <= limit <= 200:
        raise BadRequest("'limit' must be between 1 and 200.", param="limit")
    return limit
