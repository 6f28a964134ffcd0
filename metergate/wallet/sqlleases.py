"""The SQL store's side of escrow leases (:mod:`metergate.wallet.escrow`): recalling the leases that other
processes hold on a wallet, and telling a lease holder which of its wallets were recalled."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, func, select, tuple_

from metergate.wallet import schema as t
from metergate.wallet.models import Mode
from metergate.wallet.sqlrunner import SqlRunner

AccountKey = tuple[Mode, str, str]
LEASE_PREFIX = "lease:"


class LeaseRecalls(SqlRunner):
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
