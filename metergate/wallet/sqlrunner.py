"""How the SQL wallet store runs its operations: the engines, SQLite's writer thread and PostgreSQL's group
commit, read threads, schema migration, and the few statements every part of the store shares.

Every operation is written once, as a synchronous function over a SQLAlchemy Core ``Connection`` that runs
inside one transaction (:meth:`SqlRunner.write`, :meth:`SqlRunner.read`); the hot ones (reserve, extend,
settle) go through the batch engine instead (:meth:`SqlRunner.hot`, :mod:`metergate.wallet.engine`). How they
run depends on the backend:

* PostgreSQL (asyncpg, Read Committed): a write is one transaction through ``AsyncConnection.run_sync``; a hold
  there is one conditional ``UPDATE ... WHERE available >= amount``, which PostgreSQL re-checks on the newest row
  version, so concurrent holds cannot overspend; settlement locks the hold row, then the account row (always in
  that order, so no deadlock). The hot operations are group-committed by :mod:`metergate.wallet.pgcommit`.
* SQLite (the standard library driver): one writer. All writes run on a single dedicated thread that
  group-commits (:class:`~metergate.wallet.execution.SqliteWriter`): the batch engine first, set-based, then
  every other operation in a savepoint of its own; no caller sees its result before that COMMIT returned.
  ``BEGIN IMMEDIATE`` plus ``busy_timeout`` serialise writers across processes. Reads run on a small thread
  pool in WAL mode and never wait for the writer. ``synchronous=NORMAL`` keeps every commit across a process
  crash (not across power loss), the usual WAL trade-off, documented in the README.

The other modules that keep tables beside the wallet's (payments, billing, pricing, subscriptions, assets, the
hold API) run their statements through :meth:`SqlRunner.write` and :meth:`SqlRunner.read` too, so they share
its transactions, its writer and its migrations' lock.
"""


from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from metergate.observability.threads import name_os_thread
from metergate.wallet import schema as t
from metergate.wallet.audit import upgrade_v1_to_v2
from metergate.wallet.batchops import EngineOp
from metergate.wallet.errors import (
    CustomerNotFound,
)
from metergate.wallet.execution import (
    CHECKPOINT_INTERVAL_S,
    READER_THREAD,
    WRITE_BATCH_MAX,
    SqliteWriter,
    json_dumps,
)
from metergate.wallet.models import (
    Mode,
    now_ms,
)

if TYPE_CHECKING:  # PostgreSQL's driver stack loads only when a store opens on PostgreSQL (bench/memory.py)
    from sqlalchemy.ext.asyncio import AsyncEngine

    from metergate.wallet.pgcommit import PgGroupCommit

T = TypeVar("T")

_PG_MIGRATION_LOCK = 0x6D657465  # "mete": serialises schema migration across replicas


class SqlRunner:
    """The engines and the ways of running an operation that every part of the SQL store shares.

    SQLite knobs, for the benchmarks and the tests (the defaults are the production setting):
    ``write_batch_max`` bounds a group commit (1: a transaction per operation); ``sqlite_fast=False``
    runs the prepared statements through SQLAlchemy, as on PostgreSQL; ``sqlite_checkpoint_s=None``
    leaves WAL checkpoints to SQLite, inside a COMMIT (see :mod:`metergate.wallet.execution`);
    ``batch_engine=False`` runs the hot operations one by one on the classic path, as before the batch engine
    (the benchmarks' baseline, and a switch back should it ever be needed)."""

    def __init__(self, url: str, *, pool_size: int = 10, write_batch_max: int = WRITE_BATCH_MAX,
                 sqlite_fast: bool = True, sqlite_checkpoint_s: float | None = CHECKPOINT_INTERVAL_S,
                 batch_engine: bool = True) -> None:
        parsed = make_url(url)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        if self._sqlite:
            self._url = str(parsed.set(drivername="sqlite"))
        elif parsed.drivername in ("postgresql", "postgres"):
            self._url = str(parsed.set(drivername="postgresql+asyncpg"))
        else:
            self._url = url
        self._pool_size = pool_size
        self._write_batch_max = write_batch_max
        self._sqlite_fast = sqlite_fast
        self._sqlite_checkpoint_s = sqlite_checkpoint_s
        self._async: AsyncEngine | None = None
        self._sync_writer: Engine | None = None
        self._sync_reader: Engine | None = None
        self._writer: SqliteWriter | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        # The batch engine for the hot operations (reserve, extend, settle): on SQLite inside the writer's group
        # commit, on PostgreSQL its own group-commit loop (batch_engine=False: each its own classic operation).
        self._batch_engine = batch_engine
        self._pg_commit: PgGroupCommit | None = None

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._sqlite:
            self._sync_writer = self._sqlite_engine(immediate=True, pool_size=1)
            self._sync_reader = self._sqlite_engine(immediate=False, pool_size=4)
            self._writer = SqliteWriter(self._sync_writer, batch_max=self._write_batch_max, fast=self._sqlite_fast,
                                        checkpoint_interval_s=self._sqlite_checkpoint_s)
            self._writer.start()
            self._read_threads = ThreadPoolExecutor(4, thread_name_prefix=READER_THREAD, initializer=name_os_thread)
        else:
            from sqlalchemy.ext.asyncio import create_async_engine  # SQLAlchemy's async layer, ORM and asyncpg

            self._async = create_async_engine(self._url, pool_size=self._pool_size, max_overflow=self._pool_size,
                                              json_serializer=json_dumps,
                                              pool_pre_ping=True)
            event.listen(self._async.sync_engine, "handle_error", _server_unavailable)
        await self.write(self._migrate)
        if not self._sqlite and self._batch_engine:
            from metergate.wallet.pgcommit import PgGroupCommit

            dsn = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
            self._pg_commit = PgGroupCommit(dsn)
            self._pg_commit.start()

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> Engine:
        engine = create_engine(self._url, pool_size=pool_size, max_overflow=0, json_serializer=json_dumps,
                               connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the driver so that BEGIN is ours to emit.
            dbapi_connection.isolation_level = None
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=15000", "foreign_keys=ON"):
                dbapi_connection.execute(f"PRAGMA {pragma}")

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # On the driver connection: a whole SQLAlchemy execution for BEGIN costs more than the BEGIN.
            conn.connection.driver_connection.execute(begin)

        return engine

    async def close(self) -> None:
        if self._pg_commit is not None:
            await self._pg_commit.close()  # applies what is queued first
            self._pg_commit = None
        if self._async is not None:
            await self._async.dispose()
            self._async = None
        if self._writer is not None:
            self._writer.close()  # applies what is queued first
        if self._read_threads is not None:
            self._read_threads.shutdown(wait=True)
        for engine in (self._sync_writer, self._sync_reader):
            if engine is not None:
                engine.dispose()
        self._sync_writer = self._sync_reader = None
        self._writer = None
        self._read_threads = None

    async def ping(self) -> None:
        await self.read(lambda conn: conn.execute(text("SELECT 1")).scalar())

    def _migrate(self, conn: Connection) -> None:
        """Bring the schema to :data:`schema.SCHEMA_VERSION`, once, even with many replicas starting."""
        if not self._sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        t.metadata.create_all(conn, checkfirst=True)
        current = conn.execute(select(func.max(t.schema_version.c.version))).scalar()
        if current is None:
            conn.execute(insert(t.schema_version).values(version=t.SCHEMA_VERSION, applied_at_ms=now_ms()))
        elif current > t.SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{current} is newer than this metergate (v{t.SCHEMA_VERSION})")
        else:
            if current == 1:
                upgrade_v1_to_v2(conn)
                conn.execute(insert(t.schema_version).values(version=2, applied_at_ms=now_ms()))
            if current <= 2:
                conn.execute(text("ALTER TABLE api_keys ADD COLUMN attributes JSON"))  # NULL: no attributes
                conn.execute(insert(t.schema_version).values(version=3, applied_at_ms=now_ms()))
            if current <= 3:
                # The budget path of each usage record (NULL: no budget node), unless a partial upgrade added it.
                if "budget_path" not in {c["name"] for c in inspect(conn).get_columns("usage_records")}:
                    conn.execute(text("ALTER TABLE usage_records ADD COLUMN budget_path VARCHAR(1040)"))
                conn.execute(insert(t.schema_version).values(version=4, applied_at_ms=now_ms()))

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one write transaction (on SQLite, in a savepoint of the writer's next
        group commit); return once that transaction has committed."""
        if self._sqlite:
            assert self._writer is not None, "store is not open"
            result: T = await self._writer.submit(fn, args)
            return result
        return await self.transaction(fn, *args)

    async def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """PostgreSQL: run ``fn(conn, *args)`` in a transaction of its own, straight on the pool (no group
        commit): :meth:`write`'s path, and the one a store that groups writes itself commits its groups on."""
        assert self._async is not None, "store is not open"
        async with self._async.begin() as aconn:
            return await aconn.run_sync(fn, *args)

    def hot(self, op: EngineOp, classic: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Apply a hot operation through the batch engine (:mod:`metergate.wallet.engine`), grouped with the
        others queued meanwhile; ``classic(conn, *args)`` is the same operation on the per-operation path, for
        what the engine hands back. The awaitable (the group commit's future itself: no coroutine of its own on
        the hot path) resolves once the transaction that applied it has committed."""
        if not self._batch_engine:
            return self.write(classic, *args)
        if self._sqlite:
            assert self._writer is not None, "store is not open"
            return self._writer.submit(classic, args, engine=op)
        assert self._pg_commit is not None, "store is not open"
        return cast("Awaitable[T]", self._pg_commit.submit(op, lambda: self.write(classic, *args)))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a read-only transaction."""
        if self._sqlite:
            assert self._read_threads is not None and self._sync_reader is not None, "store is not open"
            engine = self._sync_reader

            def run() -> T:
                with engine.connect() as conn:
                    return fn(conn, *args)

            return await asyncio.get_running_loop().run_in_executor(self._read_threads, run)
        assert self._async is not None, "store is not open"
        async with self._async.connect() as aconn:
            return await aconn.run_sync(fn, *args)

    @property
    def is_sqlite(self) -> bool:
        """The backend is SQLite (one writer thread, already group-committed), not PostgreSQL."""
        return self._sqlite

    def for_update(self, stmt: Any) -> Any:
        return stmt if self._sqlite else stmt.with_for_update()

    # ------------------------------------------------------------------ helpers

    def dialect_insert(self, table: Any) -> Any:
        """``INSERT`` with ``ON CONFLICT`` support, in this backend's dialect."""
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)

    @staticmethod
    def require_customer(conn: Connection, mode: Mode, customer_id: str) -> None:
        if conn.execute(select(t.customers.c.id).where(
                t.customers.c.mode == mode, t.customers.c.id == customer_id)).first() is None:
            raise CustomerNotFound(customer_id)

    def ensure_account(self, conn: Connection, mode: Mode, customer_id: str, asset: str) -> None:
        self.ensure_account_in(conn, mode, customer_id, asset)

    @staticmethod
    def ensure_account_in(conn: Connection, mode: Mode, customer_id: str, asset: str) -> None:
        """Create the (mode, customer, asset) account row unless it exists; the dialect is the connection's."""
        values = dict(mode=mode, customer_id=customer_id, asset=asset, credits_posted=0, debits_posted=0,
                      debits_pending=0, overdraft_limit=0)
        if conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        conn.execute(dialect_insert(t.accounts).values(**values).on_conflict_do_nothing())


__all__ = ["SqlRunner"]


def _server_unavailable(context: ExceptionContext) -> BaseException | None:
    """A PostgreSQL that is starting up, shutting down or lost the connection is *down*, whichever class the
    driver gives the error: asyncpg's ``CannotConnectNowError`` (57P03, "the database system is starting
    up") reaches SQLAlchemy as a plain ``DBAPIError``, which the proxy would answer with a 500. SQLSTATE classes
    08 (connection exception) and 57 (operator intervention) become the ``OperationalError`` that
    :data:`metergate.wallet.errors.STORAGE_DOWN` names (a 503, a retried settlement)."""
    error = context.sqlalchemy_exception
    if not isinstance(error, DBAPIError) or isinstance(error, OperationalError):
        return None
    state = str(getattr(context.original_exception, "sqlstate", "") or "")
    if state[:2] in ("08", "57"):
        return OperationalError(error.statement, error.params, context.original_exception)
    return None
