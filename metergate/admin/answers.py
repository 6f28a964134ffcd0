"""The admin API's answers as OpenAPI components, each derived (:mod:`metergate.admin.schemas`) from the value
its handler serializes: ``Customer`` is ``asdict(wallet.models.Customer)``, ``Grant`` is ``asdict(Grant)`` with
the ``free`` and decimal fields :meth:`WalletsApi._grant_view` adds, and so on. Envelopes (pages, a credit's
entry and balance, a hold call's answer) are written here around those components."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, Table

from metergate.admin.schemas import (
    DECIMAL,
    INTEGER,
    MS,
    Schema,
    data_of,
    envelope,
    nullable,
    object_of,
    page_of,
    ref,
)
from metergate.admin.views import BalanceView
from metergate.billing import schema as billing_tables
from metergate.billing.store import OUTBOX_FIELDS, ReconRow
from metergate.payments.store import AutoTopUpSetting, SpendCaps, TopUp
from metergate.wallet.grants import ORDERS
from metergate.wallet.holds import HoldBalanceView, HoldView
from metergate.wallet.models import (
    ApiKey,
    Asset,
    Conversion,
    Customer,
    Entitlement,
    Grant,
    LedgerEntry,
    Plan,
    Subscription,
    UsageRecord,
)

STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
STRINGS: Schema = {"type": "object", "additionalProperties": STRING}
INTEGERS: Schema = {"type": "object", "additionalProperties": INTEGER}
MODE: Schema = {"type": "string", "enum": ["test", "live"]}


def _error() -> Schema:
    # A refusal for lack of funds (402 insufficient_funds, the hold API's) also says how short, and where the
    # customer tops up.
    short = {"asset": STRING, "balance": INTEGER, "required": INTEGER,
             "portal_url": {**STRING, "description": "the customer's signed billing-portal link"}}
    detail = envelope({"message": STRING, "type": STRING, "code": STRING, "param": nullable(STRING), **short},
                      "param", *short)
    return envelope({"error": detail}, description="The OpenAI error envelope; ``code`` is stable.")


def _price_version() -> tuple[Schema, Schema]:
    summary = envelope({"id": STRING, "mode": nullable(MODE), "state": {"type": "string",
                                                                         "enum": ["draft", "published"]},
                        "note": STRING, "created_at_ms": MS, "effective_at_ms": nullable(MS),
                        "published_at_ms": nullable(MS), "rule_count": INTEGER},
                       description="A price version (PriceVersion.summary); mode null: the configuration's "
                                   "version 0, shared by both modes.")
    full = {**summary, "properties": {**summary["properties"], "rules": {"type": "array", "items": {
        "type": "object"}}}, "required": [*summary["required"], "rules"]}
    return summary, full


def columns_of(table: Table, names: tuple[str, ...]) -> dict[str, Schema]:
    """The JSON types of a table's columns as a row of it is answered: integers and strings, ``null`` where the
    column is nullable."""
    out = {}
    for name in names:
        column = table.c[name]
        kind: Schema = INTEGER if isinstance(column.type, Integer) else STRING
        out[name] = nullable(kind) if column.nullable else kind
    return out


def _margin_row() -> Schema:
    """A row of metergate.reports.margin.row_json: a group (or an asset's total) over the range."""
    return envelope({"key": STRING, "asset": STRING, "requests": INTEGER, "charged": INTEGER, "price": INTEGER,
                     "written_off": INTEGER, "revenue_nanos": nullable(INTEGER), "cost_nanos": INTEGER,
                     "margin_nanos": nullable(INTEGER),
                     "margin_basis": {"type": "string", "enum": ["usd", "valued", "not_usd"]},
                     "negative_margin": BOOLEAN,
                     "unknown_cost": envelope({"requests": INTEGER, "charged": INTEGER}),
                     "no_usage_requests": INTEGER, "period_start": STRING, "period_end": STRING},
                    "period_start", "period_end")


def components() -> dict[str, Schema]:
    version_summary, version = _price_version()
    quote_price = envelope({"exact": DECIMAL, "lines": STRINGS, "minimum_applied": BOOLEAN})
    event_result = envelope({"id": STRING, "customer_id": STRING, "usage_record_id": STRING,
                             "status": {"type": "string", "enum": ["accepted", "duplicate", "rejected"]},
                             "asset": STRING, "charged": INTEGER, "charged_decimal": DECIMAL, "written_off": INTEGER,
                             "version": STRING, "rule": STRING, "code": STRING, "message": STRING,
                             "available": DECIMAL, "required": DECIMAL},
                            "asset", "charged", "charged_decimal", "written_off", "version", "rule", "code",
                            "message", "available", "required",
                            description="One event's outcome: accepted or duplicate with what was charged, or "
                                        "rejected with a code (insufficient_funds: with available and required).")
    return {
        "Error": _error(),
        "Customer": object_of(Customer),
        "CustomerWithBalances": object_of(Customer, add={"balances": {"type": "array", "items": ref("Balance")}},
                                          description="A customer and its balance in every asset it holds."),
        "Balance": object_of(BalanceView),
        "Balances": envelope({"customer_id": STRING, "balances": {"type": "array", "items": ref("Balance")}}),
        "LedgerEntry": object_of(LedgerEntry, add={"amount_decimal": DECIMAL}),
        "Credit": envelope({"entry": ref("LedgerEntry"), "balance": ref("Balance")},
                           description="The credit's ledger entry (the first one on a replay) and the balance after."),
        "UsageRecord": object_of(UsageRecord, add={"charged_decimal": DECIMAL}),
        "ApiKey": object_of(ApiKey),
        "IssuedApiKey": object_of(ApiKey, add={"key": {"type": "string", "description": "the secret, shown once"}},
                                  description="A proxy API key just issued, with its secret."),
        "PortalLink": envelope({"url": STRING, "access": {"type": "string", "enum": ["billing_admin", "view_topup"]},
                                "expires_in_s": INTEGER}),
        "DashboardLink": envelope({"url": STRING, "path": STRING, "mode": MODE, "expires_in_s": INTEGER}),
        "RateLimits": envelope({
            "customer_id": STRING,
            "override": nullable(envelope({"requests_per_minute": nullable(INTEGER),
                                           "tokens_per_minute": nullable(INTEGER), "updated_at_ms": MS})),
            "defaults": ref("RateLimit"), "effective": ref("RateLimit"), "api_key_limits": ref("RateLimit")}),
        "RateLimit": envelope({"requests_per_minute": nullable(INTEGER), "tokens_per_minute": nullable(INTEGER)}),
        "Asset": object_of(Asset),
        "Conversion": object_of(Conversion),
        "Converted": envelope({"from_asset": STRING, "to_asset": STRING, "debited": INTEGER, "granted": INTEGER,
                               "rate": DECIMAL, "grant_id": nullable(STRING), "entry_seq": INTEGER,
                               "balances": {"type": "object", "additionalProperties": envelope(
                                   {"available": INTEGER})}}),
        "Grant": object_of(Grant, add={"free": INTEGER, "amount_decimal": DECIMAL, "free_decimal": DECIMAL}),
        "ConsumptionOrder": envelope({"customer_id": STRING, "order": {"type": "string", "enum": list(ORDERS)},
                                      "orders": {**STRINGS, "description": "every order and what it means"}}),
        "Entitlement": object_of(Entitlement),
        "Plan": object_of(Plan, add={"entitlements": {"type": "array", "items": ref("Entitlement")}}),
        "Subscription": object_of(Subscription),
        "Tick": envelope({"periods_granted": INTEGER, "subscription": ref("Subscription")}),
        "Hold": object_of(HoldView),
        "HoldBalance": object_of(HoldBalanceView),
        "HoldAnswer": envelope({"hold": ref("Hold"), "balance": ref("HoldBalance"), "extended": INTEGER,
                                "charged": INTEGER, "written_off": INTEGER}, "extended", "charged", "written_off",
                               description="The hold after the call and the wallet's balance: 'extended' after an "
                                           "extend, 'charged' and 'written_off' after a capture or void."),
        "HoldWithAllocations": envelope({"hold": ref("Hold"), "allocations": {"type": "array", "items": envelope(
            {"grant_id": nullable(STRING), "held": INTEGER, "captured": INTEGER})}}),
        "Heartbeat": envelope({"action": {"type": "string", "enum": ["continue", "stop"]},
                               "reason": nullable({"type": "string",
                                                   "enum": ["insufficient_funds", "hold_not_pending"]}),
                               "allowance": INTEGER, "charged": INTEGER, "written_off": INTEGER, "hold": ref("Hold"),
                               "balance": ref("HoldBalance"),
                               "portal_url": {**STRING, "description": "with reason insufficient_funds: the "
                                              "customer's signed billing-portal link, to top up"}},
                              "portal_url"),
        "PriceVersionSummary": version_summary,
        "PriceVersion": version,
        "Quote": envelope({"customer_id": STRING, "asset": STRING, "amount": INTEGER, "amount_decimal": DECIMAL,
                           "quantities": STRINGS, "attributes": STRINGS, "version": STRING, "rule": STRING,
                           "period_prior": STRINGS, "price": quote_price},
                          description="What the request or event would cost; nothing is held or written."),
        "EventResult": event_result,
        "AutoTopUp": object_of(AutoTopUpSetting),
        "SpendCaps": object_of(SpendCaps),
        "TopUp": object_of(TopUp),
        "ReconciliationRow": object_of(ReconRow, add={"balanced": BOOLEAN, "complete": BOOLEAN}),
        "MarginRow": _margin_row(),
    }


def answers() -> dict[str, Schema]:
    """The answers of the core admin API (metergate/admin/api.py and its neighbours), by operation."""
    seq = {"type": "integer", "minimum": 0}
    margin = envelope({"object": {"const": "margin_report"}, "mode": MODE, "group_by": STRING, "from": STRING,
                       "to": STRING, "from_ms": MS, "to_ms": MS, "units": STRINGS,
                       "data": {"type": "array", "items": ref("MarginRow")},
                       "totals": {"type": "array", "items": ref("MarginRow")},
                       "negative_margin": envelope({"customers": {"type": "array", "items": STRING},
                                                    "models": {"type": "array", "items": STRING}}),
                       "truncated": BOOLEAN})
    billing = envelope({"customer_id": STRING, "mode": MODE, "billing_mode": {"type": "string",
                                                                               "enum": ["prepaid", "invoiced"]},
                        "asset_modes": STRINGS, "credit_limits": INTEGERS, "effective": STRINGS,
                        "balances": {"type": "object"}, "changes": {"type": "array", "items": {"type": "object"}},
                        "overdraft_changes": {"type": "array", "items": envelope({
                            "asset": STRING, "from_limit": INTEGER, "to_limit": INTEGER, "target": INTEGER,
                            "reason": STRING, "created_at_ms": MS})},
                        "changed": BOOLEAN}, "changed")
    return {
        "customer_page": page_of(ref("Customer"), STRING),
        "ledger_page": page_of(ref("LedgerEntry"), seq),
        "usage_page": page_of(ref("UsageRecord"), seq),
        "api_keys": data_of(ref("ApiKey")),
        "margin": margin,
        "auto_top_up": envelope({"customer_id": STRING, "auto_top_up": nullable(ref("AutoTopUp"))}),
        "spend_caps": envelope({"customer_id": STRING, "spend_caps": nullable(ref("SpendCaps"))}),
        "top_ups": data_of(ref("TopUp")),
        "billing": billing,
        "meter_events": envelope({"customer_id": STRING, "data": {"type": "array", "items": envelope({
            **columns_of(billing_tables.meter_event_outbox, OUTBOX_FIELDS), "duplicate": BOOLEAN})}}),
        "reconciliation": envelope({"mode": MODE, "from_ms": MS, "to_ms": MS,
                                    "data": {"type": "array", "items": ref("ReconciliationRow")},
                                    "totals": {"type": "object", "additionalProperties": INTEGERS}}),
    }


def wallet_answers() -> dict[str, Schema]:
    """The answers of the wallet and hold API (metergate/admin/wallets.py, holds.py)."""
    return {
        "assets": data_of(ref("Asset")),
        "conversions": data_of(ref("Conversion")),
        "grant_page": page_of(ref("Grant"), {"type": "integer", "minimum": 0}),
        "plans": data_of(ref("Plan")),
        "subscriptions": data_of(ref("Subscription")),
        "holds": data_of(ref("Hold")),
    }


def pricing_answers() -> dict[str, Any]:
    """The answers of the pricing API (metergate/pricing/admin.py)."""
    totals = {"type": "array", "items": envelope({"asset": STRING, "records": INTEGER, "old_total": INTEGER,
                                                  "new_total": INTEGER, "difference": INTEGER})}
    return {
        "validated": envelope({"valid": {"const": True}, "rules": {"type": "array", "items": {"type": "object"}}}),
        "versions": envelope({"data": {"type": "array", "items": ref("PriceVersionSummary")},
                              "in_force": ref("PriceVersionSummary"), "next_cursor": nullable(MS)}),
        "simulation": envelope({"version": STRING, "from_ms": MS, "to_ms": MS,
                                "customers": {"type": "array", "items": {"type": "object"}}, "totals": totals,
                                "counts": {"type": "object"}}),
        "events": envelope({"data": {"type": "array", "items": ref("EventResult")}, "accepted": INTEGER,
                            "duplicate": INTEGER, "rejected": INTEGER}),
    }
