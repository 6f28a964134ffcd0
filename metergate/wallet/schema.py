"""The SQL schema: accounts (balance columns), holds, the append-only ledger, usage records, rate limits.

Invariant, checked by :meth:`SqlWalletStore.audit` and by the tests: for every account, each balance
column equals the sum of the matching delta column over that account's ledger entries, and
``debits_pending`` equals the sum of its pending holds. Ledger rows are only ever inserted.
Idempotency is a unique index on ``(mode, idempotency_key)``, enforced in the same transaction as
the effect it guards.
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

SCHEMA_VERSION = 1

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
    Index("ix_usage_customer", "mode", "customer_id", "seq"),
    Index("ix_usage_time", "mode", "created_at_ms"),  # margin reports and the dashboard read time ranges
)

# Rate limits (issue #7). New tables need no version bump: ``create_all`` adds them to an existing database.
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
