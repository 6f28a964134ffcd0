"""Plans, subscriptions and the period engine that grants their entitlements.

A plan has a period — ``month`` (calendar months in UTC), ``week`` (7 days) or ``days`` (a custom number of
days) — and entitlements: per asset, an ``amount`` granted at the start of every period as an
``entitlement`` grant (priority 100 by default, so the allowance is consumed before paid funds and overage
is drawn from the paid balance), expiring at the period's end. With a ``rollover_cap``, what lapsed unused of
the previous period's allowance (its entitlement and rollover grants) is granted again, up to the cap, as a
second grant expiring with the new period.

Periods. Period ``k`` of a subscription starts at its anchor plus ``k`` periods. Calendar months keep the
anchor's day of month and time of day in UTC, clamped to the month's last day (an anchor on 31 January
gives 28 or 29 February, then 31 March): period ``k`` starts at ``anchor + k months``, never at
``period k-1 + 1 month``, so clamping never drifts.

Ticks are idempotent. :meth:`Subscriptions.tick` grants every period from the subscription's
``next_period`` up to the one containing ``now``, in one transaction under the subscription's row lock,
with the period's grant id and ledger key derived from (subscription, period, asset): a repeated or
concurrent tick grants nothing twice, and a missed tick grants the missed periods once — those whose end has
passed lapse at once, so the ledger shows them granted and expired (and their lapse rolls over, capped).
Canceling ticks up to now first; no period is granted after it.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from metergate.errors import Conflict, NotFound
from metergate.wallet import grants as gr
from metergate.wallet import schema as t
from metergate.wallet.holdops import credit_in
from metergate.wallet.ledger import lock_account, move_account, request_hash
from metergate.wallet.models import Entitlement, Mode, Plan, Subscription, now_ms
from metergate.wallet.sql import SqlWalletStore

Period = Literal["month", "week", "days"]
DAY_MS = 86_400_000
ENTITLEMENT_PRIORITY = 100


def period_start(period: Period, period_days: int | None, anchor_ms: int, k: int) -> int:
    """Start (epoch ms) of period ``k`` (0 is the one that starts at the anchor)."""
    if period == "week":
        return anchor_ms + k * 7 * DAY_MS
    if period == "days":
        assert period_days is not None and period_days > 0
        return anchor_ms + k * period_days * DAY_MS
    seconds, millis = divmod(anchor_ms, 1000)
    anchor = dt.datetime.fromtimestamp(seconds, dt.UTC)
    year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + k, 12)
    day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
    start = anchor.replace(year=year, month=month0 + 1, day=day)
    return calendar.timegm(start.timetuple()) * 1000 + millis


def period_index(period: Period, period_days: int | None, anchor_ms: int, at_ms: int) -> int:
    """The period containing ``at_ms`` (-1 before the anchor)."""
    if at_ms < anchor_ms:
        return -1
    if period != "month":
        length = 7 * DAY_MS if period == "week" else (period_days or 1) * DAY_MS
        return (at_ms - anchor_ms) // length
    k = max(0, (at_ms - anchor_ms) // (31 * DAY_MS))  # never past the answer: a month is at most 31 days
    while period_start(period, period_days, anchor_ms, k + 1) <= at_ms:
        k += 1
    return k


class Subscriptions:
    def __init__(self, store: SqlWalletStore) -> None:
        self._store = store

    # ------------------------------------------------------------------ plans

    async def create_plan(self, mode: Mode, plan_id: str, *, name: str, period: Period, period_days: int | None,
                          entitlements: tuple[Entitlement, ...]) -> Plan:
        """Create a plan; the same plan again is a no-op, another under the same id a 409 (plans are immutable:
        subscriptions keep the terms they were sold)."""
        plan = Plan(mode, plan_id, name, period, period_days, entitlements, now_ms())
        stored = [{"asset": e.asset, "amount": e.amount, "rollover_cap": e.rollover_cap, "priority": e.priority}
                  for e in entitlements]
        try:
            await self._store.write(lambda conn: conn.execute(insert(t.plans).values(
                mode=mode, id=plan_id, name=name, period=period, period_days=period_days, entitlements=stored,
                created_at_ms=plan.created_at_ms)))
        except IntegrityError:
            existing = await self.get_plan(mode, plan_id)
            if existing is not None and (existing.name, existing.period, existing.period_days,
                                         existing.entitlements) == (name, period, period_days, entitlements):
                return existing
            raise Conflict(f"Plan {plan_id!r} already exists with other terms.", code="already_exists",
                           param="id") from None
        return plan

    async def get_plan(self, mode: Mode, plan_id: str) -> Plan | None:
        row = await self._store.read(lambda conn: _plan_row(conn, mode, plan_id))
        return _plan(row) if row is not None else None

    async def plans(self, mode: Mode) -> list[Plan]:
        p = t.plans.c
        rows = await self._store.read(lambda conn: conn.execute(select(t.plans).where(p.mode == mode)
                                                                 .order_by(p.id)).all())
        return [_plan(r) for r in rows]

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, mode: Mode, subscription_id: str, *, customer_id: str, plan_id: str,
                        anchor_ms: int | None = None, at_ms: int | None = None) -> Subscription:
        """Subscribe a customer (idempotent per id) and grant the current period at once. An anchor in the past
        sets where periods start, not when the customer subscribed: the first period granted is the one
        containing the subscription's creation, so an old anchor never makes one call grant (and one
        transaction write) every period since it."""
        now = now_ms() if at_ms is None else at_ms
        anchor = now if anchor_ms is None else anchor_ms

        def op(conn: Connection) -> None:
            SqlWalletStore.require_customer(conn, mode, customer_id)
            plan_row = _plan_row(conn, mode, plan_id)
            if plan_row is None:
                raise NotFound(f"No plan {plan_id!r} in this mode.", code="plan_not_found", param="plan_id")
            plan = _plan(plan_row)
            first = max(0, period_index(plan.period, plan.period_days, anchor, now))
            conn.execute(insert(t.subscriptions).values(
                mode=mode, id=subscription_id, customer_id=customer_id, plan_id=plan_id, anchor_ms=anchor,
                next_period=first, state="active", canceled_at_ms=None, created_at_ms=now))

        try:
            await self._store.write(op)
        except IntegrityError:
            existing = await self.get(mode, subscription_id)
            if existing is None or (existing.customer_id, existing.plan_id) != (customer_id, plan_id) or (
                    anchor_ms is not None and existing.anchor_ms != anchor_ms):
                raise Conflict(f"Subscription {subscription_id!r} already exists with other terms.",
                               code="already_exists", param="id") from None
        await self.tick(mode, subscription_id, now_ms=now)
        found = await self.get(mode, subscription_id)
        assert found is not None
        return found

    async def get(self, mode: Mode, subscription_id: str) -> Subscription | None:
        s = t.subscriptions.c
        row = await self._store.read(lambda conn: conn.execute(select(t.subscriptions).where(
            s.mode == mode, s.id == subscription_id)).first())
        return _subscription(row) if row is not None else None

    async def of_customer(self, mode: Mode, customer_id: str) -> list[Subscription]:
        s = t.subscriptions.c
        rows = await self._store.read(lambda conn: conn.execute(select(t.subscriptions).where(
            s.mode == mode, s.customer_id == customer_id).order_by(s.created_at_ms, s.id)).all())
        return [_subscription(r) for r in rows]

    async def cancel(self, mode: Mode, subscription_id: str, *, at_ms: int | None = None) -> Subscription | None:
        now = now_ms() if at_ms is None else at_ms
        if await self.get(mode, subscription_id) is None:
            return None
        await self.tick(mode, subscription_id, now_ms=now)
        s = t.subscriptions.c
        await self._store.write(lambda conn: conn.execute(update(t.subscriptions).where(
            s.mode == mode, s.id == subscription_id, s.state == "active").values(state="canceled", canceled_at_ms=now)))
        return await self.get(mode, subscription_id)

    async def tick(self, mode: Mode, subscription_id: str, *, now_ms: int) -> int:
        """Grant every period of the subscription not granted yet up to the one containing ``now_ms``; return
        how many periods this call granted (0 when another tick got there first)."""
        return await self._store.write(_tick, mode, subscription_id, now_ms)

    async def tick_all(self, *, now_ms: int, limit: int = 500) -> int:
        """The sweeper's tick: every active subscription, each in its own transaction."""
        s = t.subscriptions.c
        ids = await self._store.read(lambda conn: conn.execute(select(s.mode, s.id).where(
            s.state == "active").order_by(s.mode, s.id).limit(limit)).all())
        granted = 0
        for mode, subscription_id in ids:
            granted += await self.tick(mode, subscription_id, now_ms=now_ms)
        return granted


def _tick(conn: Connection, mode: Mode, subscription_id: str, now: int) -> int:
    s = t.subscriptions.c
    row = conn.execute(select(t.subscriptions).where(s.mode == mode, s.id == subscription_id)
                       .with_for_update()).first()
    if row is None:
        raise NotFound(f"No subscription {subscription_id!r} in this mode.", code="subscription_not_found")
    sub = _subscription(row)
    if sub.state != "active":
        return 0
    plan_row = _plan_row(conn, mode, sub.plan_id)
    assert plan_row is not None, "a subscription's plan is never deleted"
    plan = _plan(plan_row)
    current = period_index(plan.period, plan.period_days, sub.anchor_ms, now)
    if current < sub.next_period:
        return 0
    entitlements = sorted(plan.entitlements, key=lambda e: e.asset)  # one account lock order
    for k in range(sub.next_period, current + 1):
        start = period_start(plan.period, plan.period_days, sub.anchor_ms, k)
        end = period_start(plan.period, plan.period_days, sub.anchor_ms, k + 1)
        for e in entitlements:
            _grant_period(conn, sub, e, k, start, end, now)
    conn.execute(update(t.subscriptions).where(s.mode == mode, s.id == subscription_id).values(
        next_period=current + 1))
    return current + 1 - sub.next_period


def period_grant_id(sub: Subscription, asset: str, k: int, *, rollover: bool = False) -> str:
    return ("ro_" if rollover else "en_") + request_hash(sub.mode, sub.id, k, asset)[:32]


def _grant_period(conn: Connection, sub: Subscription, e: Entitlement, k: int, start: int, end: int,
                  now: int) -> None:
    mode, customer_id, asset = sub.mode, sub.customer_id, e.asset
    SqlWalletStore.ensure_account_in(conn, mode, customer_id, asset)
    lock_account(conn, mode, customer_id, asset)
    carry = 0
    if e.rollover_cap and k > 0:
        for gid in (period_grant_id(sub, asset, k - 1), period_grant_id(sub, asset, k - 1, rollover=True)):
            g = gr.grant_row(conn, gid)
            if g is not None and gr.is_stale(g, now):
                move_account(conn, mode, customer_id, asset, credits=gr.advance_grant(conn, mode, customer_id,
                                                                                      asset, g, now))
                g = gr.grant_row(conn, gid)
            if g is not None and g.state == "expired":
                carry += int(g.removed)
        carry = min(carry, e.rollover_cap)
    source = f"subscription:{sub.id}:{k}"
    for gid, amount, memo in ((period_grant_id(sub, asset, k), e.amount, f"period {k} allowance"),
                              (period_grant_id(sub, asset, k, rollover=True), carry, f"period {k} rollover")):
        if amount <= 0 or gr.grant_row(conn, gid) is not None:
            continue
        credit_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount, key=f"entitle:{gid}",
                  hashed=request_hash("entitle", gid, amount), memo=memo, purpose="entitlement",
                  priority=e.priority, effective_at_ms=start, expires_at_ms=end, grant_id=gid, source=source,
                  now=now)


def _plan_row(conn: Connection, mode: Mode, plan_id: str) -> Any:
    p = t.plans.c
    return conn.execute(select(t.plans).where(p.mode == mode, p.id == plan_id)).first()


def _plan(r: Any) -> Plan:
    entitlements = tuple(Entitlement(asset=e["asset"], amount=int(e["amount"]),
                                     rollover_cap=None if e.get("rollover_cap") is None else int(e["rollover_cap"]),
                                     priority=int(e.get("priority", ENTITLEMENT_PRIORITY)))
                         for e in r.entitlements)
    return Plan(mode=r.mode, id=r.id, name=r.name, period=r.period, period_days=r.period_days,
                entitlements=entitlements, created_at_ms=int(r.created_at_ms))


def _subscription(r: Any) -> Subscription:
    return Subscription(mode=r.mode, id=r.id, customer_id=r.customer_id, plan_id=r.plan_id,
                        anchor_ms=int(r.anchor_ms), next_period=int(r.next_period), state=r.state,
                        canceled_at_ms=None if r.canceled_at_ms is None else int(r.canceled_at_ms),
                        created_at_ms=int(r.created_at_ms))
