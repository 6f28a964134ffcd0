"""Grants: consumption order, allocations, expiry, activation, voids, partial captures and conversions.

Method: drive ``SqlWalletStore`` on SQLite and PostgreSQL (the ``store`` fixture) with explicit times
(``at_ms`` / ``now_ms``) instead of sleeping, and check allocations, balances and ``audit()`` after each step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from metergate.wallet.errors import HoldNotPending, IdempotencyConflict, InsufficientFunds
from metergate.wallet.sql import SqlWalletStore

MODE = "test"
T0 = 1_800_000_000_000  # a fixed "now" for every test; the store's clock is only ever given explicitly
MIN = 60_000


async def customer(store: SqlWalletStore, customer_id: str = "acme") -> None:
    await store.create_customer(MODE, customer_id, customer_id.title())


async def drawn(store: SqlWalletStore, hold_id: str) -> dict[str, tuple[int, int]]:
    """The hold's allocations as {grant memo (or '' unbacked): (held, captured)}."""
    names = {g.id: g.memo for g in await store.grants(MODE, "acme")}
    return {names.get(a.grant_id, ""): (a.held, a.captured) for a in await store.allocations(hold_id)}


async def test_a_plain_credit_is_a_paid_grant_without_expiry(store: SqlWalletStore) -> None:
    await customer(store)
    entry = await store.credit(MODE, "acme", "USD", 500, idempotency_key="k1", memo="top-up")
    [grant] = await store.grants(MODE, "acme")
    assert entry.grant_id == grant.id
    assert (grant.purpose, grant.priority, grant.expires_at_ms, grant.state, grant.free) == ("paid", 0, None,
                                                                                             "active", 500)
    again = await store.credit(MODE, "acme", "USD", 500, idempotency_key="k1", memo="top-up")
    assert again.seq == entry.seq and len(await store.grants(MODE, "acme")) == 1
    assert await store.audit() == []


# Consumption order, table-driven. Each grant is (memo, priority, expires in minutes or None, effective minutes
# ago); each grant holds 100. A hold of 250 draws the first two grants in order and 50 of the third.
GRANTS = [("paid-old", 0, None, 30), ("paid-new", 0, None, 10), ("promo-soon", 0, 5, 20),
          ("promo-late", 0, 60, 25), ("plan", 100, 50, 5)]
ORDER_CASES: list[tuple[str, list[tuple[str, int, int | None, int]], list[str]]] = [
    # default: priority, then soonest expiry (none last), then oldest
    ("priority", GRANTS, ["plan", "promo-soon", "promo-late"]),
    # soonest expiry first whatever the priority
    ("expiry", GRANTS, ["promo-soon", "plan", "promo-late"]),
    # oldest first
    ("fifo", GRANTS, ["paid-old", "promo-late", "promo-soon"]),
    # ties of priority and expiry: oldest first
    ("priority", [("b", 0, None, 10), ("a", 0, None, 20), ("c", 0, None, 5)], ["a", "b", "c"]),
    # a higher priority beats an earlier expiry under the default order, not under "expiry"
    ("priority", [("soon", 0, 1, 10), ("high", 5, None, 10), ("mid", 1, 90, 10)], ["high", "mid", "soon"]),
    ("expiry", [("soon", 0, 1, 10), ("high", 5, None, 10), ("mid", 1, 90, 10)], ["soon", "mid", "high"]),
]


@pytest.mark.parametrize(("order", "grants", "expected"), ORDER_CASES)
async def test_consumption_order(store: SqlWalletStore, order: str, grants: list[tuple[str, int, int | None, int]],
                                 expected: list[str]) -> None:
    await customer(store)
    if order != "priority":
        await store.set_consumption_order(MODE, "acme", order)
    for memo, priority, expires_min, age_min in grants:
        await store.credit(MODE, "acme", "USD", 100, idempotency_key=memo, memo=memo, priority=priority,
                           purpose="promotional", effective_at_ms=T0 - age_min * MIN,
                           expires_at_ms=None if expires_min is None else T0 + expires_min * MIN, at_ms=T0 - 40 * MIN)
    await store.reserve(MODE, "acme", "USD", 250, hold_id="h1", ttl_ms=MIN, at_ms=T0)
    assert await drawn(store, "h1") == {expected[0]: (100, 0), expected[1]: (100, 0), expected[2]: (50, 0)}
    settled = await store.settle("h1", 120, at_ms=T0)  # captures in the same order, releases the rest
    assert settled.charged == 120
    assert await drawn(store, "h1") == {expected[0]: (0, 100), expected[1]: (0, 20), expected[2]: (0, 0)}
    assert await store.audit() == []


async def test_a_future_grant_is_not_spendable_until_it_is_effective(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 300, idempotency_key="later", effective_at_ms=T0 + MIN, at_ms=T0)
    assert (await store.balance(MODE, "acme", "USD")).available == 0
    with pytest.raises(InsufficientFunds):
        await store.reserve(MODE, "acme", "USD", 1, hold_id="early", ttl_ms=MIN, at_ms=T0 + MIN - 1)
    assert await store.audit() == []
    # Effective now: the hold activates it (no sweep needed), and the sweep then has nothing left to do.
    hold, balance = await store.reserve(MODE, "acme", "USD", 300, hold_id="on-time", ttl_ms=MIN, at_ms=T0 + MIN)
    assert balance.available == 0 and hold.amount == 300
    assert await store.expire_grants(now_ms=T0 + MIN) == 0
    kinds = [e.kind for e in reversed(await store.ledger(MODE, "acme", limit=10))]
    assert kinds == ["credit", "activate", "hold"]
    assert await store.audit() == []


async def test_the_sweeper_activates_and_lapses_grants_once(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="promo", purpose="promotional",
                       expires_at_ms=T0 + MIN, at_ms=T0)
    await store.credit(MODE, "acme", "USD", 40, idempotency_key="later", effective_at_ms=T0 + 2 * MIN, at_ms=T0)
    await store.reserve(MODE, "acme", "USD", 30, hold_id="h", ttl_ms=10 * MIN, at_ms=T0)
    assert await store.expire_grants(now_ms=T0 + MIN) == 1  # the promotion lapses: its free 70, not the held 30
    assert await store.expire_grants(now_ms=T0 + MIN) == 0  # a second replica's sweep finds nothing
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.credits_posted, balance.debits_pending, balance.available) == (30, 30, 0)
    assert await store.expire_grants(now_ms=T0 + 2 * MIN) == 1  # the later grant activates
    assert (await store.balance(MODE, "acme", "USD")).available == 40
    # A capture never draws the lapsed grant: the hold's 30 on it lapse, and the capture comes from the new grant.
    settled = await store.settle("h", 25, at_ms=T0 + 3 * MIN)
    assert (settled.charged, settled.written_off) == (25, 0)
    grants = await store.grants(MODE, "acme")
    assert [(g.state, g.consumed, g.removed) for g in sorted(grants, key=lambda g: g.amount)] == [
        ("active", 25, 0), ("expired", 0, 100)]
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.credits_posted, balance.debits_posted, balance.available) == (40, 25, 15)
    assert await store.audit() == []


async def test_a_capture_on_a_grant_that_expired_unswept_draws_other_grants(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 50, idempotency_key="promo", memo="promo", priority=1,
                       expires_at_ms=T0 + MIN, at_ms=T0)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="paid", memo="paid", at_ms=T0)
    await store.reserve(MODE, "acme", "USD", 80, hold_id="h", ttl_ms=10 * MIN, at_ms=T0)
    assert await drawn(store, "h") == {"promo": (50, 0), "paid": (30, 0)}
    settled = await store.settle("h", 80, at_ms=T0 + 2 * MIN)  # the promotion expired; no sweep ran
    assert (settled.charged, settled.written_off) == (80, 0)
    assert await drawn(store, "h") == {"promo": (0, 0), "paid": (0, 80)}
    assert (await store.balance(MODE, "acme", "USD")).available == 20
    assert await store.audit() == []


async def test_void_grant_removes_its_free_remainder_once(store: SqlWalletStore) -> None:
    await customer(store)
    entry = await store.credit(MODE, "acme", "USD", 100, idempotency_key="oops", purpose="adjustment", at_ms=T0)
    await store.reserve(MODE, "acme", "USD", 30, hold_id="h", ttl_ms=MIN, at_ms=T0)
    assert entry.grant_id is not None
    voided = await store.void_grant(MODE, entry.grant_id, at_ms=T0)
    assert voided is not None and (voided.state, voided.removed, voided.held) == ("voided", 70, 30)
    again = await store.void_grant(MODE, entry.grant_id, at_ms=T0)
    assert again == voided
    assert await store.void_grant("live", entry.grant_id) is None  # another mode cannot see it
    settled = await store.settle("h", 10, at_ms=T0)  # a voided grant is never drawn: nothing else covers it
    assert (settled.charged, settled.written_off) == (0, 10)
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.credits_posted, balance.debits_posted, balance.debits_pending) == (0, 0, 0)
    assert await store.audit() == []


async def test_partial_captures_keep_the_hold_open_and_are_idempotent(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 1000, idempotency_key="seed", at_ms=T0)
    await store.reserve(MODE, "acme", "USD", 300, hold_id="job", ttl_ms=MIN, at_ms=T0)
    first = await store.capture("job", 100, idempotency_key="hb1", at_ms=T0)
    assert (first.charged, first.hold.state, first.hold.pending) == (100, "pending", 200)
    replay = await store.capture("job", 100, idempotency_key="hb1", at_ms=T0)
    assert replay.replayed and replay.charged == 100
    with pytest.raises(IdempotencyConflict):
        await store.capture("job", 101, idempotency_key="hb1", at_ms=T0)
    beyond = await store.capture("job", 350, idempotency_key="hb2", at_ms=T0)  # 200 held + 150 from the wallet
    assert (beyond.charged, beyond.hold.amount, beyond.hold.captured_amount, beyond.hold.pending) == (350, 450, 450, 0)
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.debits_posted, balance.debits_pending, balance.available) == (450, 0, 550)
    assert await store.audit() == []
    settled = await store.settle("job", 500, at_ms=T0)  # the final total includes the partial captures
    assert (settled.charged, settled.written_off) == (500, 0)
    with pytest.raises(HoldNotPending):
        await store.capture("job", 1, idempotency_key="hb3", at_ms=T0)
    assert (await store.balance(MODE, "acme", "USD")).available == 500
    assert await store.audit() == []


async def test_a_capture_beyond_its_hold_draws_further_grants_in_order_then_writes_off(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="a", memo="a", priority=2, at_ms=T0)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="b", memo="b", priority=1, at_ms=T0)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="c", memo="c", priority=0, at_ms=T0)
    await store.reserve(MODE, "acme", "USD", 50, hold_id="h", ttl_ms=MIN, at_ms=T0)
    settled = await store.settle("h", 320, at_ms=T0)
    assert (settled.charged, settled.written_off) == (300, 20)
    assert await drawn(store, "h") == {"a": (0, 100), "b": (0, 100), "c": (0, 100)}
    assert await store.audit() == []


async def test_an_overdraft_covers_what_grants_cannot_and_is_recorded_unbacked(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 100, idempotency_key="seed", memo="seed", at_ms=T0)
    await store.write(lambda conn: conn.execute(  # the billing module's credit limit
        text("UPDATE accounts SET overdraft_limit = 50")))
    await store.reserve(MODE, "acme", "USD", 140, hold_id="h", ttl_ms=MIN, at_ms=T0)
    assert await drawn(store, "h") == {"seed": (100, 0), "": (40, 0)}
    with pytest.raises(InsufficientFunds):
        await store.reserve(MODE, "acme", "USD", 11, hold_id="h2", ttl_ms=MIN, at_ms=T0)
    settled = await store.settle("h", 150, at_ms=T0)
    assert (settled.charged, settled.written_off) == (150, 0)
    assert (await store.balance(MODE, "acme", "USD")).available == 0
    assert await store.audit() == []


async def test_convert_debits_one_asset_and_grants_another_once(store: SqlWalletStore) -> None:
    await customer(store)
    await store.credit(MODE, "acme", "USD", 5_000_000, idempotency_key="seed", at_ms=T0)
    args: dict[str, Any] = {"idempotency_key": "pack-1", "at_ms": T0}
    entry, usd, tokens = await store.convert(MODE, "acme", "USD", "TOKENS", 2_000_000, 1_000_000, **args)
    assert (usd.available, tokens.available) == (3_000_000, 1_000_000)
    assert entry.kind == "credit" and entry.asset == "TOKENS"
    again, usd2, tokens2 = await store.convert(MODE, "acme", "USD", "TOKENS", 2_000_000, 1_000_000, **args)
    assert again.seq == entry.seq and (usd2.available, tokens2.available) == (3_000_000, 1_000_000)
    with pytest.raises(IdempotencyConflict):
        await store.convert(MODE, "acme", "USD", "TOKENS", 2_000_000, 999_999, **args)
    with pytest.raises(InsufficientFunds):
        await store.convert(MODE, "acme", "USD", "TOKENS", 3_000_001, 1, idempotency_key="too-much", at_ms=T0)
    assert (await store.balance(MODE, "acme", "USD")).available == 3_000_000
    assert await store.audit() == []


@pytest.mark.parametrize("wallet", ["acme", "bolt", "crux", "dune", "echo", "fern"])  # raced wrongly 1 in 9
async def test_concurrent_holds_over_many_grants_never_overspend(store: SqlWalletStore, wallet: str) -> None:
    """Racing holds and settlements (on two replicas in turn, where the topology has them) keep the grants in
    step with the wallet: what the grants consumed is what was charged, to the unit. Two PostgreSQL replicas
    once drew a hold as unbacked while its grants had free funds (a locked read paired a fresh account with
    grants of an older snapshot): the wallet balanced, its grants did not."""
    await customer(store, wallet)
    for i in range(6):  # 6 grants of 100 with different priorities and expiries
        await store.credit(MODE, wallet, "USD", 100, idempotency_key=f"g{i}", priority=i % 3,
                           expires_at_ms=None if i % 2 else T0 + (i + 1) * MIN, at_ms=T0)

    async def one(i: int) -> int:
        try:
            await store.reserve(MODE, wallet, "USD", 35, hold_id=f"{wallet}-h{i}", ttl_ms=MIN, at_ms=T0)
        except InsufficientFunds:
            return 0
        return (await store.settle(f"{wallet}-h{i}", 30 if i % 2 else 40, at_ms=T0)).charged

    charged = await asyncio.gather(*(one(i) for i in range(40)))
    balance = await store.balance(MODE, wallet, "USD")
    assert balance.debits_posted == sum(charged) <= 600 and balance.debits_pending == 0
    assert balance.available == 600 - sum(charged) >= 0
    assert sum(g.consumed for g in await store.grants(MODE, wallet)) == sum(charged)
    assert await store.audit() == []
