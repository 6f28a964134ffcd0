"""Escrow leases over the real SQL stores: requests admitted in memory against a lease are billed exactly once,
the ledger stays derivable, a crashed process's lease expires to what its settlements captured, and a request
the shared store refuses gets the funds that sit in other processes' leases.

Each "process" is an :class:`Escrow` over a store of its own (on PostgreSQL, its own connections and group
commit; on SQLite, the one embedded store), so that leases on one wallet compete as replicas' do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from metergate.wallet.errors import HoldNotPending, IdempotencyConflict, InsufficientFunds
from metergate.wallet.escrow import Escrow, EscrowPolicy
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import _reset_pg

MODE, CUSTOMER, ASSET = "test", "acme", "USD"
# Leased from the first reserve; returned after 50 ms idle; renewals and recalls checked every 20 ms.
FAST = EscrowPolicy(hot_per_s=1, horizon_s=1.0, share=4, min_requests=2, ttl_s=2, idle_s=0.05, tick_s=0.02,
                    recall_wait_s=2, cooldown_s=0.2)


def usage(hold_id: str, price: int) -> UsageRecord:
    return UsageRecord(id="u" + hold_id, mode=MODE, customer_id=CUSTOMER, hold_id=hold_id, route="/v1",
                       endpoint="chat", model="m", feature=None, stream=False, status_code=200,
                       usage_source="provider", tokens_input=1, tokens_cached_input=0, tokens_output=1,
                       tokens_reasoning=0, asset=ASSET, price_amount=price)


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[list[SqlWalletStore]]:
    """Two processes' stores on one database (SQLite: one store, shared)."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
        opened = [SqlWalletStore(store_url), SqlWalletStore(store_url)]
    else:
        one = SqlWalletStore(store_url)
        opened = [one, one]
    for s in dict.fromkeys(opened):
        await s.open()
    await opened[0].create_customer(MODE, CUSTOMER, "Acme")
    yield opened
    for s in dict.fromkeys(opened):
        await s.close()


async def started(store: SqlWalletStore, policy: EscrowPolicy = FAST) -> Escrow:
    escrow = Escrow(store, policy)
    await escrow.start()
    return escrow


async def spend(escrow: Escrow, n: int, *, hold: int, price: int) -> list[str]:
    """``n`` requests reserved and settled concurrently; the ids of the ones admitted."""
    async def one(i: int) -> str | None:
        hold_id = f"h{uuid.uuid4().hex[:10]}{i}"
        try:
            await escrow.reserve(MODE, CUSTOMER, ASSET, hold, hold_id=hold_id, ttl_ms=60_000)
        except InsufficientFunds:
            return None
        await escrow.settle(hold_id, price, usage(hold_id, price))
        return hold_id

    return [h for h in await asyncio.gather(*(one(i) for i in range(n))) if h is not None]


async def settled_state(store: SqlWalletStore) -> tuple[Any, list[Any]]:
    balance = await store.balance(MODE, CUSTOMER, ASSET)
    records = [r for _, r in await store.usage(MODE, CUSTOMER, limit=100_000)]
    return balance, records


async def test_leased_requests_are_billed_once_and_the_ledger_derives_the_balance(
        stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    await store.credit(MODE, CUSTOMER, ASSET, 1_000_000, idempotency_key="fund")
    escrow = await started(store)
    admitted = await spend(escrow, 200, hold=1_000, price=700)
    assert len(admitted) == 200
    assert escrow.stats["local"] > 100, escrow.stats  # most of the hot wallet's requests were served from leases
    await escrow.close()
    balance, records = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (200 * 700, 0)
    assert sorted(r.hold_id for r in records) == sorted(admitted)
    assert all((r.charged_amount, r.written_off_amount) == (700, 0) for r in records)
    assert await store.audit() == []


async def test_a_replayed_settlement_charges_nothing_more(stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    await store.credit(MODE, CUSTOMER, ASSET, 1_000_000, idempotency_key="fund")
    escrow = await started(store)
    await spend(escrow, 5, hold=1_000, price=10)  # makes the wallet hot: the next one is leased
    await escrow.reserve(MODE, CUSTOMER, ASSET, 1_000, hold_id="h-replay", ttl_ms=60_000)
    assert escrow.local_hold("h-replay") is not None
    first = await escrow.settle("h-replay", 400, usage("h-replay", 400))
    again = await escrow.settle("h-replay", 400, usage("h-replay", 400))
    assert (first.charged, first.replayed) == (400, False)
    assert (again.charged, again.replayed) == (400, True)
    with pytest.raises(IdempotencyConflict):
        await escrow.settle("h-replay", 401, usage("h-replay", 401))
    await escrow.close()
    balance, _ = await settled_state(store)
    assert balance.debits_posted == 5 * 10 + 400
    assert await store.audit() == []


async def test_a_request_that_costs_more_than_its_hold_draws_the_wallet_beyond_the_lease(
        stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    await store.credit(MODE, CUSTOMER, ASSET, 100_000, idempotency_key="fund")
    escrow = await started(store)
    await spend(escrow, 3, hold=1_000, price=1_000)
    await escrow.reserve(MODE, CUSTOMER, ASSET, 1_000, hold_id="h-big", ttl_ms=60_000)
    done = await escrow.settle("h-big", 50_000, usage("h-big", 50_000))
    assert (done.charged, done.written_off) == (50_000, 0)
    await escrow.close()
    balance, _ = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (53_000, 0)
    assert await store.audit() == []


async def test_a_crashed_process_lease_expires_to_what_its_settlements_captured(
        stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    await store.credit(MODE, CUSTOMER, ASSET, 1_000_000, idempotency_key="fund")
    crashed = Escrow(store, FAST)  # no heartbeat: it "dies" with its lease open
    await spend(crashed, 20, hold=1_000, price=300)
    await crashed.reserve(MODE, CUSTOMER, ASSET, 1_000, hold_id="h-lost", ttl_ms=60_000)  # never settled
    balance, _ = await settled_state(store)
    assert balance.debits_pending > 0  # the lease
    assert await store.expire_holds(now_ms=now_ms() + 3_000) >= 1  # past its 2 s TTL: the sweeper's turn
    balance, records = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (20 * 300, 0)
    assert len(records) == 20
    assert await store.audit() == []


async def test_a_refused_request_recalls_the_funds_in_another_process_lease(stores: list[SqlWalletStore]) -> None:
    a_store, b_store = stores
    await a_store.credit(MODE, CUSTOMER, ASSET, 40_000, idempotency_key="fund")
    a = await started(a_store, EscrowPolicy(hot_per_s=1, share=2, min_requests=4, ttl_s=5, idle_s=60, tick_s=0.02,
                                            recall_wait_s=3, cooldown_s=0.5))
    await spend(a, 2, hold=1_000, price=1_000)
    lease = next(iter(a.leased()))
    assert lease.free > 0
    b = await started(b_store)
    leased = lease.amount - lease.captured
    free = (await b_store.balance(MODE, CUSTOMER, ASSET)).available
    # More than the shared store has free, less than it has with A's lease back.
    ask = free + leased // 2
    hold, _ = await b.reserve(MODE, CUSTOMER, ASSET, ask, hold_id="h-b", ttl_ms=60_000)
    assert hold.amount == ask
    assert b.local_hold("h-b") is None  # a hold in the shared store: the wallet is too small to lease now
    await b.settle("h-b", ask, usage("h-b", ask))
    await a.close()
    await b.close()
    balance, _ = await settled_state(a_store)
    assert (balance.debits_posted, balance.debits_pending) == (2_000 + ask, 0)
    assert await a_store.audit() == []


@pytest.mark.parametrize("price_equals_hold", [True])
async def test_two_processes_serve_exactly_what_the_wallet_funds(stores: list[SqlWalletStore],
                                                                 price_equals_hold: bool) -> None:
    """The storm at the store: a wallet funded for K requests at price = hold, 4K requests split over two
    processes' leases: exactly K admitted, the wallet ends empty, nothing written off."""
    k, fee = 300, 1_000
    await stores[0].credit(MODE, CUSTOMER, ASSET, k * fee, idempotency_key="fund")
    a, b = await started(stores[0]), await started(stores[1])
    got = await asyncio.gather(spend(a, 2 * k, hold=fee, price=fee), spend(b, 2 * k, hold=fee, price=fee))
    assert a.stats["local"] + b.stats["local"] > 0, (a.stats, b.stats)
    await a.close()
    await b.close()
    assert len(got[0]) + len(got[1]) == k
    balance, records = await settled_state(stores[0])
    assert (balance.available, balance.debits_pending) == (0, 0)
    assert len(records) == k and all(r.written_off_amount == 0 for r in records)
    assert await stores[0].audit() == []


# ---------------------------------------------------------------------- shrinking a lease in place

# Heartbeats by hand (``tick()``), and the wallet's balance as the last round trip left it (a settlement's).
MANUAL = EscrowPolicy(hot_per_s=1, horizon_s=1.0, share=2, min_requests=2, ttl_s=5, idle_s=60, tick_s=3600,
                      recall_wait_s=0, cooldown_s=0)


async def shrink_entries(store: SqlWalletStore) -> list[Any]:
    return [e for e in await store.ledger(MODE, CUSTOMER, limit=100_000) if e.kind == "shrink"]


async def lease_of(escrow: Escrow, store: SqlWalletStore) -> tuple[Any, Any]:
    """The process's one lease, and its hold as the shared store has it."""
    (lease,) = escrow.leased()
    hold = await store.get_hold(lease.hold_id)
    assert hold is not None
    return lease, hold


async def oversized_lease(store: SqlWalletStore, escrow: Escrow) -> int:
    """Fund the wallet, give ``escrow`` a lease sized for a burst of 40 requests, then let a direct hold (a
    replica serving the wallet hold by hold, or a long job) take most of what is free outside the lease, and
    settle one more leased request, whose answer tells the lease holder how little the wallet has left."""
    await store.credit(MODE, CUSTOMER, ASSET, 100_000, idempotency_key="fund")
    await spend(escrow, 40, hold=1_000, price=100)
    free = (await store.balance(MODE, CUSTOMER, ASSET)).available
    await store.reserve(MODE, CUSTOMER, ASSET, free - 8_000, hold_id="direct-1", ttl_ms=60_000)
    await spend(escrow, 1, hold=1_000, price=100)
    return free - 8_000


async def test_a_lease_well_above_its_target_shrinks_at_the_heartbeat_and_others_get_the_funds_at_once(
        stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    a = Escrow(store, MANUAL)
    direct = await oversized_lease(store, a)
    lease, hold = await lease_of(a, store)
    before = (await store.balance(MODE, CUSTOMER, ASSET)).available
    await a.tick()  # target: a share of the 8,000 left, far below what the lease holds free
    assert a.stats["shrinks"] == 1 and not lease.retiring
    after = (await store.balance(MODE, CUSTOMER, ASSET)).available
    _, shrunk = await lease_of(a, store)
    given = hold.amount - shrunk.amount
    assert given > 0 and after == before + given
    assert [e.amount for e in await shrink_entries(store)] == [given]
    assert lease.amount - lease.captured == shrunk.amount - shrunk.captured_amount  # the count is the store's
    # The funds are the wallet's at once: a direct hold needing them is admitted, and the lease still serves.
    await store.reserve(MODE, CUSTOMER, ASSET, after, hold_id="direct-2", ttl_ms=60_000)
    assert len(await spend(a, 2, hold=1_000, price=100)) == 2
    await a.tick()  # nothing more to give back
    assert a.stats["shrinks"] == 1
    await store.settle("direct-1", direct)
    await store.settle("direct-2", 0)
    await a.close()
    balance, records = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (43 * 100 + direct, 0)
    assert len(records) == 43
    assert await store.audit() == []


async def test_shrinks_racing_the_lease_settlements_bill_each_request_once(stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    a = Escrow(store, MANUAL)
    direct = await oversized_lease(store, a)

    async def shrinking() -> None:
        for _ in range(10):
            await a.shrink()
            await asyncio.sleep(0)

    admitted, _ = await asyncio.gather(spend(a, 100, hold=100, price=60), shrinking())
    assert len(admitted) == 100 and a.stats["shrinks"] >= 1
    lease, hold = await lease_of(a, store)
    assert lease.captured == hold.captured_amount and lease.amount <= hold.amount
    await store.settle("direct-1", direct)
    await a.close()
    balance, records = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (41 * 100 + 100 * 60 + direct, 0)
    assert len(records) == 141 and all(r.written_off_amount == 0 for r in records)
    assert await store.audit() == []


async def test_a_shrunk_hold_keeps_the_grants_its_captures_draw_first(stores: list[SqlWalletStore]) -> None:
    """The store's shrink on its own: what it gives back is what a capture would draw last (here the paid
    funds, behind an allowance of higher priority), and what the hold keeps is still captured from it."""
    store = stores[0]
    await store.credit(MODE, CUSTOMER, ASSET, 5_000, idempotency_key="allowance", purpose="entitlement",
                       priority=100, grant_id="g-allowance")
    await store.credit(MODE, CUSTOMER, ASSET, 10_000, idempotency_key="paid", grant_id="g-paid")
    await store.reserve(MODE, CUSTOMER, ASSET, 12_000, hold_id="lease:x:1", ttl_ms=60_000)
    hold, given = await store.shrink_hold("lease:x:1", 8_000, step=1)
    assert (hold.amount, given) == (4_000, 8_000)
    assert {a.grant_id: a.held for a in await store.allocations("lease:x:1")} == {"g-allowance": 4_000, "g-paid": 0}
    assert (await store.balance(MODE, CUSTOMER, ASSET)).available == 11_000
    _, again = await store.shrink_hold("lease:x:1", 8_000, step=1)
    _, more = await store.shrink_hold("lease:x:1", 9_000, step=2)  # more than it holds: what it holds
    assert (again, more) == (8_000, 4_000)
    await store.settle("lease:x:1", 0)
    with pytest.raises(HoldNotPending):  # resolved: nothing to give back
        await store.shrink_hold("lease:x:1", 1, step=3)
    assert (await store.balance(MODE, CUSTOMER, ASSET)).available == 15_000
    assert await store.audit() == []


class LosesOneShrinkAnswer:
    """The shared store, except that the first shrink's answer is lost after it committed (a connection that
    dropped before the reply)."""

    def __init__(self, store: SqlWalletStore) -> None:
        self.store = store
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def shrink_hold(self, hold_id: str, amount: int, *, step: int | str) -> Any:
        done = await self.store.shrink_hold(hold_id, amount, step=step)
        if not self.lost:
            self.lost += 1
            raise ConnectionResetError("the answer was lost")
        return done


async def test_a_shrink_whose_answer_was_lost_is_sent_again_and_gives_back_nothing_twice(
        stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    flaky = LosesOneShrinkAnswer(store)
    a = Escrow(flaky, MANUAL)  # type: ignore[arg-type]
    await oversized_lease(store, a)
    lease, hold = await lease_of(a, store)
    before = (await store.balance(MODE, CUSTOMER, ASSET)).available
    with pytest.raises(ConnectionResetError):
        await a.tick()
    assert lease.unshrunk is not None  # counted, and to be sent again
    step, amount = lease.unshrunk
    await a.tick()  # sent again, with the same step: the store answers with the first result
    assert lease.unshrunk is None
    (entry,) = await shrink_entries(store)
    after = (await store.balance(MODE, CUSTOMER, ASSET)).available
    assert after == before + entry.amount
    # Once more by hand: the same answer, nothing given back; other content under the same step is refused.
    _, given = await store.shrink_hold(lease.hold_id, amount, step=step)
    assert given == entry.amount and len(await shrink_entries(store)) == 1
    with pytest.raises(IdempotencyConflict):
        await store.shrink_hold(lease.hold_id, amount + 1, step=step)
    assert (await store.balance(MODE, CUSTOMER, ASSET)).available == after
    _, shrunk = await lease_of(a, store)
    kept = hold.amount - hold.captured_amount - entry.amount
    assert lease.amount - lease.captured == shrunk.amount - shrunk.captured_amount == kept
    await store.settle("direct-1", 0)
    await a.close()
    assert await store.audit() == []


async def test_a_process_that_crashes_after_shrinking_its_lease_loses_nothing(stores: list[SqlWalletStore]) -> None:
    store = stores[0]
    crashed = Escrow(store, MANUAL)
    direct = await oversized_lease(store, crashed)
    await crashed.tick()
    assert crashed.stats["shrinks"] == 1
    await crashed.reserve(MODE, CUSTOMER, ASSET, 1_000, hold_id="h-lost", ttl_ms=60_000)  # never settled
    await store.settle("direct-1", direct)
    assert await store.expire_holds(now_ms=now_ms() + 6_000) >= 1  # past the lease's 5 s TTL: the sweeper's turn
    balance, records = await settled_state(store)
    assert (balance.debits_posted, balance.debits_pending) == (41 * 100 + direct, 0)
    assert len(records) == 41
    assert await store.audit() == []


async def test_a_recalled_lease_gives_back_its_free_part_before_its_requests_in_flight_settle(
        stores: list[SqlWalletStore]) -> None:
    a_store, b_store = stores
    await a_store.credit(MODE, CUSTOMER, ASSET, 40_000, idempotency_key="fund")
    a = await started(a_store, EscrowPolicy(hot_per_s=1, share=2, min_requests=4, ttl_s=5, idle_s=60, tick_s=0.02,
                                            recall_wait_s=3, cooldown_s=0.5))
    await spend(a, 10, hold=1_000, price=1_000)
    await a.reserve(MODE, CUSTOMER, ASSET, 1_000, hold_id="h-a", ttl_ms=60_000)  # in flight throughout
    lease = next(iter(a.leased()))
    assert a.local_hold("h-a") is not None and lease.free > 0
    free = (await b_store.balance(MODE, CUSTOMER, ASSET)).available
    ask = free + lease.free // 2  # more than the store has free; less than it has with the lease's free part
    b = await started(b_store, replace(FAST, recall_wait_s=10))
    hold, _ = await b.reserve(MODE, CUSTOMER, ASSET, ask, hold_id="h-b", ttl_ms=60_000)
    assert hold.amount == ask
    assert a.local_hold("h-a") is not None  # A's request has not settled: its lease was shrunk, not returned
    assert a.stats["shrinks"] >= 1
    await b.settle("h-b", ask, usage("h-b", ask))
    done = await a.settle("h-a", 600, usage("h-a", 600))
    assert (done.charged, done.written_off) == (600, 0)  # the lease kept what its request in flight held
    await a.close()
    await b.close()
    balance, _ = await settled_state(a_store)
    assert (balance.debits_posted, balance.debits_pending) == (10_000 + ask + 600, 0)
    assert await a_store.audit() == []
