"""The SQL store's rate limits: per-customer overrides, and fixed one-minute windows shared by every replica,
each request counted by one conditional upsert so that replicas never count past a limit."""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    delete,
    select,
    update,
)

from metergate.wallet import schema as t
from metergate.wallet.errors import (
    CustomerNotFound,
)
from metergate.wallet.models import (
    Mode,
    RateLimitCharge,
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

    async def consume_rate_limits(self, mode: Mode, charges: list[RateLimitCharge], *, window_start_ms: int,
                                  tokens: int) -> RateLimitDenial | None:
        assert tokens >= 0, "a request cannot use negative tokens"
        insert_ = self.dialect_insert
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

        return await self.write(op)

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


__all__ = ["RateLimits"]
