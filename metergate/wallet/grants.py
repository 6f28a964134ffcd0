"""Grants: every credit is a grant, and every hold and capture says which grants it draws.

A grant has a purpose (``paid``, ``promotional``, ``trial``, ``entitlement``, ``adjustment``), an
``effective_at_ms``, an optional ``expires_at_ms`` and a ``priority``. Its ``amount`` splits into
``consumed`` (captured), ``held`` (allocated to open holds), ``removed`` (lapsed at expiry, or voided) and
the ``free`` remainder. A grant is *live* at time ``now`` while it is active, effective and unexpired
(``expires_at_ms > now``); only a live grant's free remainder can be held or captured.

Consumption order (per wallet, :data:`ORDERS`; default ``priority``) decides which grants a hold draws:

* ``priority`` — highest ``priority`` first, then soonest expiry (no expiry last), then oldest
  (``effective_at_ms``, then creation order);
* ``expiry`` — soonest expiry first (no expiry last), then highest priority, then oldest;
* ``fifo`` — oldest first, whatever the priority or expiry.

Plans grant entitlements at priority 100 and ``credit()`` defaults to 0, so under the default order an
allowance is used before paid funds: overage is drawn from the paid balance.

Keeping the account aggregate exact. ``accounts.credits_posted`` is the sum of ``amount - removed`` over the
activated grants, so the hot path still admits a hold with one conditional ``UPDATE`` on the account row
and only then splits it over grants (:func:`allocate`). The aggregate goes stale in two ways, both repaired
inside the operation that notices them, under the account's row lock (:func:`refresh`): a scheduled grant
whose ``effective_at_ms`` has passed is *activated* (ledger kind ``activate``, +credits), and an active grant
whose ``expires_at_ms`` has passed *lapses* (kind ``lapse``, -credits of its free remainder). The sweeper
does the same for every grant (``SqlWalletStore.expire_grants``); each step is conditional on the grant's
state, so replicas sweeping at once apply it once. The part of a lapsed (or voided) grant that an open hold
still holds stays held until the hold resolves; a capture never draws it, and when the hold releases it,
that part lapses too (one ``lapse`` entry per grant and hold).

Lock order on PostgreSQL, everywhere: hold row, then account row(s) (in asset order), then grant rows.
All grant mutations happen under their account's lock, so they are serialised per wallet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, insert, or_, select, update

from metergate.wallet import schema as t
from metergate.wallet.execution import Prepared
from metergate.wallet.ledger import AnyRow, append, lock_account, move_account, request_hash
from metergate.wallet.models import Allocation, Grant, GrantPurpose, Mode

PURPOSES: tuple[GrantPurpose, ...] = ("paid", "promotional", "trial", "entitlement", "adjustment")
ORDERS: dict[str, str] = {
    "priority": "highest priority first, then soonest expiry (no expiry last), then oldest",
    "expiry": "soonest expiry first (no expiry last), then highest priority, then oldest",
    "fifo": "oldest first",
}
DEFAULT_ORDER = "priority"
_NEVER = 2**62  # sorts "no expiry" after every real expiry

_g, _al, _ws = t.grants.c, t.hold_allocations.c, t.wallet_settings.c
_ORDER_OF = select(_ws.consumption_order).where(
    _ws.mode == bindparam("b_mode"), _ws.customer_id == bindparam("b_customer")).scalar_subquery()
_GRANT_FIELDS = (_g.id, _g.seq, _g.amount, _g.consumed, _g.held, _g.removed, _g.priority, _g.effective_at_ms,
                 _g.expires_at_ms, _g.state)
# The wallet's open grants with something free (live, stale or scheduled), and its consumption order, at once.
SELECT_OPEN = Prepared(select(*_GRANT_FIELDS, _ORDER_OF.label("corder")).where(
    _g.mode == bindparam("b_mode"), _g.customer_id == bindparam("b_customer"), _g.asset == bindparam("b_asset"),
    or_(_g.state == bindparam("b_active"), _g.state == bindparam("b_scheduled")),
    _g.amount - _g.consumed - _g.held - _g.removed > bindparam("b_zero")))
SELECT_ORDER = Prepared(select(_ws.consumption_order).where(
    _ws.mode == bindparam("b_mode"), _ws.customer_id == bindparam("b_customer")))
SELECT_ALLOCS = Prepared(select(
    _al.grant_id, _al.held.label("a_held"), _al.captured.label("a_captured"), *_GRANT_FIELDS[1:],
).select_from(t.hold_allocations.outerjoin(t.grants, _g.id == _al.grant_id)).where(
    _al.hold_id == bindparam("b_hold")))
SELECT_ALLOCS_ORDERED = Prepared(select(
    _al.grant_id, _al.held.label("a_held"), _al.captured.label("a_captured"), *_GRANT_FIELDS[1:],
    _ORDER_OF.label("corder"),
).select_from(t.hold_allocations.outerjoin(t.grants, _g.id == _al.grant_id)).where(
    _al.hold_id == bindparam("b_hold")))
MOVE_GRANT = Prepared(update(t.grants).where(_g.id == bindparam("b_grant")).values(
    held=_g.held + bindparam("b_held"), consumed=_g.consumed + bindparam("b_consumed"),
    removed=_g.removed + bindparam("b_removed")))
INSERT_ALLOC = Prepared(insert(t.hold_allocations), columns=("hold_id", "grant_id", "held", "captured"))
MOVE_ALLOC = Prepared(update(t.hold_allocations).where(
    _al.hold_id == bindparam("b_hold"), _al.grant_id == bindparam("b_grant")).values(
    held=_al.held + bindparam("b_held"), captured=_al.captured + bindparam("b_captured")))
_INSERT_GRANT_COLUMNS = ("id", "seq", "mode", "customer_id", "asset", "purpose", "amount", "consumed", "held",
                         "removed", "priority", "effective_at_ms", "expires_at_ms", "state", "source", "memo",
                         "created_at_ms")
INSERT_GRANT = Prepared(insert(t.grants), columns=_INSERT_GRANT_COLUMNS)


def _where(mode: str, customer_id: str, asset: str) -> dict[str, Any]:
    return {"b_mode": mode, "b_customer": customer_id, "b_asset": asset}


def sort_key(order: str | None) -> Callable[[AnyRow], tuple[int, ...]]:
    """The key that sorts grant rows (or :class:`Grant` values) into the wallet's consumption order."""

    def expiry(g: AnyRow) -> int:
        return _NEVER if g.expires_at_ms is None else int(g.expires_at_ms)

    if order == "expiry":
        return lambda g: (expiry(g), -int(g.priority), int(g.effective_at_ms), int(g.seq))
    if order == "fifo":
        return lambda g: (int(g.effective_at_ms), int(g.seq))
    return lambda g: (-int(g.priority), expiry(g), int(g.effective_at_ms), int(g.seq))


def is_live(g: AnyRow, now: int) -> bool:
    return bool(g.state == "active" and int(g.effective_at_ms) <= now
                and (g.expires_at_ms is None or int(g.expires_at_ms) > now))


def is_stale(g: AnyRow, now: int) -> bool:
    """The grant's state lags the clock: due to activate, or due to lapse."""
    if g.state == "scheduled":
        return int(g.effective_at_ms) <= now
    return bool(g.state == "active" and g.expires_at_ms is not None and int(g.expires_at_ms) <= now)


def stale_from(g: AnyRow) -> int:
    """The first ``now`` at which :func:`is_stale` holds for ``g`` (``is_stale(g, now) == (now >= stale_from(g))``),
    a time far in the future for a grant that never goes stale by the clock: one comparison per decision."""
    if g.state == "scheduled":
        return int(g.effective_at_ms)
    if g.state == "active" and g.expires_at_ms is not None:
        return int(g.expires_at_ms)
    return _NEVER


def free_of(g: AnyRow) -> int:
    return int(g.amount) - int(g.consumed) - int(g.held) - int(g.removed)


def open_grants(conn: Connection, mode: str, customer_id: str, asset: str) -> list[AnyRow]:
    return SELECT_OPEN.all(conn, {**_where(mode, customer_id, asset), "b_active": "active",
                                        "b_scheduled": "scheduled", "b_zero": 0})


def wallet_order(conn: Connection, mode: str, customer_id: str) -> str:
    row = SELECT_ORDER.first(conn, {"b_mode": mode, "b_customer": customer_id})
    return str(row[0]) if row is not None else DEFAULT_ORDER


def live_in_order(rows: Iterable[AnyRow], now: int, order: str | None) -> list[AnyRow]:
    return sorted((g for g in rows if is_live(g, now) and free_of(g) > 0), key=sort_key(order))


# ------------------------------------------------------------------ the grant clock: activation and lapse


def advance_grant(conn: Connection, mode: str, customer_id: str, asset: str, g: AnyRow, now: int) -> int:
    """Activate and/or lapse one grant as its clock says; return the change to ``credits_posted`` (the caller
    moves the account). Each step is conditional on the grant's state, so it applies once."""
    credits = 0
    state = g.state
    if state == "scheduled" and int(g.effective_at_ms) <= now and conn.execute(
            update(t.grants).where(_g.id == g.id, _g.state == "scheduled").values(state="active")).rowcount:
        amount = int(g.amount) - int(g.removed)
        append(conn, f"activate:{g.id}", request_hash("activate", g.id), mode, customer_id, asset, "activate",
               amount, credits=amount, grant_id=g.id, at_ms=now)
        credits += amount
        state = "active"
    if state == "active" and g.expires_at_ms is not None and int(g.expires_at_ms) <= now:
        free = free_of(g)
        if conn.execute(update(t.grants).where(_g.id == g.id, _g.state == "active")
                        .values(state="expired", removed=_g.removed + free)).rowcount and free:
            append(conn, f"lapse:{g.id}", request_hash("lapse", g.id), mode, customer_id, asset, "lapse", free,
                   credits=-free, grant_id=g.id, at_ms=now)
            credits -= free
    return credits


def refresh(conn: Connection, mode: str, customer_id: str, asset: str, now: int) -> bool:
    """Bring the wallet's grants up to ``now`` (activate the due, lapse the expired) under the account lock;
    return whether any credit changed."""
    lock_account(conn, mode, customer_id, asset)
    credits = 0
    changed = False
    for g in open_grants(conn, mode, customer_id, asset):
        if is_stale(g, now):
            changed = True
            credits += advance_grant(conn, mode, customer_id, asset, g, now)
    move_account(conn, mode, customer_id, asset, credits=credits)
    return changed


# ------------------------------------------------------------------ allocations


def allocate(conn: Connection, hold_id: str, live: list[AnyRow], amount: int, existing: set[str]) -> None:
    """Split ``amount`` of a hold over ``live`` grants in order; what they cannot cover is unbacked ('')."""
    remaining = amount
    for g in live:
        if remaining == 0:
            break
        take = min(free_of(g), remaining)
        MOVE_GRANT.run(conn, {"b_grant": g.id, "b_held": take, "b_consumed": 0, "b_removed": 0})
        add_alloc(conn, hold_id, g.id, take, 0, existing)
        remaining -= take
    if remaining:
        add_alloc(conn, hold_id, "", remaining, 0, existing)


def add_alloc(conn: Connection, hold_id: str, grant_id: str, held: int, captured: int, existing: set[str]) -> None:
    if grant_id in existing:
        MOVE_ALLOC.run(conn, {"b_hold": hold_id, "b_grant": grant_id, "b_held": held, "b_captured": captured})
    else:
        INSERT_ALLOC.run(conn, {"hold_id": hold_id, "grant_id": grant_id, "held": held, "captured": captured})
        existing.add(grant_id)


def allocations(conn: Connection, hold_id: str) -> list[AnyRow]:
    return SELECT_ALLOCS.all(conn, {"b_hold": hold_id})


def allocations_ordered(conn: Connection, hold_id: str, mode: str, customer_id: str) -> list[AnyRow]:
    """The hold's allocations, each row also carrying the wallet's consumption order (``corder``)."""
    return SELECT_ALLOCS_ORDERED.all(conn, {"b_hold": hold_id, "b_mode": mode, "b_customer": customer_id})


def draw_and_release(conn: Connection, mode: str, customer_id: str, asset: str, hold_id: str, allocs: list[AnyRow],
                     amount: int, now: int, order: str | None, *, final: bool) -> tuple[int, int, int]:
    """Capture up to ``amount`` from what the hold holds — on live grants in the wallet's order, then its unbacked
    part; a lapsed or voided grant is never drawn — and, when ``final``, release the rest (a part held on a dead
    grant lapses now). One grant and one allocation update per allocation touched. Return (drawn, released,
    change to ``credits_posted``); the caller moves the account."""
    need = amount
    takes: dict[str, int] = {}
    live = sorted((a for a in allocs if a.grant_id and int(a.a_held) > 0 and is_live(a, now)), key=sort_key(order))
    for a in [*live, *(a for a in allocs if not a.grant_id and int(a.a_held) > 0)]:
        if need == 0:
            break
        takes[a.grant_id] = take = min(int(a.a_held), need)
        need -= take
    released = credits = 0
    for a in allocs:
        take = takes.get(a.grant_id, 0)
        rel = int(a.a_held) - take if final else 0
        if take == 0 and rel == 0:
            continue
        dead = bool(a.grant_id) and not is_live(a, now)
        if a.grant_id:
            MOVE_GRANT.run(conn, {"b_grant": a.grant_id, "b_held": -(take + rel), "b_consumed": take,
                                  "b_removed": rel if dead else 0})
        MOVE_ALLOC.run(conn, {"b_hold": hold_id, "b_grant": a.grant_id, "b_held": -(take + rel), "b_captured": take})
        released += rel
        if dead and rel:
            append(conn, f"lapse:{a.grant_id}:{hold_id}", request_hash("lapse", a.grant_id, hold_id), mode,
                   customer_id, asset, "lapse", rel, credits=-rel, hold_id=hold_id, grant_id=a.grant_id, at_ms=now)
            credits -= rel
    return amount - need, released, credits




def release(conn: Connection, mode: str, customer_id: str, asset: str, hold_id: str, now: int) -> int:
    """Give back everything the hold still holds; a part held on a lapsed or voided grant lapses now. Return the
    change to ``credits_posted`` (the caller moves the account)."""
    credits = 0
    for a in allocations(conn, hold_id):
        held = int(a.a_held)
        if held == 0:
            continue
        dead = bool(a.grant_id) and not is_live(a, now)
        if a.grant_id:
            MOVE_GRANT.run(conn, {"b_grant": a.grant_id, "b_held": -held, "b_consumed": 0,
                                  "b_removed": held if dead else 0})
        MOVE_ALLOC.run(conn, {"b_hold": hold_id, "b_grant": a.grant_id, "b_held": -held, "b_captured": 0})
        if dead:
            append(conn, f"lapse:{a.grant_id}:{hold_id}", request_hash("lapse", a.grant_id, hold_id), mode,
                   customer_id, asset, "lapse", held, credits=-held, hold_id=hold_id, grant_id=a.grant_id,
                   at_ms=now)
            credits -= held
    return credits


def release_part(conn: Connection, mode: str, customer_id: str, hold_id: str, amount: int, now: int) -> int:
    """Give back up to ``amount`` of what an open hold holds and keep it open (an escrow lease shrinking): the
    parts a capture would draw last first — its unbacked part, then its live grants in reverse consumption
    order — so that what it keeps is what its captures draw first. A part on a lapsed or voided grant is not
    given back: as for any open hold, it stays held until the hold resolves, and lapses then (its one ``lapse``
    entry). Return how much was given back; the caller moves the account's pending by as much."""
    allocs = allocations_ordered(conn, hold_id, mode, customer_id)
    order = allocs[0].corder if allocs else None
    live = sorted((a for a in allocs if a.grant_id and is_live(a, now)), key=sort_key(order), reverse=True)
    left = amount
    for a in [*(a for a in allocs if not a.grant_id), *live]:
        give = min(int(a.a_held), left)
        if give <= 0:
            continue
        if a.grant_id:
            MOVE_GRANT.run(conn, {"b_grant": a.grant_id, "b_held": -give, "b_consumed": 0, "b_removed": 0})
        MOVE_ALLOC.run(conn, {"b_hold": hold_id, "b_grant": a.grant_id, "b_held": -give, "b_captured": 0})
        left -= give
    return amount - left


def draw_free(conn: Connection, hold_id: str, live: list[AnyRow], amount: int, existing: set[str]) -> int:
    """Capture up to ``amount`` straight from the free remainder of ``live`` grants (a capture beyond its hold);
    return how much was drawn."""
    need = amount
    for g in live:
        if need == 0:
            break
        take = min(free_of(g), need)
        MOVE_GRANT.run(conn, {"b_grant": g.id, "b_held": 0, "b_consumed": take, "b_removed": 0})
        add_alloc(conn, hold_id, g.id, 0, take, existing)
        need -= take
    return amount - need


# ------------------------------------------------------------------ creating and voiding grants


def insert_grant(conn: Connection, *, grant_id: str, seq: int, mode: Mode, customer_id: str, asset: str,
                 purpose: GrantPurpose, amount: int, priority: int, effective_at_ms: int, expires_at_ms: int | None,
                 scheduled: bool, source: str, memo: str, created_at_ms: int) -> None:
    INSERT_GRANT.run(conn, {
        "id": grant_id, "seq": seq, "mode": mode, "customer_id": customer_id, "asset": asset, "purpose": purpose,
        "amount": amount, "consumed": 0, "held": 0, "removed": 0, "priority": priority,
        "effective_at_ms": effective_at_ms, "expires_at_ms": expires_at_ms,
        "state": "scheduled" if scheduled else "active", "source": source, "memo": memo,
        "created_at_ms": created_at_ms})


def grant_row(conn: Connection, grant_id: str, *, mode: str | None = None) -> AnyRow | None:
    stmt = select(t.grants).where(_g.id == grant_id)
    if mode is not None:
        stmt = stmt.where(_g.mode == mode)
    return conn.execute(stmt).first()


def void_grant(conn: Connection, mode: Mode, grant_id: str, now: int) -> AnyRow | None:
    """Void the grant's free remainder (what open holds hold on it lapses when they release); idempotent."""
    found = grant_row(conn, grant_id, mode=mode)
    if found is None:
        return None
    lock_account(conn, found.mode, found.customer_id, found.asset)
    g = grant_row(conn, grant_id, mode=mode)  # re-read under the account lock
    assert g is not None
    if g.state in ("expired", "voided"):
        return g
    free = free_of(g)
    active = g.state == "active"
    conn.execute(update(t.grants).where(_g.id == grant_id, _g.state == g.state).values(
        state="voided", removed=_g.removed + free))
    append(conn, f"revoke:{grant_id}", request_hash("revoke", grant_id), g.mode, g.customer_id, g.asset, "revoke",
           free, credits=-free if active else 0, grant_id=grant_id, at_ms=now)
    if active:
        move_account(conn, g.mode, g.customer_id, g.asset, credits=-free)
    return grant_row(conn, grant_id)


def grant_of(row: AnyRow) -> Grant:
    return Grant(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset, purpose=row.purpose,
                 amount=int(row.amount), consumed=int(row.consumed), held=int(row.held), removed=int(row.removed),
                 priority=int(row.priority), effective_at_ms=int(row.effective_at_ms),
                 expires_at_ms=None if row.expires_at_ms is None else int(row.expires_at_ms), state=row.state,
                 source=row.source, memo=row.memo, created_at_ms=int(row.created_at_ms))


def allocation_of(row: AnyRow, hold_id: str) -> Allocation:
    return Allocation(hold_id=hold_id, grant_id=row.grant_id, held=int(row.a_held), captured=int(row.a_captured))
