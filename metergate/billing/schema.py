"""Billing tables, on the wallet's metadata so that the wallet's migration (``create_all``) creates them.

* ``billing_mode_changes``: append-only. Each row is the customer's whole billing configuration from its
  ``created_at_ms`` on (the default mode, per-asset overrides, credit limits), who set it, the mode it
  replaced and the balances at that moment. The newest row is the configuration in effect; the mode a
  usage record is billed in is the one in effect when the record was created.
* ``overdraft_changes``: append-only history of every change metergate makes to an account's
  ``overdraft_limit`` (the wallet's ledger does not carry it as a delta). Invariant, checked by
  :meth:`BillingStore.audit`: an account's ``overdraft_limit`` equals the ``to_limit`` of its newest row
  here (0 when it has none). ``target`` is the limit the configuration asks for; the applied limit is
  never below the account's exposure (so ``available`` never goes negative) and converges down to the target.
* ``meter_event_outbox``: one row per usage record of a customer that has ever been invoiced, keyed by the
  usage record's id (so a record can be enqueued once, whatever replica scans it), with the billing
  decision (``invoiced`` → a meter event to send; ``prepaid``/``zero``/``unmapped`` → nothing to send),
  the delivery state and the claim lease that lets several replicas share the work.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String, Table, Text

from metergate.wallet.schema import metadata

_SEQ = BigInteger().with_variant(Integer(), "sqlite")

billing_mode_changes = Table(
    "billing_mode_changes", metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("billing_mode", String(8), nullable=False),  # prepaid | invoiced: the customer's default
    Column("asset_modes", JSON, nullable=False),  # {asset: prepaid | invoiced}: overrides of the default
    Column("credit_limits", JSON, nullable=False),  # {asset: limit in the smallest unit}; absent: uncapped
    Column("targets", JSON, nullable=False),  # {asset: overdraft limit asked for}
    Column("previous", JSON, nullable=True),  # the configuration replaced (null: the implicit prepaid default)
    Column("balances", JSON, nullable=False),  # {asset: {credits_posted, debits_posted, debits_pending}} then
    Column("changed_by", String(128), nullable=False),
    Column("memo", Text, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_billing_mode_changes_customer", "mode", "customer_id", "seq"),
)

overdraft_changes = Table(
    "overdraft_changes", metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("from_limit", BigInteger, nullable=False),
    Column("to_limit", BigInteger, nullable=False),
    Column("target", BigInteger, nullable=False),
    Column("reason", String(128), nullable=False),  # mode_change:<id> | converge
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_overdraft_changes_account", "mode", "customer_id", "asset", "seq"),
)

meter_event_outbox = Table(
    "meter_event_outbox", metadata,
    Column("usage_id", String(64), primary_key=True),  # the meter event's identifier
    Column("mode", String(4), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("asset", String(32), nullable=False),
    Column("billing_mode", String(8), nullable=False),  # invoiced | prepaid
    Column("state", String(8), nullable=False),  # pending | sent | skipped
    Column("skip_reason", String(16), nullable=True),  # prepaid | zero | unmapped
    Column("event_name", String(100), nullable=True),
    Column("value", BigInteger, nullable=False),  # the usage record's charged amount, smallest unit
    Column("usage_created_at_ms", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at_ms", BigInteger, nullable=False),
    Column("claimed_until_ms", BigInteger, nullable=False),
    Column("claim_token", String(40), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("stripe_customer_id", String(255), nullable=True),
    Column("duplicate", Integer, nullable=False),  # 1: Stripe already held this identifier when we sent it
    Column("created_at_ms", BigInteger, nullable=False),
    Column("sent_at_ms", BigInteger, nullable=True),
    Index("ix_meter_outbox_due", "state", "next_attempt_at_ms"),
    Index("ix_meter_outbox_customer", "mode", "customer_id", "usage_created_at_ms"),
)

TABLES = (billing_mode_changes, overdraft_changes, meter_event_outbox)
