"""SQLite's group-commit writer: what the operations of one batch share, and what they must not.

Method: fire many operations at one SQLite store at once, so that the writer batches them (checked
through its counters), mix in operations that fail, and check each caller's own outcome, what another
connection sees the moment a caller is answered, and ``audit()``. To put operations in one batch for
certain, the writer is first kept busy by an operation that sleeps. Each test runs batched on the
direct path (prepared SQL on the driver connection), batched on the SQLAlchemy path that PostgreSQL
uses, and with a transaction per operation.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from metergate.wallet.errors import HoldNotFound, IdempotencyConflict, InsufficientFunds
from metergate.wallet.sql import SqlWalletStore

MODE = "test"


@pytest.fixture(params=[(64, True), (64, False), (1, True)], ids=["batched", "batched-core", "per-op"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlWalletStore]:
    batch_max, fast = request.param
    s = SqlWalletStore(f"sqlite:///{tmp_path / 'wallet.db'}", write_batch_max=batch_max, sqlite_fast=fast)
    await s.open()
    yield s
    await s.close()


async def funded(store: SqlWalletStore, amount: int) -> None:
    await store.create_customer(MODE, "acme", "Acme")
    await store.credit(MODE, "acme", "USD", amount, idempotency_key="seed")


async def writer_busy(store: SqlWalletStore, seconds: float = 0.2) -> asyncio.Task[Any]:
    """Occupy the writer thread, so that what is submitted next queues up into one batch."""
    task = asyncio.ensure_future(store.write(lambda _conn: time.sleep(seconds)))
    await asyncio.sleep(0.02)  # the writer has taken it
    return task


def batched(store: SqlWalletStore) -> bool:
    writer = store._writer
    assert writer is not None
    return writer._batch_max > 1


async def test_a_failing_operation_rolls_back_only_itself(store: SqlWalletStore) -> None:
    await funded(store, 100 * 7)
    busy = await writer_busy(store)

    async def reserve(i: int) -> str:
        try:
            await store.reserve(MODE, "acme", "USD", 7, hold_id=f"h{i}", ttl_ms=60_000)
            return "held"
        except InsufficientFunds:
            return "refused"

    async def settle_unknown(i: int) -> str:
        try:
            await store.settle(f"nohold{i}", 1)
            return "settled"
        except HoldNotFound:
            return "not found"

    results = await asyncio.gather(*(reserve(i) if i % 10 else settle_unknown(i) for i in range(330)))
    await busy
    assert results.count("held") == 100
    assert results.count("refused") == 197
    assert results.count("not found") == 33
    balance = await store.balance(MODE, "acme", "USD")
    assert balance.available == 0 and balance.debits_pending == 700
    assert await store.audit() == []
    writer = store._writer
    assert writer is not None
    if batched(store):
        assert writer.batches < writer.ops / 10, "the operations were not group-committed"


async def test_a_hold_id_replayed_within_one_batch_holds_once(store: SqlWalletStore) -> None:
    """The second reserve's UPDATE succeeds before its INSERT hits the unique hold id: its savepoint must
    undo the UPDATE too, and it must answer with the first hold."""
    await funded(store, 1000)
    busy = await writer_busy(store)
    holds = await asyncio.gather(*(store.reserve(MODE, "acme", "USD", 30, hold_id="h1", ttl_ms=60_000)
                                   for _ in range(20)))
    await busy
    assert {(h.id, h.amount) for h, _ in holds} == {("h1", 30)}
    with pytest.raises(IdempotencyConflict):
        await store.reserve(MODE, "acme", "USD", 31, hold_id="h1", ttl_ms=60_000)
    balance = await store.balance(MODE, "acme", "USD")
    assert balance.debits_pending == 30
    settlements = await asyncio.gather(*(store.settle("h1", 20) for _ in range(10)))
    assert sum(not s.replayed for s in settlements) == 1
    assert {s.charged for s in settlements} == {20}
    assert (await store.balance(MODE, "acme", "USD")).available == 980
    assert await store.audit() == []


async def test_no_caller_is_answered_before_its_commit(store: SqlWalletStore, tmp_path: Path) -> None:
    await funded(store, 10_000)
    other = sqlite3.connect(tmp_path / "wallet.db", isolation_level=None)

    async def reserve_then_look(i: int) -> bool:
        await store.reserve(MODE, "acme", "USD", 1, hold_id=f"h{i}", ttl_ms=60_000)
        # Synchronously, before anything else runs on this loop: another connection must see it.
        return other.execute("SELECT 1 FROM holds WHERE id = ?", (f"h{i}",)).fetchone() is not None

    try:
        busy = await writer_busy(store)
        seen = await asyncio.gather(*(reserve_then_look(i) for i in range(200)))
        await busy
    finally:
        other.close()
    assert all(seen)


def _commit_will_fail(conn: Connection) -> None:
    """An operation that succeeds itself but makes its transaction's COMMIT fail (a deferred foreign key)."""
    conn.execute(text("PRAGMA defer_foreign_keys = ON"))
    conn.execute(text("INSERT INTO api_keys (id, key_hash, prefix, mode, customer_id, created_at_ms) "
                      "VALUES ('k', 'x', 'p', 'test', 'nobody', 0)"))


def _transaction_lost(conn: Connection) -> None:
    """An operation whose failure cost SQLite the whole transaction (as a full disk can)."""
    conn.exec_driver_sql("ROLLBACK")
    raise OSError("disk full, say")


@pytest.mark.parametrize("bad_op", [_commit_will_fail, _transaction_lost])
async def test_a_batch_that_fails_as_a_whole_is_reapplied_one_by_one(store: SqlWalletStore,
                                                                      bad_op: Any) -> None:
    await funded(store, 1000)
    busy = await writer_busy(store)
    good = [asyncio.ensure_future(store.reserve(MODE, "acme", "USD", 10, hold_id=f"h{i}", ttl_ms=60_000))
            for i in range(10)]
    bad = asyncio.ensure_future(store.write(bad_op))
    more = [asyncio.ensure_future(store.reserve(MODE, "acme", "USD", 10, hold_id=f"g{i}", ttl_ms=60_000))
            for i in range(10)]
    await busy
    with pytest.raises((IntegrityError, OSError)):
        await bad
    holds = await asyncio.gather(*good, *more)
    assert len(holds) == 20
    assert (await store.balance(MODE, "acme", "USD")).debits_pending == 200
    assert await store.audit() == []


async def test_an_operation_cancelled_before_it_ran_has_no_effect(store: SqlWalletStore) -> None:
    await funded(store, 1000)
    busy = await writer_busy(store)
    doomed = asyncio.ensure_future(store.reserve(MODE, "acme", "USD", 10, hold_id="h1", ttl_ms=60_000))
    await asyncio.sleep(0)  # submitted
    doomed.cancel()
    kept = await store.reserve(MODE, "acme", "USD", 10, hold_id="h2", ttl_ms=60_000)
    await busy
    assert kept[0].id == "h2"
    assert await store.get_hold("h1") is None
    assert (await store.balance(MODE, "acme", "USD")).debits_pending == 10


@pytest.mark.parametrize("checkpoint_s", [0.05, None], ids=["checkpointer", "sqlite-default"])
async def test_the_checkpointer_moves_committed_pages_into_the_database_file(tmp_path: Path,
                                                                             checkpoint_s: float | None) -> None:
    """Without a checkpoint the database file's own header lags behind what is committed in the WAL; the
    checkpointer brings it level soon after writes, with no COMMIT paying for it."""
    path = tmp_path / "wallet.db"
    store = SqlWalletStore(f"sqlite:///{path}", sqlite_checkpoint_s=checkpoint_s)
    await store.open()
    try:
        await funded(store, 10**9)
        await asyncio.gather(*(store.reserve(MODE, "acme", "USD", 1, hold_id=f"h{i}", ttl_ms=60_000)
                               for i in range(300)))
        await asyncio.sleep(0.3)
        other = sqlite3.connect(path)
        try:
            committed_pages = other.execute("PRAGMA page_count").fetchone()[0]
        finally:
            other.close()
        in_file = int.from_bytes(path.read_bytes()[28:32], "big")  # the header's database size, in pages
    finally:
        await store.close()
    assert (in_file == committed_pages) == (checkpoint_s is not None)
