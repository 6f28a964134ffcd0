"""Compare the Redis projection with the SQL ledger and the usage records, wallet by wallet; repair drift.

Why: Redis is a projection; anything that changes SQL behind its back (a flush racing the sink, a credit
whose projection update failed, an operator's SQL fix) shows here as drift, and a repair rebuilds the
wallet from the ledger.

A wallet is compared only when it is quiet: its unapplied-event counter is 0 and its projection reads the
same before and after the SQL read (otherwise it is reported ``busy``, not as drift). ``usage_charged`` is the
sum of ``charged_amount`` over the wallet's usage records and ``ledger_captured`` the sum of its captures;
they differ only by captures settled without a usage record (store-level callers), reported, not repaired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from metergate.wallet import schema as t
from metergate.wallet.models import Mode
from metergate.wallet.redis.store import RedisWalletStore, WalletRef


@dataclass(frozen=True, slots=True)
class WalletDrift:
    mode: Mode
    customer_id: str
    asset: str
    ledger: tuple[int, int, int]  # credits posted, debits posted, debits pending (SQL)
    redis: tuple[int, int, int] | None  # the projection, None when not loaded
    unapplied: int  # events in the stream not yet committed to SQL
    ledger_captured: int
    usage_charged: int
    status: str  # "ok", "drift", "busy" (events in flight), "not_loaded", "repaired"

    @property
    def drift(self) -> tuple[int, int, int] | None:
        if self.redis is None:
            return None
        return (self.redis[0] - self.ledger[0], self.redis[1] - self.ledger[1], self.redis[2] - self.ledger[2])


def _ledger_view(conn: Connection) -> list[tuple[WalletRef, tuple[int, int, int], int, int]]:
    a, e, u = t.accounts.c, t.ledger_entries.c, t.usage_records.c
    captured = {(r.mode, r.customer_id, r.asset): int(r.total) for r in conn.execute(
        select(e.mode, e.customer_id, e.asset, func.sum(e.posted_delta).label("total"))
        .group_by(e.mode, e.customer_id, e.asset)).all()}
    charged = {(r.mode, r.customer_id, r.asset): int(r.total) for r in conn.execute(
        select(u.mode, u.customer_id, u.asset, func.sum(u.charged_amount).label("total"))
        .group_by(u.mode, u.customer_id, u.asset)).all()}
    out = []
    for r in conn.execute(select(t.accounts).order_by(a.mode, a.customer_id, a.asset)).all():
        pk = (r.mode, r.customer_id, r.asset)
        out.append((WalletRef(r.mode, r.customer_id, r.asset),
                    (int(r.credits_posted), int(r.debits_posted), int(r.debits_pending)),
                    captured.get(pk, 0), charged.get(pk, 0)))
    return out


async def _redis_view(store: RedisWalletStore, w: WalletRef) -> tuple[tuple[int, int, int] | None, int]:
    wallet, _, unapplied = store.keys.wallet(w)
    pipe: Any = store.redis.pipeline(transaction=False)
    pipe.hmget(wallet, "c", "p", "q")
    pipe.get(unapplied)
    (c, p, q), left = await store.redis_call(pipe.execute())
    return (None if c is None else (int(c), int(p), int(q))), int(left or 0)


async def reconcile(store: RedisWalletStore, *, repair: bool = False, mode: Mode | None = None) -> list[WalletDrift]:
    """One row per SQL account (of ``mode``, or all); with ``repair``, drifting wallets are rebuilt."""
    before = {}
    views = await store.sql.read(_ledger_view)
    for w, *_ in views:
        before[w] = await _redis_view(store, w)
    views = await store.sql.read(_ledger_view)  # after: a wallet whose projection moved meanwhile is busy
    report: list[WalletDrift] = []
    for w, ledger, captured, charged in views:
        if mode is not None and w.mode != mode:
            continue
        projection, unapplied = await _redis_view(store, w)
        if projection is None:
            status = "not_loaded"
        elif unapplied or before.get(w) != (projection, unapplied):
            status = "busy"
        elif projection != ledger:
            status = "drift"
            if repair and await store.invalidate(w):
                await store.rebuild(w)
                status = "repaired"
        else:
            status = "ok"
        report.append(WalletDrift(w.mode, w.customer_id, w.asset, ledger, projection, unapplied, captured, charged,
                                  status))
    return report


__all__ = ["WalletDrift", "reconcile"]
