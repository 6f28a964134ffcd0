"""Payment tables, on the wallet's metadata so that the wallet's migration (``create_all``) creates them.

* ``stripe_customers``: the Stripe customer of each wallet owner, created lazily, one per mode;
* ``topups``: every top-up attempt (Checkout or off-session), its Stripe object and its state. The money
  itself moves only through the wallet's ``credit``, whose idempotency key is the Stripe object's id: the
  ledger's unique index is what makes duplicate and concurrent deliveries credit once;
* ``auto_topup_settings`` and ``spend_caps``: per wallet and asset, set by the operator or the customer.

Invariant: at most one auto top-up per (mode, customer, asset) is ``in_flight``, enforced by a unique index
on ``in_flight_key`` (NULL once the attempt has ended; NULLs never collide).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, String, Table, Text

from metergate.wallet.schema import metadata

stripe_customers = Table(
    "stripe_customers", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("stripe_customer_id", String(255), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

topups = Table(
    "topups", metadata,
    Column("id", String(64), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),  # in the asset's smallest unit
    Column("kind", String(8), nullable=False),  # checkout | auto
    Column("state", String(12), nullable=False),  # pending | in_flight | succeeded | failed
    Column("stripe_id", String(255), nullable=True),  # the Checkout Session or PaymentIntent
    Column("in_flight_key", String(200), nullable=True, unique=True),
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Index("ix_topups_customer", "mode", "customer_id", "created_at_ms"),
    Index("ix_topups_stripe", "stripe_id"),
)

auto_topup_settings = Table(
    "auto_topup_settings", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("asset", String(32), primary_key=True),
    Column("threshold", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

spend_caps = Table(
    "spend_caps", metadata,
    Column("mode", String(4), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("asset", String(32), primary_key=True),
    Column("daily", BigInteger, nullable=True),
    Column("monthly", BigInteger, nullable=True),
    Column("updated_at_ms", BigInteger, nullable=False),
)

TABLES = (stripe_customers, topups, auto_topup_settings, spend_caps)
