"""The admin API's OpenAPI document, kept next to the handlers it describes."""

from __future__ import annotations

from typing import Any

from metergate import __version__
from metergate.admin.answers import answers, components
from metergate.admin.schemas import ref
from metergate.admin.wallet_openapi import wallet_paths
from metergate.budgets.openapi import budget_paths, budget_schemas
from metergate.portal.links import ACCESS
from metergate.pricing.openapi import pricing_paths
from metergate.webhooks.openapi import webhook_paths, webhook_schemas

_ERROR = {"$ref": "#/components/schemas/Error"}
# Shared schemas. The document is also what the server enforces (metergate/admin/validation.py): every
# object that takes a fixed set of fields says additionalProperties: false, every integer has bounds.
ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"}
ASSET = {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_-]{0,31}$"}
KEY = {"type": "string", "minLength": 1, "maxLength": 128}
MAX_AMOUNT = 10**15
AMOUNT = {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT, "x-error-code": "invalid_amount"}
DECIMAL0 = {"type": "string", "pattern": r"^[0-9]{1,16}(\.[0-9]{1,18})?$", "x-error-code": "invalid_amount",
            "description": "a plain decimal string in the asset's major unit"}
# The same, above zero (an amount of 0 is refused wherever AMOUNT's minimum is 1).
AMOUNT_DECIMAL = {**DECIMAL0, "pattern": r"^([1-9][0-9]{0,15}(\.[0-9]{1,18})?|0\.[0-9]{0,17}[1-9][0-9]{0,17})$"}
SEQ_CURSOR = {"type": "string", "pattern": "^[0-9]{1,18}$", "description": "next_cursor of the previous page"}
LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}}
# A calendar date (days 1-28: valid in every month) or date-time in UTC, or epoch milliseconds.
INSTANT = {"type": "string", "pattern": r"^([0-9]{1,13}|[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
                                        r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?Z)?)$",
           "description": "ISO 8601 date or date-time (UTC), or epoch milliseconds"}


def one_amount(name: str = "amount") -> dict[str, Any]:
    """Schema keywords: exactly one of ``name`` and ``name_decimal`` (never both: one would silently win)."""
    return {"oneOf": [{"required": [name], "not": {"required": [f"{name}_decimal"]}},
                      {"required": [f"{name}_decimal"], "not": {"required": [name]}}],
            "x-alternatives-code": "invalid_amount",
            "x-alternatives-message": f"give exactly one of '{name}' and '{name}_decimal'."}


def strict(properties: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    """An object schema that takes exactly ``properties``."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        schema["required"] = list(required)
    return schema


_TEXT = {"text/csv": "CSV with a header line (RFC 4180, CRLF line ends)",
         "application/x-ndjson": "JSON Lines: one JSON object per line"}


def _op(summary: str, answer: dict[str, Any] | None, *, body: dict[str, Any] | None = None, ok: int = 200,
        params: tuple[str, ...] = (), query: list[dict[str, Any]] | None = None,
        media: tuple[str, ...] = ("application/json",), body_required: bool = True) -> dict[str, Any]:
    """An operation; ``answer`` is the schema of its JSON success answer (None: it answers only ``media`` text)."""
    ok_content = {m: {"schema": answer} if m == "application/json" else
                  {"schema": {"type": "string", "description": _TEXT[m]}} for m in media}
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"name": p, "in": "path", "required": True, "schema": ID}
                       for p in params] + (query or []),
        "responses": {str(ok): {"description": "OK", "content": ok_content},
                      "default": {"description": "Error",
                                  "content": {"application/json": {"schema": _ERROR}}}},
    }
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    return op


def _payments(customers: str, c: tuple[str, ...]) -> dict[str, Any]:
    """Auto top-up, spend caps and top-up history (metergate/payments/admin.py)."""
    shape = answers()  # the answer schemas, by operation
    asset = [{"name": "asset", "in": "query", "schema": ASSET}]
    auto = strict({"asset": ASSET, "threshold": AMOUNT, "amount": AMOUNT}, "threshold", "amount")
    cap = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_AMOUNT}
    caps = strict({"asset": ASSET, "daily": cap, "monthly": cap})
    return {
        f"{customers}/auto-top-up": {
            "get": _op("The wallet's auto top-up (threshold and amount, smallest unit)", shape["auto_top_up"],
                       params=c, query=asset),
            "put": _op("Set auto top-up: charge the saved card 'amount' below 'threshold'", shape["auto_top_up"],
                       params=c, body=auto),
            "delete": _op("Turn auto top-up off", shape["auto_top_up"], params=c, query=asset),
        },
        f"{customers}/spend-caps": {
            "get": _op("The customer's daily and monthly spend caps", shape["spend_caps"], params=c, query=asset),
            "put": _op("Set spend caps (null: no cap)", shape["spend_caps"], params=c, body=caps),
        },
        f"{customers}/top-ups": {"get": _op("Recent top-up attempts and their outcomes", shape["top_ups"], params=c)},
    }


def _billing(customers: str, c: tuple[str, ...], period: list[dict[str, Any]]) -> dict[str, Any]:
    """Billing modes, meter events, reconciliation and exports (metergate/billing/admin.py)."""
    shape = answers()  # the answer schemas, by operation
    mode = {"type": "string", "enum": ["prepaid", "invoiced"]}
    limit = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_AMOUNT}
    config = strict({
        "billing_mode": mode, "asset_modes": {"type": "object", "additionalProperties": mode, "maxProperties": 64},
        "credit_limits": {"type": "object", "additionalProperties": limit, "maxProperties": 64},
        "memo": {"type": "string", "maxLength": 500}, "changed_by": {"type": "string", "maxLength": 80}},
        "billing_mode")
    customer = [{"name": "customer_id", "in": "query", "schema": ID}]
    fmt = [{"name": "format", "in": "query", "schema": {"type": "string", "enum": ["csv", "jsonl"], "default": "csv"}}]
    streamed = ("text/csv", "application/x-ndjson")
    return {
        f"{customers}/billing": {
            "get": _op("Billing mode, per-asset overrides, credit limits, change and overdraft history",
                       shape["billing"], params=c),
            "put": _op("Set the billing mode (recorded; a repeated PUT records nothing)", shape["billing"],
                       params=c, body=config),
        },
        f"{customers}/meter-events": {"get": _op("The customer's usage records queued for Stripe Billing",
                                                 shape["meter_events"], params=c)},
        "/admin/v1/billing/reconciliation": {"get": _op(
            "Usage and ledger totals beside meter events sent, pending and failing", shape["reconciliation"],
            query=period + customer)},
        "/admin/v1/exports/usage": {"get": _op("Usage records by period, streamed (CSV or JSON Lines)", None,
                                               query=period + customer + fmt, media=streamed)},
        "/admin/v1/exports/ledger": {"get": _op("Ledger entries by period, streamed (CSV or JSON Lines)", None,
                                                query=period + customer + fmt, media=streamed)},
    }


def document() -> dict[str, Any]:
    shape = answers()  # the answer schemas, by operation
    c = ("customer_id",)
    page = [LIMIT, {"name": "cursor", "in": "query", "schema": SEQ_CURSOR}]
    customer_page = [LIMIT, {"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
                             "schema": ID}]
    credit = strict({"asset": ASSET, "amount": AMOUNT, "amount_decimal": AMOUNT_DECIMAL, "idempotency_key": KEY,
                     "memo": {"type": "string", "maxLength": 500}}, **one_amount())  # or the Idempotency-Key header
    customers = "/admin/v1/customers/{customer_id}"
    key_attributes = {"type": "object", "additionalProperties": False, "properties": {"attributes": {
        "type": "object", "maxProperties": 16, "additionalProperties": {"type": "string", "minLength": 1,
                                                                         "maxLength": 128},
        "description": "Pricing attributes of the key's requests (e.g. feature); its client cannot change them"}}}
    per_minute = {"type": ["integer", "null"], "minimum": 1, "maximum": 1_000_000_000}
    per_minute_tokens = {"type": ["integer", "null"], "minimum": 1, "maximum": 10**12}
    limits = strict({"requests_per_minute": per_minute, "tokens_per_minute": per_minute_tokens},
                    "requests_per_minute", "tokens_per_minute")
    instant = INSTANT
    margin = [
        {"name": "group_by", "in": "query", "schema": {
            "type": "string", "enum": ["customer", "feature", "model", "day", "week", "month", "budget_node"],
            "default": "customer"}},
        {"name": "from", "in": "query", "description": "inclusive; default: 30 days before 'to'", "schema": instant},
        {"name": "to", "in": "query", "description": "exclusive; default: now", "schema": instant},
        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"}},
    ]
    paths: dict[str, Any] = {
        "/admin/v1/customers": {
            "post": _op("Create a customer", ref("Customer"), ok=201, body=strict(
                {"id": {**ID, "x-error-code": "invalid_customer"}, "name": {"type": "string", "maxLength": 256}},
                "id")),
            "get": _op("List customers", shape["customer_page"], query=customer_page),
        },
        customers: {"get": _op("Get a customer with balances", ref("CustomerWithBalances"), params=c)},
        f"{customers}/api-keys": {"post": _op("Issue a proxy API key (optionally with pricing attributes)",
                                              ref("IssuedApiKey"), ok=201,
                                              params=c, body=key_attributes, body_required=False),
                                  "get": _op("The customer's proxy API keys (prefixes only), newest first",
                                             shape["api_keys"],
                                             params=c, query=page[:1])},
        "/admin/v1/api-keys/{key_id}": {
            "delete": _op("Revoke a proxy API key", ref("ApiKey"), params=("key_id",)),
            "patch": _op("Replace a proxy API key's pricing attributes", ref("ApiKey"),
                         params=("key_id",), body=key_attributes),
        },
        f"{customers}/credits": {"post": _op("Credit a wallet (idempotent)", ref("Credit"),
                                             ok=201, params=c, body=credit)},
        f"{customers}/balance": {"get": _op("Balances per asset", ref("Balances"), params=c)},
        f"{customers}/ledger": {"get": _op("Ledger entries, newest first", shape["ledger_page"], params=c, query=page)},
        f"{customers}/usage": {"get": _op("Usage records, newest first", shape["usage_page"], params=c, query=page)},
        f"{customers}/portal-link": {"post": _op(
            "A signed billing-portal link: billing_admin (the default; at most 15 minutes), or view_topup with "
            'the optional body {"access": "view_topup"}', ref("PortalLink"), params=c, body_required=False,
            body=strict({"access": {"type": "string", "enum": list(ACCESS)}}))},
        f"{customers}/rate-limits": {
            "get": _op("The customer's rate-limit override, the defaults and the limits in effect", ref("RateLimits"),
                       params=c),
            "put": _op("Override the customer's rate limits (null lifts a limit)", ref("RateLimits"),
                       params=c, body=limits),
            "delete": _op("Drop the override: the configured defaults apply again", ref("RateLimits"), params=c),
        },
        "/admin/v1/reports/margin": {"get": _op(
            "Revenue, provider cost and margin per group over a time range (JSON or CSV)", shape["margin"],
            query=margin, media=("application/json", "text/csv"))},
        "/admin/v1/dashboard-link": {"post": _op("A short-lived signed link to the operator dashboard",
                                                 ref("DashboardLink"), ok=201)},
    }
    paths.update(_payments(customers, c))
    paths.update(wallet_paths())  # assets, grants, plans, subscriptions, the hold API (metergate/admin/wallets.py)
    paths.update(pricing_paths())  # price versions, quote, simulator, events (metergate/pricing)
    paths.update(_billing(customers, c, margin[1:3]))
    paths.update(webhook_paths())  # the notification outbox (metergate/webhooks/admin.py)
    paths.update(budget_paths())  # budget nodes, limits, key attachments (metergate/budgets/admin.py)
    return {
        "openapi": "3.1.0",
        "info": {"title": "metergate admin API", "version": __version__},
        "components": {
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {**components(), **webhook_schemas(), **budget_schemas()},
        },
        "security": [{"adminKey": []}],
        "paths": paths,
    }
