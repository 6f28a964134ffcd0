"""The SQL store's rate limits: per-customer overrides, and fixed one-minute windows shared by every replica,
from which each replica leases quota in chunks (:mod:`metergate.wallet.quota_sql`), so that replicas never
count past a limit and no request writes a window row of its own."""


from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    delete,
    select,
)

from metergate.wallet import schema as t
from metergate.wallet.errors import (
    CustomerNotFound,
)
from metergate.wallet.models import (
    Mode,
    RateLimitDenial,
    RateLimitOverride,
    now_ms,
)
from metergate.wallet.quota import QuotaClaim, QuotaGrant
from metergate.wallet.quota_sql import claim_quota, release_quota
from metergate.wallet.sqlrunner import SqlRunner


class RateLimits(SqlRunner):
    # ------------------------------------------------------------------ rate limits

    async def rate_limit_overrides(self) -> list[RateLimitOverride]:
        rows = await self.read(lambda conn: conn.execute(select(t.rate_limit_overrides)).all())
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
            stmt = self.dialect_insert(t.rate_limit_overrides).values(mode=mode, customer_id=customer_id, **limits)
            conn.execute(stmt.on_conflict_do_update(index_elements=["mode", "customer_id"], set_=limits))

        await self.write(op)
        return override

    async def delete_rate_limit_override(self, mode: Mode, customer_id: str) -> bool:
        o = t.rate_limit_overrides.c
        deleted = await self.write(lambda conn: conn.execute(delete(t.rate_limit_overrides).where(
            o.mode == mode, o.customer_id == customer_id)).rowcount)
        return bool(deleted)

    async def claim_rate_quota(self, mode: Mode, customer_id: str, claims: list[QuotaClaim], *,
                               window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
        return await self.write(claim_quota, self.dialect_insert, mode, window_start_ms, claims)

    async def release_rate_quota(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]], *,
                                 window_start_ms: int) -> None:
        await self.write(release_quota, mode, window_start_ms, releases)

    async def prune_rate_limit_windows(self, *, before_ms: int) -> int:
        w = t.rate_limit_windows.c
        pruned: int = await self.write(lambda conn: conn.execute(delete(t.rate_limit_windows).where(
            w.window_start_ms < before_ms)).rowcount)
        return pruned


def _override(row: Row[Any]) -> RateLimitOverride:
    return RateLimitOverride(mode=row.mode, customer_id=row.customer_id,
                             requests_per_minute=_opt_int(row.requests_per_minute),
                             tokens_per_minute=_opt_int(row.tokens_per_minute), updated_at_ms=int(row.updated_at_ms))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


__all__ = ["RateLimits"]
