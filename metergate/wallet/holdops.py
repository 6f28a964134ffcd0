"""The money operations, each a function over a ``Connection`` inside the caller's transaction: credit (a grant),
hold, extend, capture (partial or final), expire, convert.

Holds follow two-phase transfers with a twist for long jobs: a hold is *pending* until resolved exactly once
(captured, voided or expired), and while pending it can be captured from in parts. ``amount`` is what it
holds in all (grown by extensions, and by partial captures that went beyond it), ``captured_amount`` what was
captured so far; while pending it reserves ``amount - captured_amount``. A final capture releases the rest.

Coverage of a capture, in order: the grants the hold holds (in the wallet's consumption order, never a lapsed
or voided one), the hold's unbacked part (admitted under an overdraft or replayed with ``overdraw``), then
the free remainder of the wallet's other live grants, then the overdraft headroom; with ``overdraw`` all of
it. Whatever none of these covers is *written off*: returned, recorded in the entry's memo and in the usage
record, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy import Connection, update

from metergate.wallet import grants as gr
from metergate.wallet import schema as t
from metergate.wallet.ledger import (
    INSERT_HOLD,
    OVERDRAW,
    RESERVE,
    UPDATE_HOLD,
    append,
    balance_row,
    hold_of,
    lock_account,
    move_account,
    request_hash,
)
from metergate.wallet.models import Balance, GrantPurpose, Hold, LedgerEntry, Mode


def credit_in(conn: Connection, *, mode: Mode, customer_id: str, asset: str, amount: int, key: str, hashed: str,
              memo: str, purpose: GrantPurpose, priority: int, effective_at_ms: int, expires_at_ms: int | None,
              grant_id: str, source: str, now: int) -> LedgerEntry:
    """Append the credit entry (the idempotency guard: a duplicate key raises before anything else is written),
    then its grant; an effective grant credits the account at once, a scheduled one when it activates."""
    scheduled = effective_at_ms > now
    entry = append(conn, key, hashed, mode, customer_id, asset, "credit", amount,
                   credits=0 if scheduled else amount, memo=memo, grant_id=grant_id, at_ms=now)
    gr.insert_grant(conn, grant_id=grant_id, seq=entry.seq, mode=mode, customer_id=customer_id, asset=asset,
                    purpose=purpose, amount=amount, priority=priority, effective_at_ms=effective_at_ms,
                    expires_at_ms=expires_at_ms, scheduled=scheduled, source=source, memo=memo, created_at_ms=now)
    if not scheduled:
        move_account(conn, mode, customer_id, asset, credits=amount)
        if expires_at_ms is not None and expires_at_ms <= now:  # granted for a period already over
            gr.refresh(conn, mode, customer_id, asset, now)
    return entry


def admit(conn: Connection, mode: Mode, customer_id: str, asset: str, amount: int, hold_id: str, now: int, *,
          overdraw: bool, existing: set[str]) -> Balance | None:
    """Add ``amount`` to the account's pending debits if the wallet covers it (one conditional UPDATE), and
    split it over grants; ``None`` when it does not cover it (nothing admitted)."""
    where = {"b_mode": mode, "b_customer": customer_id, "b_asset": asset, "b_amount": amount}
    stmt = OVERDRAW if overdraw else RESERVE
    for attempt in (0, 1):
        row = stmt.first(conn, where)
        if row is None:
            if attempt == 0 and gr.refresh(conn, mode, customer_id, asset, now):
                continue  # a grant became effective meanwhile: try once more
            return None
        grants = gr.open_grants(conn, mode, customer_id, asset)
        if any(gr.is_stale(g, now) for g in grants):
            # The aggregate counted a grant that lapsed (or not one that began): give the admission back,
            # bring the grants up to date, and decide again.
            move_account(conn, mode, customer_id, asset, pending=-amount)
            gr.refresh(conn, mode, customer_id, asset, now)
            continue
        order = grants[0].corder if grants else None
        gr.allocate(conn, hold_id, gr.live_in_order(grants, now, order), amount, existing)
        return balance_row(row)
    return None


def reserve_in(conn: Connection, *, mode: Mode, customer_id: str, asset: str, amount: int, hold_id: str,
               ttl_ms: int, now: int, overdraw: bool) -> tuple[Hold, Balance] | None:
    balance = admit(conn, mode, customer_id, asset, amount, hold_id, now, overdraw=overdraw, existing=set())
    if balance is None:
        return None
    hold = Hold(id=hold_id, mode=mode, customer_id=customer_id, asset=asset, amount=amount, state="pending",
                expires_at_ms=now + ttl_ms, created_at_ms=now)
    INSERT_HOLD.run(conn, {"id": hold_id, "mode": mode, "customer_id": customer_id, "asset": asset,
                           "amount": amount, "state": "pending", "captured_amount": 0,
                           "expires_at_ms": hold.expires_at_ms, "created_at_ms": now})
    append(conn, f"hold:{hold_id}", request_hash("hold", customer_id, asset, amount), mode, customer_id, asset,
           "hold", amount, pending=amount, hold_id=hold_id, at_ms=now)
    return hold, balance


def extend_in(conn: Connection, hold: Hold, amount: int, *, key: str, ttl_ms: int, now: int,
              overdraw: bool) -> Hold | None:
    """Grow a pending hold by ``amount`` and push its expiry to at least ``now + ttl_ms``; ``None`` (nothing
    written) when the wallet cannot cover it."""
    assert hold.state == "pending"
    existing = {a.grant_id for a in gr.allocations(conn, hold.id)}
    if admit(conn, hold.mode, hold.customer_id, hold.asset, amount, hold.id, now, overdraw=overdraw,
             existing=existing) is None:
        return None
    extended = replace(hold, amount=hold.amount + amount, expires_at_ms=max(hold.expires_at_ms, now + ttl_ms))
    _store_hold(conn, extended, None)
    append(conn, key, request_hash("extend", amount), hold.mode, hold.customer_id, hold.asset, "extend", amount,
           pending=amount, hold_id=hold.id, at_ms=now)
    return extended


def shrink_in(conn: Connection, hold: Hold, amount: int, *, key: str, hashed: str, now: int) -> tuple[Hold, int]:
    """Give back up to ``amount`` of what a pending hold holds uncaptured and keep it open: an extension's
    inverse, for an escrow lease whose holder needs less of it. What is given back leaves the account's pending
    debits in the same statement that moves the rest of the balance, so it is available at once to any hold on
    the wallet, by the one availability rule (:data:`metergate.wallet.ledger.RESERVE`). The hold row is written
    only if it is still pending and still holds that much (a conditional UPDATE: the caller locked the row, so
    this is the guard against a bug, never a race). Returns the hold and what was given back; nothing is written
    when that is nothing. The caller has checked idempotency (``key`` is the ledger entry's)."""
    assert hold.state == "pending" and amount >= 0
    lock_account(conn, hold.mode, hold.customer_id, hold.asset)
    open_part = hold.amount - hold.captured_amount
    given = gr.release_part(conn, hold.mode, hold.customer_id, hold.id, min(amount, open_part), now)
    if given == 0:
        return hold, 0
    h = t.holds.c
    shrunk = conn.execute(update(t.holds).where(
        h.id == hold.id, h.state == "pending", h.amount - h.captured_amount >= given,
    ).values(amount=h.amount - given).returning(*t.holds.c)).first()
    assert shrunk is not None, f"hold {hold.id} changed under its lock"
    move_account(conn, hold.mode, hold.customer_id, hold.asset, pending=-given)
    append(conn, key, hashed, hold.mode, hold.customer_id, hold.asset, "shrink", given, pending=-given,
           hold_id=hold.id, at_ms=now)
    return hold_of(shrunk), given


def touch_in(conn: Connection, hold: Hold, *, ttl_ms: int, now: int) -> Hold:
    """Push a pending hold's expiry out without growing it (a heartbeat that needs no more funds)."""
    touched = replace(hold, expires_at_ms=max(hold.expires_at_ms, now + ttl_ms))
    if touched != hold:
        _store_hold(conn, touched, None)
    return touched


@dataclass(frozen=True, slots=True)
class Captured:
    hold: Hold
    charged: int  # by this capture
    written_off: int
    balance: Balance


def capture_in(conn: Connection, hold: Hold, amount: int, *, key: str, hashed: str, final: bool, now: int,
               overdraw: bool, from_hold: int | None = None) -> Captured:
    """Capture ``amount`` more from the hold (see the module docstring for what covers it); ``final`` releases
    the rest and resolves the hold. A hold no longer pending (an expired lease a late settlement names) holds
    nothing: without ``final`` the capture is drawn from the wallet as beyond the hold, and the hold keeps its
    state. The caller holds the hold row's lock and has checked idempotency."""
    assert amount >= 0
    late = hold.state != "pending"  # a capture after the hold was resolved: billed from the wallet, state kept
    mode, customer_id, asset = hold.mode, hold.customer_id, hold.asset
    before = lock_account(conn, mode, customer_id, asset)
    allocs = gr.allocations_ordered(conn, hold.id, mode, customer_id)
    exact = True  # the balance after is ``before`` moved by this capture's own deltas (no refresh, no re-read)
    if any(a.grant_id and gr.is_stale(a, now) for a in allocs):
        gr.refresh(conn, mode, customer_id, asset, now)
        before = lock_account(conn, mode, customer_id, asset)
        allocs = gr.allocations_ordered(conn, hold.id, mode, customer_id)
    order = allocs[0].corder if allocs else gr.wallet_order(conn, mode, customer_id)
    pending_left = hold.amount - hold.captured_amount if hold.state == "pending" else 0
    drawable = amount if from_hold is None else min(amount, from_hold)  # a lease's request: its own share only
    drawn, released, credits = gr.draw_and_release(conn, mode, customer_id, asset, hold.id, allocs, drawable, now,
                                                   order, final=final) if pending_left else (0, 0, 0)
    move_account(conn, mode, customer_id, asset, credits=credits, pending=-(drawn + released), posted=drawn)
    extra_grants = extra_unbacked = 0
    need = amount - drawn
    if need:  # a capture beyond what the hold holds: the wallet's other grants, then its overdraft
        exact = False
        existing = {a.grant_id for a in allocs}
        grants = gr.open_grants(conn, mode, customer_id, asset)
        if any(gr.is_stale(g, now) for g in grants):
            gr.refresh(conn, mode, customer_id, asset, now)
            grants = gr.open_grants(conn, mode, customer_id, asset)
        extra_grants = gr.draw_free(conn, hold.id, gr.live_in_order(grants, now, order), need, existing)
        move_account(conn, mode, customer_id, asset, posted=extra_grants)
        need -= extra_grants
        if need:
            headroom = lock_account(conn, mode, customer_id, asset).available
            extra_unbacked = need if overdraw else min(need, max(0, headroom))
            if extra_unbacked:
                gr.add_alloc(conn, hold.id, "", 0, extra_unbacked, existing)
                move_account(conn, mode, customer_id, asset, posted=extra_unbacked)
    charged = drawn + extra_grants + extra_unbacked
    written_off = amount - charged
    extra = extra_grants + extra_unbacked
    if final:
        state = "captured" if hold.captured_amount + charged else "voided"
        after = replace(hold, state=state, captured_amount=hold.captured_amount + charged)  # type: ignore[arg-type]
    else:
        after = replace(hold, amount=hold.amount + extra, captured_amount=hold.captured_amount + charged)
    _store_hold(conn, after, now if final or late else None)
    kind = "capture" if after.captured_amount or not final else "void"  # as the state it leaves
    append(conn, key, hashed, mode, customer_id, asset, kind, charged, posted=charged,  # type: ignore[arg-type]
           pending=-(drawn + released), hold_id=hold.id, memo=f"written off {written_off}" if written_off else "",
           at_ms=now)
    if exact:
        balance = replace(before, credits_posted=before.credits_posted + credits,
                          debits_pending=before.debits_pending - drawn - released,
                          debits_posted=before.debits_posted + drawn)
    else:
        balance = lock_account(conn, mode, customer_id, asset)
    assert overdraw or balance.available >= 0 or balance.available >= before.available, "capture overspent"
    return Captured(after, charged, written_off, balance)


def expire_hold_in(conn: Connection, hold_id: str, now: int) -> bool:
    """Expire one hold if it is still pending (a conditional UPDATE: many sweepers, one expiry) and release what
    it holds, grant by grant; ``False`` when it was resolved meanwhile. For any code that expires a named hold
    (the SQL sweeper, the Redis ledger sink): writing the hold row alone would leave its allocations held."""
    h = t.holds.c
    row = conn.execute(update(t.holds).where(h.id == hold_id, h.state == "pending").values(
        state="expired", resolved_at_ms=now).returning(*t.holds.c)).first()
    if row is None:
        return False
    expire_in(conn, hold_of(row), now)
    return True


def expire_in(conn: Connection, hold: Hold, now: int) -> None:
    """Release an expired hold (its row already marked ``expired`` by the caller's conditional UPDATE)."""
    pending_left = hold.amount - hold.captured_amount
    lock_account(conn, hold.mode, hold.customer_id, hold.asset)
    credits = gr.release(conn, hold.mode, hold.customer_id, hold.asset, hold.id, now)
    move_account(conn, hold.mode, hold.customer_id, hold.asset, credits=credits, pending=-pending_left)
    append(conn, f"expire:{hold.id}", request_hash("expire"), hold.mode, hold.customer_id, hold.asset, "expire",
           pending_left, pending=-pending_left, hold_id=hold.id, at_ms=now)


def _store_hold(conn: Connection, hold: Hold, resolved_at_ms: int | None) -> None:
    UPDATE_HOLD.run(conn, {"b_hold": hold.id, "b_state": hold.state, "b_amount": hold.amount,
                           "b_captured": hold.captured_amount, "b_expires": hold.expires_at_ms,
                           "b_resolved": resolved_at_ms})
