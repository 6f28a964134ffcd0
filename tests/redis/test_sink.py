"""The ledger sink's batches, through its drain entry point on the real Redis and SQLite/PostgreSQL ledgers.

Method: the stores here drain nothing by themselves (``run_sink=False``); each test drains a shard with
``sink.drain_shard`` at the moment it chooses, so that a hold and its settle land in one stream batch or in two,
or a batch is committed and then not acknowledged (the crash between COMMIT and XACK). What SQL holds is
compared row by row: ledger entries, holds, usage records and accounts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Connection, select

from metergate.wallet import schema as t
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.reconcile import reconcile
from metergate.wallet.redis.store import RedisWalletStore
from tests.conftest import _reset_pg

MODE, ASSET = "test", "USD"


def usage(rid: str, hold_id: str, price: int, customer: str) -> UsageRecord:
    return UsageRecord(id=rid, mode=MODE, customer_id=customer, hold_id=hold_id, route="/openai",
                       endpoint="chat", model="gpt-4o-mini", feature=None, stream=False, status_code=200,
                       usage_source="provider", tokens_input=10, tokens_cached_input=0, tokens_output=5,
                       tokens_reasoning=0, asset=ASSET, price_amount=price)


@pytest.fixture
async def quiet(store_url: str, redis_url: str, prefix: str) -> AsyncIterator[RedisWalletStore]:
    """One shard, no sink of its own: the test drains."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    store = RedisWalletStore(BatchingSqlWalletStore(store_url), redis_url, prefix=prefix, shards=1, run_sink=False)
    await store.open()
    yield store
    await store.close()


async def funded(store: RedisWalletStore, customer: str, amount: int = 1000) -> None:
    await store.create_customer(MODE, customer, customer.title())
    await store.credit(MODE, customer, ASSET, amount, idempotency_key=f"seed-{customer}")


def ledger_of(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the sink writes, minus the columns that are the clock's (creation and resolution times)."""
    e, h, u, a = t.ledger_entries.c, t.holds.c, t.usage_records.c, t.accounts.c
    return {
        "entries": [tuple(r) for r in conn.execute(select(
            e.idempotency_key, e.request_hash, e.customer_id, e.kind, e.amount, e.credits_delta, e.posted_delta,
            e.pending_delta, e.hold_id, e.grant_id).order_by(e.idempotency_key, e.kind, e.grant_id)).all()],
        "holds": [tuple(r) for r in conn.execute(select(
            h.id, h.customer_id, h.amount, h.state, h.captured_amount).order_by(h.id)).all()],
        "usage": [tuple(r) for r in conn.execute(select(
            u.id, u.hold_id, u.charged_amount, u.written_off_amount).order_by(u.id)).all()],
        "accounts": [tuple(r) for r in conn.execute(select(
            a.customer_id, a.credits_posted, a.debits_posted, a.debits_pending).order_by(a.customer_id)).all()],
    }


async def stream_length(store: RedisWalletStore) -> int:
    return int(await store.redis.xlen(store.keys.stream(0)))


async def test_a_batch_replayed_after_a_crash_between_commit_and_ack_changes_nothing(
        quiet: RedisWalletStore) -> None:
    store = quiet
    await funded(store, "acme", 1000)
    await store.reserve(MODE, "acme", ASSET, 300, hold_id="h1", ttl_ms=60_000)
    await store.settle("h1", 120, usage("r1", "h1", 120, "acme"))
    await store.reserve(MODE, "acme", ASSET, 50, hold_id="h3", ttl_ms=1)
    await store.expire_holds(now_ms=now_ms() + 10_000)
    await store.reserve(MODE, "acme", ASSET, 10, hold_id="h4", ttl_ms=60_000)
    await store.reserve(MODE, "acme", ASSET, 200, hold_id="h2", ttl_ms=60_000)
    await store.extend_hold("h2", 100, step=1, ttl_ms=60_000)
    over = await store.settle("h2", 1500, usage("r2", "h2", 1500, "acme"))  # beyond the wallet: Redis writes off
    assert over.written_off > 0
    events = await stream_length(store)

    real_script = store.script

    async def crash_before_ack(name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "ACK":
            raise ConnectionError("the sink died after the COMMIT, before the XACK")
        return await real_script(name, keys, args)

    store.script = crash_before_ack  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await store.sink.drain_shard(0)
    store.script = real_script  # type: ignore[method-assign]
    committed = await store.sql.read(ledger_of)
    assert await stream_length(store) == events  # nothing acknowledged
    assert ("r2", "h2", over.charged, over.written_off) in committed["usage"]  # the write-off Redis decided
    assert ("h3", "acme", 50, "expired", 0) in committed["holds"]

    assert await store.sink.drain_shard(0) == events  # the pending entries come back first, all of them
    assert await store.sql.read(ledger_of) == committed
    assert await stream_length(store) == 0
    assert await store.audit() == []
    assert all(row.status == "ok" for row in await reconcile(store))


async def test_a_hold_settled_in_its_own_batch_is_ledgered_as_one_split_over_two(quiet: RedisWalletStore) -> None:
    store = quiet
    await funded(store, "one")
    await funded(store, "two")
    # "one": reserve and settle, then a drain: both events in one batch.
    await store.reserve(MODE, "one", ASSET, 400, hold_id="h-x", ttl_ms=60_000)
    await store.settle("h-x", 150, usage("r-x", "h-x", 150, "one"))
    assert await store.sink.drain_shard(0) == 2
    # "two": the same, with a drain between the reserve and the settle.
    await store.reserve(MODE, "two", ASSET, 400, hold_id="h-y", ttl_ms=60_000)
    assert await store.sink.drain_shard(0) == 1
    await store.settle("h-y", 150, usage("r-y", "h-y", 150, "two"))
    assert await store.sink.drain_shard(0) == 1

    rows = await store.sql.read(ledger_of)

    def of(customer: str, hold: str, record: str) -> dict[str, list[tuple[Any, ...]]]:
        def norm(row: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(str(v).replace(customer, "C").replace(hold, "H").replace(record, "R") if v is not None
                         else None for v in row)

        mine = {table: [norm(r) for r in found if customer in r or hold in r or record in r]
                for table, found in rows.items()}
        # The request hashes and grant ids are derived from the customer's name: compare whether they are set.
        mine["entries"] = [(key, *rest[:-1], rest[-1] is not None) for key, _, *rest in mine["entries"]]
        return mine

    one, two = of("one", "h-x", "r-x"), of("two", "h-y", "r-y")
    assert one["holds"] == [("H", "C", "400", "captured", "150")]
    assert one == two
    assert await store.audit() == []


async def test_a_hold_the_engine_hands_back_is_settled_in_the_same_batch_after_it(quiet: RedisWalletStore) -> None:
    """A grant whose clock runs out between admission and drain sends the batch's hold to the per-operation
    path (after the batch): the settle that follows it in the batch still reaches the ledger, after its hold."""
    store = quiet
    await store.create_customer(MODE, "acme", "Acme")
    await store.sql.credit(MODE, "acme", ASSET, 500, idempotency_key="promo", purpose="promotional",
                           expires_at_ms=now_ms() + 300)
    await store.credit(MODE, "acme", ASSET, 1000, idempotency_key="paid")
    await store.reserve(MODE, "acme", ASSET, 200, hold_id="h1", ttl_ms=60_000)
    await store.settle("h1", 80, usage("r1", "h1", 80, "acme"))
    await asyncio.sleep(0.4)  # the promo grant lapses before the sink sees the events
    assert await store.sink.drain_shard(0) == 2
    hold = await store.sql.get_hold("h1")
    assert hold is not None and (hold.state, hold.captured_amount) == ("captured", 80)
    [(_, record)] = await store.usage(MODE, "acme", limit=5)
    assert record.charged_amount == 80
    assert await stream_length(store) == 0
    assert await store.audit() == []
