"""OpenAPI paths of the wallet admin endpoints (:mod:`metergate.admin.wallets`) and the hold API
(:mod:`metergate.admin.holds`), merged into the admin document by :mod:`metergate.admin.openapi`."""

from __future__ import annotations

from typing import Any


def wallet_paths() -> dict[str, Any]:
    from metergate.admin.openapi import _op  # here, not at import: openapi imports this module

    c, g, p, s, h = ("customer_id",), ("grant_id",), ("plan_id",), ("subscription_id",), ("hold_id",)
    customers = "/admin/v1/customers/{customer_id}"
    minor = {"type": "integer", "minimum": 1}
    minor0 = {"type": "integer", "minimum": 0}
    decimal = {"type": "string", "description": "a plain decimal string in the asset's major unit"}
    key = {"type": "string", "minLength": 1, "maxLength": 128}
    ms = {"type": "integer", "minimum": 0, "description": "epoch milliseconds"}
    purpose = {"type": "string", "enum": ["paid", "promotional", "trial", "entitlement", "adjustment"]}
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            {"name": "asset", "in": "query", "schema": {"type": "string"}}]
    asset = {"type": "object", "required": ["code", "scale"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_-]{0,31}$"}, "name": {"type": "string"},
        "scale": {"type": "integer", "minimum": 0, "maximum": 12}, "value_per_unit": decimal,
        "value_currency": {"type": "string", "pattern": "^[A-Z]{3}$"}}}
    conversion = {"type": "object", "required": ["from_asset", "to_asset", "rate"], "properties": {
        "from_asset": {"type": "string"}, "to_asset": {"type": "string"}, "rate": decimal, "purpose": purpose}}
    convert = {"type": "object", "required": ["from_asset", "to_asset"], "properties": {
        "from_asset": {"type": "string"}, "to_asset": {"type": "string"}, "amount": minor, "amount_decimal": decimal,
        "idempotency_key": key}}
    grant = {"type": "object", "properties": {
        "asset": {"type": "string"}, "amount": minor, "amount_decimal": decimal, "purpose": purpose,
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000}, "effective_at_ms": ms,
        "expires_at_ms": ms, "memo": {"type": "string", "maxLength": 500}, "idempotency_key": key}}
    order = {"type": "object", "required": ["order"], "properties": {
        "order": {"type": "string", "enum": ["priority", "expiry", "fifo"]}}}
    plan = {"type": "object", "required": ["id", "period", "entitlements"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "period": {"type": "string", "enum": ["month", "week", "days"]},
        "period_days": {"type": "integer", "minimum": 1, "maximum": 3660},
        "entitlements": {"type": "array", "minItems": 1, "maxItems": 20, "items": {"type": "object", "properties": {
            "asset": {"type": "string"}, "amount": minor, "amount_decimal": decimal, "rollover_cap": minor,
            "priority": {"type": "integer"}}}}}}
    subscribe = {"type": "object", "required": ["id", "plan_id"], "properties": {
        "id": {"type": "string"}, "plan_id": {"type": "string"}, "anchor_ms": ms}}
    hold = {"type": "object", "required": ["customer_id"], "properties": {
        "customer_id": {"type": "string"}, "asset": {"type": "string"}, "amount": minor, "amount_decimal": decimal,
        "ttl_s": {"type": "integer", "minimum": 1, "maximum": 604800}, "hold_id": {"type": "string"},
        "idempotency_key": key}}
    extend = {"type": "object", "properties": {"amount": minor, "amount_decimal": decimal,
                                               "ttl_s": {"type": "integer"}, "idempotency_key": key}}
    capture = {"type": "object", "properties": {"amount": minor0, "amount_decimal": decimal,
                                                "final": {"type": "boolean"}, "idempotency_key": key}}
    heartbeat = {"type": "object", "properties": {
        "used": minor0, "used_decimal": decimal, "next": minor0, "next_decimal": decimal,
        "ttl_s": {"type": "integer"}, "partial": {"type": "boolean"}, "idempotency_key": key}}
    return {
        "/admin/v1/assets": {"get": _op("Assets of this mode (configured ones first)"),
                             "post": _op("Define a custom asset", ok=201, body=asset)},
        "/admin/v1/conversions": {"get": _op("Allowed conversions between assets"),
                                  "post": _op("Allow (or re-rate) a conversion", ok=201, body=conversion)},
        f"{customers}/convert": {"post": _op("Convert between assets at the configured rate, rounded down "
                                             "(idempotent)", ok=201, params=c, body=convert)},
        f"{customers}/grants": {"get": _op("The wallet's grants, newest first", params=c, query=page),
                                "post": _op("Grant credit (idempotent)", ok=201, params=c, body=grant)},
        "/admin/v1/grants/{grant_id}": {"get": _op("A grant", params=g)},
        "/admin/v1/grants/{grant_id}/void": {"post": _op("Void a grant's unused remainder", params=g)},
        f"{customers}/consumption-order": {"get": _op("The order the wallet's grants are consumed in", params=c),
                                           "put": _op("Set the consumption order", params=c, body=order)},
        "/admin/v1/plans": {"get": _op("Plans"), "post": _op("Create a plan (immutable)", ok=201, body=plan)},
        "/admin/v1/plans/{plan_id}": {"get": _op("A plan", params=p)},
        f"{customers}/subscriptions": {"get": _op("The customer's subscriptions", params=c),
                                       "post": _op("Subscribe (grants the current period)", ok=201, params=c,
                                                   body=subscribe)},
        "/admin/v1/subscriptions/{subscription_id}": {"get": _op("A subscription", params=s)},
        "/admin/v1/subscriptions/{subscription_id}/cancel": {"post": _op("Cancel: no period after now", params=s)},
        "/admin/v1/subscriptions/{subscription_id}/tick": {"post": _op(
            "Grant the periods due (idempotent; the sweeper ticks too)", params=s)},
        "/admin/v1/holds": {"post": _op("Hold funds for a workload (idempotent)", ok=201, body=hold),
                            "get": _op("Open (pending) holds, soonest expiry first", query=[
                                {"name": "customer_id", "in": "query", "schema": {"type": "string"}}, *page[:1]])},
        "/admin/v1/holds/{hold_id}": {"get": _op("A hold and the grants it draws", params=h)},
        "/admin/v1/holds/{hold_id}/extend": {"post": _op("Grow the hold (idempotent)", params=h, body=extend)},
        "/admin/v1/holds/{hold_id}/capture": {"post": _op("Capture part of the hold, or the final amount",
                                                          params=h, body=capture)},
        "/admin/v1/holds/{hold_id}/void": {"post": _op("Release the hold", params=h)},
        "/admin/v1/holds/{hold_id}/heartbeat": {"post": _op(
            "Capture usage so far and hold the next increment; answers continue or stop", params=h, body=heartbeat)},
    }
