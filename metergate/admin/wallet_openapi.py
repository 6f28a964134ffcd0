"""OpenAPI paths of the wallet admin endpoints (:mod:`metergate.admin.wallets`) and the hold API
(:mod:`metergate.admin.holds`), merged into the admin document by :mod:`metergate.admin.openapi`."""

from __future__ import annotations

from typing import Any

from metergate.admin.answers import wallet_answers
from metergate.admin.schemas import ref


def _one(name: str) -> dict[str, Any]:
    from metergate.admin.openapi import one_amount

    return one_amount(name)


def wallet_paths() -> dict[str, Any]:
    # here, not at import: openapi imports this module
    from metergate.admin.openapi import AMOUNT, AMOUNT_DECIMAL, ASSET, DECIMAL0, ID, KEY, SEQ_CURSOR, _op, strict

    shape = wallet_answers()  # the answer schemas, by operation

    c, g, p, s, h = ("customer_id",), ("grant_id",), ("plan_id",), ("subscription_id",), ("hold_id",)
    customers = "/admin/v1/customers/{customer_id}"
    minor = AMOUNT
    minor0 = {**AMOUNT, "minimum": 0}
    decimal = AMOUNT_DECIMAL
    rate = {**AMOUNT_DECIMAL, "x-error-code": "invalid_request",
            "description": "major units of to_asset per major unit of from_asset, above zero"}
    ms = {"type": "integer", "minimum": 0, "maximum": 253_402_300_799_999, "description": "epoch milliseconds"}
    priority = {"type": "integer", "minimum": -1000, "maximum": 1000}
    ttl = {"type": "integer", "minimum": 1, "maximum": 604800}
    memo = {"type": "string", "maxLength": 500}
    name = {"type": "string", "maxLength": 256}
    purpose = {"type": "string", "enum": ["paid", "promotional", "trial", "entitlement", "adjustment"]}
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "cursor", "in": "query", "schema": SEQ_CURSOR},
            {"name": "asset", "in": "query", "schema": ASSET}]
    asset = strict({"code": {**ASSET, "x-error-code": "invalid_asset"}, "name": name,
                    "scale": {"type": "integer", "minimum": 0, "maximum": 12},
                    "value_per_unit": {**DECIMAL0, "x-error-code": "invalid_request"},
                    "value_currency": {"type": "string", "pattern": "^[A-Z]{3}$", "x-error-code": "invalid_asset"}},
                   "code", "scale")
    conversion = strict({"from_asset": ASSET, "to_asset": ASSET, "rate": rate, "purpose": purpose},
                        "from_asset", "to_asset", "rate")
    convert = strict({"from_asset": ASSET, "to_asset": ASSET, "amount": minor, "amount_decimal": decimal,
                      "idempotency_key": KEY}, "from_asset", "to_asset", **_one("amount"))
    grant = strict({"asset": ASSET, "amount": minor, "amount_decimal": decimal, "purpose": purpose,
                    "priority": priority, "effective_at_ms": ms, "expires_at_ms": ms, "memo": memo,
                    "idempotency_key": KEY}, **_one("amount"))
    order = strict({"order": {"type": "string", "enum": ["priority", "expiry", "fifo"]}}, "order")
    entitlement = strict({"asset": ASSET, "amount": minor, "amount_decimal": decimal, "rollover_cap": minor,
                          "priority": priority}, "asset", **_one("amount"))
    plan = strict({"id": ID, "name": name, "period": {"type": "string", "enum": ["month", "week", "days"]},
                   "period_days": {"type": "integer", "minimum": 1, "maximum": 3660},
                   "entitlements": {"type": "array", "minItems": 1, "maxItems": 20, "items": entitlement}},
                  "id", "period", "entitlements")
    subscribe = strict({"id": ID, "plan_id": ID, "anchor_ms": ms}, "id", "plan_id")
    hold = strict({"customer_id": {**ID, "x-error-code": "invalid_customer"}, "asset": ASSET, "amount": minor,
                   "amount_decimal": decimal, "ttl_s": ttl, "hold_id": {**ID, "maxLength": 64},
                   "idempotency_key": KEY}, "customer_id", **_one("amount"))
    extend = strict({"amount": minor, "amount_decimal": decimal, "ttl_s": ttl, "idempotency_key": KEY},
                    **_one("amount"))
    capture = strict({"amount": minor0, "amount_decimal": DECIMAL0, "final": {"type": "boolean"},
                      "idempotency_key": KEY}, **_one("amount"))
    heartbeat = strict({"used": minor0, "used_decimal": DECIMAL0, "next": minor0, "next_decimal": DECIMAL0,
                        "ttl_s": ttl, "partial": {"type": "boolean"}, "idempotency_key": KEY},
                       allOf=[_one("used"), _one("next")])
    return {
        "/admin/v1/assets": {"get": _op("Assets of this mode (configured ones first)", shape["assets"]),
                             "post": _op("Define a custom asset", ref("Asset"), ok=201, body=asset)},
        "/admin/v1/conversions": {"get": _op("Allowed conversions between assets", shape["conversions"]),
                                  "post": _op("Allow (or re-rate) a conversion", ref("Conversion"),
                                              ok=201, body=conversion)},
        f"{customers}/convert": {"post": _op("Convert between assets at the configured rate, rounded down "
                                             "(idempotent)", ref("Converted"), ok=201, params=c, body=convert)},
        f"{customers}/grants": {"get": _op("The wallet's grants, newest first", shape["grant_page"], params=c,
                                           query=page),
                                "post": _op("Grant credit (idempotent)", ref("Grant"), ok=201, params=c, body=grant)},
        "/admin/v1/grants/{grant_id}": {"get": _op("A grant", ref("Grant"), params=g)},
        "/admin/v1/grants/{grant_id}/void": {"post": _op("Void a grant's unused remainder", ref("Grant"), params=g)},
        f"{customers}/consumption-order": {"get": _op("The order the wallet's grants are consumed in",
                                                      ref("ConsumptionOrder"), params=c),
                                           "put": _op("Set the consumption order", ref("ConsumptionOrder"),
                                                      params=c, body=order)},
        "/admin/v1/plans": {"get": _op("Plans", shape["plans"]),
                            "post": _op("Create a plan (immutable)", ref("Plan"), ok=201, body=plan)},
        "/admin/v1/plans/{plan_id}": {"get": _op("A plan", ref("Plan"), params=p)},
        f"{customers}/subscriptions": {"get": _op("The customer's subscriptions", shape["subscriptions"], params=c),
                                       "post": _op("Subscribe (grants the current period)", ref("Subscription"),
                                                   ok=201, params=c,
                                                   body=subscribe)},
        "/admin/v1/subscriptions/{subscription_id}": {"get": _op("A subscription", ref("Subscription"), params=s)},
        "/admin/v1/subscriptions/{subscription_id}/cancel": {"post": _op("Cancel: no period after now",
                                                                         ref("Subscription"), params=s)},
        "/admin/v1/subscriptions/{subscription_id}/tick": {"post": _op(
            "Grant the periods due (idempotent; the sweeper ticks too)", ref("Tick"), params=s)},
        "/admin/v1/holds": {"post": _op("Hold funds for a workload (idempotent)", ref("HoldAnswer"), ok=201, body=hold),
                            "get": _op("Open (pending) holds, soonest expiry first", shape["holds"], query=[
                                {"name": "customer_id", "in": "query", "schema": {"type": "string"}}, *page[:1]])},
        "/admin/v1/holds/{hold_id}": {"get": _op("A hold and the grants it draws", ref("HoldWithAllocations"),
                                                 params=h)},
        "/admin/v1/holds/{hold_id}/extend": {"post": _op("Grow the hold (idempotent)", ref("HoldAnswer"),
                                                         params=h, body=extend)},
        "/admin/v1/holds/{hold_id}/capture": {"post": _op("Capture part of the hold, or the final amount",
                                                          ref("HoldAnswer"),
                                                          params=h, body=capture)},
        "/admin/v1/holds/{hold_id}/void": {"post": _op("Release the hold", ref("HoldAnswer"), params=h,
                                                       body=strict({"idempotency_key": KEY}), body_required=False)},
        "/admin/v1/holds/{hold_id}/heartbeat": {"post": _op(
            "Capture usage so far and hold the next increment; answers continue or stop", ref("Heartbeat"), params=h,
            body=heartbeat)},
    }
