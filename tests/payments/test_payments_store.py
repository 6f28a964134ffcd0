"""Payment state keeps its invariants in every topology (SQLite, PostgreSQL and PostgreSQL with Redis, two
replicas each): one auto top-up in flight per wallet under concurrency, a daily cap, outcomes that never
regress, and a Stripe-keyed credit applied once.

Method: the wallet fixture ``store`` (each topology, calls alternating between replicas), the payment tables
created on it, and concurrent calls through ``asyncio.gather``; the ledger audit is checked afterwards.
"""

from __future__ import annotations

import asyncio
from typing import cast

from metergate.payments.store import PaymentsStore
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore


async def _payments(store: WalletStore) -> PaymentsStore:
    payments = PaymentsStore(cast(SqlWalletStore, store))  # or Replicas of them (tests/topologies.py)
    await payments.open()
    await store.create_customer("test", "acme", "Acme")
    return payments


async def test_one_in_flight_under_concurrency(store: WalletStore) -> None:
    payments = await _payments(store)
    claims = await asyncio.gather(*(payments.begin_auto_topup("test", "acme", "USD", 1_000, day_start_ms=0,
                                                              daily_cap=100) for _ in range(20)))
    assert len([c for c in claims if c is not None]) == 1


async def test_daily_cap_counts_finished_attempts(store: WalletStore) -> None:
    payments = await _payments(store)
    for _ in range(2):
        topup = await payments.begin_auto_topup("test", "acme", "USD", 1_000, day_start_ms=0, daily_cap=2)
        assert topup is not None
        assert await payments.finish_topup(topup.id, "failed", error_code="card_declined") is not None
    assert await payments.begin_auto_topup("test", "acme", "USD", 1_000, day_start_ms=0, daily_cap=2) is None


async def test_succeeded_never_regresses_to_failed(store: WalletStore) -> None:
    payments = await _payments(store)
    topup = await payments.begin_auto_topup("test", "acme", "USD", 1_000, day_start_ms=0, daily_cap=5)
    assert topup is not None
    assert await payments.finish_topup(topup.id, "succeeded") is not None
    assert await payments.finish_topup(topup.id, "failed", error_code="late") is None
    assert await payments.finish_topup(topup.id, "succeeded") is None  # told once
    found = await payments.get_topup(topup.id)
    assert found is not None and found.state == "succeeded" and found.error_code is None


async def test_stripe_keyed_credit_applies_once_under_concurrency(store: WalletStore) -> None:
    await _payments(store)
    await asyncio.gather(*(store.credit("test", "acme", "USD", 25_000_000, idempotency_key="stripe:cs_test_1",
                                        memo="Stripe top-up cs_test_1") for _ in range(20)))
    assert (await store.balance("test", "acme", "USD")).available == 25_000_000
    assert await store.audit() == []


async def test_stripe_customer_is_stored_once(store: WalletStore) -> None:
    payments = await _payments(store)
    stored = await asyncio.gather(payments.save_stripe_customer("test", "acme", "cus_first"),
                                  payments.save_stripe_customer("test", "acme", "cus_second"))
    assert stored[0] == stored[1] and stored[0] in ("cus_first", "cus_second")
    assert await payments.stripe_customer("test", "acme") == stored[0]
