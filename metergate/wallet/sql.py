"""The SQLAlchemy wallet store: SQLite (embedded default) or PostgreSQL, chosen by URL.

Every operation is written once, as a synchronous function over a SQLAlchemy Core ``Connection`` that
runs inside one transaction. How it runs depends on the backend:

* PostgreSQL (asyncpg, Read Committed): through ``AsyncConnection.run_sync``. A hold is one conditional
  ``UPDATE ... WHERE available >= amount``; PostgreSQL re-checks the condition on the newest row version,
  so concurrent holds cannot overspend. Settlement locks the hold row, then the account row (always in
  that order, so no deadlock).
* SQLite (the standard library driver): one writer. All writes run on a single dedicated thread that
  group-commits: the operations queued meanwhile share one ``BEGIN IMMEDIATE`` transaction, each in a
  savepoint of its own, and no caller sees its result before that COMMIT returned
  (:class:`~metergate.wallet.execution.SqliteWriter`). ``BEGIN IMMEDIATE`` plus ``busy_timeout``
  serialise writers across processes. Reads run on a small thread pool in WAL mode and never wait for
  the writer. ``synchronous=NORMAL`` keeps every commit across a process crash (not across power loss),
  the usual WAL trade-off, documented in the README.

The hot statements are :class:`~metergate.wallet.execution.Prepared`: on the SQLite writer they skip
SQLAlchemy's per-call work and run their precompiled SQL on the driver connection; on PostgreSQL they
run through ``Connection.execute`` unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from metergate.wallet import schema as t
from metergate.wallet.errors import (
    CustomerExists,
    CustomerNotFound,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.execution import CHECKPOINT_INTERVAL_S, WRITE_BATCH_MAX, Prepared, SqliteWriter
from metergate.wallet.models import (
    ApiKey,
    Balance,
    Customer,
    EntryKind,
    Hold,
    LedgerEntry,
    Mode,
    RateLimitCharge,
    RateLimitDenial,
    RateLimitOverride,
    Settlement,
    UsageAggregate,
    UsageGrouping,
    UsageRecord,
    now_ms,
)

T = TypeVar("T")
AnyRow = Any  # a SQLAlchemy Row, or a Prepared statement's named tuple of the same columns
_PG_MIGRATION_LOCK = 0x6D657465  # "mete": serialises schema migration across replicas


# Hot-path statements are built once with bound parameters, and prepared (compiled for the SQLite
# writer's direct path): constructing a Core statement per call costs more than executing it on SQLite.
# The *_LOCKED forms are SELECT ... FOR UPDATE on PostgreSQL; SQLite has one writer and no row locks,
# and SQLAlchemy renders no FOR UPDATE there.
_a, _h, _e = t.accounts.c, t.holds.c, t.ledger_entries.c
_ACCOUNT_WHERE = (_a.mode == bindparam("b_mode"), _a.customer_id == bindparam("b_customer"),
                  _a.asset == bindparam("b_asset"))
_RESERVE = Prepared(update(t.accounts)
                    .where(*_ACCOUNT_WHERE,
                           _a.credits_posted + _a.overdraft_limit - _a.debits_posted - _a.debits_pending
                           >= bindparam("b_amount"))
                    .values(debits_pending=_a.debits_pending + bindparam("b_amount"))
                    .returning(_a.mode, _a.customer_id, _a.asset, _a.credits_posted, _a.debits_posted,
                               _a.debits_pending, _a.overdraft_limit))
_OVERDRAW = Prepared(update(t.accounts)
                     .where(*_ACCOUNT_WHERE)
                     .values(debits_pending=_a.debits_pending + bindparam("b_amount"))
                     .returning(_a.mode, _a.customer_id, _a.asset, _a.credits_posted, _a.debits_posted,
                                _a.debits_pending, _a.overdraft_limit))
_SELECT_ACCOUNT = Prepared(select(t.accounts).where(*_ACCOUNT_WHERE))
_SELECT_ACCOUNT_LOCKED = Prepared(select(t.accounts).where(*_ACCOUNT_WHERE).with_for_update())
_MOVE_ACCOUNT = Prepared(update(t.accounts).where(*_ACCOUNT_WHERE).values(
    debits_pending=_a.debits_pending - bindparam("b_released"),
    debits_posted=_a.debits_posted + bindparam("b_charged")))
_SELECT_HOLD = Prepared(select(t.holds).where(_h.id == bindparam("b_hold")))
_SELECT_HOLD_LOCKED = Prepared(select(t.holds).where(_h.id == bindparam("b_hold")).with_for_update())
_RESOLVE_HOLD = Prepared(update(t.holds).where(_h.id == bindparam("b_hold")).values(
    state=bindparam("b_state"), captured_amount=bindparam("b_charged"), resolved_at_ms=bindparam("b_at")))
_SELECT_ENTRY = Prepared(select(t.ledger_entries).where(_e.mode == bindparam("b_mode"),
                                                        _e.idempotency_key == bindparam("b_key")))
_INSERT_HOLD = Prepared(insert(t.holds), columns=(
    "id", "mode", "customer_id", "asset", "amount", "state", "captured_amount", "expires_at_ms", "created_at_ms"))
_INSERT_ENTRY = Prepared(insert(t.ledger_entries).returning(_e.seq), columns=(
    "idempotency_key", "request_hash", "mode", "customer_id", "asset", "kind", "amount", "credits_delta",
    "posted_delta", "pending_delta", "hold_id", "memo", "created_at_ms"))
_USAGE_FIELDS: tuple[str, ...] = tuple(UsageRecord.__dataclass_fields__)
_INSERT_USAGE = Prepared(insert(t.usage_records), columns=_USAGE_FIELDS)


def _hash(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


class SqlWalletStore:
    """SQLite knobs, for the benchmarks and the tests (the defaults are the production setting):
    ``write_batch_max`` bounds a group commit (1: a transaction per operation); ``sqlite_fast=False``
    runs the prepared statements through SQLAlchemy, as on PostgreSQL; ``sqlite_checkpoint_s=None``
    leaves WAL checkpoints to SQLite, inside a COMMIT. See :mod:`metergate.wallet.execution`."""

    def __init__(self, url: str, *, pool_size: int = 10, write_batch_max: int = WRITE_BATCH_MAX,
                 sqlite_fast: bool = True, sqlite_checkpoint_s: float | None = CHECKPOINT_INTERVAL_S) -> None:
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

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._sqlite:
            self._sync_writer = self._sqlite_engine(immediate=True, pool_size=1)
            self._sync_reader = self._sqlite_engine(immediate=False, pool_size=4)
            self._writer = SqliteWriter(self._sync_writer, batch_max=self._write_batch_max, fast=self._sqlite_fast,
                                        checkpoint_interval_s=self._sqlite_checkpoint_s)
            self._writer.start()
            self._read_threads = ThreadPoolExecutor(4, thread_name_prefix="metergate-sqlite-reader")
        else:
            self._async = create_async_engine(self._url, pool_size=self._pool_size, max_overflow=self._pool_size,
                                              pool_pre_ping=True)
        await self._write(self._migrate)

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> Engine:
        engine = create_engine(self._url, pool_size=pool_size, max_overflow=0,
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
        await self._read(lambda conn: conn.execute(text("SELECT 1")).scalar())

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

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one write transaction (on SQLite, in a savepoint of the writer's next
        group commit); return once that transaction has committed."""
        if self._sqlite:
            assert self._writer is not None, "store is not open"
            result: T = await self._writer.submit(fn, args)
            return result
        assert self._async is not None, "store is not open"
        async with self._async.begin() as aconn:
            return await aconn.run_sync(fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
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

    def _for_update(self, stmt: Any) -> Any:
        return stmt if self._sqlite else stmt.with_for_update()

    # ------------------------------------------------------------------ customers and keys

    async def create_customer(self, mode: Mode, customer_id: str, name: str) -> Customer:
        customer = Customer(mode=mode, id=customer_id, name=name, created_at_ms=now_ms())
        try:
            await self._write(lambda conn: conn.execute(insert(t.customers).values(
                mode=mode, id=customer_id, name=name, created_at_ms=customer.created_at_ms)))
        except IntegrityError:
            raise CustomerExists(customer_id) from None
        return customer

    async def get_customer(self, mode: Mode, customer_id: str) -> Customer | None:
        row = await self._read(lambda conn: conn.execute(select(t.customers).where(
            t.customers.c.mode == mode, t.customers.c.id == customer_id)).first())
        return _customer(row) if row else None

    async def list_customers(self, mode: Mode, *, limit: int, after: str | None = None) -> list[Customer]:
        stmt = select(t.customers).where(t.customers.c.mode == mode)
        if after is not None:
            stmt = stmt.where(t.customers.c.id > after)
        rows = await self._read(lambda conn: conn.execute(stmt.order_by(t.customers.c.id).limit(limit)).all())
        return [_customer(r) for r in rows]

    async def create_api_key(self, mode: Mode, customer_id: str, *, key_id: str, key_hash: str,
                             prefix: str) -> ApiKey:
        key = ApiKey(id=key_id, mode=mode, customer_id=customer_id, prefix=prefix, created_at_ms=now_ms())
        try:
            await self._write(lambda conn: conn.execute(insert(t.api_keys).values(
                id=key_id, key_hash=key_hash, prefix=prefix, mode=mode, customer_id=customer_id,
                created_at_ms=key.created_at_ms)))
        except IntegrityError:
            raise CustomerNotFound(customer_id) from None
        return key

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = await self._read(lambda conn: conn.execute(
            select(t.api_keys).where(t.api_keys.c.key_hash == key_hash)).first())
        return _api_key(row) if row else None

    async def revoke_api_key(self, mode: Mode, key_id: str) -> ApiKey | None:
        def op(conn: Connection) -> Row[Any] | None:
            conn.execute(update(t.api_keys).where(
                t.api_keys.c.id == key_id, t.api_keys.c.mode == mode, t.api_keys.c.revoked_at_ms.is_(None),
            ).values(revoked_at_ms=now_ms()))
            return conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id,
                                                         t.api_keys.c.mode == mode)).first()

        row = await self._write(op)
        return _api_key(row) if row else None

    # ------------------------------------------------------------------ money

    async def credit(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                     idempotency_key: str, memo: str = "") -> LedgerEntry:
        if amount <= 0:
            raise ValueError("a credit must be positive")
        request_hash = _hash("credit", customer_id, asset, amount, memo)
        key = f"credit:{idempotency_key}"  # namespaced apart from the hold/settle/expire keys

        def op(conn: Connection) -> LedgerEntry:
            if conn.execute(select(t.customers.c.id).where(
                    t.customers.c.mode == mode, t.customers.c.id == customer_id)).first() is None:
                raise CustomerNotFound(customer_id)
            self._ensure_account(conn, mode, customer_id, asset)
            conn.execute(update(t.accounts).where(*_account_pk(mode, customer_id, asset)).values(
                credits_posted=t.accounts.c.credits_posted + amount))
            return _append(conn, key, request_hash, mode, customer_id, asset, "credit", amount, credits=amount,
                           memo=memo)

        try:
            return await self._write(op)
        except IntegrityError:
            row = await self._read(_entry_row, mode, key)
            if row is None:
                raise
            if row.request_hash != request_hash:
                raise IdempotencyConflict(key) from None
            return _entry(row)

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int, overdraw: bool = False) -> tuple[Hold, Balance]:
        """Place a hold. ``overdraw=True`` skips the availability check: for replaying a hold that another
        authority (the Redis projection) has already admitted, never for deciding admission."""
        assert amount >= 0, "a hold cannot be negative"
        created = now_ms()
        hold = Hold(id=hold_id, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                    state="pending", expires_at_ms=created + ttl_ms, created_at_ms=created)
        where = {"b_mode": mode, "b_customer": customer_id, "b_asset": asset}

        def op(conn: Connection) -> tuple[Hold, Balance]:
            if overdraw:
                self._ensure_account(conn, mode, customer_id, asset)
            row = (_OVERDRAW if overdraw else _RESERVE).first(conn, {**where, "b_amount": amount})
            if row is None:
                existing = _hold_row(conn, hold_id)
                if existing is not None:
                    return _replayed_hold(existing, hold), _balance_of(conn, mode, customer_id, asset)
                balance = _balance_of(conn, mode, customer_id, asset)
                raise InsufficientFunds(asset=asset, available=balance.available, required=amount)
            _INSERT_HOLD.run(conn, {"id": hold_id, "mode": mode, "customer_id": customer_id, "asset": asset,
                                    "amount": amount, "state": "pending", "captured_amount": 0,
                                    "expires_at_ms": hold.expires_at_ms, "created_at_ms": created})
            _append(conn, f"hold:{hold_id}", _hash("hold", customer_id, asset, amount), mode, customer_id, asset,
                    "hold", amount, pending=amount, hold_id=hold_id)
            return hold, _balance(row)

        def replay(conn: Connection) -> tuple[Hold, Balance] | None:
            existing = _hold_row(conn, hold_id)
            if existing is None:
                return None
            return _replayed_hold(existing, hold), _balance_of(conn, mode, customer_id, asset)

        try:
            return await self._write(op)
        except IntegrityError:
            replayed = await self._read(replay)
            if replayed is None:
                raise
            return replayed

    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None, *,
                     overdraw: bool = False) -> Settlement:
        """Capture ``amount`` against the hold (0 voids it), releasing the rest; see the module contract.
        ``overdraw=True`` captures all of ``amount`` even beyond what the wallet covers (replaying a
        capture decided elsewhere, see :meth:`reserve`)."""
        assert amount >= 0, "a capture cannot be negative"
        key = f"settle:{hold_id}"
        request_hash = _hash("settle", amount)

        def op(conn: Connection) -> Settlement:
            row = _SELECT_HOLD_LOCKED.first(conn, {"b_hold": hold_id})
            if row is None:
                raise HoldNotFound(hold_id)
            hold = _hold(row)
            if hold.state in ("captured", "voided"):
                entry = _entry_row(conn, hold.mode, key)
                assert entry is not None, f"resolved hold {hold_id} has no settle entry"
                if entry.request_hash != request_hash:
                    raise IdempotencyConflict(key)
                balance = _balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                return Settlement(hold_id, int(entry.posted_delta), amount - int(entry.posted_delta), balance,
                                  replayed=True)
            released = hold.amount if hold.state == "pending" else 0  # an expired hold already released
            where = {"b_mode": hold.mode, "b_customer": hold.customer_id, "b_asset": hold.asset}
            before = _balance(_SELECT_ACCOUNT_LOCKED.one(conn, where))
            coverable = amount if overdraw else max(0, before.available + released)
            charged = min(amount, coverable)
            written_off = amount - charged
            after = replace(before, debits_pending=before.debits_pending - released,
                            debits_posted=before.debits_posted + charged)
            assert after.debits_pending >= 0 and charged <= coverable
            assert overdraw or after.available >= 0 or after.available >= before.available, "settlement overspent"
            _RESOLVE_HOLD.run(conn, {"b_hold": hold_id, "b_state": "captured" if charged else "voided",
                                     "b_charged": charged, "b_at": now_ms()})
            _MOVE_ACCOUNT.run(conn, {**where, "b_released": released, "b_charged": charged})
            kind: EntryKind = "capture" if charged else "void"
            _append(conn, key, request_hash, hold.mode, hold.customer_id, hold.asset, kind, charged,
                    posted=charged, pending=-released, hold_id=hold_id,
                    memo=f"written off {written_off}" if written_off else "")
            if usage is not None:
                _INSERT_USAGE.run(conn, _usage_values(usage, charged_amount=charged, written_off_amount=written_off))
            return Settlement(hold_id, charged, written_off, after)

        return await self._write(op)

    async def extend_hold(self, hold_id: str, amount: int, *, step: int, ttl_ms: int,
                          overdraw: bool = False) -> Hold:
        """Grow a pending hold by ``amount`` (idempotent per ``step``) and push its expiry out, or raise
        ``InsufficientFunds`` when the wallet cannot cover the increment — the signal for a long-running
        job to stop at zero instead of running up debt."""
        assert amount > 0, "an extension must be positive"
        key = f"extend:{hold_id}:{step}"

        def op(conn: Connection) -> Hold:
            row = _SELECT_HOLD_LOCKED.first(conn, {"b_hold": hold_id})
            if row is None:
                raise HoldNotFound(hold_id)
            hold = _hold(row)
            if _entry_row(conn, hold.mode, key) is not None:
                return hold  # this step was applied already
            if hold.state != "pending":
                raise HoldNotFound(hold_id)
            where = {"b_mode": hold.mode, "b_customer": hold.customer_id, "b_asset": hold.asset}
            if (_OVERDRAW if overdraw else _RESERVE).first(conn, {**where, "b_amount": amount}) is None:
                balance = _balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                raise InsufficientFunds(asset=hold.asset, available=balance.available, required=amount)
            expires = max(hold.expires_at_ms, now_ms() + ttl_ms)
            conn.execute(update(t.holds).where(t.holds.c.id == hold_id).values(
                amount=t.holds.c.amount + amount, expires_at_ms=expires))
            _append(conn, key, _hash("extend", amount), hold.mode, hold.customer_id, hold.asset, "extend", amount,
                    pending=amount, hold_id=hold_id)
            return replace(hold, amount=hold.amount + amount, expires_at_ms=expires)

        return await self._write(op)

    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int:
        ids = await self._read(lambda conn: conn.execute(select(t.holds.c.id).where(
            t.holds.c.state == "pending", t.holds.c.expires_at_ms < now_ms,
        ).order_by(t.holds.c.expires_at_ms).limit(limit)).scalars().all())

        def op(conn: Connection, hold_id: str) -> bool:
            row = conn.execute(update(t.holds).where(
                t.holds.c.id == hold_id, t.holds.c.state == "pending",
            ).values(state="expired", resolved_at_ms=now_ms).returning(*t.holds.c)).first()
            if row is None:
                return False  # settled meanwhile, or expired by another replica
            hold = _hold(row)
            conn.execute(update(t.accounts).where(*_account_pk(hold.mode, hold.customer_id, hold.asset)).values(
                debits_pending=t.accounts.c.debits_pending - hold.amount))
            _append(conn, f"expire:{hold_id}", _hash("expire"), hold.mode, hold.customer_id, hold.asset, "expire",
                    hold.amount, pending=-hold.amount, hold_id=hold_id)
            return True

        expired = 0
        for hold_id in ids:
            expired += await self._write(op, hold_id)
        return expired

    # ------------------------------------------------------------------ reads

    async def balances(self, mode: Mode, customer_id: str) -> list[Balance]:
        rows = await self._read(lambda conn: conn.execute(select(t.accounts).where(
            t.accounts.c.mode == mode, t.accounts.c.customer_id == customer_id,
        ).order_by(t.accounts.c.asset)).all())
        return [_balance(r) for r in rows]

    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance:
        return await self._read(_balance_of, mode, customer_id, asset)

    async def get_hold(self, hold_id: str) -> Hold | None:
        row = await self._read(_hold_row, hold_id)
        return _hold(row) if row else None

    async def ledger(self, mode: Mode, customer_id: str, *, limit: int,
                     before: int | None = None) -> list[LedgerEntry]:
        c = t.ledger_entries.c
        stmt = select(t.ledger_entries).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        rows = await self._read(lambda conn: conn.execute(stmt.order_by(c.seq.desc()).limit(limit)).all())
        return [_entry(r) for r in rows]

    async def usage(self, mode: Mode, customer_id: str, *, limit: int,
                    before: int | None = None) -> list[tuple[int, UsageRecord]]:
        c = t.usage_records.c
        stmt = select(t.usage_records).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        rows = await self._read(lambda conn: conn.execute(stmt.order_by(c.seq.desc()).limit(limit)).all())
        return [(r.seq, _usage(r)) for r in rows]

    async def audit(self) -> list[str]:
        return await self._read(_audit)

    # ------------------------------------------------------------------ reports

    async def usage_summary(self, mode: Mode, *, group_by: UsageGrouping, from_ms: int, to_ms: int,
                            limit: int) -> list[UsageAggregate]:
        return await self._read(_usage_summary, mode, group_by, from_ms, to_ms, limit)

    # ------------------------------------------------------------------ rate limits

    async def rate_limit_overrides(self) -> list[RateLimitOverride]:
        rows = await self._read(lambda conn: conn.execute(select(t.rate_limit_overrides)).all())
        return [_override(r) for r in rows]

    async def set_rate_limit_override(self, mode: Mode, customer_id: str, *, requests_per_minute: int | None,
                                      tokens_per_minute: int | None) -> RateLimitOverride:
        override = RateLimitOverride(mode, customer_id, requests_per_minute, tokens_per_minute, now_ms())
        limits = {"requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
                  "updated_at_ms": override.updated_at_ms}

        def op(conn: Connection) -> None:
            if conn.execute(select(t.customers.c.id).where(
                    t.customers.c.mode == mode, t.customers.c.id == customer_id)).first() is None:
                raise CustomerNotFound(customer_id)
            stmt = self._dialect_insert(t.rate_limit_overrides).values(mode=mode, customer_id=customer_id, **limits)
            conn.execute(stmt.on_conflict_do_update(index_elements=["mode", "customer_id"], set_=limits))

        await self._write(op)
        return override

    async def delete_rate_limit_override(self, mode: Mode, customer_id: str) -> bool:
        o = t.rate_limit_overrides.c
        deleted = await self._write(lambda conn: conn.execute(delete(t.rate_limit_overrides).where(
            o.mode == mode, o.customer_id == customer_id)).rowcount)
        return bool(deleted)

    async def consume_rate_limits(self, mode: Mode, charges: list[RateLimitCharge], *, window_start_ms: int,
                                  tokens: int) -> RateLimitDenial | None:
        assert tokens >= 0, "a request cannot use negative tokens"
        insert_ = self._dialect_insert
        # Subjects in one order everywhere, so that two transactions never wait on each other's rows.
        ordered = sorted(charges, key=lambda ch: ch.subject)

        def op(conn: Connection) -> RateLimitDenial | None:
            charged: list[RateLimitCharge] = []
            for charge in ordered:
                denial = _charge_window(conn, insert_, mode, charge, window_start_ms, tokens)
                if denial is not None:
                    # All or none: give back, in the same transaction, what this request took from the windows
                    # charged before the one that refused it. (Compensating rather than raising to roll back
                    # keeps the outcome independent of how the writer batches transactions.)
                    for done in charged:
                        _uncharge_window(conn, mode, done.subject, window_start_ms, tokens)
                    return denial
                charged.append(charge)
            return None

        return await self._write(op)

    async def prune_rate_limit_windows(self, *, before_ms: int) -> int:
        w = t.rate_limit_windows.c
        pruned: int = await self._write(lambda conn: conn.execute(delete(t.rate_limit_windows).where(
            w.window_start_ms < before_ms)).rowcount)
        return pruned

    # ------------------------------------------------------------------ helpers

    def _dialect_insert(self, table: Any) -> Any:
        """``INSERT`` with ``ON CONFLICT`` support, in this backend's dialect."""
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)

    def _ensure_account(self, conn: Connection, mode: Mode, customer_id: str, asset: str) -> None:
        values = dict(mode=mode, customer_id=customer_id, asset=asset, credits_posted=0, debits_posted=0,
                      debits_pending=0, overdraft_limit=0)
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        conn.execute(dialect_insert(t.accounts).values(**values).on_conflict_do_nothing())


_DAY_MS = 86_400_000


def _usage_summary(conn: Connection, mode: Mode, group_by: UsageGrouping, from_ms: int, to_ms: int,
                   limit: int) -> list[UsageAggregate]:
    """One aggregate query; every sum is over integers, so SQLite and PostgreSQL agree to the unit."""
    c = t.usage_records.c
    keys: dict[str, Any] = {"customer": c.customer_id, "feature": func.coalesce(c.feature, ""), "model": c.model,
                            "day": c.created_at_ms // _DAY_MS}  # integer division on both backends
    known = c.cost_nanos.is_not(None)
    no_usage = and_(c.cost_nanos.is_(None), c.usage_source == "none")
    unknown = and_(c.cost_nanos.is_(None), c.usage_source != "none")

    def total(expr: Any) -> Any:
        return func.coalesce(func.sum(expr), 0)

    key = keys.get(group_by)
    stmt = select(
        (key if key is not None else literal("")).label("key"), c.asset, func.count().label("requests"),
        total(c.price_amount).label("price"), total(c.charged_amount).label("charged"),
        total(c.written_off_amount).label("written_off"),
        total(case((known, c.charged_amount), else_=0)).label("costed_charged"),
        total(func.coalesce(c.cost_nanos, 0)).label("cost"),
        total(case((unknown, 1), else_=0)).label("cost_unknown"),
        total(case((no_usage, 1), else_=0)).label("no_usage"),
        total(case((known, 0), else_=c.charged_amount)).label("unmargined"),
    ).where(c.mode == mode, c.created_at_ms >= from_ms, c.created_at_ms < to_ms)
    if key is not None:
        stmt = stmt.group_by(key, c.asset).order_by(key, c.asset)
    else:
        stmt = stmt.group_by(c.asset).order_by(c.asset)
    return [UsageAggregate(key=str(r.key), asset=r.asset, requests=int(r.requests), price_amount=int(r.price),
                           charged_amount=int(r.charged), written_off_amount=int(r.written_off),
                           costed_charged=int(r.costed_charged), cost_nanos=int(r.cost),
                           cost_unknown_count=int(r.cost_unknown), no_usage_count=int(r.no_usage),
                           unmargined_charged=int(r.unmargined))
            for r in conn.execute(stmt.limit(limit)).all()]


def _charge_window(conn: Connection, insert_: Callable[[Any], Any], mode: Mode, charge: RateLimitCharge,
                   window_start_ms: int, tokens: int) -> RateLimitDenial | None:
    """Count one request in the subject's window with one conditional upsert; ``None`` when it fits.

    A first request opens the window with an ``INSERT``; later ones take the ``ON CONFLICT`` branch, whose
    ``WHERE`` re-checks the limits on the newest row version (PostgreSQL locks the row; SQLite has one
    writer), so concurrent replicas can never count past a limit.
    """
    rpm, tpm = charge.requests_per_minute, charge.tokens_per_minute
    if tpm is not None and tokens > tpm:
        return RateLimitDenial(charge.subject, "tokens", tpm, 0, window_start_ms)  # can never fit
    w = t.rate_limit_windows
    conditions = []
    if rpm is not None:
        conditions.append(w.c.requests + 1 <= rpm)
    if tpm is not None:
        conditions.append(w.c.tokens + tokens <= tpm)
    stmt = insert_(w).values(mode=mode, subject=charge.subject, window_start_ms=window_start_ms, requests=1,
                             tokens=tokens)
    stmt = stmt.on_conflict_do_update(
        index_elements=["mode", "subject", "window_start_ms"],
        set_={"requests": w.c.requests + 1, "tokens": w.c.tokens + stmt.excluded.tokens},
        where=and_(*conditions) if conditions else None,
    ).returning(w.c.requests)
    if conn.execute(stmt).first() is not None:
        return None
    used = conn.execute(select(w.c.requests, w.c.tokens).where(
        w.c.mode == mode, w.c.subject == charge.subject, w.c.window_start_ms == window_start_ms)).one()
    if rpm is not None and int(used.requests) + 1 > rpm:
        return RateLimitDenial(charge.subject, "requests", rpm, int(used.requests), window_start_ms)
    assert tpm is not None, "a refused charge must have hit one of its limits"
    return RateLimitDenial(charge.subject, "tokens", tpm, int(used.tokens), window_start_ms)


def _uncharge_window(conn: Connection, mode: Mode, subject: str, window_start_ms: int, tokens: int) -> None:
    w = t.rate_limit_windows.c
    conn.execute(update(t.rate_limit_windows).where(
        w.mode == mode, w.subject == subject, w.window_start_ms == window_start_ms,
    ).values(requests=w.requests - 1, tokens=w.tokens - tokens))


def _override(row: Row[Any]) -> RateLimitOverride:
    return RateLimitOverride(mode=row.mode, customer_id=row.customer_id,
                             requests_per_minute=_opt_int(row.requests_per_minute),
                             tokens_per_minute=_opt_int(row.tokens_per_minute), updated_at_ms=int(row.updated_at_ms))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _audit(conn: Connection) -> list[str]:
    """Re-derive every balance from the ledger; return each discrepancy found (none: [])."""
    problems: list[str] = []
    e, h = t.ledger_entries.c, t.holds.c
    sums = {
        (r.mode, r.customer_id, r.asset): (r.credits, r.posted, r.pending)
        for r in conn.execute(select(
            e.mode, e.customer_id, e.asset, func.sum(e.credits_delta).label("credits"),
            func.sum(e.posted_delta).label("posted"), func.sum(e.pending_delta).label("pending"),
        ).group_by(e.mode, e.customer_id, e.asset)).all()
    }
    pending = {
        (r.mode, r.customer_id, r.asset): r.total
        for r in conn.execute(select(h.mode, h.customer_id, h.asset, func.sum(h.amount).label("total"))
                              .where(h.state == "pending").group_by(h.mode, h.customer_id, h.asset)).all()
    }
    for row in conn.execute(select(t.accounts)).all():
        b = _balance(row)
        pk = (b.mode, b.customer_id, b.asset)
        derived = tuple(int(x) for x in sums.get(pk, (0, 0, 0)))
        if derived != (b.credits_posted, b.debits_posted, b.debits_pending):
            problems.append(f"{pk}: account columns {(b.credits_posted, b.debits_posted, b.debits_pending)}"
                            f" != ledger sums {derived}")
        if int(pending.get(pk, 0)) != b.debits_pending:
            problems.append(f"{pk}: debits_pending {b.debits_pending} != open holds {pending.get(pk, 0)}")
        if b.available < 0:
            problems.append(f"{pk}: available {b.available} is below zero")
    unresolved = conn.execute(select(func.count()).select_from(t.holds).where(
        h.state != "pending", ~select(e.seq).where(
            e.hold_id == h.id, e.kind.in_(("capture", "void", "expire"))).exists())).scalar_one()
    if unresolved:
        problems.append(f"{unresolved} resolved holds have no resolving ledger entry")
    return problems


def _append(conn: Connection, key: str, request_hash: str, mode: Mode, customer_id: str, asset: str,
            kind: EntryKind, amount: int, *, credits: int = 0, posted: int = 0, pending: int = 0,
            hold_id: str | None = None, memo: str = "") -> LedgerEntry:
    created = now_ms()
    seq = _INSERT_ENTRY.scalar_one(conn, {
        "idempotency_key": key, "request_hash": request_hash, "mode": mode, "customer_id": customer_id,
        "asset": asset, "kind": kind, "amount": amount, "credits_delta": credits, "posted_delta": posted,
        "pending_delta": pending, "hold_id": hold_id, "memo": memo, "created_at_ms": created})
    return LedgerEntry(seq, key, mode, customer_id, asset, kind, amount, credits, posted, pending, hold_id, memo,
                       created)


def _replayed_hold(row: AnyRow, wanted: Hold) -> Hold:
    found = _hold(row)
    if (found.mode, found.customer_id, found.asset, found.amount) != (
            wanted.mode, wanted.customer_id, wanted.asset, wanted.amount):
        raise IdempotencyConflict(f"hold:{wanted.id}")
    return found


def _balance_of(conn: Connection, mode: Mode, customer_id: str, asset: str) -> Balance:
    row = _SELECT_ACCOUNT.first(conn, {"b_mode": mode, "b_customer": customer_id, "b_asset": asset})
    return _balance(row) if row is not None else Balance(mode, customer_id, asset, 0, 0, 0)


def _hold_row(conn: Connection, hold_id: str) -> AnyRow | None:
    return _SELECT_HOLD.first(conn, {"b_hold": hold_id})


def _entry_row(conn: Connection, mode: Mode, key: str) -> AnyRow | None:
    return _SELECT_ENTRY.first(conn, {"b_mode": mode, "b_key": key})


def _account_pk(mode: str, customer_id: str, asset: str) -> Sequence[Any]:
    a = t.accounts.c
    return (a.mode == mode, a.customer_id == customer_id, a.asset == asset)


def _customer(row: Row[Any]) -> Customer:
    return Customer(mode=row.mode, id=row.id, name=row.name, created_at_ms=row.created_at_ms)


def _api_key(row: Row[Any]) -> ApiKey:
    return ApiKey(id=row.id, mode=row.mode, customer_id=row.customer_id, prefix=row.prefix,
                  created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms)


def _balance(row: AnyRow) -> Balance:
    return Balance(mode=row.mode, customer_id=row.customer_id, asset=row.asset,
                   credits_posted=int(row.credits_posted), debits_posted=int(row.debits_posted),
                   debits_pending=int(row.debits_pending), overdraft_limit=int(row.overdraft_limit))


def _hold(row: AnyRow) -> Hold:
    return Hold(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset, amount=int(row.amount),
                state=row.state, expires_at_ms=int(row.expires_at_ms), created_at_ms=int(row.created_at_ms),
                captured_amount=int(row.captured_amount))


def _entry(row: AnyRow) -> LedgerEntry:
    return LedgerEntry(seq=row.seq, idempotency_key=row.idempotency_key, mode=row.mode,
                       customer_id=row.customer_id, asset=row.asset, kind=row.kind, amount=int(row.amount),
                       credits_delta=int(row.credits_delta), posted_delta=int(row.posted_delta),
                       pending_delta=int(row.pending_delta), hold_id=row.hold_id, memo=row.memo,
                       created_at_ms=int(row.created_at_ms))


def _usage_values(usage: UsageRecord, **changes: Any) -> dict[str, Any]:
    """The record's column values, with ``changes`` applied (cheaper than ``dataclasses.replace``)."""
    values = {name: getattr(usage, name) for name in _USAGE_FIELDS}
    values.update(changes)
    values["detail"] = json.loads(json.dumps(usage.detail, default=str))
    return values


def _usage(row: Row[Any]) -> UsageRecord:
    mapping = cast(dict[str, Any], row._mapping)
    return UsageRecord(**{name: mapping[name] for name in _USAGE_FIELDS})


__all__ = ["SqlWalletStore"]
