"""The batch engine (metergate/wallet/engine.py): one group commit's reserves, extensions and settlements decided
together and written set-based, on SQLite and PostgreSQL.

Method: put operations into one batch for certain — on SQLite by keeping the writer busy while they queue, on
PostgreSQL by submitting them in one event-loop turn, checked through the group commit's batch counter — and
check each caller's outcome, the ledger and ``audit()``; replay whole batches and count ledger rows; race two
store instances (two engines, as two replicas) on one PostgreSQL wallet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from metergate.wallet.errors import IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import UsageRecord
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import _reset_pg

MODE = "test"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlWalletStore]:
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    s = SqlWalletStore(store_url)
    await s.open()
    yield s
    await s.close()


def usage(i: str, hold_id: str) -> UsageRecord:
    return UsageRecord(id=i, mode=MODE, customer_id="acme", hold_id=hold_id, route="/openai", endpoint="chat",
                       model="gpt-4o-mini", feature=None, stream=False, status_code=200, usage_source="provider",
                       tokens_input=10, tokens_cached_input=0, tokens_output=5, tokens_reasoning=0, asset="USD",
                       price_amount=80, detail={"n": 1})


async def funded(store: SqlWalletStore, amount: int) -> None:
    await store.create_customer(MODE, "acme", "Acme")
    await store.credit(MODE, "acme", "USD", amount, idempotency_key="seed")


def batches(store: SqlWalletStore) -> int:
    counter = store._writer if store._writer is not None else store._pg_commit
    assert counter is not None
    return counter.batches


async def one_batch(store: SqlWalletStore, calls: list[Awaitable[Any]]) -> list[Any]:
    """Run ``calls`` so that they share one group commit; their outcomes (results or exceptions), in order."""
    busy = None
    if store._writer is not None:  # SQLite: occupy the writer so that what comes next queues up
        busy = asyncio.ensure_future(store.write(lambda _conn: time.sleep(0.2)))
        await asyncio.sleep(0.02)
    before = batches(store)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    if busy is not None:
        await busy
    assert batches(store) - before == 1 + (busy is not None), "the calls did not share one batch"
    return list(outcomes)


async def ledger_rows(store: SqlWalletStore) -> int:
    return len(await store.ledger(MODE, "acme", limit=10_000))


async def test_a_batch_mixing_a_refusal_a_duplicate_key_and_good_ops_commits_exactly_the_good_ones(
        store: SqlWalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 100, hold_id="old", ttl_ms=60_000)
    outcomes = await one_batch(store, [
        store.reserve(MODE, "acme", "USD", 300, hold_id="a", ttl_ms=60_000),
        store.reserve(MODE, "acme", "USD", 5000, hold_id="too-big", ttl_ms=60_000),  # refused
        store.reserve(MODE, "acme", "USD", 300, hold_id="a", ttl_ms=60_000),  # the same key again: a replay
        store.reserve(MODE, "acme", "USD", 301, hold_id="a", ttl_ms=60_000),  # the same key, other content
        store.settle("old", 60, usage("u-old", "old")),
        store.reserve(MODE, "acme", "USD", 200, hold_id="b", ttl_ms=60_000),
        store.settle("nope", 1),  # no such hold
    ])
    first, refused, replay, conflict, settled, second, missing = outcomes
    assert first[0].id == "a" and replay[0] == first[0]
    assert isinstance(refused, InsufficientFunds) and refused.required == 5000
    assert isinstance(conflict, IdempotencyConflict)
    assert settled.charged == 60 and not settled.replayed
    assert second[0].id == "b"
    assert type(missing).__name__ == "HoldNotFound"
    assert await store.get_hold("too-big") is None
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.debits_pending, balance.debits_posted) == (500, 60)
    assert [r.id for _, r in await store.usage(MODE, "acme", limit=10)] == ["u-old"]
    kinds = sorted(e.kind for e in await store.ledger(MODE, "acme", limit=100))
    assert kinds == sorted(["credit", "hold", "capture", "hold", "hold"])
    assert await store.audit() == []


async def test_a_replayed_batch_changes_nothing(store: SqlWalletStore) -> None:
    await funded(store, 10_000)
    ids = [f"h{i}" for i in range(20)]
    await one_batch(store, [store.reserve(MODE, "acme", "USD", 100, hold_id=h, ttl_ms=60_000) for h in ids])
    settle = [store.settle(h, 40 + i, usage(f"u{i}", h)) for i, h in enumerate(ids[:10])]
    extend = [store.extend_hold(h, 50, step=1, ttl_ms=60_000) for h in ids[10:]]
    first = await one_batch(store, [*settle, *extend])
    rows, balance = await ledger_rows(store), await store.balance(MODE, "acme", "USD")

    again = await one_batch(store, [
        *(store.reserve(MODE, "acme", "USD", 100, hold_id=h, ttl_ms=60_000) for h in ids),
        *(store.settle(h, 40 + i, usage(f"u{i}", h)) for i, h in enumerate(ids[:10])),
        *(store.extend_hold(h, 50, step=1, ttl_ms=60_000) for h in ids[10:]),
    ])
    assert not any(isinstance(o, BaseException) for o in again), again
    assert [h.id for h, _ in again[:20]] == ids
    assert all(s.replayed and s.charged == f.charged for s, f in zip(again[20:30], first[:10], strict=True))
    assert [h.amount for h in again[30:]] == [150] * 10 == [h.amount for h in first[10:]]
    assert await ledger_rows(store) == rows
    assert await store.balance(MODE, "acme", "USD") == balance
    assert len(await store.usage(MODE, "acme", limit=100)) == 10
    assert await store.audit() == []


async def test_settling_in_the_batch_that_holds_draws_the_released_grant(store: SqlWalletStore) -> None:
    """A grant fully held at the batch's start becomes free when a settlement of the batch releases it; a later
    reserve of the same batch must draw it, not run unbacked."""
    await funded(store, 100)
    await store.reserve(MODE, "acme", "USD", 100, hold_id="all", ttl_ms=60_000)
    outcomes = await one_batch(store, [store.settle("all", 30),
                                       store.reserve(MODE, "acme", "USD", 70, hold_id="next", ttl_ms=60_000)])
    assert outcomes[0].charged == 30 and outcomes[1][0].amount == 70
    assert [(a.grant_id != "", a.held) for a in await store.allocations("next")] == [(True, 70)]
    assert (await store.balance(MODE, "acme", "USD")).available == 0
    assert await store.audit() == []


def replays(store: SqlWalletStore) -> int:
    counter = store._writer if store._writer is not None else store._pg_commit
    assert counter is not None
    return counter.replays


async def test_a_replayed_capture_among_new_ones_answers_its_first_result_and_the_new_ones_apply_once(
        store: SqlWalletStore) -> None:
    """The engine does not read the ledger keys a batch writes before deciding it: a replayed settlement against
    a lease is decided as new, the unique index refuses it, and the batch is decided again with its keys read.
    The replay must get its first answer, the conflicting one an error, the new captures of the same batch
    exactly one ledger row and one usage record each."""
    await funded(store, 10_000)
    await store.reserve(MODE, "acme", "USD", 5_000, hold_id="lease", ttl_ms=60_000)
    first = await store.capture_usage("lease", 70, key="settle:r1", usage=usage("u1", "r1"), held=100)
    rows, before = await ledger_rows(store), replays(store)

    async def capture(amount: int, request: str) -> Any:  # submitted when one_batch runs it, not before
        return await store.capture_usage("lease", amount, key=f"settle:{request}", usage=usage(f"u{request[1:]}",
                                                                                              request), held=100)

    again, fresh, conflict, other = await one_batch(store, [
        capture(70, "r1"), capture(30, "r2"),
        capture(71, "r1"),  # the same key, other content
        capture(40, "r3"),
    ])
    assert replays(store) == before + 1  # decided without the keys first, then again with them
    assert (first.charged, first.replayed) == (70, False)
    assert (again.charged, again.written_off, again.replayed) == (70, 0, True)
    assert isinstance(conflict, IdempotencyConflict)
    assert (fresh.charged, fresh.replayed, other.charged, other.replayed) == (30, False, 40, False)
    assert await ledger_rows(store) == rows + 2
    assert sorted(r.id for _, r in await store.usage(MODE, "acme", limit=10)) == ["u1", "u2", "u3"]
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.debits_posted, balance.debits_pending) == (140, 5_000 - 140)
    assert await store.audit() == []


async def test_a_replayed_extension_among_new_ones_answers_without_growing_the_hold_twice(
        store: SqlWalletStore) -> None:
    await funded(store, 10_000)
    for h in ("a", "b"):
        await store.reserve(MODE, "acme", "USD", 100, hold_id=h, ttl_ms=60_000)
    await store.extend_hold("a", 50, step=1, ttl_ms=60_000)
    before = replays(store)
    replayed, new = await one_batch(store, [store.extend_hold("a", 50, step=1, ttl_ms=60_000),
                                            store.extend_hold("b", 25, step=1, ttl_ms=60_000)])
    assert replays(store) == before + 1
    assert (replayed.amount, new.amount) == (150, 125)
    assert (await store.balance(MODE, "acme", "USD")).debits_pending == 275
    assert await store.audit() == []



async def test_an_extension_replayed_after_its_hold_settled_answers_its_first_result(store: SqlWalletStore) -> None:
    """Decided without reading its key, the extension of a settled hold looks refused (no pending hold); its key
    says it is a replay, so its answer is the first one (the Redis ledger sink replays exactly this)."""
    await funded(store, 10_000)
    await store.reserve(MODE, "acme", "USD", 100, hold_id="a", ttl_ms=60_000)
    first = await store.extend_hold("a", 50, step=1, ttl_ms=60_000)
    await store.settle("a", 120, usage("r-a", "a"))
    again, (new, _) = await one_batch(store, [store.extend_hold("a", 50, step=1, ttl_ms=60_000),
                                              store.reserve(MODE, "acme", "USD", 10, hold_id="b", ttl_ms=60_000)])
    assert again.id == first.id == "a" and again.amount == first.amount == 150 and new.id == "b"
    balance = await store.balance(MODE, "acme", "USD")
    assert (balance.debits_posted, balance.debits_pending) == (120, 10)
    assert await store.audit() == []


@pytest.mark.postgres
async def test_two_postgres_engines_racing_on_one_wallet_never_overspend(pg_url: str) -> None:
    await _reset_pg(pg_url)
    a, b = SqlWalletStore(pg_url), SqlWalletStore(pg_url)
    await a.open()
    await b.open()
    try:
        await funded(a, 1000)

        async def attempt(store: SqlWalletStore, i: int) -> str | None:
            try:
                await store.reserve(MODE, "acme", "USD", 7, hold_id=f"h{i}", ttl_ms=60_000)
            except InsufficientFunds:
                return None
            return f"h{i}"

        held = await asyncio.gather(*(attempt(a if i % 2 else b, i) for i in range(300)))
        admitted = [h for h in held if h is not None]
        assert len(admitted) == 1000 // 7  # every refusal was for want of funds, never a lost race
        balance = await a.balance(MODE, "acme", "USD")
        assert balance.debits_pending == 7 * len(admitted) and balance.available == 1000 % 7
        settled = await asyncio.gather(*(((a, b)[i % 2]).settle(h, 5, usage(f"u{h}", h))
                                         for i, h in enumerate(admitted)))
        assert sum(s.charged for s in settled) == 5 * len(admitted)
        assert (await b.balance(MODE, "acme", "USD")).available == 1000 - 5 * len(admitted)
        assert await a.audit() == [] and await b.audit() == []
        assert a._pg_commit is not None and b._pg_commit is not None
        assert a._pg_commit.batches < a._pg_commit.ops and b._pg_commit.batches < b._pg_commit.ops
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_an_optimistic_batch_that_lost_its_race_is_decided_again_under_the_lock(pg_url: str) -> None:
    """Both engines read the wallet while a third session holds its row, both decide that their hold fits; the
    second write to get the row must find it no longer does, write nothing, and refuse under the lock."""
    import asyncpg

    await _reset_pg(pg_url)
    a, b = SqlWalletStore(pg_url), SqlWalletStore(pg_url)
    await a.open()
    await b.open()
    blocker = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await funded(a, 1000)
        tr = blocker.transaction()
        await tr.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE customer_id = 'acme' FOR UPDATE")
        small = asyncio.ensure_future(a.reserve(MODE, "acme", "USD", 10, hold_id="small", ttl_ms=60_000))
        large = asyncio.ensure_future(b.reserve(MODE, "acme", "USD", 995, hold_id="large", ttl_ms=60_000))
        await asyncio.sleep(0.5)  # both have read and are waiting for the row in their write
        assert not small.done() and not large.done()
        await tr.rollback()
        outcomes = await asyncio.gather(small, large, return_exceptions=True)
        assert sum(isinstance(o, InsufficientFunds) for o in outcomes) == 1
        assert a._pg_commit is not None and b._pg_commit is not None
        assert a._pg_commit.conflicts + b._pg_commit.conflicts == 1
        balance = await a.balance(MODE, "acme", "USD")
        assert balance.debits_pending in (10, 995) and balance.available >= 0
        assert await a.audit() == []
    finally:
        await blocker.close()
        await a.close()
        await b.close()


async def test_a_usage_record_stores_its_strings_sanitized_and_bounded_and_plain_ones_as_they_are(
        store: SqlWalletStore) -> None:
    await funded(store, 1000)
    await store.reserve(MODE, "acme", "USD", 100, hold_id="h", ttl_ms=60_000)
    record = UsageRecord(id="u", mode=MODE, customer_id="acme", hold_id="h", route="/open\x00ai",
                         endpoint="chat\u2028", model="m\x07" + "x" * 300, feature="", stream=False, status_code=200,
                         usage_source="provider", tokens_input=1, tokens_cached_input=0, tokens_output=1,
                         tokens_reasoning=0, asset="USD", price_amount=5)
    plain = UsageRecord(id="p", mode=MODE, customer_id="acme", hold_id="h", route="/openai", endpoint="chat",
                        model="gpt-4o-mini", feature="search", stream=False, status_code=200, usage_source="provider",
                        tokens_input=1, tokens_cached_input=0, tokens_output=1, tokens_reasoning=0, asset="USD",
                        price_amount=5)
    await store.settle("h", 5, record)
    (_, stored), = await store.usage(MODE, "acme", limit=1)
    assert (stored.route, stored.endpoint, stored.feature) == ("/openai", "chat\u2028", None)
    assert stored.model == "m" + "x" * 127  # control characters dropped, then cut to the column's 128
    assert (plain.route, plain.endpoint, plain.model, plain.feature) == ("/openai", "chat", "gpt-4o-mini", "search")
