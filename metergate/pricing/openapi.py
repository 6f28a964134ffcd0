"""The OpenAPI paths of the pricing admin API (:mod:`metergate.pricing.admin`), merged by
:mod:`metergate.admin.openapi`."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_DECIMAL = {"type": "string", "pattern": r"^[0-9]{1,16}(\.[0-9]{1,18})?$"}
_INSTANT = {"type": ["string", "integer"], "description": "ISO 8601 date or date-time, or epoch milliseconds"}
_STEP = {"type": "object", "required": ["up_to", "rate"],
         "properties": {"up_to": {"type": ["string", "null"]}, "rate": _DECIMAL}}
_TIERS = {"type": "object", "required": ["quantity", "mode", "steps"], "properties": {
    "quantity": {"type": "string"}, "mode": {"type": "string", "enum": ["volume", "graduated"]},
    "period": {"type": "string", "enum": ["month", "week", "day"], "default": "month"}, "key": {"type": "string"},
    "steps": {"type": "array", "items": _STEP, "minItems": 1, "maxItems": 50}}}
_RULE = {"type": "object", "required": ["asset"], "properties": {
    "id": {"type": "string"}, "asset": {"type": "string"},
    "match": {"type": "object", "additionalProperties": {"type": "string"},
              "description": "attribute -> exact value or '*'; the most specific matching rule prices"},
    "per_units": _DECIMAL, "event_fee": _DECIMAL, "rates": {"type": "object", "additionalProperties": _DECIMAL},
    "tiers": {"type": "array", "items": _TIERS}, "markup": _DECIMAL, "asset_usd_value": _DECIMAL,
    "minimum": _DECIMAL}}
# Bodies whose handlers validate themselves (metergate.admin.validation.HANDLER_VALIDATES): the document says
# what they refuse (unknown fields included), the handler answers with the rule's or the nested field's path.
_OWN: dict[str, Any] = {"additionalProperties": False, "x-validated-by-handler": True}
_RULE_LIST = {"type": "array", "items": _RULE, "minItems": 1, "maxItems": 1000}
_RULES: dict[str, Any] = {"type": "object", "required": ["rules"], "properties": {
    "rules": _RULE_LIST, "note": {"type": "string"}}}
_DRAFT = {**_RULES, **_OWN, "properties": {**_RULES["properties"], "note": {"type": "string", "maxLength": 500},
                                           "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 128}}}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 128}
_TOKENS = {"type": "integer", "minimum": 0, "maximum": 10**10}
_EVENT = {"type": "object", "required": ["id", "customer_id", "type"], "properties": {
    "id": {"type": "string"}, "customer_id": {"type": "string"}, "type": {"type": "string"},
    "quantity": _DECIMAL, "quantities": {"type": "object", "additionalProperties": _DECIMAL},
    "attributes": {"type": "object", "additionalProperties": {"type": "string"}}, "timestamp": _INSTANT,
    "cost_usd": _DECIMAL}}
_QUOTE = {"type": "object", "required": ["customer_id"], **_OWN, "properties": {
    "customer_id": {"type": "string"}, "type": {**_TEXT, "default": "request"}, "model": _TEXT,
    "endpoint": _TEXT, "route": _TEXT, "feature": _TEXT,
    "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
    "usage": {"type": "object", "additionalProperties": False, "properties": {
        name: _TOKENS for name in ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                                   "reasoning_tokens")},
              "description": "token counts, disjoint: input_tokens are the uncached ones"},
    "payload": {"type": "object", "description": "a request body to estimate, as the proxy does"},
    "quantities": {"type": "object", "additionalProperties": _DECIMAL},
    "cost_usd": {"type": "string", "pattern": r"^[0-9]{1,9}(\.[0-9]{1,9})?$"},
    "version": {**_TEXT, "description": "a draft or published version id; default: the one in force"},
    "at": _INSTANT}}


def _op(summary: str, answer: dict[str, Any], *, body: dict[str, Any] | None = None, ok: int = 200,
        version: bool = False, query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": ([{"name": "version_id", "in": "path", "required": True, "schema": {"type": "string"}}]
                       if version else []) + (query or []),
        "responses": {str(ok): {"description": "OK", "content": {"application/json": {"schema": answer}}},
                      "default": {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _replayed(op: dict[str, Any]) -> dict[str, Any]:
    """A create that answers its first result again (200) for a repeated idempotency key: both statuses carry
    the created answer."""
    op["responses"]["200"] = op["responses"]["201"]
    return op


def pricing_paths() -> dict[str, Any]:
    from metergate.admin.answers import pricing_answers  # here: the admin document imports this module
    from metergate.admin.schemas import ref

    shape = pricing_answers()  # the answer schemas, by operation
    versions = "/admin/v1/price-versions"
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "cursor", "in": "query", "schema": {"type": "string"}}]
    return {
        versions: {
            "post": _replayed(_op(
                "Create a draft price version from a validated rule set (422 with the rule path if invalid); "
                "once per Idempotency-Key (a replay answers 200 with the first draft)",
                ref("PriceVersion"), body=_DRAFT, ok=201)),
            "get": _op("Price versions, newest first, and the one in force now", shape["versions"], query=page),
        },
        f"{versions}/validate": {"post": _op("Validate a rule set; nothing is stored", shape["validated"],
                                             body=_RULES)},
        f"{versions}/simulate": {"post": _op(
            "Re-price recorded usage in [from, to) under a rule set that is validated, not stored",
            shape["simulation"], body={"type": "object", "required": ["rules", "from", "to"], **_OWN,
                                       "properties": {"rules": _RULE_LIST, "from": _INSTANT, "to": _INSTANT}})},
        f"{versions}/{{version_id}}": {"get": _op("A price version with its rules ('config': the file's)",
                                                  ref("PriceVersion"),
                                                  version=True)},
        f"{versions}/{{version_id}}/publish": {"post": _op(
            "Publish a draft from effective_at (default now); published versions never change", ref("PriceVersion"),
            version=True,
            body={"type": "object", "properties": {"effective_at": _INSTANT}})},
        f"{versions}/{{version_id}}/simulate": {"post": _op(
            "Re-price recorded usage in [from, to) under this version: old and new totals per customer",
            shape["simulation"], version=True, body={"type": "object", "required": ["from", "to"],
                                "properties": {"from": _INSTANT, "to": _INSTANT}})},
        "/admin/v1/quote": {"post": _op("Price a hypothetical request or event; the wallet is not touched",
                                        ref("Quote"),
                                        body=_QUOTE)},
        "/admin/v1/events": {"post": _op(
            "Ingest usage events, idempotent by id, debited at once; per-event accepted/duplicate/rejected",
            shape["events"], body={"type": "object", "required": ["events"], "properties": {
                "events": {"type": "array", "items": _EVENT, "minItems": 1, "maxItems": 500}}})},
    }
