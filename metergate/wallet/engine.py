"""The batch engine's decisions: the hot wallet operations (:mod:`metergate.wallet.batchops`: reserve, extend,
settle, a lease's capture) of one group commit, decided in memory, in order, over state loaded once
(:mod:`metergate.wallet.batchstate`), and written back as one set of rows (:mod:`metergate.wallet.batchsql`).

Why: writing the system of record one event at a time costs a dozen statements and their Python per event
(17 per request, most of a request's ledger CPU, and one row-lock hand-over per event on PostgreSQL). Here a
batch costs a few reads (its holds, its accounts with their consumption order, their open grants, its holds'
allocations, the extension keys it names) and one multi-row write per table, whatever its size.

Invariant: each operation's decision is the one :mod:`metergate.wallet.holdops` would make against the same
rows, with the same ledger rows, allocations and deltas — availability is ``credits + overdraft - posted -
pending``, grants are drawn in the wallet's consumption order, each event keeps its own ledger row and
idempotency key. An operation is decided before anything of it is applied to the in-memory state, so a refusal
(insufficient funds, a conflicting key) changes nothing and fails alone, without a savepoint. Every operation
of a batch was submitted before any of the batch was answered, so they are concurrent and any order among them
is a valid one.

What the engine does not decide it hands back as :data:`CLASSIC`: the caller runs it through the per-operation
path (:mod:`metergate.wallet.holdops`), after the batch's rows are written. That is every case that needs the
database rather than the loaded rows: a grant whose clock has run out (activation and lapse entries), an
account that does not exist yet, a replay of a hold or settlement committed by an earlier batch, an expired
hold. They are rare on the hot path, and keeping them out keeps one copy of their rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from metergate.wallet.batchops import CLASSIC, CaptureOp, EngineOp, ExtendOp, ReserveOp, SettleOp
from metergate.wallet.batchstate import (
    ALWAYS,
    AccountState,
    AllocState,
    BatchState,
    GrantState,
    HoldState,
    usage_row,
)
from metergate.wallet.errors import (
    CaptureBelowCaptured,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.grants import free_of, is_live, sort_key, stale_from
from metergate.wallet.ledger import request_hash
from metergate.wallet.models import Capture, Settlement


@functools.lru_cache(maxsize=4096)
def operation_hash(kind: str, amount: int) -> str:
    """``request_hash(kind, amount)`` (a settlement's or an extension's), computed once per amount: a hot
    wallet's requests settle at a handful of amounts, and a SHA-256 per event is a good part of deciding it."""
    return request_hash(kind, amount)


def decide(state: BatchState, ops: Sequence[EngineOp]) -> list[Any]:
    """Each operation's outcome, in order: its result, an exception for its caller, or :data:`CLASSIC`.
    Applies the accepted ones to ``state``; nothing is written here."""
    outcomes: list[Any] = []
    append = outcomes.append
    for op in ops:
        try:
            append(_DECIDE[type(op)](state, op))
        except (IdempotencyConflict, HoldNotFound, CaptureBelowCaptured, InsufficientFunds) as refused:
            append(refused if state.keys_read or not isinstance(op, ExtendOp | CaptureOp) else CLASSIC)
    return outcomes


def _entry(state: BatchState, key: str, hashed: str, mode: str, customer_id: str, asset: str, kind: str,
           amount: int, *, credits: int = 0, posted: int = 0, pending: int = 0, hold_id: str | None = None,
           memo: str = "", grant_id: str | None = None, at_ms: int) -> None:
    assert (mode, key) not in state.keys, f"idempotency key {key!r} written twice in one batch"
    state.keys[(mode, key)] = hashed
    state.entries.append((key, hashed, mode, customer_id, asset, kind, amount, credits, posted, pending, hold_id,
                          memo, at_ms, grant_id))


def _live_grants(account: AccountState, now: int) -> list[GrantState]:
    live = [g for g in account.grants if is_live(g, now) and free_of(g) > 0]
    if len(live) > 1:
        live.sort(key=sort_key(account.order))
    return live


def _alloc(state: BatchState, hold_id: str, grant_id: str) -> AllocState:
    allocs = state.allocs.setdefault(hold_id, {})
    found = allocs.get(grant_id)
    if found is None:
        found = allocs[grant_id] = AllocState(grant_id, 0, 0, new=True)
    return found


def _admit(state: BatchState, account: AccountState, hold_id: str, amount: int, now: int, overdraw: bool) -> bool:
    """:func:`metergate.wallet.holdops.admit` on the loaded rows: add ``amount`` to pending if it is covered
    and split it over the live grants in order (the rest unbacked); False, changing nothing, if not."""
    if not overdraw and account.available < amount:
        return False
    account.move(pending=amount)
    remaining = amount
    for g in _live_grants(account, now):
        if remaining == 0:
            break
        take = min(free_of(g), remaining)
        g.move(held=take)
        _alloc(state, hold_id, g.id).move(held=take)
        remaining -= take
    if remaining:
        _alloc(state, hold_id, "").move(held=remaining)
    return True


def _reserve(state: BatchState, op: ReserveOp) -> Any:
    hashed = request_hash("hold", op.customer_id, op.asset, op.amount)
    hold = state.holds.get(op.hold_id)
    if hold is not None:
        if hold.hold_hash is None:
            return CLASSIC  # committed by an earlier batch: a replay or a conflict, decided on its ledger entry
        if hold.mode != op.mode or hold.hold_hash != hashed:
            raise IdempotencyConflict(f"hold:{op.hold_id}")
        return hold.value(), state.accounts[(hold.mode, hold.customer_id, hold.asset)].balance()
    found = state.accounts.get((op.mode, op.customer_id, op.asset))
    if found is None or found.stale_at(op.now):
        return CLASSIC
    account = found
    if not _admit(state, account, op.hold_id, op.amount, op.now, op.overdraw):
        return InsufficientFunds(asset=op.asset, available=account.available, required=op.amount)
    balance = account.balance()
    state.holds[op.hold_id] = hold = HoldState(op.hold_id, op.mode, op.customer_id, op.asset, op.amount, "pending",
                                               0, op.now + op.ttl_ms, op.now, new=True, hold_hash=hashed)
    _entry(state, f"hold:{op.hold_id}", hashed, op.mode, op.customer_id, op.asset, "hold", op.amount,
           pending=op.amount, hold_id=op.hold_id, at_ms=op.now)
    return hold.value(), balance


def _extend(state: BatchState, op: ExtendOp) -> Any:
    hold = state.holds.get(op.hold_id)
    if hold is None:
        raise HoldNotFound(op.hold_id)
    hashed = operation_hash("extend", op.amount)
    previous = state.keys.get((hold.mode, op.key))
    if previous is not None:
        if previous != hashed:
            raise IdempotencyConflict(op.key)
        return hold.value()  # this step was applied already
    if hold.state != "pending":
        raise HoldNotFound(op.hold_id)
    account = state.accounts[(hold.mode, hold.customer_id, hold.asset)]
    if account.stale_at(op.now):
        return CLASSIC
    if not _admit(state, account, hold.id, op.amount, op.now, op.overdraw):
        raise InsufficientFunds(asset=hold.asset, available=account.available, required=op.amount)
    hold.amount += op.amount
    hold.expires_at_ms = max(hold.expires_at_ms, op.now + op.ttl_ms)
    hold.dirty = True
    _entry(state, op.key, hashed, hold.mode, hold.customer_id, hold.asset, "extend", op.amount, pending=op.amount,
           hold_id=hold.id, at_ms=op.now)
    return hold.value()


def _allocs_stale(state: BatchState, hold: HoldState, now: int) -> bool:
    """One of the hold's allocations names a grant not loaded, or one whose clock ran out: the classic path's.
    Worked out once per hold and batch: an allocation this batch adds names one of the account's grants, which
    :meth:`AccountState.stale_at` covers."""
    found = hold.allocs_stale_from
    if found is None:
        found = -ALWAYS
        for a in state.allocs.get(hold.id, {}).values():
            if a.grant_id:
                grant = state.grants.get(a.grant_id)
                if grant is None:
                    found = ALWAYS
                    break
                found = min(found, stale_from(grant))
        hold.allocs_stale_from = found
    return now >= found


def _settle(state: BatchState, op: SettleOp) -> Any:
    hold = state.holds.get(op.hold_id)
    if hold is None:
        raise HoldNotFound(op.hold_id)
    hashed = operation_hash("settle", op.amount)
    account = state.accounts[(hold.mode, hold.customer_id, hold.asset)]
    if hold.state in ("captured", "voided"):
        if hold.settle_hash is None:
            return CLASSIC  # settled by an earlier batch: its ledger entry decides replay or conflict
        if hold.settle_hash != hashed:
            raise IdempotencyConflict(f"settle:{op.hold_id}")
        return Settlement(op.hold_id, hold.captured_amount, op.amount - hold.captured_amount, account.balance(),
                          replayed=True)
    if hold.state != "pending":
        return CLASSIC  # expired: what covers a capture after expiry is the classic path's
    if op.amount < hold.captured_amount:
        raise CaptureBelowCaptured(op.hold_id, hold.captured_amount, op.amount)
    if account.stale_at(op.now) or _allocs_stale(state, hold, op.now):
        return CLASSIC
    allocs = state.allocs.get(hold.id, {})
    _, written_off = _capture_final(state, account, hold, allocs, op.amount - hold.captured_amount, op.now,
                                          hashed, op.overdraw)
    hold.settle_hash = hashed
    total = hold.captured_amount
    if op.usage is not None:
        state.usage.append(usage_row(op.usage, total, written_off))
    return Settlement(op.hold_id, total, written_off, account.balance())


def _capture(state: BatchState, op: CaptureOp) -> Any:
    hold = state.holds.get(op.hold_id)
    if hold is None:
        raise HoldNotFound(op.hold_id)
    hashed = operation_hash("settle", op.amount)
    previous = state.keys.get((hold.mode, op.key))
    if previous is not None:
        if previous != hashed:
            raise IdempotencyConflict(op.key)
        return CLASSIC  # applied before: its ledger entry says what it charged
    if hold.state != "pending":
        return CLASSIC  # a capture after the hold ran out: the classic path charges the wallet directly
    account = state.accounts[(hold.mode, hold.customer_id, hold.asset)]
    if account.stale_at(op.now) or _allocs_stale(state, hold, op.now):
        return CLASSIC
    allocs = state.allocs.get(hold.id, {})
    charged, written_off = _draw(state, account, hold, allocs, op.amount, op.now, op.key, hashed, op.overdraw,
                                 False, op.held)
    if op.usage is not None:
        state.usage.append(usage_row(op.usage, charged, written_off))
    return Capture(hold.value(), charged, written_off, account.balance())


def _capture_final(state: BatchState, account: AccountState, hold: HoldState, allocs: dict[str, AllocState],
                   amount: int, now: int, hashed: str, overdraw: bool) -> tuple[int, int]:
    return _draw(state, account, hold, allocs, amount, now, f"settle:{hold.id}", hashed, overdraw, True)


def _draw(state: BatchState, account: AccountState, hold: HoldState, allocs: dict[str, AllocState],
          amount: int, now: int, key: str, hashed: str, overdraw: bool, final: bool,
          from_hold: int | None = None) -> tuple[int, int]:
    """:func:`metergate.wallet.holdops.capture_in` on the loaded rows: draw ``amount`` from what the hold holds
    (live grants in order, then its unbacked part); ``final`` releases the rest (a part held on a dead grant
    lapses) and resolves the hold; then cover any excess from the wallet's other live grants and its overdraft
    headroom (an open hold grows by that excess). ``from_hold`` caps what is drawn from the hold itself: a
    request settled against a lease takes only its own share of it, and the rest as an excess, so that it never
    spends what backs the lease's other requests. Returns (charged, written off)."""
    before = account.available
    mode, customer_id, asset = hold.mode, hold.customer_id, hold.asset
    grants = state.grants
    capped = amount if from_hold is None else min(amount, from_hold)
    # What the hold holds, in the order it is drawn: its live grants' parts in the wallet's consumption order,
    # then its unbacked part.
    live: list[AllocState] = []
    unbacked: list[AllocState] = []
    for a in allocs.values():
        if a.held > 0:
            if not a.grant_id:
                unbacked.append(a)
            elif is_live(grants[a.grant_id], now):
                live.append(a)
    if len(live) > 1:
        order_key = sort_key(account.order)
        live.sort(key=lambda a: order_key(grants[a.grant_id]))
    need = capped
    takes: dict[str, int] = {}
    for a in (*live, *unbacked):
        if need == 0:
            break
        takes[a.grant_id] = take = min(a.held, need)
        need -= take
    drawn, released, credits = capped - need, 0, 0
    if final:  # and release the rest: a part held on a grant no longer live lapses
        lapses: list[tuple[str, int]] = []
        for a in list(allocs.values()):
            take = takes.get(a.grant_id, 0)
            rel = a.held - take
            if take == 0 and rel == 0:
                continue
            grant = grants.get(a.grant_id) if a.grant_id else None
            dead = grant is not None and not is_live(grant, now)
            if grant is not None:
                grant.move(-(take + rel), take, rel if dead else 0)
            a.move(-(take + rel), take)
            released += rel
            if dead and rel:
                lapses.append((a.grant_id, rel))
                credits -= rel
        for grant_id, rel in lapses:
            _entry(state, f"lapse:{grant_id}:{hold.id}", request_hash("lapse", grant_id, hold.id), mode,
                   customer_id, asset, "lapse", rel, credits=-rel, hold_id=hold.id, grant_id=grant_id, at_ms=now)
    else:  # only what was taken moves, each from a live grant or the unbacked part
        for grant_id, take in takes.items():
            if grant_id:
                grants[grant_id].move(-take, take, 0)
            allocs[grant_id].move(-take, take)
    account.move(credits, drawn, -(drawn + released))
    extra_grants = extra_unbacked = 0
    need = amount - drawn
    if need:  # beyond what the hold holds: the wallet's other live grants, then its overdraft headroom
        for g in _live_grants(account, now):
            if need == 0:
                break
            take = min(free_of(g), need)
            g.move(consumed=take)
            _alloc(state, hold.id, g.id).move(captured=take)
            extra_grants += take
            need -= take
        account.move(posted=extra_grants)
        if need:
            extra_unbacked = need if overdraw else min(need, max(0, account.available))
            if extra_unbacked:
                _alloc(state, hold.id, "").move(captured=extra_unbacked)
                account.move(posted=extra_unbacked)
    charged = drawn + extra_grants + extra_unbacked
    written_off = amount - charged
    hold.captured_amount += charged
    if final:
        hold.state = "captured" if hold.captured_amount else "voided"
        hold.resolved_at_ms = now
    else:
        hold.amount += extra_grants + extra_unbacked
    hold.dirty = True
    kind = "capture" if hold.captured_amount or not final else "void"
    # _entry's row, inline: this is every settlement's entry.
    assert (mode, key) not in state.keys, f"idempotency key {key!r} written twice in one batch"
    state.keys[(mode, key)] = hashed
    state.entries.append((key, hashed, mode, customer_id, asset, kind, charged, 0, charged, -(drawn + released),
                          hold.id, f"written off {written_off}" if written_off else "", now, None))
    assert overdraw or account.available >= 0 or account.available >= before, "capture overspent"
    return charged, written_off


_DECIDE: dict[type, Any] = {ReserveOp: _reserve, ExtendOp: _extend, CaptureOp: _capture, SettleOp: _settle}

__all__ = ["decide", "operation_hash"]
