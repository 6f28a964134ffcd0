"""Pricing tables, on the wallet's metadata so that the wallet's migration (``create_all``) creates them.

* ``price_versions``: every price version of a mode, a draft until published with an ``effective_at``; a
  published version never changes. The rule set is stored as the canonical JSON that validation produced.
* ``pricing_period_usage``: what each priced item added to a tier counter (``rules.Tiers.counter``) in its
  period, keyed by (record id, counter) so that counting an item twice is impossible. Quantities are stored
  in millionths of a unit (event quantities have at most six decimal places), as integers.
* ``price_version_keys``: the idempotency key a draft was created under, with the SHA-256 of its canonical
  rules, so that a retried create (``metergate prices push`` after a lost answer) returns the first draft
  instead of storing a second one. The primary key makes the claim and the draft one transaction's effect.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, String, Table, Text

from metergate.wallet.schema import metadata

price_versions = Table(
    "price_versions", metadata,
    Column("id", String(40), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("state", String(9), nullable=False),  # draft | published
    Column("rules", JSON, nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("effective_at_ms", BigInteger, nullable=True),
    Column("published_at_ms", BigInteger, nullable=True),
    Index("ix_price_versions_mode", "mode", "state", "effective_at_ms"),
)

pricing_period_usage = Table(
    "pricing_period_usage", metadata,
    Column("record_id", String(64), primary_key=True),
    Column("counter", String(200), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("period_start_ms", BigInteger, nullable=False),
    Column("quantity_micros", BigInteger, nullable=False),
    Index("ix_pricing_period_usage", "mode", "customer_id", "counter", "period_start_ms"),
)

price_version_keys = Table(
    "price_version_keys", metadata,
    Column("mode", String(4), primary_key=True),
    Column("idempotency_key", String(128), primary_key=True),
    Column("version_id", String(40), nullable=False),
    Column("rules_sha256", String(64), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

TABLES = (price_versions, pricing_period_usage, price_version_keys)
