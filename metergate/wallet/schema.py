"""The SQL schema: accounts (balance columns), holds, the append-only ledger, usage records, rate limits,
and grants, hold allocations, custom assets, conversions, plans and subscriptions.

Invariant, checked by :meth:`SqlWalletStore.audit` and by the tests: for every account, each balance
column equals the sum of the matching delta column over that account's ledger entries, and
``debits_pending`` equals the sum of its pending holds. Ledger rows are only ever inserted.
Idempotency is a unique index on ``(mode, idempotency_key)``, enforced in the same transaction as
the effect it guards.

Grants (see :mod:`metergate.wallet.grants`) refine the account aggregate without replacing it: an
account's ``credits_posted`` is the sum of ``amount - removed`` over its activated grants, and every
hold's pending amount and every capture is split over ``hold_allocations`` rows, one per grant drawn
(``grant_id = ''`` for the part an overdraft or an overdraw covers), so that ``debits_posted`` is the sum
of the allocations' ``captured`` and ``debits_pending`` the sum of the open allocations' ``held``.
Every change of a grant's credit is a ledger row carrying its ``grant_id``.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 4  # v2: ledger_entries.grant_id, grants and allocations; v3: api_keys.attributes;
# v4: usage_records.budget_path (the budget node path a request was charged along)

metadata = MetaData()

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "metergate_schema", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at_ms", BigInteger, nullable=False),
)

customers = Table(
    "customers", metadata,
    Column("mode", String(4), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("name", String(256), nullable=False, default=""),
    Column("created_at_ms", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(24), nullable=False),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=True),
    Column("attributes", JSON, nullable=True),  # v3: the key's pricing attributes (NULL: none)
    ForeignKeyConstraint(["mode", "customer_id"], ["customers.mode", "customers.id"]),
)

accounts = Table(
    "accounts", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("asset", String(32), primary_key=True),
    Column("credits_posted", BigInteger, nullable=False, default=0),
    Column("debits_posted", BigInteger, nullable=False, default=0),
    Column("debits_pending", BigInteger, nullable=False, default=0),
    Column("overdraft_limit", BigInteger, nullable=False, default=0),
    ForeignKeyConstraint(["mode", "customer_id"], ["customers.mode", "customers.id"]),
)

holds = Table(
    "holds", metadata,
    Column("id", String(64), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("state", String(9), nullable=False),
    Column("captured_amount", BigInteger, nullable=False, default=0),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("resolved_at_ms", BigInteger, nullable=True),
    Index("ix_holds_pending_expiry", "state", "expires_at_ms"),
)

ledger_entries = Table(
    "ledger_entries", metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(200), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("credits_delta", BigInteger, nullable=False),
    Column("posted_delta", BigInteger, nullable=False),
    Column("pending_delta", BigInteger, nullable=False),
    Column("hold_id", String(64), nullable=True),
    Column("memo", Text, nullable=False, default=""),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("grant_id", String(64), nullable=True),  # v2: the grant whose credit this entry changes
    UniqueConstraint("mode", "idempotency_key", name="uq_ledger_idempotency"),
    Index("ix_ledger_account", "mode", "customer_id", "seq"),
)

usage_records = Table(
    "usage_records", metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("hold_id", String(64), nullable=True),
    Column("route", String(128), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("feature", String(128), nullable=True),
    Column("stream", Boolean, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("usage_source", String(9), nullable=False),
    Column("tokens_input", BigInteger, nullable=False),
    Column("tokens_cached_input", BigInteger, nullable=False),
    Column("tokens_output", BigInteger, nullable=False),
    Column("tokens_reasoning", BigInteger, nullable=False),
    Column("tokens_cache_write", BigInteger, nullable=False, default=0),
    Column("asset", String(32), nullable=False),
    Column("price_amount", BigInteger, nullable=False),
    Column("charged_amount", BigInteger, nullable=False),
    Column("written_off_amount", BigInteger, nullable=False),
    Column("cost_nanos", BigInteger, nullable=True),
    Column("detail", JSON, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("budget_path", String(1040), nullable=True),  # v4: "root/project/agent"; NULL: no budget node
    Index("ix_usage_customer", "mode", "customer_id", "seq"),
    Index("ix_usage_time", "mode", "created_at_ms"),  # margin reports and the dashboard read time ranges
)

# Rate limits. New tables need no version bump: ``create_all`` adds them to an existing database.
# A customer's override replaces the configured default limits; NULL lifts that limit.
rate_limit_overrides = Table(
    "rate_limit_overrides", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("requests_per_minute", BigInteger, nullable=True),
    Column("tokens_per_minute", BigInteger, nullable=True),
    Column("updated_at_ms", BigInteger, nullable=False),
    ForeignKeyConstraint(["mode", "customer_id"], ["customers.mode", "customers.id"]),
)

# Fixed one-minute windows shared by every replica: one row per (mode, subject, window), charged by an
# atomic conditional upsert, pruned a few windows later.
rate_limit_windows = Table(
    "rate_limit_windows", metadata,
    Column("mode", String(4), primary_key=True),
    Column("subject", String(160), primary_key=True),
    Column("window_start_ms", BigInteger, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Index("ix_rate_limit_windows_start", "window_start_ms"),
)


# Grants, allocations, assets, plans and subscriptions.

# One row per credit. ``amount`` is what was granted; ``consumed`` what captures drew, ``held`` what open holds
# have allocated, ``removed`` what lapsed at expiry or was voided: ``amount - consumed - held - removed`` is the
# grant's free remainder, never negative. ``state``: scheduled (not effective yet: not in credits_posted),
# active, expired, voided. ``seq`` orders grants by age (ties of created_at_ms).
grants = Table(
    "grants", metadata,
    Column("id", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("purpose", String(12), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("consumed", BigInteger, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("removed", BigInteger, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("effective_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=True),
    Column("state", String(9), nullable=False),
    Column("source", String(200), nullable=False, default=""),  # e.g. the subscription period that granted it
    Column("memo", Text, nullable=False, default=""),
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_grants_account", "mode", "customer_id", "asset", "state"),
    Index("ix_grants_expiry", "state", "expires_at_ms"),
    Index("ix_grants_effective", "state", "effective_at_ms"),
)

# How a hold's amount is split over grants: ``held`` is still pending, ``captured`` was drawn. ``grant_id`` is
# '' for the part no grant covers (an overdraft limit, or a hold replayed with overdraw=True).
hold_allocations = Table(
    "hold_allocations", metadata,
    Column("hold_id", String(64), primary_key=True),
    Column("grant_id", String(64), primary_key=True),
    Column("held", BigInteger, nullable=False),
    Column("captured", BigInteger, nullable=False),
)

# Per-wallet settings; today only the consumption order (metergate.wallet.grants.ORDERS).
wallet_settings = Table(
    "wallet_settings", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("consumption_order", String(32), nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

# Operator-defined assets per mode; the assets in settings are always present besides these.
assets = Table(
    "assets", metadata,
    Column("mode", String(4), primary_key=True),
    Column("code", String(32), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("scale", Integer, nullable=False),
    Column("value_per_unit", String(64), nullable=True),  # a Decimal string: fiat value of one major unit
    Column("value_currency", String(8), nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
)

# Where one asset may be turned into another: ``rate`` (a Decimal string) major units of ``to_asset`` per major
# unit of ``from_asset``; the converted amount is rounded down to the smallest unit.
asset_conversions = Table(
    "asset_conversions", metadata,
    Column("mode", String(4), primary_key=True),
    Column("from_asset", String(32), primary_key=True),
    Column("to_asset", String(32), primary_key=True),
    Column("rate", String(64), nullable=False),
    Column("purpose", String(12), nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

plans = Table(
    "plans", metadata,
    Column("mode", String(4), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("period", String(5), nullable=False),  # month | week | days
    Column("period_days", Integer, nullable=True),  # for period = days
    Column("entitlements", JSON, nullable=False),  # [{"asset", "amount", "rollover_cap", "priority"}]
    Column("created_at_ms", BigInteger, nullable=False),
)

subscriptions = Table(
    "subscriptions", metadata,
    Column("mode", String(4), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("plan_id", String(128), nullable=False),
    Column("anchor_ms", BigInteger, nullable=False),  # the start of period 0
    Column("next_period", BigInteger, nullable=False),  # the first period not granted yet
    Column("state", String(8), nullable=False),  # active | canceled
    Column("canceled_at_ms", BigInteger, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    ForeignKeyConstraint(["mode", "customer_id"], ["customers.mode", "customers.id"]),
    Index("ix_subscriptions_state", "state"),
)

# The recorded outcome of each hold-API call, in the transaction of its effect: a replay answers the same.
hold_requests = Table(
    "hold_requests", metadata,
    Column("mode", String(4), primary_key=True),
    Column("key", String(300), primary_key=True),
    Column("hold_id", String(64), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("response", JSON, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

# Escrow leases (metergate/wallet/escrow.py): a lease is a hold whose id starts ``lease:<owner>:``; a process
# that the shared store refused while leases sat on the wallet asks their owners for them back with this row,
# which every lease holder's heartbeat reads.
lease_recalls = Table(
    "lease_recalls", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("asset", String(32), primary_key=True),
    Column("recalled_at_ms", BigInteger, nullable=False),
)

# Budgets (metergate/budgets): a tree of nodes below each customer, their limits, which node each proxy key
# is attached to, the limits' use per window bucket (claimed quota, as for the rate limits), alert thresholds
# and the alerts fired, each claimed once by a unique key.
budget_nodes = Table(
    "budget_nodes", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("parent_id", String(128), nullable=True),  # NULL only for the root
    Column("kind", String(16), nullable=False),
    Column("name", String(256), nullable=False, default=""),
    Column("allowed_models", JSON, nullable=True),  # NULL: any model
    Column("created_at_ms", BigInteger, nullable=False),
    ForeignKeyConstraint(["mode", "customer_id"], ["customers.mode", "customers.id"]),
)

budget_limits = Table(
    "budget_limits", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("node_id", String(128), nullable=False),
    Column("dimension", String(8), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("window_kind", String(8), nullable=False),
    Column("window_length_ms", BigInteger, nullable=False),
    Column("window_buckets", Integer, nullable=False),
    Column("asset", String(32), nullable=True),
    Column("version", Integer, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

budget_key_nodes = Table(
    "budget_key_nodes", metadata,
    Column("key_id", String(40), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("node_id", String(128), nullable=False),
    Index("ix_budget_key_nodes_customer", "mode", "customer_id"),
)

budget_usage = Table(
    "budget_usage", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("limit_id", String(128), primary_key=True),
    Column("bucket_start_ms", BigInteger, primary_key=True),
    Column("used", BigInteger, nullable=False),
    Index("ix_budget_usage_bucket", "bucket_start_ms"),
)

budget_alert_rules = Table(
    "budget_alert_rules", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("target", String(140), nullable=False),  # "balance:<asset>" or "limit:<limit id>"
    Column("thresholds", JSON, nullable=False),  # [{"percent": 80} | {"amount": 5000}, ...]
    Column("updated_at_ms", BigInteger, nullable=False),
)

# One row per alert that fired: the key (rule, threshold, period) is unique, so that however many replicas
# see a crossing, and across restarts, one of them inserts it and only that one enqueues the webhook.
budget_alert_events = Table(
    "budget_alert_events", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("rule_id", String(128), primary_key=True),
    Column("threshold", String(40), primary_key=True),
    Column("period_start_ms", BigInteger, primary_key=True),
    Column("fired_at_ms", BigInteger, nullable=False),
    Column("recovered_at_ms", BigInteger, nullable=True),
)
