"""The SQLAlchemy wallet store: SQLite (embedded default) or PostgreSQL, chosen by URL.

Concurrency, per backend:

* PostgreSQL (Read Committed): a hold is one conditional ``UPDATE ... WHERE available >= amount``;
  PostgreSQL re-checks the condition on the newest row version, so concurrent holds cannot overspend.
  Settlement locks the hold row, then the account row (always in that order, so no deadlock).
* SQLite: one writer. Writes go through a single connection, serialised in-process by an
  ``asyncio.Lock`` and across processes by ``BEGIN IMMEDIATE`` plus ``busy_timeout``. Reads use a
  separate pool in WAL mode and never wait for the writer. ``synchronous=NORMAL`` keeps every commit
  across a process crash (not across power loss) — the usual WAL trade-off, documented in the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, cast

from sqlalchemy import Row, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from metergate.wallet import schema as t
from metergate.wallet.errors import (
    CustomerExists,
    CustomerNotFound,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.models import (
    ApiKey,
    Balance,
    Customer,
    EntryKind,
    Hold,
    LedgerEntry,
    Mode,
    Settlement,
    UsageRecord,
    now_ms,
)

_PG_MIGRATION_LOCK = 0x6D657465  # "mete": serialises schema migration across replicas


def _hash(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


class SqlWalletStore:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self._url = url
        self._sqlite = url.startswith("sqlite")
        self._pool_size = pool_size
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._write_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._sqlite:
            self._writer = self._sqlite_engine(immediate=True, pool_size=1)
            self._reader = self._sqlite_engine(immediate=False, pool_size=self._pool_size)
        else:
            engine = create_async_engine(self._url, pool_size=self._pool_size, max_overflow=self._pool_size,
                                         pool_pre_ping=True)
            self._writer = self._reader = engine
        await self._migrate()

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(self._url, pool_size=pool_size, max_overflow=0)

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the driver so that BEGIN is ours to emit.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=15000", "foreign_keys=ON"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    async def close(self) -> None:
        for engine in {id(e): e for e in (self._writer, self._reader) if e is not None}.values():
            await engine.dispose()
        self._writer = self._reader = None

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(text("SELECT 1"))

    async def _migrate(self) -> None:
        """Bring the schema to :data:`schema.SCHEMA_VERSION`, once, even with many replicas starting."""
        async with self._tx() as conn:
            if not self._sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            await conn.run_sync(t.metadata.create_all, checkfirst=True)
            current = (await conn.execute(select(func.max(t.schema_version.c.version)))).scalar()
            if current is None:
                await conn.execute(insert(t.schema_version).values(version=t.SCHEMA_VERSION,
                                                                   applied_at_ms=now_ms()))
            elif current > t.SCHEMA_VERSION:
                raise RuntimeError(f"database schema v{current} is newer than this metergate (v{t.SCHEMA_VERSION})")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        assert self._writer is not None, "store is not open"
        if self._sqlite:
            async with self._write_lock, self._writer.begin() as conn:
                yield conn
        else:
            async with self._writer.begin() as conn:
                yield conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        assert self._reader is not None, "store is not open"
        async with self._reader.connect() as conn:
            yield conn

    def _for_update(self, stmt: Any) -> Any:
        return stmt if self._sqlite else stmt.with_for_update()

    # ------------------------------------------------------------------ customers and keys

    async def create_customer(self, mode: Mode, customer_id: str, name: str) -> Customer:
        customer = Customer(mode=mode, id=customer_id, name=name, created_at_ms=now_ms())
        try:
            async with self._tx() as conn:
                await conn.execute(insert(t.customers).values(mode=mode, id=customer_id, name=name,
                                                              created_at_ms=customer.created_at_ms))
        except IntegrityError:
            raise CustomerExists(customer_id) from None
        return customer

    async def get_customer(self, mode: Mode, customer_id: str) -> Customer | None:
        async with self._read() as conn:
            row = (await conn.execute(select(t.customers).where(
                t.customers.c.mode == mode, t.customers.c.id == customer_id))).first()
        return _customer(row) if row else None

    async def list_customers(self, mode: Mode, *, limit: int, after: str | None = None) -> list[Customer]:
        stmt = select(t.customers).where(t.customers.c.mode == mode)
        if after is not None:
            stmt = stmt.where(t.customers.c.id > after)
        async with self._read() as conn:
            rows = (await conn.execute(stmt.order_by(t.customers.c.id).limit(limit))).all()
        return [_customer(r) for r in rows]

    async def create_api_key(self, mode: Mode, customer_id: str, *, key_id: str, key_hash: str,
                             prefix: str) -> ApiKey:
        key = ApiKey(id=key_id, mode=mode, customer_id=customer_id, prefix=prefix, created_at_ms=now_ms())
        try:
            async with self._tx() as conn:
                await conn.execute(insert(t.api_keys).values(
                    id=key_id, key_hash=key_hash, prefix=prefix, mode=mode, customer_id=customer_id,
                    created_at_ms=key.created_at_ms))
        except IntegrityError:
            raise CustomerNotFound(customer_id) from None
        return key

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        async with self._read() as conn:
            row = (await conn.execute(select(t.api_keys).where(t.api_keys.c.key_hash == key_hash))).first()
        return _api_key(row) if row else None

    async def revoke_api_key(self, mode: Mode, key_id: str) -> ApiKey | None:
        async with self._tx() as conn:
            await conn.execute(update(t.api_keys).where(
                t.api_keys.c.id == key_id, t.api_keys.c.mode == mode, t.api_keys.c.revoked_at_ms.is_(None),
            ).values(revoked_at_ms=now_ms()))
            row = (await conn.execute(select(t.api_keys).where(
                t.api_keys.c.id == key_id, t.api_keys.c.mode == mode))).first()
        return _api_key(row) if row else None

    # ------------------------------------------------------------------ money

    async def credit(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                     idempotency_key: str, memo: str = "") -> LedgerEntry:
        if amount <= 0:
            raise ValueError("a credit must be positive")
        request_hash = _hash("credit", customer_id, asset, amount, memo)
        key = f"credit:{idempotency_key}"  # namespaced apart from the hold/settle/expire keys
        try:
            async with self._tx() as conn:
                if not await self._customer_exists(conn, mode, customer_id):
                    raise CustomerNotFound(customer_id)
                await self._ensure_account(conn, mode, customer_id, asset)
                await conn.execute(update(t.accounts).where(*_account_pk(mode, customer_id, asset)).values(
                    credits_posted=t.accounts.c.credits_posted + amount))
                return await self._append(conn, key, request_hash, mode, customer_id, asset,
                                          "credit", amount, credits=amount, memo=memo)
        except IntegrityError:
            return await self._replay(mode, key, request_hash)

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]:
        assert amount >= 0, "a hold cannot be negative"
        created = now_ms()
        hold = Hold(id=hold_id, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                    state="pending", expires_at_ms=created + ttl_ms, created_at_ms=created)
        a = t.accounts.c
        available = a.credits_posted + a.overdraft_limit - a.debits_posted - a.debits_pending
        try:
            async with self._tx() as conn:
                row = (await conn.execute(
                    update(t.accounts)
                    .where(*_account_pk(mode, customer_id, asset), available >= amount)
                    .values(debits_pending=a.debits_pending + amount)
                    .returning(a.mode, a.customer_id, a.asset, a.credits_posted, a.debits_posted,
                               a.debits_pending, a.overdraft_limit))).first()
                if row is None:
                    existing = await self._hold_row(conn, hold_id)
                    if existing is not None:
                        return self._replayed_hold(existing, hold), await self._balance(conn, mode, customer_id,
                                                                                          asset)
                    balance = await self._balance(conn, mode, customer_id, asset)
                    raise InsufficientFunds(asset=asset, available=balance.available, required=amount)
                await conn.execute(insert(t.holds).values(
                    id=hold_id, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                    state="pending", captured_amount=0, expires_at_ms=hold.expires_at_ms, created_at_ms=created))
                await self._append(conn, f"hold:{hold_id}", _hash("hold", customer_id, asset, amount), mode,
                                   customer_id, asset, "hold", amount, pending=amount, hold_id=hold_id)
                return hold, _balance(row)
        except IntegrityError:
            async with self._read() as conn:
                existing = await self._hold_row(conn, hold_id)
                if existing is None:
                    raise
                return self._replayed_hold(existing, hold), await self._balance(conn, mode, customer_id, asset)

    @staticmethod
    def _replayed_hold(row: Row[Any], wanted: Hold) -> Hold:
        found = _hold(row)
        if (found.mode, found.customer_id, found.asset, found.amount) != (
                wanted.mode, wanted.customer_id, wanted.asset, wanted.amount):
            raise IdempotencyConflict(f"hold:{wanted.id}")
        return found

    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement:
        """Capture ``amount`` against the hold (0 voids it), releasing the rest; see the module contract."""
        assert amount >= 0, "a capture cannot be negative"
        key = f"settle:{hold_id}"
        request_hash = _hash("settle", amount)
        async with self._tx() as conn:
            row = (await conn.execute(self._for_update(select(t.holds).where(t.holds.c.id == hold_id)))).first()
            if row is None:
                raise HoldNotFound(hold_id)
            hold = _hold(row)
            if hold.state in ("captured", "voided"):
                entry = await self._entry(conn, hold.mode, key)
                assert entry is not None, f"resolved hold {hold_id} has no settle entry"
                if entry.request_hash != request_hash:
                    raise IdempotencyConflict(key)
                balance = await self._balance(conn, hold.mode, hold.customer_id, hold.asset)
                return Settlement(hold_id, entry.posted_delta, amount - entry.posted_delta, balance, replayed=True)
            released = hold.amount if hold.state == "pending" else 0  # an expired hold already released
            acct = (await conn.execute(self._for_update(select(t.accounts).where(
                *_account_pk(hold.mode, hold.customer_id, hold.asset))))).one()
            before = _balance(acct)
            coverable = max(0, before.available + released)
            charged = min(amount, coverable)
            written_off = amount - charged
            after = replace(before, debits_pending=before.debits_pending - released,
                            debits_posted=before.debits_posted + charged)
            assert after.debits_pending >= 0 and charged <= coverable
            assert after.available >= 0 or after.available >= before.available, "settlement overspent"
            await conn.execute(update(t.holds).where(t.holds.c.id == hold_id).values(
                state="captured" if charged else "voided", captured_amount=charged, resolved_at_ms=now_ms()))
            await conn.execute(update(t.accounts).where(
                *_account_pk(hold.mode, hold.customer_id, hold.asset)).values(
                debits_pending=t.accounts.c.debits_pending - released,
                debits_posted=t.accounts.c.debits_posted + charged))
            kind: EntryKind = "capture" if charged else "void"
            await self._append(conn, key, request_hash, hold.mode, hold.customer_id, hold.asset, kind, charged,
                               posted=charged, pending=-released, hold_id=hold_id,
                               memo=f"written off {written_off}" if written_off else "")
            if usage is not None:
                await conn.execute(insert(t.usage_records).values(
                    **_usage_values(replace(usage, charged_amount=charged, written_off_amount=written_off))))
            return Settlement(hold_id, charged, written_off, after)

    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int:
        async with self._read() as conn:
            ids = (await conn.execute(select(t.holds.c.id).where(
                t.holds.c.state == "pending", t.holds.c.expires_at_ms < now_ms,
            ).order_by(t.holds.c.expires_at_ms).limit(limit))).scalars().all()
        expired = 0
        for hold_id in ids:
            async with self._tx() as conn:
                row = (await conn.execute(update(t.holds).where(
                    t.holds.c.id == hold_id, t.holds.c.state == "pending",
                ).values(state="expired", resolved_at_ms=now_ms).returning(*t.holds.c))).first()
                if row is None:
                    continue  # settled meanwhile, or expired by another replica
                hold = _hold(row)
                await conn.execute(update(t.accounts).where(
                    *_account_pk(hold.mode, hold.customer_id, hold.asset)).values(
                    debits_pending=t.accounts.c.debits_pending - hold.amount))
                await self._append(conn, f"expire:{hold_id}", _hash("expire"), hold.mode, hold.customer_id,
                                   hold.asset, "expire", hold.amount, pending=-hold.amount, hold_id=hold_id)
                expired += 1
        return expired

    # ------------------------------------------------------------------ reads

    async def balances(self, mode: Mode, customer_id: str) -> list[Balance]:
        async with self._read() as conn:
            rows = (await conn.execute(select(t.accounts).where(
                t.accounts.c.mode == mode, t.accounts.c.customer_id == customer_id,
            ).order_by(t.accounts.c.asset))).all()
        return [_balance(r) for r in rows]

    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance:
        async with self._read() as conn:
            return await self._balance(conn, mode, customer_id, asset)

    async def get_hold(self, hold_id: str) -> Hold | None:
        async with self._read() as conn:
            row = await self._hold_row(conn, hold_id)
        return _hold(row) if row else None

    async def ledger(self, mode: Mode, customer_id: str, *, limit: int,
                     before: int | None = None) -> list[LedgerEntry]:
        c = t.ledger_entries.c
        stmt = select(t.ledger_entries).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        async with self._read() as conn:
            rows = (await conn.execute(stmt.order_by(c.seq.desc()).limit(limit))).all()
        return [_entry(r) for r in rows]

    async def usage(self, mode: Mode, customer_id: str, *, limit: int,
                    before: int | None = None) -> list[tuple[int, UsageRecord]]:
        c = t.usage_records.c
        stmt = select(t.usage_records).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        async with self._read() as conn:
            rows = (await conn.execute(stmt.order_by(c.seq.desc()).limit(limit))).all()
        return [(r.seq, _usage(r)) for r in rows]

    async def audit(self) -> list[str]:
        problems: list[str] = []
        e = t.ledger_entries.c
        async with self._read() as conn:
            sums = {
                (r.mode, r.customer_id, r.asset): (r.credits, r.posted, r.pending)
                for r in (await conn.execute(select(
                    e.mode, e.customer_id, e.asset, func.sum(e.credits_delta).label("credits"),
                    func.sum(e.posted_delta).label("posted"), func.sum(e.pending_delta).label("pending"),
                ).group_by(e.mode, e.customer_id, e.asset))).all()
            }
            h = t.holds.c
            pending = {
                (r.mode, r.customer_id, r.asset): r.total
                for r in (await conn.execute(select(
                    h.mode, h.customer_id, h.asset, func.sum(h.amount).label("total"),
                ).where(h.state == "pending").group_by(h.mode, h.customer_id, h.asset))).all()
            }
            for row in (await conn.execute(select(t.accounts))).all():
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
            unresolved = (await conn.execute(select(func.count()).select_from(t.holds).where(
                h.state != "pending", ~select(e.seq).where(
                    e.hold_id == h.id, e.kind.in_(("capture", "void", "expire"))).exists()))).scalar_one()
            if unresolved:
                problems.append(f"{unresolved} resolved holds have no resolving ledger entry")
        return problems

    # ------------------------------------------------------------------ helpers

    async def _customer_exists(self, conn: AsyncConnection, mode: Mode, customer_id: str) -> bool:
        return (await conn.execute(select(t.customers.c.id).where(
            t.customers.c.mode == mode, t.customers.c.id == customer_id))).first() is not None

    async def _ensure_account(self, conn: AsyncConnection, mode: Mode, customer_id: str, asset: str) -> None:
        values = dict(mode=mode, customer_id=customer_id, asset=asset, credits_posted=0, debits_posted=0,
                      debits_pending=0, overdraft_limit=0)
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        await conn.execute(dialect_insert(t.accounts).values(**values).on_conflict_do_nothing())

    async def _balance(self, conn: AsyncConnection, mode: Mode, customer_id: str, asset: str) -> Balance:
        row = (await conn.execute(select(t.accounts).where(*_account_pk(mode, customer_id, asset)))).first()
        if row is None:
            return Balance(mode, customer_id, asset, 0, 0, 0)
        return _balance(row)

    async def _hold_row(self, conn: AsyncConnection, hold_id: str) -> Row[Any] | None:
        return (await conn.execute(select(t.holds).where(t.holds.c.id == hold_id))).first()

    async def _entry(self, conn: AsyncConnection, mode: Mode, key: str) -> Row[Any] | None:
        return (await conn.execute(select(t.ledger_entries).where(
            t.ledger_entries.c.mode == mode, t.ledger_entries.c.idempotency_key == key))).first()

    async def _append(self, conn: AsyncConnection, key: str, request_hash: str, mode: Mode, customer_id: str,
                      asset: str, kind: EntryKind, amount: int, *, credits: int = 0, posted: int = 0,
                      pending: int = 0, hold_id: str | None = None, memo: str = "") -> LedgerEntry:
        created = now_ms()
        seq = (await conn.execute(insert(t.ledger_entries).values(
            idempotency_key=key, request_hash=request_hash, mode=mode, customer_id=customer_id, asset=asset,
            kind=kind, amount=amount, credits_delta=credits, posted_delta=posted, pending_delta=pending,
            hold_id=hold_id, memo=memo, created_at_ms=created).returning(t.ledger_entries.c.seq))).scalar_one()
        return LedgerEntry(seq, key, mode, customer_id, asset, kind, amount, credits, posted, pending, hold_id,
                           memo, created)

    async def _replay(self, mode: Mode, key: str, request_hash: str) -> LedgerEntry:
        async with self._read() as conn:
            row = await self._entry(conn, mode, key)
        if row is None:
            raise RuntimeError(f"integrity error without an entry for {key!r}")
        if row.request_hash != request_hash:
            raise IdempotencyConflict(key)
        return _entry(row)


def _account_pk(mode: str, customer_id: str, asset: str) -> Sequence[Any]:
    a = t.accounts.c
    return (a.mode == mode, a.customer_id == customer_id, a.asset == asset)


def _customer(row: Row[Any]) -> Customer:
    return Customer(mode=row.mode, id=row.id, name=row.name, created_at_ms=row.created_at_ms)


def _api_key(row: Row[Any]) -> ApiKey:
    return ApiKey(id=row.id, mode=row.mode, customer_id=row.customer_id, prefix=row.prefix,
                  created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms)


def _balance(row: Row[Any]) -> Balance:
    return Balance(mode=row.mode, customer_id=row.customer_id, asset=row.asset,
                   credits_posted=int(row.credits_posted), debits_posted=int(row.debits_posted),
                   debits_pending=int(row.debits_pending), overdraft_limit=int(row.overdraft_limit))


def _hold(row: Row[Any]) -> Hold:
    return Hold(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset, amount=int(row.amount),
                state=row.state, expires_at_ms=int(row.expires_at_ms), created_at_ms=int(row.created_at_ms),
                captured_amount=int(row.captured_amount))


def _entry(row: Row[Any]) -> LedgerEntry:
    return LedgerEntry(seq=row.seq, idempotency_key=row.idempotency_key, mode=row.mode,
                       customer_id=row.customer_id, asset=row.asset, kind=row.kind, amount=int(row.amount),
                       credits_delta=int(row.credits_delta), posted_delta=int(row.posted_delta),
                       pending_delta=int(row.pending_delta), hold_id=row.hold_id, memo=row.memo,
                       created_at_ms=int(row.created_at_ms))


_USAGE_FIELDS: tuple[str, ...] = tuple(f for f in UsageRecord.__dataclass_fields__)


def _usage_values(usage: UsageRecord) -> dict[str, Any]:
    values = {name: getattr(usage, name) for name in _USAGE_FIELDS}
    values["detail"] = json.loads(json.dumps(usage.detail, default=str))
    return values


def _usage(row: Row[Any]) -> UsageRecord:
    mapping = cast(dict[str, Any], row._mapping)
    return UsageRecord(**{name: mapping[name] for name in _USAGE_FIELDS})


__all__ = ["SqlWalletStore"]
