"""How the wallet's SQL runs: a thin execution layer for the hot statements, and the SQLite writer
that group-commits.

The wallet logic in :mod:`metergate.wallet.sql` is written once, as functions over a SQLAlchemy
``Connection``, for both backends. Its hot statements are :class:`Prepared` once at import and run
through the statement's methods (``_RESERVE.first(conn, values)``): on the SQLite writer's connection
they run their SQL, compiled once for SQLite, straight on the driver connection of the same
transaction; on any other connection (PostgreSQL, SQLite reads, the writer with ``fast=False``) they
run through ``conn.execute`` like every other statement, so the PostgreSQL path is exactly the Core
path. Driver errors surface as SQLAlchemy's exception classes either way (``IntegrityError`` for a
duplicate idempotency key), and rows have the same attribute names.

:class:`SqliteWriter` is SQLite's single writer: one thread that owns the write connection and
applies queued operations in group commits. It takes what is queued (up to ``batch_max`` operations)
into one ``BEGIN IMMEDIATE`` transaction, runs each operation inside a SAVEPOINT of its own, so that
an operation that fails (insufficient funds, a replayed idempotency key) rolls back only itself and
its error goes to its own caller, and COMMITs once. Invariant: no caller sees a result before the
COMMIT that made it durable has returned; then the event loop is woken once per batch to resolve
every caller. The other way round, the writer is woken once per event-loop iteration that queued
operations, after that iteration's callbacks (:meth:`SqliteWriter._wake`), not once per operation.
If a batch fails as a whole (its COMMIT, or an error that cost SQLite the transaction),
nothing of it was committed, and each of its operations runs again in a transaction of its own.
Batches form only from what queued up while the previous one ran: the writer never waits to fill one,
so a lone request pays no batching delay.

WAL checkpoints run mostly off the commit path. By default SQLite checkpoints inside whichever COMMIT
takes the WAL past 1000 pages (4 MB), and a checkpoint fsyncs: that COMMIT, and every caller of its
batch, waits for the disk (tens of milliseconds on a slow disk: the p99 of a lone request).
Here a checkpointer thread with a connection of its own runs a PASSIVE checkpoint every
``checkpoint_interval_s`` in which writes happened; a PASSIVE checkpoint copies committed pages into
the database file and fsyncs without blocking the writer or the readers. Durability is unchanged: it
is set by ``synchronous=NORMAL``, and a checkpoint only copies pages that are already committed.
The price is WAL size. The WAL can only restart from its beginning when a checkpoint has caught up
with every frame before the next write begins, which under steady writes takes a checkpoint inside a
COMMIT; so the writer's own automatic checkpoint is kept, raised to :data:`WAL_AUTOCHECKPOINT_PAGES`
(about 80 MB of WAL with 4 KiB pages): one such stall per 80 MB written instead of per 4 MB, and a
cheap one, since the checkpointer has copied most pages already. The WAL file therefore reaches about
80 MB under sustained writes and is truncated back to :data:`WAL_SIZE_LIMIT_BYTES` when it restarts,
and recovery after a crash reads up to that much WAL once at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import operator
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import UpdateBase

from metergate.observability import ledger_batches
from metergate.observability.threads import name_os_thread
from metergate.wallet.batchops import CLASSIC

log = logging.getLogger(__name__)

# At most this many operations share one write transaction. It bounds how long one COMMIT holds
# SQLite's write lock (other processes' writers wait behind it) and how long an operation can wait
# behind the others of its batch: at 30-100 us of writer time per operation, 64 is 2-6 ms. Beyond a
# few dozen the saving per operation is small (bench/wallet_ops.py).
WRITE_BATCH_MAX = 64

# The SQLite threads' names, in Python and as the kernel shows them (``top -H``, /proc/<pid>/task/*/comm; at
# most 15 bytes): the writer's CPU is the ledger's share of a request (bench/run.py reads it by this name).
# Reader threads are numbered after the prefix (mg-sql-reader_0, ...).
WRITER_THREAD = "mg-sql-writer"
CHECKPOINT_THREAD = "mg-sql-ckpt"
READER_THREAD = "mg-sql-reader"

# WAL checkpoints (see the module docstring): the checkpointer's period, the WAL size (pages) at which the
# writer checkpoints inside a COMMIT (SQLite's default is 1000), the size a restarted WAL is truncated to.
CHECKPOINT_INTERVAL_S = 1.0
WAL_AUTOCHECKPOINT_PAGES = 20_000
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


def json_dumps(value: Any) -> str:
    """How JSON columns are written, on every engine and on the direct path alike: a value JSON has no type
    for (a ``Decimal`` in a usage record's detail) is written as its string."""
    return json.dumps(value, default=str)


_SQLITE = sqlite.dialect(json_serializer=json_dumps)
_RAW = "metergate.sqlite_raw"  # Connection.info key: the driver connection, set by the writer only


class Prepared:
    """A hot Core statement, with its SQLite form compiled once: SQL, parameter order, row type.

    ``columns`` names the values an INSERT is given, every one of them each time, as
    ``Connection.execute(insert(table), values)`` would infer them from the keys.
    """

    __slots__ = ("_binds", "_order", "_params", "_row", "_row_procs", "core", "sql")

    def __init__(self, core: Select[Any] | UpdateBase, *, columns: Sequence[str] | None = None) -> None:
        compiled = core.compile(dialect=_SQLITE, column_keys=list(columns) if columns is not None else None)
        order = tuple(compiled.positiontup or ())
        if columns is not None:
            # A column left out would take a Python-side default that the SQLite form does not carry.
            assert set(order) == set(columns), f"a prepared INSERT is given every column it writes: {order}"
        self.core = core
        self.sql = compiled.string
        self._order = order
        binds = (compiled.binds[name].type.bind_processor(_SQLITE) for name in order)
        # The parameter tuple in one C call; then only the values that need a bind processor (JSON, Boolean)
        # are fixed up, by position.
        self._binds = tuple((i, proc) for i, proc in enumerate(binds) if proc is not None)
        self._params: Callable[[Mapping[str, Any]], Any] = (
            operator.itemgetter(*order) if len(order) > 1 else lambda values: tuple(values[k] for k in order))
        returned = list(getattr(core, "exported_columns", ()))
        self._row: Any = collections.namedtuple("Row", [c.key for c in returned]) if returned else None
        procs = tuple(c.type.result_processor(_SQLITE, None) for c in returned)
        self._row_procs = procs if any(procs) else None

    def _rows(self, raw: sqlite3.Connection, values: Mapping[str, Any]) -> list[Any]:
        params = self._params(values)
        if self._binds:
            params = list(params)
            for i, proc in self._binds:
                params[i] = proc(params[i])
        try:
            return raw.execute(self.sql, params).fetchall()
        except sqlite3.Error as error:
            raise DBAPIError.instance(self.sql, params, error, sqlite3.Error) from error

    def _row_of(self, raw: Sequence[Any]) -> Any:
        assert self._row is not None, "this statement returns no rows"
        if self._row_procs is not None:
            raw = [v if proc is None else proc(v) for v, proc in zip(raw, self._row_procs, strict=True)]
        return self._row._make(raw)

    def run(self, conn: Connection, values: Mapping[str, Any]) -> None:
        raw = conn.info.get(_RAW)
        if raw is None:
            conn.execute(self.core, values)
        else:
            self._rows(raw, values)

    def first(self, conn: Connection, values: Mapping[str, Any]) -> Any | None:
        """The first row, or None (``Result.first``)."""
        raw = conn.info.get(_RAW)
        if raw is None:
            return conn.execute(self.core, values).first()
        rows = self._rows(raw, values)
        return self._row_of(rows[0]) if rows else None

    def all(self, conn: Connection, values: Mapping[str, Any]) -> list[Any]:
        """Every row (``Result.all``)."""
        raw = conn.info.get(_RAW)
        if raw is None:
            return list(conn.execute(self.core, values).all())
        return [self._row_of(r) for r in self._rows(raw, values)]

    def one(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """Exactly one row, else ``NoResultFound`` / ``MultipleResultsFound`` (``Result.one``)."""
        raw = conn.info.get(_RAW)
        if raw is None:
            return conn.execute(self.core, values).one()
        rows = self._rows(raw, values)
        if not rows:
            raise NoResultFound("No row was found when one was required")
        if len(rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._row_of(rows[0])

    def scalar_one(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        return self.one(conn, values)[0]


# ------------------------------------------------------------------------------------------ the writer


@dataclass(slots=True)
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    ok: bool = False
    outcome: Any = field(default=None)
    engine: Any = None  # a batch engine operation (metergate.wallet.batchops), decided with the batch's others
    link: Any = None  # for the batch's span: the submitter's span (metergate.observability.ledger_batches)


def _resolve(ops: list[_Op]) -> None:
    """On the event loop: hand every operation of a committed batch its result or its error."""
    for op in ops:
        if not op.future.done():  # a caller may have stopped waiting (cancelled)
            if op.ok:
                op.future.set_result(op.outcome)
            else:
                op.future.set_exception(op.outcome)


class SqliteWriter:
    """SQLite's one writer thread; see the module docstring for the group-commit contract."""

    def __init__(self, engine: Engine, *, batch_max: int = WRITE_BATCH_MAX, fast: bool = True,
                 checkpoint_interval_s: float | None = CHECKPOINT_INTERVAL_S) -> None:
        """``fast=False`` runs the prepared statements through SQLAlchemy too, as on PostgreSQL;
        ``checkpoint_interval_s=None`` leaves checkpoints to SQLite (inside a COMMIT, every 1000 pages)."""
        assert 1 <= batch_max <= 10_000, "batch_max must be 1-10000"
        assert checkpoint_interval_s is None or 0.01 <= checkpoint_interval_s <= 3600
        self._engine = engine
        self._batch_max = batch_max
        self._fast = fast
        database = engine.url.database
        self._checkpoint_path = database if database and database != ":memory:" else None
        self._checkpoint_interval_s = checkpoint_interval_s if self._checkpoint_path else None
        self._queue: collections.deque[_Op | None] = collections.deque()  # appended on loops, taken by the writer
        self._wakes: queue.SimpleQueue[None] = queue.SimpleQueue()  # what the writer sleeps on when it is empty
        self._waking: set[asyncio.AbstractEventLoop] = set()  # loops with a wake-up of the writer scheduled
        self._thread = threading.Thread(target=self._main, name=WRITER_THREAD, daemon=True)
        self._checkpointer = threading.Thread(target=self._checkpoint_main, name=CHECKPOINT_THREAD,
                                              daemon=True)
        self._stop_checkpoints = threading.Event()
        self._closed = False
        self.batches = 0  # committed batches and operations, for the benchmarks
        self.ops = 0
        self.replays = 0  # engine batches decided again because they wrote a ledger key written before

    def start(self) -> None:
        self._thread.start()
        if self._checkpoint_interval_s is not None:
            self._checkpointer.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], *, engine: Any = None) -> asyncio.Future[Any]:
        """Queue ``fn(conn, *args)``; the future resolves once the transaction that ran it has committed. With
        ``engine`` (a :mod:`metergate.wallet.batchops` operation) the batch engine decides it together with the
        batch's other engine operations, and ``fn`` runs only if the engine hands it back as classic."""
        assert not self._closed, "store is not open"
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Op(fn, args, future, loop, False, None, engine, ledger_batches.link(engine)))
        if loop not in self._waking:  # the writer is woken once the loop has run what is ready now
            self._waking.add(loop)
            loop.call_soon(self._wake, loop)
        return future

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop, after the callbacks that queued operations: wake the writer for all of them.

        Why not on every submit: waking a thread is a system call, and one made while the event loop holds the
        GIL lets the OS switch the loop out right there (holding the GIL, so the writer it woke cannot run
        either) and hands the writer one operation instead of the iteration's batch. Woken here, the writer
        takes everything the iteration queued, and the loop is about to release the GIL to wait."""
        self._waking.discard(loop)
        self._wakes.put(None)

    def close(self) -> None:
        """Finish what is queued, then stop the thread and close the connection."""
        if not self._closed:
            self._closed = True
            self._queue.append(None)
            self._wakes.put(None)
            if self._thread.is_alive():
                self._thread.join()
            self._stop_checkpoints.set()
            if self._checkpointer.is_alive():
                self._checkpointer.join()

    # ------------------------------------------------------------------ on the writer thread

    def _main(self) -> None:
        name_os_thread()
        conn: Connection | None = None
        batch: list[_Op] = []
        stopping = False
        try:
            while not stopping:
                first = self._next()
                if first is None:
                    break
                batch = [first]
                stopping = self._take(batch)
                # A caller cancelled before its operation started gets no effect, as with an executor job
                # cancelled before it ran.
                batch = [op for op in batch if not op.future.cancelled()]
                if batch:
                    conn = self._apply(conn, batch)
                    self._deliver(batch)
                batch = []
        except BaseException:
            # Only a bug or the interpreter exiting gets here: no caller may be left waiting forever.
            self._closed = True
            while True:
                try:
                    op = self._queue.popleft()
                except IndexError:
                    break
                if op is not None:
                    batch.append(op)
            for op in batch:
                op.ok, op.outcome = False, RuntimeError("the SQLite writer stopped")
            self._deliver(batch)
            raise
        finally:
            if conn is not None:
                conn.close()

    def _next(self) -> _Op | None:
        """The next queued operation (``None``: stop), sleeping until a wake-up while there is none."""
        while True:
            try:
                return self._queue.popleft()
            except IndexError:
                self._wakes.get()

    def _take(self, batch: list[_Op]) -> bool:
        """Move what is queued into ``batch``, up to the bound; True if the stop sentinel came."""
        while len(batch) < self._batch_max:
            try:
                op = self._queue.popleft()
            except IndexError:
                return False
            if op is None:
                return True
            batch.append(op)
        return False

    def _apply(self, conn: Connection | None, batch: list[_Op]) -> Connection | None:
        """Apply ``batch`` in one transaction, filling in each operation's outcome; return the connection
        to use next (``None``: open a fresh one)."""
        try:
            conn = conn if conn is not None and not conn.invalidated else self._connect()
            with ledger_batches.batch("sqlite", batch):
                self._transaction(conn, batch)
        except Exception as error:
            if conn is not None:
                conn = _rolled_back(conn)
            if len(batch) == 1:
                batch[0].ok, batch[0].outcome = False, error
                return conn
            # Nothing of the batch was committed: run each operation again in a transaction of its own,
            # so that one operation's failure is never another's.
            log.warning("write batch of %d failed as a whole (%s); applying its operations one by one",
                        len(batch), type(error).__name__)
            for op in batch:
                conn = self._apply(conn, [op])
            return conn
        self.batches += 1
        self.ops += len(batch)
        return conn

    def _connect(self) -> Connection:
        conn = self._engine.connect()
        if self._checkpoint_interval_s is not None:
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            raw.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        return conn

    def _checkpoint_main(self) -> None:
        """Every interval in which batches were committed, a PASSIVE checkpoint on a connection of its own."""
        assert self._checkpoint_path is not None and self._checkpoint_interval_s is not None
        name_os_thread()
        checkpointed = 0
        con = sqlite3.connect(self._checkpoint_path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stop_checkpoints.wait(self._checkpoint_interval_s):
                if self.batches == checkpointed:
                    continue
                checkpointed = self.batches
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # the writer's backstop checkpoints meanwhile
                    log.warning("WAL checkpoint failed: %s", error)
        finally:
            con.close()

    def _transaction(self, conn: Connection, batch: list[_Op]) -> None:
        conn.begin()  # the engine's "begin" listener emits BEGIN IMMEDIATE
        raw = conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection), "the SQLite writer needs the sqlite3 driver"
        if self._fast:
            conn.info[_RAW] = raw
        classic = [op for op in batch if op.engine is None]
        engine_ops = [op for op in batch if op.engine is not None]
        if engine_ops:
            # First the batch engine, set-based, over what the whole batch touches (first in the transaction: it
            # may roll it back and begin it again, see metergate.wallet.batchsql); then what it hands back and the
            # other operations, each in its own savepoint (see the module docstring).
            from metergate.wallet.batchsql import apply_sqlite

            try:
                outcomes, again = apply_sqlite(raw, [op.engine for op in engine_ops])
            except sqlite3.Error as error:
                raise DBAPIError.instance("batch", None, error, sqlite3.Error) from error
            self.replays += again
            for op, outcome in zip(engine_ops, outcomes, strict=True):
                if outcome is CLASSIC:
                    classic.append(op)
                else:
                    op.outcome, op.ok = outcome, not isinstance(outcome, BaseException)
        if len(batch) == 1 and classic:
            # Alone in its transaction, an operation needs no savepoint: its error rolls it all back (in
            # _apply) and is its outcome.
            op = batch[0]
            op.outcome, op.ok = op.fn(conn, *op.args), True
            conn.commit()
            return
        for op in classic:
            raw.execute("SAVEPOINT mg_op")
            try:
                op.outcome, op.ok = op.fn(conn, *op.args), True
            except Exception as error:
                op.outcome, op.ok = error, False
                if not raw.in_transaction:
                    raise  # SQLite rolled the whole transaction back (disk full, I/O error)
                raw.execute("ROLLBACK TO mg_op")
            raw.execute("RELEASE mg_op")
        conn.commit()

    @staticmethod
    def _deliver(batch: list[_Op]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        for op in batch:
            by_loop.setdefault(op.loop, []).append(op)
        for loop, ops in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, ops)
            except RuntimeError:
                log.warning("event loop closed before %d write results could be delivered", len(ops))


def _rolled_back(conn: Connection) -> Connection | None:
    """Roll back whatever is open on the writer's connection; ``None`` if that failed (reconnect)."""
    try:
        conn.rollback()
        raw = conn.connection.driver_connection
        if raw is not None and raw.in_transaction:  # a failed COMMIT leaves SQLite's open, SQLAlchemy's ended
            raw.rollback()
    except Exception:
        log.exception("rollback on the SQLite writer failed; reconnecting")
        conn.invalidate()
        conn.close()
        return None
    return conn


__all__ = ["CHECKPOINT_THREAD", "READER_THREAD", "WRITER_THREAD", "WRITE_BATCH_MAX", "Prepared", "SqliteWriter"]
