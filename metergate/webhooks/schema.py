"""The webhook outbox, on the wallet's metadata so that the wallet's migration (``create_all``) creates it.

One row per notification; its ``id`` is the ``webhook-id`` a receiver deduplicates by, and ``payload`` is
the exact body every attempt sends and signs. ``status``: ``pending`` (to be sent, at ``next_attempt_at_ms``),
``delivered``, ``failed`` (every attempt used) or ``skipped`` (no ``notify_url``: kept for the admin API and
``metergate webhooks listen``). A replica sending a row holds it by ``claim_token`` until
``claimed_until_ms``; a crashed replica's claim runs out and another takes the row over.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text

from metergate.wallet.schema import metadata

webhook_outbox = Table(
    "webhook_outbox", metadata,
    Column("id", String(64), primary_key=True),
    Column("mode", String(4), nullable=False),
    Column("type", String(64), nullable=False),
    Column("customer_id", String(128), nullable=True),
    Column("payload", Text, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("status", String(12), nullable=False),
    Column("next_attempt_at_ms", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("delivered_at_ms", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("claim_token", String(32), nullable=True),
    Column("claimed_until_ms", BigInteger, nullable=False, default=0),
    Index("ix_webhook_outbox_due", "status", "next_attempt_at_ms"),
    Index("ix_webhook_outbox_mode", "mode", "created_at_ms", "id"),
)

TABLES = (webhook_outbox,)
