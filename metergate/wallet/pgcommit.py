"""Group commit on PostgreSQL: the hot operations queued while one batch commits form the next batch, applied
by the batch engine in one short transaction on one asyncpg connection.

Why: on a hot wallet every operation's transaction waits for the account row lock, so a transaction per
operation runs at one row-lock hand-over per operation (about 180 reserve+settle pairs a second here). One
transaction per batch pays that hand-over once for the batch, and :mod:`metergate.wallet.batchsql` makes the
batch a few statements whatever its size.

Contract, as the SQLite writer's (:mod:`metergate.wallet.execution`):

* no caller learns its outcome before the COMMIT of the transaction that made it durable returned;
* batches form only from what queued up while the previous one ran: a lone request waits for no one;
* an operation the engine refuses (insufficient funds, a conflicting key) fails alone, the batch commits;
* if the batch fails as a whole (a key another replica wrote first, a deadlock, a lost connection), nothing of
  it committed, and each operation is applied again alone; its error, if any, is then its own;
* what the engine hands back as classic runs through the store's per-operation path after the COMMIT (all
  operations of a batch are concurrent, so running it after the others is a valid order).

Many replicas: each runs its own loop. A batch first runs optimistically (read without locks, decide, one
write statement that commits on its own and re-checks under each row's lock that what the decisions relied on
still holds: the account lock is taken last and held only until that COMMIT); if another replica changed those
rows meanwhile, or a ledger key it writes was written before (the optimistic run does not read them: a replay),
nothing is written and the batch runs again in a transaction that locks holds, then accounts, before it reads,
and reads the keys (:mod:`metergate.wallet.batchsql`). Either way the availability check happens under the row
lock, so no replica can overspend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from metergate.observability import ledger_batches
from metergate.wallet.batchops import CLASSIC, EngineOp
from metergate.wallet.batchsql import BatchConflict, apply_postgres

log = logging.getLogger(__name__)

# At most this many operations share one transaction: it bounds how long the batch holds a hot account's row
# lock (other replicas wait behind it) and the statements' parameter lists.
PG_BATCH_MAX = 256


@dataclass(slots=True)
class _Job:
    op: EngineOp
    classic: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]
    link: Any = None  # for the batch's span: the submitter's span (metergate.observability.ledger_batches)


def driver_error(exc: BaseException) -> BaseException:
    """asyncpg's errors as the SQLAlchemy classes the rest of metergate handles: a unique violation is the
    ``IntegrityError`` of a replayed key; a lost or refused connection, a deadlock or a serialisation failure is
    an ``OperationalError`` (storage trouble: retried, or 503); any other database error a ``DBAPIError``."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError("batch", None, exc)
    if isinstance(exc, asyncpg.TransactionRollbackError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
                  | OSError | asyncpg.CannotConnectNowError | asyncpg.exceptions.OperatorInterventionError):
        return OperationalError("batch", None, exc)
    if isinstance(exc, asyncpg.PostgresError):
        return DBAPIError("batch", None, exc)
    return exc


class PgGroupCommit:
    def __init__(self, dsn: str, *, batch_max: int = PG_BATCH_MAX) -> None:
        assert 1 <= batch_max <= 10_000, "batch_max must be 1-10000"
        self._dsn = dsn
        self._batch_max = batch_max
        self._queue: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._con: Any = None
        self._closing = False
        self.batches = 0  # committed batches and operations, for the benchmarks and tests
        self.ops = 0
        self.conflicts = 0  # optimistic batches that found their rows changed and ran again locked
        self.replays = 0  # optimistic batches that wrote a ledger key written before, and ran again locked

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main(), name="metergate-pg-group-commit")

    def submit(self, op: EngineOp, classic: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Queue ``op``; the future resolves after the COMMIT that made its outcome durable. ``classic`` runs the
        operation through the per-operation path, for what the engine does not decide."""
        assert self._task is not None and not self._closing, "store is not open"
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(op, classic, future, ledger_batches.link(op)))
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Apply what is queued, then stop and close the connection."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._con is not None:
            await self._con.close()
            self._con = None

    async def _main(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the operations the last COMMIT woke up queue their next one first: without this turn of the
            # loop, the batch is cut before they run, and batches alternate between full and nearly empty.
            await asyncio.sleep(0)
            batch, self._queue = self._queue[:self._batch_max], self._queue[self._batch_max:]
            batch = [job for job in batch if not job.future.cancelled()]
            if batch:
                try:
                    await self._run(batch)
                except Exception:  # a bug: nobody may be left waiting
                    log.exception("PostgreSQL group commit failed unexpectedly")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(RuntimeError("the PostgreSQL group commit failed"))

    async def _run(self, batch: list[_Job]) -> None:
        try:
            with ledger_batches.batch("postgresql", batch):
                outcomes = await self._transaction(batch)
        except Exception as exc:
            error = driver_error(exc)
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            log.warning("PostgreSQL batch of %d failed as a whole (%s); applying its operations one by one",
                        len(batch), type(error).__name__)
            for job in batch:
                await self._run([job])
            return
        self.batches += 1
        self.ops += len(batch)
        classic: list[_Job] = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if outcome is CLASSIC:
                classic.append(job)
            elif not job.future.done():
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
        if classic:
            await asyncio.gather(*(self._classic(job) for job in classic))

    @staticmethod
    async def _classic(job: _Job) -> None:
        try:
            result = await job.classic()
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _transaction(self, batch: list[_Job]) -> list[Any]:
        if self._con is None or self._con.is_closed():
            self._con = None
            self._con = await asyncpg.connect(self._dsn)
        con = self._con
        ops = [job.op for job in batch]
        try:
            try:
                return await apply_postgres(con, ops, locked=False)
            except BatchConflict:
                self.conflicts += 1
            except asyncpg.UniqueViolationError:
                self.replays += 1  # a key written before (a replay): decided again, reading the keys
            async with con.transaction():
                return await apply_postgres(con, ops, locked=True)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            await self._drop()
            raise

    async def _drop(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.terminate()


__all__ = ["PG_BATCH_MAX", "PgGroupCommit", "driver_error"]
