"""RedisWalletStore through its public interface, on the real Redis and SQLite/PostgreSQL ledgers.

Method: every mutation is checked twice, in the projection (the returned balances) and, once the ledger sink
has drained the streams, in SQL (``SqlWalletStore`` reads and ``audit()``); replays, conflicts and a
concurrent storm on one wallet are driven through the same calls the proxy makes. The history check records
every operation with its outcome and replays the SQL ledger through a small reference model.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from metergate.wallet.errors import HoldNotFound, IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.redis.reconcile import reconcile
from metergate.wallet.redis.store import RedisWalletStore
from tests.redis.conftest import drained, racing_reserves

MODE, ASSET = "test", "USD"


def usage(rid: str, hold_id: str, price: int, customer: str = "acme") -> UsageRecord:
    return UsageRecord(id=rid, mode=MODE, customer_id=customer, hold_id=hold_id, route="/openai",
                       endpoint="chat", model="gpt-4o-mini", feature=None, stream=False, status_code=200,
                       usage_source="provider", tokens_input=10, tokens_cached_input=0, tokens_output=5,
                       tokens_reasoning=0, asset=ASSET, price_amount=price)


async def funded(store: RedisWalletStore, customer: str = "acme", amount: int = 1000) -> None:
    await store.create_customer(MODE, customer, customer.title())
    await store.credit(MODE, customer, ASSET, amount, idempotency_key=f"seed-{customer}")


async def test_reserve_settle_reach_the_ledger_and_audit_clean(rstore: RedisWalletStore) -> None:
    await funded(rstore)
    hold, bal = await rstore.reserve(MODE, "acme", ASSET, 300, hold_id="h1", ttl_ms=60_000)
    assert (hold.amount, hold.state, bal.available, bal.debits_pending) == (300, "pending", 700, 300)
    s = await rstore.settle("h1", 120, usage("req_1", "h1", 120))
    assert (s.charged, s.written_off, s.balance.available, s.balance.debits_pending) == (120, 0, 880, 0)
    await drained(rstore)
    sql = await rstore.sql.balance(MODE, "acme", ASSET)
    assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (1000, 120, 0)
    sql_hold = await rstore.sql.get_hold("h1")
    assert sql_hold is not None and (sql_hold.state, sql_hold.captured_amount) == ("captured", 120)
    [(_, record)] = await rstore.usage(MODE, "acme", limit=5)
    assert (record.charged_amount, record.written_off_amount) == (120, 0)
    assert await rstore.audit() == []
    assert all(row.status == "ok" for row in await reconcile(rstore))


async def test_replays_return_the_first_result_and_conflicts_are_refused(rstore: RedisWalletStore) -> None:
    await funded(rstore)
    first, _ = await rstore.reserve(MODE, "acme", ASSET, 100, hold_id="h1", ttl_ms=60_000)
    again, bal = await rstore.reserve(MODE, "acme", ASSET, 100, hold_id="h1", ttl_ms=60_000)
    assert again == first and bal.debits_pending == 100  # held once
    with pytest.raises(IdempotencyConflict):
        await rstore.reserve(MODE, "acme", ASSET, 101, hold_id="h1", ttl_ms=60_000)
    extended = await rstore.extend_hold("h1", 50, step=1, ttl_ms=60_000)
    assert extended.amount == 150
    assert (await rstore.extend_hold("h1", 50, step=1, ttl_ms=60_000)).amount == 150  # step applied once
    s1 = await rstore.settle("h1", 90)
    s2 = await rstore.settle("h1", 90)
    assert (s1.charged, s2.charged, s2.replayed) == (90, 90, True)
    with pytest.raises(IdempotencyConflict):
        await rstore.settle("h1", 91)
    with pytest.raises(HoldNotFound):
        await rstore.settle("nope", 1)
    with pytest.raises(HoldNotFound):
        await rstore.extend_hold("h1", 5, step=2, ttl_ms=60_000)  # resolved
    entry1 = await rstore.credit(MODE, "acme", ASSET, 500, idempotency_key="top-1")
    entry2 = await rstore.credit(MODE, "acme", ASSET, 500, idempotency_key="top-1")
    assert entry1.seq == entry2.seq
    with pytest.raises(IdempotencyConflict):
        await rstore.credit(MODE, "acme", ASSET, 501, idempotency_key="top-1")
    bal2 = await rstore.balance(MODE, "acme", ASSET)
    assert (bal2.credits_posted, bal2.debits_posted, bal2.debits_pending) == (1500, 90, 0)
    await drained(rstore)
    assert await rstore.audit() == []
    assert [r.status for r in await reconcile(rstore)] == ["ok"]


async def test_insufficient_funds_write_off_and_unknown_wallet(rstore: RedisWalletStore) -> None:
    await funded(rstore, amount=100)
    with pytest.raises(InsufficientFunds) as short:
        await rstore.reserve(MODE, "acme", ASSET, 101, hold_id="big", ttl_ms=60_000)
    assert (short.value.available, short.value.required) == (100, 101)
    with pytest.raises(InsufficientFunds):
        await rstore.reserve(MODE, "ghost", ASSET, 1, hold_id="g1", ttl_ms=60_000)
    await rstore.reserve(MODE, "acme", ASSET, 60, hold_id="h1", ttl_ms=60_000)
    s = await rstore.settle("h1", 150, usage("req_w", "h1", 150))  # more than the wallet covers
    assert (s.charged, s.written_off, s.balance.available) == (100, 50, 0)
    with pytest.raises(InsufficientFunds):
        await rstore.reserve(MODE, "acme", ASSET, 1, hold_id="h2", ttl_ms=60_000)
    await drained(rstore)
    [(_, record)] = await rstore.usage(MODE, "acme", limit=5)
    assert (record.charged_amount, record.written_off_amount) == (100, 50)
    assert await rstore.audit() == []


async def test_expiry_releases_the_hold_in_redis_and_in_sql(rstore: RedisWalletStore) -> None:
    await funded(rstore)
    await rstore.reserve(MODE, "acme", ASSET, 400, hold_id="h1", ttl_ms=1)
    await rstore.reserve(MODE, "acme", ASSET, 100, hold_id="h2", ttl_ms=60_000)
    await asyncio.sleep(0.01)
    assert await rstore.expire_holds(now_ms=now_ms()) == 1
    assert await rstore.expire_holds(now_ms=now_ms()) == 0  # idempotent
    assert (await rstore.balance(MODE, "acme", ASSET)).available == 900
    late = await rstore.settle("h1", 30)  # a late settle of an expired hold still captures what it used
    assert late.charged == 30
    await drained(rstore)
    h1 = await rstore.sql.get_hold("h1")
    assert h1 is not None and (h1.state, h1.captured_amount) == ("captured", 30)
    sql = await rstore.sql.balance(MODE, "acme", ASSET)
    assert (sql.debits_posted, sql.debits_pending) == (30, 100)
    assert await rstore.audit() == []
    assert [r.status for r in await reconcile(rstore)] == ["ok"]


async def test_concurrent_reserves_never_overspend(rstore: RedisWalletStore) -> None:
    k, n, amount = 37, 300, 25
    await funded(rstore, amount=k * amount)
    outcomes = await racing_reserves(rstore, n, amount)
    assert outcomes.count(True) == k
    bal = await rstore.balance(MODE, "acme", ASSET)
    assert (bal.available, bal.debits_pending) == (0, k * amount)
    await asyncio.gather(*(rstore.settle(f"c{i}", 10) for i in range(n) if outcomes[i]))
    await drained(rstore)
    sql = await rstore.sql.balance(MODE, "acme", ASSET)
    assert (sql.debits_posted, sql.debits_pending) == (k * 10, 0)
    assert await rstore.audit() == []


async def test_history_replayed_through_a_reference_model(rstore: RedisWalletStore) -> None:
    """Random operations (reserve, extend, settle, expire, credit), each recorded with its outcome; the SQL
    ledger replayed through a reference wallet must agree with every outcome and with the final balances."""
    rng = random.Random(5)
    customers = ["a", "b"]
    for c in customers:
        await funded(rstore, c, 500)
    history: list[tuple[str, str, str, int, object]] = []
    open_holds: dict[str, str] = {}
    for i in range(300):
        c = rng.choice(customers)
        op = rng.choice(["reserve", "reserve", "extend", "settle", "settle", "credit", "expire"])
        try:
            if op == "reserve":
                hid = f"h{i}"
                amount = rng.randint(0, 120)
                await rstore.reserve(MODE, c, ASSET, amount, hold_id=hid, ttl_ms=rng.choice([1, 60_000]))
                open_holds[hid] = c
                history.append((op, c, hid, amount, "ok"))
            elif op == "extend" and open_holds:
                hid = rng.choice(sorted(open_holds))
                amount = rng.randint(1, 60)
                await rstore.extend_hold(hid, amount, step=i, ttl_ms=60_000)
                history.append((op, open_holds[hid], hid, amount, "ok"))
            elif op == "settle" and open_holds:
                hid = rng.choice(sorted(open_holds))
                amount = rng.randint(0, 150)
                s = await rstore.settle(hid, amount)
                history.append((op, open_holds.pop(hid), hid, amount, (s.charged, s.written_off)))
            elif op == "credit":
                amount = rng.randint(1, 200)
                await rstore.credit(MODE, c, ASSET, amount, idempotency_key=f"k{i}")
                history.append((op, c, f"k{i}", amount, "ok"))
            elif op == "expire":
                await asyncio.sleep(0.002)
                history.append((op, "", "", await rstore.expire_holds(now_ms=now_ms()), "ok"))
        except InsufficientFunds:
            history.append((op, c, "", 0, "insufficient"))
        except HoldNotFound:
            history.append((op, c, "", 0, "not_found"))
    await drained(rstore)

    # The reference model: replay the ledger (oldest first) and check each entry is legal at its point.
    model: dict[str, dict[str, int]] = {c: {"credits": 0, "posted": 0, "pending": 0} for c in customers}
    holds: dict[str, int] = {}
    captured: dict[str, int] = {}
    kinds: set[str] = set()
    for c in customers:
        entries = sorted(await rstore.ledger(MODE, c, limit=10_000), key=lambda e: e.seq)
        for e in entries:
            m = model[c]
            kinds.add(e.kind)
            if e.kind == "credit":
                m["credits"] += e.credits_delta
            elif e.kind in ("hold", "extend"):
                m["pending"] += e.amount
                holds[e.hold_id or ""] = holds.get(e.hold_id or "", 0) + e.amount
            elif e.kind == "expire":
                m["pending"] -= holds.pop(e.hold_id or "")
            elif e.kind in ("capture", "void"):
                m["pending"] += e.pending_delta
                if e.pending_delta:
                    assert -e.pending_delta == holds.pop(e.hold_id or "")
                m["posted"] += e.amount
                captured[e.hold_id or ""] = e.amount
            else:  # kinds of the grants ledger (e.g. a lapse): their deltas, as recorded
                m["credits"] += e.credits_delta
                m["posted"] += e.posted_delta
                m["pending"] += e.pending_delta
            assert m["pending"] >= 0
        bal = await rstore.sql.balance(MODE, c, ASSET)
        live = await rstore.balance(MODE, c, ASSET)
        assert (bal.credits_posted, bal.debits_posted, bal.debits_pending) == (
            model[c]["credits"], model[c]["posted"], model[c]["pending"]), (c, kinds, len(entries))
        assert live == bal
    for op, _c, hid, amount, outcome in history:
        if op == "settle" and isinstance(outcome, tuple):
            assert captured[hid] == outcome[0] and outcome[0] + outcome[1] == amount
    credited = sum(amount for op, _c, _h, amount, outcome in history if op == "credit")
    assert sum(m["credits"] for m in model.values()) == 1000 + credited
    assert any(outcome == "insufficient" for *_, outcome in history)  # the model saw refusals too
    assert await rstore.audit() == []
