"""The wallet's contract, on SQLite and on PostgreSQL: idempotent credits, two-phase holds, write-offs,
expiry, and balances that are always derivable from the append-only ledger.

Method: drive the public ``WalletStore`` interface against real databases (``store`` runs each test on
both) and check results, ledger entries and ``audit()`` after every step.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from metergate.wallet.errors import CustomerNotFound, IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.store import WalletStore

MODE = "test"


def usage(record_id: str, hold_id: str, price: int) -> UsageRecord:
    return UsageRecord(id=record_id, mode=MODE, customer_id="acme", hold_id=hold_id, route="/openai",
                       endpoint="chat.completions", model="gpt-4o-mini", feature=None, stream=False,
                       status_code=200, usage_source="provider", tokens_input=10, tokens_cached_input=0,
                       tokens_output=5, tokens_reasoning=0, asset="USD", price_amount=price)


async def funded(store: WalletStore, amount: int = 1000) -> None:
    await store.create_customer(MODE, "acme", "Acme")
    if amount:
        await store.credit(MODE, "acme", "USD", amount, idempotency_key="seed")


async def test_credit_with_the_same_key_applies_once(store: WalletStore) -> None:
    await funded(store, 0)
    first = await store.credit(MODE, "acme", "USD", 500, idempotency_key="topup-1")
    again = await store.credit(MODE, "acme", "USD", 500, idempotency_key="topup-1")
    assert again.seq == first.seq
    assert (await store.balance(MODE, "acme", "USD")).available == 500
    with pytest.raises(IdempotencyConflict):
        await store.credit(MODE, "acme", "USD", 501, idempotency_key="topup-1")
    assert (await store.balance(MODE, "acme", "USD")).available == 500


async def test_credit_to_unknown_customer_is_refused(store: WalletStore) -> None:
    with pytest.raises(CustomerNotFound):
        await store.credit(MODE, "ghost", "USD", 5, idempotency_key="x")


async def test_modes_are_separate_wallets(store: WalletStore) -> None:
    await funded(store)
    await store.create_customer("live", "acme", "Acme live")
    assert (await store.balance("live", "acme", "USD")).available == 0
    with pytest.raises(InsufficientFunds):
        await store.reserve("live", "acme", "USD", 1, hold_id="h-live", ttl_ms=60_000)


async def test_reserve_is_refused_when_pending_and_posted_would_exceed_credits(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    with pytest.raises(InsufficientFunds) as refused:
        await store.reserve(MODE, "acme", "USD", 401, hold_id="h2", ttl_ms=60_000)
    assert (refused.value.available, refused.value.required) == (400, 401)
    await store.reserve(MODE, "acme", "USD", 400, hold_id="h3", ttl_ms=60_000)
    assert (await store.balance(MODE, "acme", "USD")).available == 0
    assert await store.audit() == []


async def test_capture_releases_unused_hold(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    settled = await store.settle("h1", 250, usage("r1", "h1", 250))
    assert (settled.charged, settled.written_off) == (250, 0)
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.available, balance.debits_pending, balance.debits_posted) == (750, 0, 250)
    [(_, record)] = await store.usage(MODE, "acme", limit=10)
    assert record.charged_amount == 250 and record.written_off_amount == 0
    assert await store.audit() == []


async def test_capture_above_the_hold_draws_available_then_writes_off(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 300, hold_id="h1", ttl_ms=60_000)
    await store.reserve(MODE, "acme", "USD", 500, hold_id="h2", ttl_ms=60_000)
    # h1's usage came out at 600: 300 from its hold, 200 still available, 100 written off.
    settled = await store.settle("h1", 600, usage("r1", "h1", 600))
    assert (settled.charged, settled.written_off) == (500, 100)
    assert (await store.balance(MODE, "acme", "USD")).available == 0
    [(_, record)] = await store.usage(MODE, "acme", limit=10)
    assert (record.price_amount, record.charged_amount, record.written_off_amount) == (600, 500, 100)
    assert await store.audit() == []


async def test_void_releases_the_whole_hold(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    settled = await store.settle("h1", 0)
    assert settled.charged == 0
    assert (await store.get_hold("h1")).state == "voided"  # type: ignore[union-attr]
    assert (await store.balance(MODE, "acme", "USD")).available == 1000


async def test_settle_is_idempotent_and_a_different_amount_conflicts(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    first = await store.settle("h1", 100, usage("r1", "h1", 100))
    again = await store.settle("h1", 100, usage("r1", "h1", 100))
    assert again.replayed and again.charged == first.charged == 100
    with pytest.raises(IdempotencyConflict):
        await store.settle("h1", 200)
    assert (await store.balance(MODE, "acme", "USD")).available == 900
    assert len(await store.usage(MODE, "acme", limit=10)) == 1


async def test_reserve_with_the_same_hold_id_holds_once(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    hold, _ = await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=60_000)
    assert hold.amount == 600
    assert (await store.balance(MODE, "acme", "USD")).debits_pending == 600
    with pytest.raises(IdempotencyConflict):
        await store.reserve(MODE, "acme", "USD", 10, hold_id="h1", ttl_ms=60_000)


async def test_sweeper_expires_holds_and_a_late_capture_draws_available(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 600, hold_id="h1", ttl_ms=1)
    await store.reserve(MODE, "acme", "USD", 100, hold_id="h2", ttl_ms=60_000)
    await asyncio.sleep(0.01)
    assert await store.expire_holds(now_ms=now_ms()) == 1
    assert await store.expire_holds(now_ms=now_ms()) == 0  # a second sweep (another replica) does nothing
    assert (await store.get_hold("h1")).state == "expired"  # type: ignore[union-attr]
    assert (await store.balance(MODE, "acme", "USD")).available == 900
    settled = await store.settle("h1", 50)
    assert settled.charged == 50
    assert (await store.balance(MODE, "acme", "USD")).available == 850
    kinds = [e.kind for e in await store.ledger(MODE, "acme", limit=10)]
    assert kinds[:3] == ["capture", "expire", "hold"]
    assert await store.audit() == []


async def test_assets_are_independent_balances(store: WalletStore) -> None:
    await funded(store, 1000)
    await store.credit(MODE, "acme", "GPU_SECONDS", 30, idempotency_key="gpu")
    await store.reserve(MODE, "acme", "GPU_SECONDS", 30, hold_id="g1", ttl_ms=60_000)
    with pytest.raises(InsufficientFunds):
        await store.reserve(MODE, "acme", "GPU_SECONDS", 1, hold_id="g2", ttl_ms=60_000)
    assert (await store.balance(MODE, "acme", "USD")).available == 1000
    assert {b.asset for b in await store.balances(MODE, "acme")} == {"GPU_SECONDS", "USD"}


async def test_balances_equal_the_sum_of_ledger_entries_after_random_operations(store: WalletStore) -> None:
    """A seeded random walk over credits, holds, captures, voids and expiries; after it, each balance
    column is recomputed here from the ledger entries the API returns and compared."""
    rng = random.Random(20261125)
    await funded(store, 0)
    open_holds: list[str] = []
    for step in range(150):
        action = rng.choice(["credit", "reserve", "reserve", "capture", "void", "expire"])
        if action == "credit":
            await store.credit(MODE, "acme", "USD", rng.randint(1, 500), idempotency_key=f"c{step}")
        elif action == "reserve":
            try:
                await store.reserve(MODE, "acme", "USD", rng.randint(0, 300), hold_id=f"h{step}",
                                    ttl_ms=rng.choice([1, 60_000]))
                open_holds.append(f"h{step}")
            except InsufficientFunds:
                pass
        elif open_holds:
            hold_id = open_holds.pop(rng.randrange(len(open_holds)))
            if action == "expire":
                await store.expire_holds(now_ms=now_ms() + 1)
            else:
                amount = rng.randint(0, 400) if action == "capture" else 0
                await store.settle(hold_id, amount, usage(f"r{step}", hold_id, amount))
        balance = await store.balance(MODE, "acme", "USD")
        assert balance.available >= 0, f"step {step}: overspent"
    entries = await store.ledger(MODE, "acme", limit=10_000)
    balance = await store.balance(MODE, "acme", "USD")
    assert sum(e.credits_delta for e in entries) == balance.credits_posted
    assert sum(e.posted_delta for e in entries) == balance.debits_posted
    assert sum(e.pending_delta for e in entries) == balance.debits_pending
    assert len({e.idempotency_key for e in entries}) == len(entries)
    assert await store.audit() == []


async def test_concurrent_reserves_never_overspend(store: WalletStore) -> None:
    await funded(store, 100 * 7)

    async def attempt(i: int) -> bool:
        try:
            await store.reserve(MODE, "acme", "USD", 7, hold_id=f"h{i}", ttl_ms=60_000)
            return True
        except InsufficientFunds:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(300)))
    assert sum(results) == 100
    balance = await store.balance(MODE, "acme", "USD")
    assert balance.available == 0 and balance.debits_pending == 700
    assert await store.audit() == []
