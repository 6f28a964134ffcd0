"""Checking the ledger, and bringing an older database up to the current schema.

:func:`audit_ledger` re-derives every account's balance columns from the ledger and every grant from its
ledger entries and the allocations of the holds that drew it (the invariants of :mod:`metergate.wallet.schema`);
:func:`upgrade_v1_to_v2` gives a database from before grants its grants and allocations.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select, text, update

from metergate.wallet import schema as t
from metergate.wallet.ledger import balance_row as _balance
from metergate.wallet.ledger import request_hash as _hash
from metergate.wallet.models import now_ms


def upgrade_v1_to_v2(conn: Connection) -> None:
    """Grants for a v1 database: each account's credits become one ``paid`` grant without expiry (source ``v1``),
    and every hold's captured and pending amounts are allocated to it, as far as it goes, then unbacked. The
    ledger's credit entries of the account are tagged with that grant (the one backfill of a new column; no
    amount changes), so that the audit's grant checks hold from the first start."""
    conn.execute(text("ALTER TABLE ledger_entries ADD COLUMN grant_id VARCHAR(64)"))
    h, e = t.holds.c, t.ledger_entries.c
    seq = int(conn.execute(select(func.coalesce(func.max(e.seq), 0))).scalar_one())
    for account in conn.execute(select(t.accounts)).all():
        mode, customer_id, asset = account.mode, account.customer_id, account.asset
        grant_id = "lg_" + _hash(mode, customer_id, asset)[:32]
        remaining = int(account.credits_posted)
        consumed = held = 0
        for hold in conn.execute(select(t.holds).where(h.mode == mode, h.customer_id == customer_id,
                                                       h.asset == asset).order_by(h.created_at_ms, h.id)).all():
            captured = int(hold.captured_amount)
            pending = int(hold.amount) - captured if hold.state == "pending" else 0
            from_grant = min(captured, remaining)
            remaining -= from_grant
            held_on_grant = min(pending, remaining)
            remaining -= held_on_grant
            consumed, held = consumed + from_grant, held + held_on_grant
            for gid, part_held, part_captured in ((grant_id, held_on_grant, from_grant),
                                                  ("", pending - held_on_grant, captured - from_grant)):
                if part_held or part_captured:
                    conn.execute(insert(t.hold_allocations).values(hold_id=hold.id, grant_id=gid, held=part_held,
                                                                   captured=part_captured))
        if int(account.credits_posted) > 0:
            conn.execute(insert(t.grants).values(
                id=grant_id, seq=seq, mode=mode, customer_id=customer_id, asset=asset, purpose="paid",
                amount=int(account.credits_posted), consumed=consumed, held=held, removed=0, priority=0,
                effective_at_ms=0, expires_at_ms=None, state="active", source="v1", memo="balance before grants",
                created_at_ms=now_ms()))
            conn.execute(update(t.ledger_entries).where(
                e.mode == mode, e.customer_id == customer_id, e.asset == asset, e.credits_delta != 0,
            ).values(grant_id=grant_id))


def audit_ledger(conn: Connection) -> list[str]:
    """Re-derive every balance from the ledger, and every grant from its ledger entries and the allocations of
    the holds that drew it; return each discrepancy found (none: [])."""
    problems: list[str] = []
    e, h, al = t.ledger_entries.c, t.holds.c, t.hold_allocations.c
    sums = {
        (r.mode, r.customer_id, r.asset): (r.credits, r.posted, r.pending)
        for r in conn.execute(select(
            e.mode, e.customer_id, e.asset, func.sum(e.credits_delta).label("credits"),
            func.sum(e.posted_delta).label("posted"), func.sum(e.pending_delta).label("pending"),
        ).group_by(e.mode, e.customer_id, e.asset)).all()
    }
    pending: dict[tuple[str, str, str], int] = {}
    captured: dict[tuple[str, str, str], int] = {}
    allocated = {r.hold_id: (int(r.held), int(r.captured)) for r in conn.execute(select(
        al.hold_id, func.sum(al.held).label("held"), func.sum(al.captured).label("captured"),
    ).group_by(al.hold_id)).all()}
    for r in conn.execute(select(h.id, h.mode, h.customer_id, h.asset, h.state, h.amount, h.captured_amount)).all():
        pk = (r.mode, r.customer_id, r.asset)
        open_part = int(r.amount) - int(r.captured_amount) if r.state == "pending" else 0
        if open_part < 0:
            problems.append(f"hold {r.id}: captured {r.captured_amount} exceeds its amount {r.amount} while open")
        pending[pk] = pending.get(pk, 0) + open_part
        captured[pk] = captured.get(pk, 0) + int(r.captured_amount)
        if allocated.get(r.id, (0, 0)) != (open_part, int(r.captured_amount)):
            problems.append(f"hold {r.id}: allocations (held, captured) {allocated.get(r.id, (0, 0))} != "
                            f"{(open_part, int(r.captured_amount))}")
    by_grant = {r.grant_id: (int(r.held), int(r.captured)) for r in conn.execute(select(
        al.grant_id, func.sum(al.held).label("held"), func.sum(al.captured).label("captured"),
    ).where(al.grant_id != "").group_by(al.grant_id)).all()}
    credited = {r.grant_id: int(r.credits) for r in conn.execute(select(
        e.grant_id, func.sum(e.credits_delta).label("credits")).where(e.grant_id.is_not(None)).group_by(e.grant_id))}
    granted: dict[tuple[str, str, str], int] = {}
    for r in conn.execute(select(t.grants)).all():
        pk = (r.mode, r.customer_id, r.asset)
        parts = (int(r.consumed), int(r.held), int(r.removed))
        if min(parts) < 0 or sum(parts) > int(r.amount):
            problems.append(f"grant {r.id}: consumed, held, removed {parts} do not fit its amount {r.amount}")
        if by_grant.get(r.id, (0, 0)) != (int(r.held), int(r.consumed)):
            problems.append(f"grant {r.id}: allocations (held, captured) {by_grant.get(r.id, (0, 0))} != "
                            f"(held, consumed) {(int(r.held), int(r.consumed))}")
        expected = 0 if r.state == "scheduled" else int(r.amount) - int(r.removed)
        if credited.get(r.id, 0) != expected:
            problems.append(f"grant {r.id}: ledger credits {credited.get(r.id, 0)} != {expected}")
        granted[pk] = granted.get(pk, 0) + expected
    for row in conn.execute(select(t.accounts)).all():
        b = _balance(row)
        pk = (b.mode, b.customer_id, b.asset)
        derived = tuple(int(x) for x in sums.get(pk, (0, 0, 0)))
        if derived != (b.credits_posted, b.debits_posted, b.debits_pending):
            problems.append(f"{pk}: account columns {(b.credits_posted, b.debits_posted, b.debits_pending)}"
                            f" != ledger sums {derived}")
        if pending.get(pk, 0) != b.debits_pending:
            problems.append(f"{pk}: debits_pending {b.debits_pending} != open holds {pending.get(pk, 0)}")
        if captured.get(pk, 0) != b.debits_posted:
            problems.append(f"{pk}: debits_posted {b.debits_posted} != captured by holds {captured.get(pk, 0)}")
        if granted.get(pk, 0) != b.credits_posted:
            problems.append(f"{pk}: credits_posted {b.credits_posted} != effective grants {granted.get(pk, 0)}")
        if b.available < 0:
            problems.append(f"{pk}: available {b.available} is below zero")
    unresolved = conn.execute(select(func.count()).select_from(t.holds).where(
        h.state != "pending", ~select(e.seq).where(
            e.hold_id == h.id, e.kind.in_(("capture", "void", "expire"))).exists())).scalar_one()
    if unresolved:
        problems.append(f"{unresolved} resolved holds have no resolving ledger entry")
    return problems
