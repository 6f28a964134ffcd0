"""The SQLAlchemy wallet store: SQLite (embedded default) or PostgreSQL, chosen by URL.

Laid out by concept: how operations run (engines, the SQLite writer, the group commits, reads, migration) is
:mod:`metergate.wallet.sqlrunner`; the hot operations' batch engine is :mod:`metergate.wallet.engine` (its
operations :mod:`metergate.wallet.batchops`, loaded rows :mod:`metergate.wallet.batchstate`, statements
:mod:`metergate.wallet.batchsql`), PostgreSQL's group commit :mod:`metergate.wallet.pgcommit`; customers and API
keys are :mod:`metergate.wallet.sqlcustomers`, usage records and their reports :mod:`metergate.wallet.sqlusage`,
grant administration and conversions :mod:`metergate.wallet.sqlgrants`, rate limits
:mod:`metergate.wallet.sqlratelimits`. Here: the money operations and the wallet's reads.
The money operations' per-operation form (:mod:`metergate.wallet.holdops`) is the classic path the batch
engine hands back what it does not decide itself.
"""


from __future__ import annotations

from collections.abc import Awaitable

from sqlalchemy import (
    Connection,
    select,
)
from sqlalchemy.exc import IntegrityError

from metergate.wallet import schema as t
from metergate.wallet.audit import audit_ledger
from metergate.wallet.batchops import CaptureOp, ExtendOp, ReserveOp, SettleOp
from metergate.wallet.errors import (
    CaptureBelowCaptured,
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.grants import (
    PURPOSES,
)
from metergate.wallet.holdops import capture_in, credit_in, expire_hold_in, extend_in, reserve_in, touch_in
from metergate.wallet.ledger import (
    balance_of,
    balance_row,
    entry_of,
    entry_row,
    hold_of,
    hold_row,
    locked_hold,
    previous_entry,
    request_hash,
)
from metergate.wallet.models import (
    Balance,
    Capture,
    GrantPurpose,
    Hold,
    LedgerEntry,
    Mode,
    Settlement,
    UsageRecord,
    now_ms,
)
from metergate.wallet.sqlbudgets import BudgetTables
from metergate.wallet.sqlcustomers import CustomerKeys
from metergate.wallet.sqlgrants import GrantAdmin
from metergate.wallet.sqlleases import LeaseRecalls
from metergate.wallet.sqlratelimits import RateLimits
from metergate.wallet.sqlusage import INSERT_USAGE, UsageReports, usage_values


class SqlWalletStore(CustomerKeys, UsageReports, GrantAdmin, RateLimits, LeaseRecalls, BudgetTables):
    """The wallet store over SQL (see the module docstring); its knobs are :class:`SqlRunner`'s."""

    @property
    def system_of_record(self) -> SqlWalletStore:
        """Itself: this store admits in the database that is its ledger."""
        return self

    def lease_of(self, hold_id: str) -> tuple[str, int] | None:
        return None  # every hold of this store is a row of its own

    async def expire_entitlements(self, *, now_ms: int) -> None:
        from metergate.wallet.subscriptions import Subscriptions  # it builds on this store

        await self.expire_grants(now_ms=now_ms)
        await Subscriptions(self).tick_all(now_ms=now_ms)

    async def refresh_overdraft(self, mode: Mode, customer_id: str, asset: str) -> None:
        """Nothing to do: reserves read the credit line from the row billing changed."""

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
        hashed = request_hash(*parts)
        key = f"credit:{idempotency_key}"  # namespaced apart from the hold/settle/expire keys
        gid = grant_id or "gr_" + request_hash(mode, key)[:24]

        def op(conn: Connection) -> LedgerEntry:
            self.require_customer(conn, mode, customer_id)
            self.ensure_account(conn, mode, customer_id, asset)
            return credit_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount, key=key,
                             hashed=hashed, memo=memo, purpose=purpose, priority=priority, effective_at_ms=effective,
                             expires_at_ms=expires_at_ms, grant_id=gid, source=source, now=now)

        try:
            return await self.write(op)
        except IntegrityError:
            row = await self.read(entry_row, mode, key)
            if row is None:
                raise
            if row.request_hash != hashed:
                raise IdempotencyConflict(key) from None
            return entry_of(row)

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
                self.ensure_account(conn, mode, customer_id, asset)
            placed = reserve_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                                hold_id=hold_id, ttl_ms=ttl_ms, now=now, overdraw=overdraw)
            if placed is None:
                replayed = replay(conn)
                if replayed is not None:
                    return replayed
                balance = balance_of(conn, mode, customer_id, asset)
                # Returned, not raised: a refusal keeps the grant activations and lapses it wrote (nothing else).
                return InsufficientFunds(asset=asset, available=balance.available, required=amount)
            return placed

        def replay(conn: Connection) -> tuple[Hold, Balance] | None:
            existing = hold_row(conn, hold_id)
            if existing is None:
                return None
            entry = entry_row(conn, existing.mode, f"hold:{hold_id}")
            if existing.mode != mode or entry is None or entry.request_hash != request_hash("hold", customer_id, asset,
                                                                                    amount):
                raise IdempotencyConflict(f"hold:{hold_id}")
            return hold_of(existing), balance_of(conn, mode, customer_id, asset)

        engine_op = ReserveOp(mode, customer_id, asset, amount, hold_id, ttl_ms, now, overdraw)
        try:
            outcome = await self.hot(engine_op, op)
        except IntegrityError:
            replayed = await self.read(replay)
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
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Settlement:  # the classic path (the batch engine hashes for itself)
            hashed = request_hash("settle", amount)
            hold = locked_hold(conn, hold_id)
            if hold.state in ("captured", "voided"):
                entry = previous_entry(conn, hold.mode, key, hashed)
                assert entry is not None, f"resolved hold {hold_id} has no settle entry"
                balance = balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                return Settlement(hold_id, hold.captured_amount, amount - hold.captured_amount, balance,
                                  replayed=True)
            if amount < hold.captured_amount:
                raise CaptureBelowCaptured(hold_id, hold.captured_amount, amount)
            done = capture_in(conn, hold, amount - hold.captured_amount, key=key, hashed=hashed, final=True,
                              now=now, overdraw=overdraw)
            total, written_off = done.hold.captured_amount, done.written_off
            if usage is not None:
                INSERT_USAGE.run(conn, usage_values(usage, charged_amount=total, written_off_amount=written_off))
            return Settlement(hold_id, total, written_off, done.balance)

        return await self.hot(SettleOp(hold_id, amount, usage, now, overdraw), op)

    async def capture(self, hold_id: str, amount: int, *, idempotency_key: str, overdraw: bool = False,
                      at_ms: int | None = None) -> Capture:
        """Capture ``amount`` more from a pending hold and keep it open (a heartbeat's usage so far); idempotent
        per ``idempotency_key``. Beyond what the hold holds it draws the wallet like :meth:`settle` does, and
        grows the hold by that much. Resolve the hold with :meth:`settle` (its total includes these)."""
        assert amount >= 0, "a capture cannot be negative"
        key = f"capture:{hold_id}:{idempotency_key}"
        hashed = request_hash("capture", amount)
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Capture:
            hold = locked_hold(conn, hold_id)
            replayed = _replayed_capture(conn, hold, key, hashed, amount)
            if replayed is not None:
                return replayed
            if hold.state != "pending":
                raise HoldNotPending(hold_id, hold.state)
            done = capture_in(conn, hold, amount, key=key, hashed=hashed, final=False, now=now, overdraw=overdraw)
            return Capture(done.hold, done.charged, done.written_off, done.balance)

        return await self.write(op)

    def capture_usage(self, hold_id: str, amount: int, *, key: str, usage: UsageRecord | None,
                      held: int | None = None, overdraw: bool = False, at_ms: int | None = None) -> Awaitable[Capture]:
        """Capture ``amount`` from a pending hold that stays open, under the ledger key ``key``, together with the
        usage record it pays for: one request settled against an escrow lease (:mod:`metergate.wallet.escrow`),
        through the batch engine. The key is the request's own ``settle:<hold id>``, so a replay is answered
        with the first result whichever path settled it. A hold that is no longer pending (a lease that ran out)
        still bills: the wallet is charged directly, as far as it can cover, and the rest written off. ``held``:
        the request's own share of the hold, all it may draw from it (the rest is drawn as beyond the hold).
        Not a coroutine: every leased request's settlement comes this way, and what it returns is the group
        commit's future itself."""
        assert amount >= 0, "a capture cannot be negative"
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Capture:  # the classic path (the batch engine hashes for itself)
            hashed = request_hash("settle", amount)
            hold = locked_hold(conn, hold_id)
            replayed = _replayed_capture(conn, hold, key, hashed, amount)
            if replayed is not None:
                return replayed
            done = capture_in(conn, hold, amount, key=key, hashed=hashed, final=False, now=now, overdraw=overdraw,
                              from_hold=held)
            if usage is not None:
                INSERT_USAGE.run(conn, usage_values(usage, charged_amount=done.charged,
                                                      written_off_amount=done.written_off))
            return Capture(done.hold, done.charged, done.written_off, done.balance)

        return self.hot(CaptureOp(hold_id, amount, key, usage, now, overdraw, held), op)

    async def touch_hold(self, hold_id: str, *, ttl_ms: int, at_ms: int | None = None) -> Hold:
        """Push a pending hold's expiry to at least ``now + ttl_ms`` (a lease's heartbeat); ``HoldNotPending``
        once it is resolved or expired."""
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Hold:
            hold = locked_hold(conn, hold_id)
            if hold.state != "pending":
                raise HoldNotPending(hold_id, hold.state)
            return touch_in(conn, hold, ttl_ms=ttl_ms, now=now)

        return await self.write(op)

    async def extend_hold(self, hold_id: str, amount: int, *, step: int | str, ttl_ms: int,
                          overdraw: bool = False, at_ms: int | None = None) -> Hold:
        """Grow a pending hold by ``amount`` (idempotent per ``step``) and push its expiry out, or raise
        ``InsufficientFunds`` when the wallet cannot cover the increment — the signal for a long-running
        job to stop at zero instead of running up debt."""
        assert amount > 0, "an extension must be positive"
        key = f"extend:{hold_id}:{step}"
        now = now_ms() if at_ms is None else at_ms

        def op(conn: Connection) -> Hold:
            hold = locked_hold(conn, hold_id)
            if previous_entry(conn, hold.mode, key, request_hash("extend", amount)) is not None:
                return hold  # this step was applied already
            if hold.state != "pending":
                raise HoldNotFound(hold_id)
            extended = extend_in(conn, hold, amount, key=key, ttl_ms=ttl_ms, now=now, overdraw=overdraw)
            if extended is None:
                balance = balance_of(conn, hold.mode, hold.customer_id, hold.asset)
                raise InsufficientFunds(asset=hold.asset, available=balance.available, required=amount)
            return extended

        return await self.hot(ExtendOp(hold_id, amount, key, ttl_ms, now, overdraw), op)

    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int:
        ids = await self.read(lambda conn: conn.execute(select(t.holds.c.id).where(
            t.holds.c.state == "pending", t.holds.c.expires_at_ms < now_ms,
        ).order_by(t.holds.c.expires_at_ms).limit(limit)).scalars().all())
        at = now_ms

        expired = 0
        for hold_id in ids:  # False: settled meanwhile, or expired by another replica
            expired += await self.write(expire_hold_in, hold_id, at)
        return expired

    # ------------------------------------------------------------------ reads

    async def balances(self, mode: Mode, customer_id: str) -> list[Balance]:
        rows = await self.read(lambda conn: conn.execute(select(t.accounts).where(
            t.accounts.c.mode == mode, t.accounts.c.customer_id == customer_id,
        ).order_by(t.accounts.c.asset)).all())
        return [balance_row(r) for r in rows]

    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance:
        return await self.read(balance_of, mode, customer_id, asset)

    async def get_hold(self, hold_id: str) -> Hold | None:
        row = await self.read(hold_row, hold_id)
        return hold_of(row) if row else None

    async def ledger(self, mode: Mode, customer_id: str, *, limit: int,
                     before: int | None = None) -> list[LedgerEntry]:
        c = t.ledger_entries.c
        stmt = select(t.ledger_entries).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        rows = await self.read(lambda conn: conn.execute(stmt.order_by(c.seq.desc()).limit(limit)).all())
        return [entry_of(r) for r in rows]

    async def audit(self) -> list[str]:
        """Re-derive every balance from the ledger, in one snapshot: on PostgreSQL a REPEATABLE READ
        transaction, so that writes committing meanwhile (live traffic) cannot show as discrepancies."""
        def snapshot(conn: Connection) -> list[str]:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return audit_ledger(conn)

        return await self.read(snapshot)

def _replayed_capture(conn: Connection, hold: Hold, key: str, hashed: str, amount: int) -> Capture | None:
    """The first answer of a capture whose key the ledger has (``IdempotencyConflict`` if with other content)."""
    entry = previous_entry(conn, hold.mode, key, hashed)
    if entry is None:
        return None
    charged = int(entry.posted_delta)
    return Capture(hold, charged, amount - charged, balance_of(conn, hold.mode, hold.customer_id, hold.asset),
                   replayed=True)



__all__ = ["SqlWalletStore"]
