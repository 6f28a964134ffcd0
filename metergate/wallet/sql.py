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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from metergate.observability.threads import name_os_thread
from metergate.wallet import schema as t
from metergate.wallet.audit import audit_ledger, upgrade_v1_to_v2
from metergate.wallet.errors import (
    CaptureBelowCaptured,
    CustomerExists,
    CustomerNotFound,
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.execution import (
    CHECKPOINT_INTERVAL_S,
    READER_THREAD,
    WRITE_BATCH_MAX,
    Prepared,
    SqliteWriter,
    json_dumps,
)
from metergate.wallet.grants import (
    ORDERS,
    PURPOSES,
    advance_grant,
    allocation_of,
    grant_of,
    grant_row,
    is_stale,
    void_grant,
    wallet_order,
)
from metergate.wallet.grants import allocations as gr_allocations
from metergate.wallet.holdops import capture_in, credit_in, expire_hold_in, extend_in, reserve_in
from metergate.wallet.ledger import (
    SELECT_HOLD_LOCKED,
    balance_of,
    balance_row,
    entry_of,
    entry_row,
    hold_of,
    hold_row,
    lock_account,
    move_account,
    request_hash,
)
from metergate.wallet.models import (
    Allocation,
    ApiKey,
    Balance,
    Capture,
    Customer,
    Grant,
    GrantPurpose,
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
from metergate.wallet.quota import QuotaClaim, QuotaGrant
from metergate.wallet.quota_sql import claim_quota, release_quota

T = TypeVar("T")
_PG_MIGRATION_LOCK = 0x6D657465  # "mete": serialises schema migration across replicas


_USAGE_FIELDS: tuple[str, ...] = tuple(UsageRecord.__dataclass_fields__)
_INSERT_USAGE = Prepared(insert(t.usage_records), columns=_USAGE_FIELDS)
_hash = request_hash
_balance, _hold, _entry = balance_row, hold_of, entry_of  # payments import _entry from here
_balance_of, _hold_row, _entry_row = balance_of, hold_row, entry_row


def _locked_hold(conn: Connection, hold_id: str) -> Hold:
    """The hold, locked for this transaction (PostgreSQL); ``HoldNotFound`` if there is none."""
    row = SELECT_HOLD_LOCKED.first(conn, {"b_hold": hold_id})
    if row is None:
        raise HoldNotFound(hold_id)
    return _hold(row)


def _previous(conn: Connection, mode: Mode, key: str, hashed: str) -> Any | None:
    """The ledger entry an earlier call with this idempotency key wrote, if any; ``IdempotencyConflict`` when
    that call had other content."""
    entry = _entry_row(conn, mode, key)
    if entry is not None and entry.request_hash != hashed:
        raise IdempotencyConflict(key)
    return entry


class _Replay(Exception):
    """Raised inside a write to roll it back when the operation turns out to have been applied already."""


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
            self._read_threads = ThreadPoolExecutor(4, thread_name_prefix=READER_THREAD, initializer=name_os_thread)
        else:
            self._async = create_async_engine(self._url, pool_size=self._pool_size, max_overflow=self._pool_size,
                                              json_serializer=json_dumps,
                                              pool_pre_ping=True)
        await self._write(self._migrate)

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
        else:
            if current == 1:
                upgrade_v1_to_v2(conn)
                conn.execute(insert(t.schema_version).values(version=2, applied_at_ms=now_ms()))
            if current <= 2:
                conn.execute(text("ALTER TABLE api_keys ADD COLUMN attributes JSON"))  # NULL: no attributes
                conn.execute(insert(t.schema_version).values(version=3, applied_at_ms=now_ms()))

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
                             prefix: str, attributes: dict[str, str] | None = None) -> ApiKey:
        key = ApiKey(id=key_id, mode=mode, customer_id=customer_id, prefix=prefix, created_at_ms=now_ms(),
                     attributes=dict(attributes or {}))
        try:
            await self._write(lambda conn: conn.execute(insert(t.api_keys).values(
                id=key_id, key_hash=key_hash, prefix=prefix, mode=mode, customer_id=customer_id,
                created_at_ms=key.created_at_ms, attributes=key.attributes or None)))
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

    async def set_api_key_attributes(self, mode: Mode, key_id: str, attributes: dict[str, str]) -> ApiKey | None:
        def op(conn: Connection) -> Row[Any] | None:
            conn.execute(update(t.api_keys).where(t.api_keys.c.id == key_id, t.api_keys.c.mode == mode)
                         .values(attributes=dict(attributes) or None))
            return conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id,
                                                         t.api_keys.c.mode == mode)).first()

        row = await self._write(op)
        return _api_key(row) if row else None

    # ------------------------------------------------------------------ money

    async def credit(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                     idempotency_key: str, memo: str = "", purpose: GrantPurpose = "paid", priority: int = 0,
                     effective_at_ms: int | None = None, expires_at_ms: int | None = None,
                     grant_id: str | None = None, source: str = "", at_ms: int | None = None) -> LedgerEntry:
        """Credit the wallet: a grant (see :mod:`metergate.wallet.grants`). Without the grant keywords it is a
        ``paid`` grant, effective now, never expiring, priority 0 — the credit every caller made before grants.
        Idempotent per ``idempotency_key``; the grant's id is derived from it unless ``grant_id`` is given."""
        if amount <= 0:
            raise ValueError("a credit must be positive")
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}")
        now = now_ms() if at_ms is None else at_ms
        effective = now if effective_at_ms is None else effective_at_ms
        if expires_at_ms is not None and expires_at_ms <= effective:
            raise ValueError("a grant must expire after it becomes effective")
        parts: list[object] = ["credit", customer_id, asset, amount, memo]
        if (purpose, priority, effective_at_ms, expires_at_ms) != ("paid", 0, None, None):
            parts += [purpose, priority, effective_at_ms, expires_at_ms]  # older keys keep their old hash
        hashed = _hash(*parts)
        key = f"credit:{idempotency_key}"  # namespaced apart from the hold/settle/expire keys
        gid = grant_id or "gr_" + _hash(mode, key)[:24]

        def op(conn: Connection) -> LedgerEntry:
            self._require_customer(conn, mode, customer_id)
            self._ensure_account(conn, mode, customer_id, asset)
            return credit_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount, key=key,
                             hashed=hashed, memo=memo, purpose=purpose, priority=priority, effective_at_ms=effective,
                             expires_at_ms=expires_at_ms, grant_id=gid, source=source, now=now)

        try:
            return await self._write(op)
        except IntegrityError:
            row = await self._read(_entry_row, mode, key)
            if row is None:
                raise
            if row.request_hash != hashed:
                raise IdempotencyConflict(key) from None
            return _entry(row)

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int, overdraw: bool = False,
                      at_ms: int | None = None) -> tuple[Hold, Balance]:
        """Place a hold, split over the wallet's grants in its consumption order. ``overdraw=True`` skips the
        availability check: for replaying a hold that another authority (the Redis projection) has already
        admitted, never for deciding admission; what no grant covers is then held unbacked."""
        assert amount >= 0, "a hold cannot be negative"
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> tuple[Hold, Balance] | InsufficientFunds:
            if overdraw:
                self._ensure_account(conn, mode, customer_id, asset)
            placed = reserve_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                                hold_id=hold_id, ttl_ms=ttl_ms, now=now, overdraw=overdraw)
            if placed is None:
                replayed = replay(conn)
                if replayed is not None:
                    return replayed
                balance = _balance_of(conn, mode, customer_id, asset)
                # Returned, not raised: a refusal keeps the grant activations and lapses it wrote (nothing else).
                return InsufficientFunds(asset=asset, available=balance.available, required=amount)
            return placed

        def replay(conn: Connection) -> tuple[Hold, Balance] | None:
            existing = _hold_row(conn, hold_id)
            if existing is None:
                return None
            entry = _entry_row(conn, existing.mode, f"hold:{hold_id}")
            if existing.mode != mode or entry is None or entry.request_hash != _hash("hold", customer_id, asset,
                                                                                    amount):
                raise IdempotencyConflict(f"hold:{hold_id}")
            return _hold(existing), _balance_of(conn, mode, customer_id, asset)

        try:
            outcome = await self._write(op)
        except IntegrityError:
            replayed = await self._read(replay)
            if replayed is None:
                raise
            return replayed
        if isinstance(outcome, InsufficientFunds):
            raise outcome
        return outcome

    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None, *,
                     overdraw: bool = False, at_ms: int | None = None) -> Settlement:
        """Resolve the hold with ``amount`` captured in all (0 voids it; partial captures made before count
        towards it), releasing the rest; see the module contract. ``overdraw=True`` captures all of ``amount``
        even beyond what the wallet covers (replaying a capture decided elsewhere, see :meth:`reserve`)."""
        assert amount >= 0, "a capture cannot be negative"
        key = f"settle:{hold_id}"
        hashed = _hash("settle", amount)
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Settlement:
            hold = _locked_hold(conn, hold_id)
            if hold.state in ("captured", "voided"):
                entry = _previous(conn, hold.mode, key, hashed)
                assert entry is not None, f"resolved hold {hold_id} has no settle entry"
                balance = _balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                return Settlement(hold_id, hold.captured_amount, amount - hold.captured_amount, balance,
                                  replayed=True)
            if amount < hold.captured_amount:
                raise CaptureBelowCaptured(hold_id, hold.captured_amount, amount)
            done = capture_in(conn, hold, amount - hold.captured_amount, key=key, hashed=hashed, final=True,
                              now=now, overdraw=overdraw)
            total, written_off = done.hold.captured_amount, done.written_off
            if usage is not None:
                _INSERT_USAGE.run(conn, _usage_values(usage, charged_amount=total, written_off_amount=written_off))
            return Settlement(hold_id, total, written_off, done.balance)

        return await self._write(op)

    async def capture(self, hold_id: str, amount: int, *, idempotency_key: str, overdraw: bool = False,
                      at_ms: int | None = None) -> Capture:
        """Capture ``amount`` more from a pending hold and keep it open (a heartbeat's usage so far); idempotent
        per ``idempotency_key``. Beyond what the hold holds it draws the wallet like :meth:`settle` does, and
        grows the hold by that much. Resolve the hold with :meth:`settle` (its total includes these)."""
        assert amount >= 0, "a capture cannot be negative"
        key = f"capture:{hold_id}:{idempotency_key}"
        hashed = _hash("capture", amount)
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Capture:
            hold = _locked_hold(conn, hold_id)
            entry = _previous(conn, hold.mode, key, hashed)
            if entry is not None:
                charged = int(entry.posted_delta)
                return Capture(hold, charged, amount - charged,
                               _balance_of(conn, hold.mode, hold.customer_id, hold.asset), replayed=True)
            if hold.state != "pending":
                raise HoldNotPending(hold_id, hold.state)
            done = capture_in(conn, hold, amount, key=key, hashed=hashed, final=False, now=now, overdraw=overdraw)
            return Capture(done.hold, done.charged, done.written_off, done.balance)

        return await self._write(op)

    async def extend_hold(self, hold_id: str, amount: int, *, step: int | str, ttl_ms: int,
                          overdraw: bool = False, at_ms: int | None = None) -> Hold:
        """Grow a pending hold by ``amount`` (idempotent per ``step``) and push its expiry out, or raise
        ``InsufficientFunds`` when the wallet cannot cover the increment — the signal for a long-running
        job to stop at zero instead of running up debt."""
        assert amount > 0, "an extension must be positive"
        key = f"extend:{hold_id}:{step}"
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Hold:
            hold = _locked_hold(conn, hold_id)
            if _previous(conn, hold.mode, key, _hash("extend", amount)) is not None:
                return hold  # this step was applied already
            if hold.state != "pending":
                raise HoldNotFound(hold_id)
            extended = extend_in(conn, hold, amount, key=key, ttl_ms=ttl_ms, now=now, overdraw=overdraw)
            if extended is None:
                balance = _balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                raise InsufficientFunds(asset=hold.asset, available=balance.available, required=amount)
            return extended

        return await self._write(op)

    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int:
        ids = await self._read(lambda conn: conn.execute(select(t.holds.c.id).where(
            t.holds.c.state == "pending", t.holds.c.expires_at_ms < now_ms,
        ).order_by(t.holds.c.expires_at_ms).limit(limit)).scalars().all())
        at = now_ms

        expired = 0
        for hold_id in ids:  # False: settled meanwhile, or expired by another replica
            expired += await self._write(expire_hold_in, hold_id, at)
        return expired

    # ------------------------------------------------------------------ grants

    async def expire_grants(self, *, now_ms: int, limit: int = 500) -> int:
        """Activate the scheduled grants that became effective and lapse the expired ones, each written to the
        ledger once however many replicas sweep at once; return how many grants changed state."""
        g = t.grants.c
        due = await self._read(lambda conn: conn.execute(select(g.id).where(or_(
            and_(g.state == "scheduled", g.effective_at_ms <= now_ms),
            and_(g.state == "active", g.expires_at_ms.is_not(None), g.expires_at_ms <= now_ms),
        )).order_by(g.seq).limit(limit)).scalars().all())
        at = now_ms

        def op(conn: Connection, grant_id: str) -> bool:
            found = grant_row(conn, grant_id)
            if found is None:
                return False
            lock_account(conn, found.mode, found.customer_id, found.asset)
            row = grant_row(conn, grant_id)  # re-read under the account lock
            if row is None or not is_stale(row, at):
                return False  # another replica got there first
            credits = advance_grant(conn, row.mode, row.customer_id, row.asset, row, at)
            move_account(conn, row.mode, row.customer_id, row.asset, credits=credits)
            return True

        changed = 0
        for grant_id in due:
            changed += await self._write(op, grant_id)
        return changed

    async def grants(self, mode: Mode, customer_id: str, *, asset: str | None = None, limit: int = 200,
                     before_seq: int | None = None) -> list[Grant]:
        """The wallet's grants, newest first."""
        g = t.grants.c
        stmt = select(t.grants).where(g.mode == mode, g.customer_id == customer_id)
        if asset is not None:
            stmt = stmt.where(g.asset == asset)
        if before_seq is not None:
            stmt = stmt.where(g.seq < before_seq)
        rows = await self._read(lambda conn: conn.execute(stmt.order_by(g.seq.desc()).limit(limit)).all())
        return [grant_of(r) for r in rows]

    async def grant_seq(self, grant_id: str) -> int | None:
        found = await self._read(lambda conn: conn.execute(select(t.grants.c.seq).where(
            t.grants.c.id == grant_id)).scalar())
        return None if found is None else int(found)

    async def get_grant(self, mode: Mode, grant_id: str) -> Grant | None:
        row = await self._read(lambda conn: grant_row(conn, grant_id, mode=mode))
        return grant_of(row) if row is not None else None

    async def void_grant(self, mode: Mode, grant_id: str, *, at_ms: int | None = None) -> Grant | None:
        """Void a grant's unused remainder (idempotent; ``None`` when there is no such grant in this mode)."""
        now = now_ms() if at_ms is None else at_ms
        row = await self._write(lambda conn: void_grant(conn, mode, grant_id, now))
        return grant_of(row) if row is not None else None

    async def allocations(self, hold_id: str) -> list[Allocation]:
        rows = await self._read(lambda conn: gr_allocations(conn, hold_id))
        return [allocation_of(r, hold_id) for r in rows]

    async def consumption_order(self, mode: Mode, customer_id: str) -> str:
        return await self._read(wallet_order, mode, customer_id)

    async def set_consumption_order(self, mode: Mode, customer_id: str, order: str) -> str:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}")
        values = {"consumption_order": order, "updated_at_ms": now_ms()}

        def op(conn: Connection) -> None:
            self._require_customer(conn, mode, customer_id)
            stmt = self._dialect_insert(t.wallet_settings).values(mode=mode, customer_id=customer_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["mode", "customer_id"], set_=values))

        await self._write(op)
        return order

    async def convert(self, mode: Mode, customer_id: str, from_asset: str, to_asset: str, amount_from: int,
                      amount_to: int, *, idempotency_key: str, purpose: GrantPurpose = "paid",
                      expires_at_ms: int | None = None, memo: str = "", at_ms: int | None = None,
                      ) -> tuple[LedgerEntry, Balance, Balance]:
        """Debit ``amount_from`` of one asset and grant ``amount_to`` of another, atomically and once per
        ``idempotency_key`` (the debit is a hold captured at once, so it draws grants like any capture; it
        must be covered in full)."""
        assert amount_from > 0 and amount_to > 0 and from_asset != to_asset
        now = now_ms() if at_ms is None else at_ms
        key = f"convert:{idempotency_key}"
        hashed = _hash("convert", customer_id, from_asset, to_asset, amount_from, amount_to, purpose, expires_at_ms,
                       memo)
        hold_id = "cv_" + _hash(mode, key)[:29]

        def op(conn: Connection) -> tuple[LedgerEntry, Balance, Balance]:
            self._require_customer(conn, mode, customer_id)
            for asset in sorted((from_asset, to_asset)):  # one lock order for every conversion
                self._ensure_account(conn, mode, customer_id, asset)
                lock_account(conn, mode, customer_id, asset)
            placed = reserve_in(conn, mode=mode, customer_id=customer_id, asset=from_asset, amount=amount_from,
                                hold_id=hold_id, ttl_ms=60_000, now=now, overdraw=False)
            if placed is None:
                if _entry_row(conn, mode, key) is not None:
                    raise _Replay()
                balance = _balance_of(conn, mode, customer_id, from_asset)
                raise InsufficientFunds(asset=from_asset, available=balance.available, required=amount_from)
            capture_in(conn, placed[0], amount_from, key=f"settle:{hold_id}", hashed=_hash("settle", amount_from),
                       final=True, now=now, overdraw=False)
            entry = credit_in(conn, mode=mode, customer_id=customer_id, asset=to_asset, amount=amount_to, key=key,
                              hashed=hashed, memo=memo or f"converted from {amount_from} {from_asset}",
                              purpose=purpose, priority=0, effective_at_ms=now, expires_at_ms=expires_at_ms,
                              grant_id="gr_" + _hash(mode, key)[:24], source=f"convert:{hold_id}", now=now)
            return (entry, _balance_of(conn, mode, customer_id, from_asset),
                    _balance_of(conn, mode, customer_id, to_asset))

        def replay(conn: Connection) -> tuple[LedgerEntry, Balance, Balance] | None:
            row = _entry_row(conn, mode, key)
            if row is None:
                return None
            if row.request_hash != hashed:
                raise IdempotencyConflict(key)
            return (_entry(row), _balance_of(conn, mode, customer_id, from_asset),
                    _balance_of(conn, mode, customer_id, to_asset))

        try:
            return await self._write(op)
        except (IntegrityError, _Replay):
            replayed = await self._read(replay)
            if replayed is None:
                raise
            return replayed

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
        return await self._read(audit_ledger)

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

    async def claim_rate_quota(self, mode: Mode, customer_id: str, claims: list[QuotaClaim], *,
                               window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
        return await self._write(claim_quota, self._dialect_insert, mode, window_start_ms, claims)

    async def release_rate_quota(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]], *,
                                 window_start_ms: int) -> None:
        await self._write(release_quota, mode, window_start_ms, releases)

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

    @staticmethod
    def _require_customer(conn: Connection, mode: Mode, customer_id: str) -> None:
        if conn.execute(select(t.customers.c.id).where(
                t.customers.c.mode == mode, t.customers.c.id == customer_id)).first() is None:
            raise CustomerNotFound(customer_id)

    def _ensure_account(self, conn: Connection, mode: Mode, customer_id: str, asset: str) -> None:
        self._ensure_account_in(conn, mode, customer_id, asset)

    @staticmethod
    def _ensure_account_in(conn: Connection, mode: Mode, customer_id: str, asset: str) -> None:
        """Create the (mode, customer, asset) account row unless it exists; the dialect is the connection's."""
        values = dict(mode=mode, customer_id=customer_id, asset=asset, credits_posted=0, debits_posted=0,
                      debits_pending=0, overdraft_limit=0)
        if conn.dialect.name == "sqlite":
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


def _customer(row: Row[Any]) -> Customer:
    return Customer(mode=row.mode, id=row.id, name=row.name, created_at_ms=row.created_at_ms)


def _api_key(row: Row[Any]) -> ApiKey:
    return ApiKey(id=row.id, mode=row.mode, customer_id=row.customer_id, prefix=row.prefix,
                  created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms,
                  attributes={str(k): str(v) for k, v in (row.attributes or {}).items()})








def _usage_values(usage: UsageRecord, **changes: Any) -> dict[str, Any]:
    """The record's column values, with ``changes`` applied (cheaper than ``dataclasses.replace``)."""
    values = {name: getattr(usage, name) for name in _USAGE_FIELDS}
    values.update(changes)
    return values


def _usage(row: Row[Any]) -> UsageRecord:
    mapping = cast(dict[str, Any], row._mapping)
    return UsageRecord(**{name: mapping[name] for name in _USAGE_FIELDS})


__all__ = ["SqlWalletStore"]


def sql_behind(store: object) -> SqlWalletStore | None:
    """The SQL database behind a wallet store: the store itself, or the ledger under a real-time wallet
    (``.sql``, the Redis store); ``None`` when there is none. For the subsystems that keep their own tables
    beside the wallet's (payments, billing, pricing, reports)."""
    if isinstance(store, SqlWalletStore):
        return store
    inner = getattr(store, "sql", None)
    return inner if isinstance(inner, SqlWalletStore) else None

