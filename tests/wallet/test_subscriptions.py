"""Plans and subscriptions: calendar periods, idempotent period ticks (repeated, concurrent, missed), rollover
with a cap, and overage drawn from the paid balance.

Method: the period arithmetic is checked table-driven against hand-written UTC dates; the engine runs on
SQLite and PostgreSQL with explicit times, and every step ends with ``audit()``.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt

import pytest

from metergate.wallet.models import Entitlement
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.subscriptions import Subscriptions, period_index, period_start

MODE = "test"


def ms(*parts: int) -> int:
    return calendar.timegm(dt.datetime(*parts, tzinfo=dt.UTC).timetuple()) * 1000  # type: ignore[misc]


PERIOD_CASES = [
    # calendar months keep the anchor's day and time, clamped to the month's end, without drifting
    ("month", None, ms(2026, 1, 31, 12), 1, ms(2026, 2, 28, 12)),
    ("month", None, ms(2026, 1, 31, 12), 2, ms(2026, 3, 31, 12)),
    ("month", None, ms(2028, 1, 30), 1, ms(2028, 2, 29)),  # leap year
    ("month", None, ms(2026, 11, 15), 2, ms(2027, 1, 15)),  # across a year
    ("month", None, ms(2026, 3, 1), 12, ms(2027, 3, 1)),
    ("week", None, ms(2026, 1, 1), 3, ms(2026, 1, 22)),
    ("days", 10, ms(2026, 1, 1), 4, ms(2026, 2, 10)),
]


@pytest.mark.parametrize(("period", "days", "anchor", "k", "start"), PERIOD_CASES)
def test_period_starts(period: str, days: int | None, anchor: int, k: int, start: int) -> None:
    assert period_start(period, days, anchor, k) == start  # type: ignore[arg-type]
    assert period_index(period, days, anchor, start) == k  # type: ignore[arg-type]
    assert period_index(period, days, anchor, start - 1) == k - 1  # type: ignore[arg-type]


async def setup(store: SqlWalletStore, *, rollover_cap: int | None = None) -> Subscriptions:
    subs = Subscriptions(store)
    await store.create_customer(MODE, "acme", "Acme")
    await subs.create_plan(MODE, "pro", name="Pro", period="month", period_days=None,
                           entitlements=(Entitlement("TOKENS", 1000, rollover_cap=rollover_cap),))
    return subs


async def entitlement_credits(store: SqlWalletStore) -> list[int]:
    return sorted(e.amount for e in await store.ledger(MODE, "acme", limit=200) if e.kind == "credit")


async def test_an_old_anchor_grants_from_the_period_the_customer_subscribed_in(store: SqlWalletStore) -> None:
    subs = Subscriptions(store)
    await store.create_customer(MODE, "acme", "Acme")
    await subs.create_plan(MODE, "daily", name="Daily", period="days", period_days=1,
                           entitlements=(Entitlement("TOKENS", 100),))
    now = ms(2026, 12, 8, 12)
    sub = await subs.subscribe(MODE, "s1", customer_id="acme", plan_id="daily", anchor_ms=0, at_ms=now)
    # periods still start at the anchor (midnight UTC, day 20,795 since 1970), but only today's is granted:
    # not one grant for each of the 20,795 days before the customer subscribed
    assert sub.next_period == period_index("days", 1, 0, now) + 1 == 20_796
    assert await entitlement_credits(store) == [100]
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 12, 9, 1)) == 1  # and the next day, the next one
    assert await entitlement_credits(store) == [100, 100]
    assert await store.audit() == []


async def test_a_tick_grants_each_period_exactly_once(store: SqlWalletStore) -> None:
    subs = await setup(store)
    anchor = ms(2026, 1, 31)
    sub = await subs.subscribe(MODE, "s1", customer_id="acme", plan_id="pro", at_ms=anchor)
    assert sub.next_period == 1 and (await store.balance(MODE, "acme", "TOKENS")).available == 1000
    assert await subs.tick(MODE, "s1", now_ms=anchor + 1) == 0  # repeated
    assert await subs.subscribe(MODE, "s1", customer_id="acme", plan_id="pro", at_ms=anchor) == sub
    # concurrent ticks at the start of period 1 grant it once
    results = await asyncio.gather(*(subs.tick(MODE, "s1", now_ms=ms(2026, 2, 28)) for _ in range(5)))
    assert sorted(results) == [0, 0, 0, 0, 1]
    assert await store.expire_grants(now_ms=ms(2026, 2, 28)) == 1  # period 0's allowance lapses
    balance = await store.balance(MODE, "acme", "TOKENS")
    assert (balance.credits_posted, balance.available) == (1000, 1000)
    # missed ticks: periods 2 and 3 are granted once each, period 2 already over (granted and lapsed at once)
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 4, 30, 1)) == 2
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 4, 30, 2)) == 0
    assert await entitlement_credits(store) == [1000, 1000, 1000, 1000]
    await store.expire_grants(now_ms=ms(2026, 4, 30, 3))
    assert (await store.balance(MODE, "acme", "TOKENS")).available == 1000  # only period 3's allowance is live
    assert await store.audit() == []
    canceled = await subs.cancel(MODE, "s1", at_ms=ms(2026, 5, 1))
    assert canceled is not None and canceled.state == "canceled"
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 9, 1)) == 0
    assert await store.audit() == []


async def test_rollover_carries_the_unused_allowance_up_to_the_cap(store: SqlWalletStore) -> None:
    subs = await setup(store, rollover_cap=300)
    anchor = ms(2026, 3, 1)
    await subs.subscribe(MODE, "s1", customer_id="acme", plan_id="pro", at_ms=anchor)
    await store.reserve(MODE, "acme", "TOKENS", 800, hold_id="h", ttl_ms=60_000, at_ms=anchor + 1)
    await store.settle("h", 800, at_ms=anchor + 2)
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 4, 1)) == 1
    assert (await store.balance(MODE, "acme", "TOKENS")).available == 1200  # 1000 + 200 rolled over
    assert await subs.tick(MODE, "s1", now_ms=ms(2026, 5, 1)) == 1  # nothing used: 1200 lapse, 300 carried
    assert (await store.balance(MODE, "acme", "TOKENS")).available == 1300
    assert await entitlement_credits(store) == [200, 300, 1000, 1000, 1000]
    assert await store.audit() == []


async def test_overage_is_drawn_from_the_paid_balance_after_the_allowance(store: SqlWalletStore) -> None:
    subs = await setup(store)
    anchor = ms(2026, 3, 1)
    await store.credit(MODE, "acme", "TOKENS", 5000, idempotency_key="paid", memo="paid", at_ms=anchor - 10)
    await subs.subscribe(MODE, "s1", customer_id="acme", plan_id="pro", at_ms=anchor)
    await store.reserve(MODE, "acme", "TOKENS", 1500, hold_id="h", ttl_ms=60_000, at_ms=anchor + 1)
    names = {g.id: g.purpose for g in await store.grants(MODE, "acme")}
    assert {names[a.grant_id]: a.held for a in await store.allocations("h")} == {"entitlement": 1000, "paid": 500}
    assert await store.audit() == []
