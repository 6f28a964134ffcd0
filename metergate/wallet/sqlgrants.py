"""The SQL store's grant administration and conversions: the grant clock's sweep, listing and voiding grants,
allocations, the wallet's consumption order, and converting one asset into another (see
:mod:`metergate.wallet.grants` for the rules; this module only runs them in transactions)."""


from __future__ import annotations

from sqlalchemy import (
    Connection,
    and_,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError

from metergate.wallet import schema as t
from metergate.wallet.errors import (
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.grants import (
    ORDERS,
    advance_grant,
    allocation_of,
    grant_of,
    grant_row,
    is_stale,
    void_grant,
    wallet_order,
)
from metergate.wallet.grants import allocations as gr_allocations
from metergate.wallet.holdops import capture_in, credit_in, reserve_in
from metergate.wallet.ledger import (
    balance_of,
    entry_of,
    entry_row,
    lock_account,
    move_account,
    request_hash,
)
from metergate.wallet.models import (
    Allocation,
    Balance,
    Grant,
    GrantPurpose,
    LedgerEntry,
    Mode,
    now_ms,
)
from metergate.wallet.sqlrunner import SqlRunner


class Replayed(Exception):
    """Raised inside a write to roll it back when the operation turns out to have been applied already."""


class GrantAdmin(SqlRunner):
    # ------------------------------------------------------------------ grants

    async def expire_grants(self, *, now_ms: int, limit: int = 500) -> int:
        """Activate the scheduled grants that became effective and lapse the expired ones, each written to the
        ledger once however many replicas sweep at once; return how many grants changed state."""
        g = t.grants.c
        due = await self.read(lambda conn: conn.execute(select(g.id).where(or_(
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
            changed += await self.write(op, grant_id)
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
        rows = await self.read(lambda conn: conn.execute(stmt.order_by(g.seq.desc()).limit(limit)).all())
        return [grant_of(r) for r in rows]

    async def grant_seq(self, grant_id: str) -> int | None:
        found = await self.read(lambda conn: conn.execute(select(t.grants.c.seq).where(
            t.grants.c.id == grant_id)).scalar())
        return None if found is None else int(found)

    async def get_grant(self, mode: Mode, grant_id: str) -> Grant | None:
        row = await self.read(lambda conn: grant_row(conn, grant_id, mode=mode))
        return grant_of(row) if row is not None else None

    async def void_grant(self, mode: Mode, grant_id: str, *, at_ms: int | None = None) -> Grant | None:
        """Void a grant's unused remainder (idempotent; ``None`` when there is no such grant in this mode)."""
        now = now_ms() if at_ms is None else at_ms
        row = await self.write(lambda conn: void_grant(conn, mode, grant_id, now))
        return grant_of(row) if row is not None else None

    async def allocations(self, hold_id: str) -> list[Allocation]:
        rows = await self.read(lambda conn: gr_allocations(conn, hold_id))
        return [allocation_of(r, hold_id) for r in rows]

    async def consumption_order(self, mode: Mode, customer_id: str) -> str:
        return await self.read(wallet_order, mode, customer_id)

    async def set_consumption_order(self, mode: Mode, customer_id: str, order: str) -> str:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}")
        values = {"consumption_order": order, "updated_at_ms": now_ms()}

        def op(conn: Connection) -> None:
            self.require_customer(conn, mode, customer_id)
            stmt = self.dialect_insert(t.wallet_settings).values(mode=mode, customer_id=customer_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["mode", "customer_id"], set_=values))

        await self.write(op)
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
        hashed = request_hash("convert", customer_id, from_asset, to_asset, amount_from, amount_to, purpose,
                              expires_at_ms, memo)
        hold_id = "cv_" + request_hash(mode, key)[:29]

        def op(conn: Connection) -> tuple[LedgerEntry, Balance, Balance]:
            self.require_customer(conn, mode, customer_id)
            for asset in sorted((from_asset, to_asset)):  # one lock order for every conversion
                self.ensure_account(conn, mode, customer_id, asset)
                lock_account(conn, mode, customer_id, asset)
            placed = reserve_in(conn, mode=mode, customer_id=customer_id, asset=from_asset, amount=amount_from,
                                hold_id=hold_id, ttl_ms=60_000, now=now, overdraw=False)
            if placed is None:
                if entry_row(conn, mode, key) is not None:
                    raise Replayed()
                balance = balance_of(conn, mode, customer_id, from_asset)
                raise InsufficientFunds(asset=from_asset, available=balance.available, required=amount_from)
            capture_in(conn, placed[0], amount_from, key=f"settle:{hold_id}",
                       hashed=request_hash("settle", amount_from), final=True, now=now, overdraw=False)
            entry = credit_in(conn, mode=mode, customer_id=customer_id, asset=to_asset, amount=amount_to, key=key,
                              hashed=hashed, memo=memo or f"converted from {amount_from} {from_asset}",
                              purpose=purpose, priority=0, effective_at_ms=now, expires_at_ms=expires_at_ms,
                              grant_id="gr_" + request_hash(mode, key)[:24], source=f"convert:{hold_id}", now=now)
            return (entry, balance_of(conn, mode, customer_id, from_asset),
                    balance_of(conn, mode, customer_id, to_asset))

        def replay(conn: Connection) -> tuple[LedgerEntry, Balance, Balance] | None:
            row = entry_row(conn, mode, key)
            if row is None:
                return None
            if row.request_hash != hashed:
                raise IdempotencyConflict(key)
            return (entry_of(row), balance_of(conn, mode, customer_id, from_asset),
                    balance_of(conn, mode, customer_id, to_asset))

        try:
            return await self.write(op)
        except (IntegrityError, Replayed):
            replayed = await self.read(replay)
            if replayed is None:
                raise
            return replayed


__all__ = ["GrantAdmin"]
