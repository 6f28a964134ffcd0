"""Group commit for the ledger sink on PostgreSQL: many sink writes, one transaction.

Why: the sink replays a hot wallet's events through the SQL store's own operations, one transaction each;
on PostgreSQL those transactions all wait on the same account row lock, so a hot wallet drains at one commit
per row-lock hand-over (about a hundred events a second on a busy host). This store runs the same operations
(the SQL store's ``_write(fn)`` hook, so every ledger rule, grants included, stays the SQL store's) but
queues them and applies the queued ones in one transaction, each in a savepoint of its own, as the SQLite
writer does (:mod:`metergate.wallet.execution`): an operation that fails is rolled back to its savepoint and
raises to its caller alone; no caller sees success before the COMMIT returned; if the COMMIT fails, every
caller of the batch gets the error (and the sink retries, idempotently).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from metergate.wallet.sql import SqlWalletStore

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class BatchingSqlWalletStore(SqlWalletStore):
    """A SqlWalletStore whose PostgreSQL writes are group-committed (SQLite: unchanged, it already is)."""

    def __init__(self, url: str, *, batch_max: int = 256, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._batch_max = batch_max
        self._queue: list[_Job] = []
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        if self.is_sqlite:
            return await super().write(fn, *args)
        if self._flusher is None or self._flusher.done():
            self._wakeup = asyncio.Event()
            self._flusher = asyncio.create_task(self._flush_forever(), name="metergate-pg-group-commit")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _flush_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:self._batch_max], self._queue[self._batch_max:]
                await self._flush(batch)

    async def _flush(self, batch: list[_Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []

        def run(conn: Any) -> None:
            for fn, args, _ in batch:
                savepoint = conn.begin_nested()
                try:
                    result = fn(conn, *args)
                except Exception as exc:
                    savepoint.rollback()
                    outcomes.append((False, exc))
                else:
                    savepoint.commit()
                    outcomes.append((True, result))

        try:
            await self.transaction(run)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def close(self) -> None:
        if self._flusher is not None:
            while self._queue:  # noqa: ASYNC110 (close is rare; the flusher empties the queue)
                await asyncio.sleep(0.01)
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await super().close()


__all__ = ["BatchingSqlWalletStore"]
