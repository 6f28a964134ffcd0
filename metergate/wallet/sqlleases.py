"""The SQL store's side of escrow leases (:mod:`metergate.wallet.escrow`): shrinking a lease in place, recalling
the leases that other processes hold on a wallet, and telling a lease holder which of its wallets were recalled."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, func, select, tuple_
from sqlalchemy.exc import IntegrityError

from metergate.wallet import schema as t
from metergate.wallet.errors import HoldNotPending
from metergate.wallet.holdops import shrink_in
from metergate.wallet.ledger import hold_of, hold_row, locked_hold, previous_entry, request_hash
from metergate.wallet.models import Hold, Mode, now_ms
from metergate.wallet.sqlrunner import SqlRunner

AccountKey = tuple[Mode, str, str]
LEASE_PREFIX = "lease:"


class LeaseRecalls(SqlRunner):
    async def shrink_hold(self, hold_id: str, amount: int, *, step: int | str,
                          at_ms: int | None = None) -> tuple[Hold, int]:
        """Give back up to ``amount`` of what a pending hold holds uncaptured, keeping it open (a lease whose
        holder needs less of it); idempotent per ``step``, as an extension is: a retry answers with what the
        first call gave back and gives back nothing more. Returns the hold and what was given back (less than
        ``amount`` if the hold holds less that can be given back: a part on a lapsed grant stays held until the
        hold resolves). ``HoldNotPending`` once the hold is resolved or expired, ``HoldNotFound`` if none.

        Why a store operation of its own and not a smaller settle: a lease's settlements capture from it while
        it is open, and resolving it would end them; here the hold stays pending and only its free part goes
        back to the wallet, in one transaction (hold row, allocations, account, one ``shrink`` ledger entry)."""
        assert amount >= 0, "a shrink gives back a non-negative amount"
        key = f"shrink:{hold_id}:{step}"
        hashed = request_hash("shrink", amount)
        now = now_ms() if at_ms is None else at_ms

        def replayed(conn: Connection, hold: Hold) -> tuple[Hold, int] | None:
            entry = previous_entry(conn, hold.mode, key, hashed)
            return None if entry is None else (hold, int(entry.amount))

        def op(conn: Connection) -> tuple[Hold, int]:
            hold = locked_hold(conn, hold_id)
            found = replayed(conn, hold)
            if found is not None:
                return found
            if hold.state != "pending":
                raise HoldNotPending(hold_id, hold.state)
            return shrink_in(conn, hold, amount, key=key, hashed=hashed, now=now)

        def again(conn: Connection) -> tuple[Hold, int] | None:
            row = hold_row(conn, hold_id)
            return None if row is None else replayed(conn, hold_of(row))

        try:
            return await self.write(op)
        except IntegrityError:  # the same shrink, committed meanwhile by a retry that overtook this call
            found = await self.read(again)
            if found is None:
                raise
            return found

    async def recall_leases(self, mode: Mode, customer_id: str, asset: str, *, owner: str, at_ms: int) -> int:
        """What the other owners' open leases on the wallet hold free (their pending amount less what they
        captured); if any, ask for them back. 0 writes nothing."""
        h = t.holds.c

        def op(conn: Connection) -> int:
            free = conn.execute(select(func.coalesce(func.sum(h.amount - h.captured_amount), 0)).where(
                h.mode == mode, h.customer_id == customer_id, h.asset == asset, h.state == "pending",
                h.id.startswith(LEASE_PREFIX, autoescape=True),
                ~h.id.startswith(f"{LEASE_PREFIX}{owner}:", autoescape=True))).scalar_one()
            if free:
                stmt = self.dialect_insert(t.lease_recalls).values(mode=mode, customer_id=customer_id, asset=asset,
                                                                  recalled_at_ms=at_ms)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["mode", "customer_id", "asset"],
                    set_={"recalled_at_ms": func.max(stmt.excluded.recalled_at_ms, t.lease_recalls.c.recalled_at_ms)
                          if self._sqlite else func.greatest(stmt.excluded.recalled_at_ms,
                                                              t.lease_recalls.c.recalled_at_ms)}))
            return int(free)

        return await self.write(op)

    async def lease_recalls(self, keys: list[AccountKey]) -> dict[AccountKey, int]:
        """When each of these wallets' leases were last recalled (absent: never)."""
        r = t.lease_recalls.c

        def op(conn: Connection) -> dict[AccountKey, int]:
            rows = conn.execute(select(r.mode, r.customer_id, r.asset, r.recalled_at_ms).where(
                tuple_(r.mode, r.customer_id, r.asset).in_(keys))).all()
            return {(cast(Mode, row.mode), row.customer_id, row.asset): int(row.recalled_at_ms) for row in rows}

        return await self.read(op) if keys else {}


__all__ = ["LEASE_PREFIX", "LeaseRecalls"]
