"""Usage events that do not pass through the proxy, priced by the same engine and debited at once.

``POST /admin/v1/events`` takes ``{"events": [...]}`` (1-500), each::

    {"id": "evt_123", "customer_id": "acme", "type": "gpu.job",          # "meter" is accepted for "type"
     "quantity": "1.5"  or  "quantities": {"gpu_seconds": "90", "jobs": 1},
     "attributes": {"region": "eu"}, "timestamp": "2026-01-31T12:00:00Z",  # or epoch ms; default now
     "cost_usd": "0.012"}                                                 # provider cost, for cost-plus rules

A single ``quantity`` is the quantity named ``quantity``. Quantities are decimals with at most six places.
The rule is chosen from the attributes plus ``type`` and ``customer``, under the version in force at the
event's ``timestamp`` (at most 5 minutes ahead, at most 35 days back).

**Exactly once.** An event's id (unique per mode) determines its hold id, and the hold id its ledger keys and
usage record id: the event is reserved, then captured, through the wallet's own ``reserve`` and ``settle``,
whose unique indexes make a second capture impossible — whether the retry comes later or concurrently. A
retry finding the event captured answers ``duplicate`` (with the first submission's charge: the first content
sent under an id is the one counted); finding its hold still pending, or expired, because the first attempt
died between the two steps, it captures that hold at the amount first priced, so the event is counted once,
never zero times (a hold that expired meanwhile is captured from what the wallet holds then; what it cannot
cover is recorded as written off, as for any settlement). A batch is processed in order, one event at a time.

**No overspend.** The hold is an atomic check-and-reserve: an event the wallet cannot cover is
``rejected`` with ``insufficient_funds`` and changes nothing; sending it again after a top-up counts it.
The customer's spend caps apply as to proxy requests. Per-event outcomes: ``accepted``, ``duplicate``, or
``rejected`` with a code (``unknown_customer``, ``no_matching_rule``, ``unknown_cost``, ``insufficient_funds``,
``spend_cap_reached``, ``storage_error`` — retry the event). A
malformed batch (bad JSON, a field of the wrong type) is refused whole with 400 and the offending path in
``param``, before anything is applied.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from metergate.errors import BadRequest, MetergateError
from metergate.money import COST_SCALE, format_minor, to_minor
from metergate.payments.spendcaps import SpendCapGuard
from metergate.pricing.engine import CostUnknown
from metergate.pricing.service import PricingService, Resolved
from metergate.proxy.identify import valid_customer_id
from metergate.wallet.errors import IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import Hold, Mode, UsageRecord, now_ms
from metergate.wallet.store import WalletStore

log = logging.getLogger(__name__)
MAX_BATCH = 500
MAX_FUTURE_MS = 5 * 60_000
MAX_PAST_MS = 35 * 86_400_000
_EVENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
_ATTRIBUTE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_QUANTITY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_AMOUNT = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")
_USD = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9})?$")
_KEYS = {"id", "customer_id", "type", "meter", "quantity", "quantities", "attributes", "timestamp", "cost_usd"}


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    customer_id: str
    type: str
    quantities: dict[str, Decimal]
    attributes: dict[str, str]
    timestamp_ms: int
    cost_nanos: int | None


def event_hold_id(mode: Mode, event_id: str) -> str:
    """The hold (and usage record) id of an event: a digest, since hold ids are global and event ids per mode."""
    return "ev_" + hashlib.sha256(f"{mode}\n{event_id}".encode()).hexdigest()[:48]


def parse_batch(body: dict[str, Any], *, now: int) -> list[Event]:
    """Validate a whole batch before anything is applied; 400 naming the first offending path."""
    raw = body.get("events")
    if set(body) - {"events"} or not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCH:
        raise BadRequest(f"Send {{\"events\": [...]}} with 1 to {MAX_BATCH} events.", param="events")
    events = [_event(item, f"events[{i}]", now) for i, item in enumerate(raw)]
    return events


def _event(item: Any, path: str, now: int) -> Event:
    from metergate.admin.reports import parse_time

    if not isinstance(item, dict):
        raise BadRequest("An event must be an object.", param=path)
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise BadRequest(f"Unknown event field {unknown[0]!r}.", param=f"{path}.{unknown[0]}")
    event_id = item.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise BadRequest("'id' must be 1-128 printable ASCII characters without spaces.", param=f"{path}.id")
    customer_id = item.get("customer_id")
    if not isinstance(customer_id, str) or not valid_customer_id(customer_id):
        raise BadRequest("'customer_id' is not a valid customer id.", code="invalid_customer",
                         param=f"{path}.customer_id")
    kind = item.get("type", item.get("meter"))
    if not isinstance(kind, str) or not _TYPE.match(kind):
        raise BadRequest("'type' must be 1-128 letters, digits, '_', '.', ':', '/' or '-'.", param=f"{path}.type")
    if ("quantity" in item) == ("quantities" in item):
        raise BadRequest("Give either 'quantity' or 'quantities'.", param=f"{path}.quantity")
    raw_q = {"quantity": item["quantity"]} if "quantity" in item else item["quantities"]
    if not isinstance(raw_q, dict) or not 1 <= len(raw_q) <= 32:
        raise BadRequest("'quantities' must be an object of 1 to 32 name: amount entries.",
                         param=f"{path}.quantities")
    quantities = {}
    for name, value in raw_q.items():
        param = f"{path}.quantity" if "quantity" in item else f"{path}.quantities.{name}"
        if not _QUANTITY.match(name):
            raise BadRequest(f"Quantity name {name!r} must be lower-case letters, digits and '_'.", param=param)
        if isinstance(value, bool) or not isinstance(value, int | str) or not _AMOUNT.match(str(value)):
            raise BadRequest("A quantity is a non-negative decimal (string or integer) with at most 6 decimal "
                             "places and 12 digits before the point.", code="invalid_quantity", param=param)
        quantities[name] = Decimal(str(value))
    attributes_raw = item.get("attributes", {})
    if not isinstance(attributes_raw, dict) or len(attributes_raw) > 16:
        raise BadRequest("'attributes' must be an object of at most 16 string values.", param=f"{path}.attributes")
    attributes = {}
    for name, value in attributes_raw.items():
        if not _ATTRIBUTE.match(name) or name in ("type", "customer"):
            raise BadRequest(f"Attribute name {name!r} is not allowed ('type' and 'customer' are set by metergate).",
                             param=f"{path}.attributes.{name}")
        if not isinstance(value, str) or not 1 <= len(value) <= 128:
            raise BadRequest("Attribute values are strings of 1-128 characters.", param=f"{path}.attributes.{name}")
        attributes[name] = value
    timestamp = now
    if "timestamp" in item:
        value = item["timestamp"]
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadRequest("'timestamp' is an ISO 8601 time or epoch milliseconds.", param=f"{path}.timestamp")
        timestamp = parse_time(str(value), f"{path}.timestamp")
        if not now - MAX_PAST_MS <= timestamp <= now + MAX_FUTURE_MS:
            raise BadRequest("'timestamp' must be within the last 35 days and at most 5 minutes ahead.",
                             code="invalid_timestamp", param=f"{path}.timestamp")
    cost_nanos = None
    if "cost_usd" in item:
        value = item["cost_usd"]
        if isinstance(value, bool) or not isinstance(value, int | str) or not _USD.match(str(value)):
            raise BadRequest("'cost_usd' is a non-negative decimal string with at most 9 decimal places.",
                             param=f"{path}.cost_usd")
        try:
            cost_nanos = to_minor(Decimal(str(value)), COST_SCALE)  # exact: at most 9 places
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
            raise BadRequest("'cost_usd' is not a decimal.", param=f"{path}.cost_usd") from None
    return Event(event_id, customer_id, kind, quantities, attributes, timestamp, cost_nanos)


class EventIngest:
    def __init__(self, pricing: PricingService, wallet: WalletStore, *, hold_ttl_s: int,
                 spend_caps: SpendCapGuard | None = None) -> None:
        self._pricing = pricing
        self._wallet = wallet
        self._ttl_ms = hold_ttl_s * 1000
        self._spend_caps = spend_caps

    async def ingest(self, mode: Mode, body: dict[str, Any]) -> dict[str, Any]:
        events = parse_batch(body, now=now_ms())
        results = [await self._one(mode, event) for event in events]
        tally = {status: sum(1 for r in results if r["status"] == status)
                 for status in ("accepted", "duplicate", "rejected")}
        return {"data": results, **tally}

    async def _one(self, mode: Mode, event: Event) -> dict[str, Any]:
        hold_id = event_hold_id(mode, event.id)
        result: dict[str, Any] = {"id": event.id, "customer_id": event.customer_id, "usage_record_id": hold_id}
        existing = await self._wallet.get_hold(hold_id)
        if existing is not None and existing.state in ("captured", "voided"):
            return {**result, **await self._money(mode, existing.asset, existing.captured_amount),
                    "status": "duplicate"}
        if await self._wallet.get_customer(mode, event.customer_id) is None:
            return self._rejected(result, "unknown_customer", f"No customer {event.customer_id!r} in this mode.")
        try:
            resolved = await self._pricing.resolve(mode, event.customer_id, {**event.attributes, "type": event.type},
                                                   at_ms=event.timestamp_ms)
        except MetergateError as error:  # a rule drawing an asset this mode no longer has
            return self._rejected(result, error.code, error.message)
        if resolved is None:
            return self._rejected(result, "no_matching_rule",
                                  f"No price rule matches events of type {event.type!r} with these attributes.")
        try:
            price = resolved.price(event.quantities, event.cost_nanos)
        except CostUnknown:
            return self._rejected(result, "unknown_cost", "The matching rule is cost-plus; send 'cost_usd'.")
        result.update(version=resolved.version_id, rule=resolved.rule.id)
        try:
            if existing is None and self._spend_caps is not None:
                await self._spend_caps.admit(mode, event.customer_id, resolved.asset, price.amount)
            hold = existing or await self._reserve(mode, event, resolved.asset, price.amount, hold_id)
            record = self._record(mode, event, resolved, hold, price.as_detail())
            settlement = await self._wallet.settle(hold.id, hold.amount, record)
        except InsufficientFunds as short:
            scale = await self._pricing.scale_of(mode, short.asset)
            return self._rejected(result, "insufficient_funds", "The wallet cannot cover this event.",
                                  asset=short.asset, available=format_minor(short.available, scale),
                                  required=format_minor(short.required, scale))
        except MetergateError as refused:  # a customer's spend cap (spend_cap_reached)
            return self._rejected(result, refused.code, refused.message)
        except Exception:
            log.exception("event %s: not recorded", event.id)
            return self._rejected(result, "storage_error", "The event could not be recorded; send it again.")
        if settlement.replayed:
            return {**result, **await self._money(mode, hold.asset, settlement.charged), "status": "duplicate"}
        await self._pricing.count(resolved, hold.id, mode, event.customer_id, event.quantities)
        return {**result, **await self._money(mode, hold.asset, settlement.charged), "status": "accepted",
                "written_off": settlement.written_off}

    async def _reserve(self, mode: Mode, event: Event, asset: str, amount: int, hold_id: str) -> Hold:
        try:
            hold, _ = await self._wallet.reserve(mode, event.customer_id, asset, amount, hold_id=hold_id,
                                                 ttl_ms=self._ttl_ms)
        except IdempotencyConflict:
            # A concurrent submission of this event reserved it first, at a price read from other tier
            # counters: its hold is the event's, and completing it is what both submissions want.
            found = await self._wallet.get_hold(hold_id)
            if found is None:
                raise
            return found
        return hold

    def _record(self, mode: Mode, event: Event, resolved: Resolved, hold: Hold,
                price_detail: dict[str, Any]) -> UsageRecord:
        q = event.quantities
        tokens = {name: int(q.get(name, 0)) for name in ("input_tokens", "output_tokens", "cached_input_tokens",
                                                         "reasoning_tokens", "cache_write_tokens")}
        return UsageRecord(
            id=hold.id, mode=mode, customer_id=event.customer_id, hold_id=hold.id, route="events", endpoint="event",
            model=event.type[:128], feature=event.attributes.get("feature"), stream=False, status_code=200,
            usage_source="provider", tokens_input=tokens["input_tokens"] + tokens["cached_input_tokens"]
            + tokens["cache_write_tokens"], tokens_cached_input=tokens["cached_input_tokens"],
            tokens_output=tokens["output_tokens"] + tokens["reasoning_tokens"],
            tokens_reasoning=tokens["reasoning_tokens"], tokens_cache_write=tokens["cache_write_tokens"],
            asset=hold.asset, price_amount=hold.amount, cost_nanos=event.cost_nanos,
            detail={"event": {"id": event.id, "type": event.type, "quantities": {k: str(v) for k, v in q.items()},
                              "attributes": event.attributes, "timestamp_ms": event.timestamp_ms},
                    "price": {**resolved.as_detail(), **price_detail}},
            created_at_ms=event.timestamp_ms)

    async def _money(self, mode: Mode, asset: str, amount: int) -> dict[str, Any]:
        scale = await self._pricing.scale_of(mode, asset)
        return {"asset": asset, "charged": amount, "charged_decimal": format_minor(amount, scale)}

    @staticmethod
    def _rejected(result: dict[str, Any], code: str, message: str, **extra: Any) -> dict[str, Any]:
        return {**result, "status": "rejected", "code": code, "message": message, **extra}
