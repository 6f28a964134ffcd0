"""Holds for any workload (GPU jobs, batch jobs, agent tools): create, extend, capture (partial or final), void
and heartbeat, each one transaction that records its answer.

Idempotency. Every call carries a key (the ``Idempotency-Key`` header or the body's ``idempotency_key``; a
create may name its ``hold_id`` instead). The call's answer is stored in ``hold_requests`` under
``(mode, hold id + key)`` in the same transaction as its effect, with a hash of what was asked (the operation
and its parameters): a replay returns the stored answer byte for byte and changes nothing, the same key with
other content is refused with 409 ``idempotency_conflict``. A call that fails (402, 404, 409) records nothing,
so its retry is decided afresh. Underneath, the wallet's own idempotency keys (``hold:``, ``extend:``,
``capture:``, ``settle:``) still guard the money.

Heartbeats. A long job reports ``used``, the cumulative usage so far, and ``next``, how much it wants held
for the next interval. The heartbeat captures ``used - captured`` (so a lost or repeated heartbeat can never
bill twice: usage is cumulative), then holds up to ``next`` again: what the hold still holds is topped up
from the wallet by at most ``next - pending``, or by what the wallet has left. The answer's ``allowance`` is
how much more the job may use before its next heartbeat; when the wallet cannot cover any of it the answer
is ``{"action": "stop", "reason": "insufficient_funds", ...}``. A job that stops when told and never uses
more than its allowance leaves the wallet at exactly zero (or at its overdraft floor); what it used beyond
its allowance is captured as far as the wallet covers it and written off beyond that.
(``"partial": false`` asks for all of ``next`` or a stop.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from metergate.ids import time_ordered_hex
from metergate.wallet import grants as gr
from metergate.wallet import schema as t
from metergate.wallet.errors import (
    CaptureBelowCaptured,
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientFunds,
)
from metergate.wallet.holdops import capture_in, extend_in, reserve_in, touch_in
from metergate.wallet.ledger import (
    SELECT_HOLD_LOCKED,
    balance_of,
    entry_row,
    hold_of,
    hold_row,
    request_hash,
)
from metergate.wallet.models import Balance, Hold, HoldState, Mode, now_ms
from metergate.wallet.sql import SqlWalletStore

Answer = dict[str, Any]


class HoldView(TypedDict):
    """A hold as the hold API shows it: amounts in the asset's smallest unit; ``pending`` is what it still
    reserves (0 once it is resolved)."""

    id: str
    customer_id: str
    asset: str
    amount: int
    captured: int
    pending: int
    state: HoldState
    expires_at_ms: int
    created_at_ms: int


class HoldBalanceView(TypedDict):
    """The wallet's balance in the hold's asset after the call, in the smallest unit."""

    asset: str
    available: int
    pending: int
    credits_posted: int
    debits_posted: int


def hold_view(hold: Hold) -> HoldView:
    return HoldView(id=hold.id, customer_id=hold.customer_id, asset=hold.asset, amount=hold.amount,
                    captured=hold.captured_amount, pending=hold.pending, state=hold.state,
                    expires_at_ms=hold.expires_at_ms, created_at_ms=hold.created_at_ms)


def balance_view(b: Balance) -> HoldBalanceView:
    return HoldBalanceView(asset=b.asset, available=b.available, pending=b.debits_pending,
                           credits_posted=b.credits_posted, debits_posted=b.debits_posted)


def new_hold_id(mode: Mode, key: str | None) -> str:
    """A hold id: derived from the idempotency key (so that a retried create names the same hold), else new and
    time-ordered (:mod:`metergate.ids`: the holds' primary key is a B-tree)."""
    if key is None:
        return "hd_" + time_ordered_hex()
    return "hd_" + request_hash("hold-key", mode, key)[:32]


class HoldService:
    def __init__(self, store: SqlWalletStore) -> None:
        self._store = store

    async def _call(self, mode: Mode, hold_id: str, key: str, hashed: str,
                    fn: Callable[[Connection, int], Answer]) -> Answer:
        record_key = f"{hold_id}:{key}"
        r = t.hold_requests.c

        def recorded(conn: Connection) -> Answer | None:
            row = conn.execute(select(r.request_hash, r.response).where(r.mode == mode, r.key == record_key)).first()
            if row is None:
                return None
            if row.request_hash != hashed:
                raise IdempotencyConflict(key)
            answer: Answer = dict(row.response)
            return answer

        def op(conn: Connection) -> Answer:
            found = recorded(conn)
            if found is not None:
                return found
            answer = fn(conn, now_ms())
            conn.execute(insert(t.hold_requests).values(mode=mode, key=record_key, hold_id=hold_id,
                                                        request_hash=hashed, response=answer,
                                                        created_at_ms=now_ms()))
            return answer

        try:
            return await self._store.write(op)
        except IntegrityError:  # the same call, concurrently: its twin committed first
            found = await self._store.read(recorded)
            if found is None:
                raise
            return found

    @staticmethod
    def _locked(conn: Connection, mode: Mode, hold_id: str) -> Hold:
        row = SELECT_HOLD_LOCKED.first(conn, {"b_hold": hold_id})
        if row is None or row.mode != mode:
            raise HoldNotFound(hold_id)
        return hold_of(row)

    # ------------------------------------------------------------------ operations

    async def create(self, mode: Mode, *, hold_id: str, key: str, customer_id: str, asset: str, amount: int,
                     ttl_ms: int) -> Answer:
        hashed = request_hash("create", customer_id, asset, amount, ttl_ms)

        def fn(conn: Connection, now: int) -> Answer:
            SqlWalletStore.require_customer(conn, mode, customer_id)
            existing = hold_row(conn, hold_id)
            if existing is not None:  # created by another key: the same hold, or a conflict
                entry = entry_row(conn, existing.mode, f"hold:{hold_id}")
                if (existing.mode != mode or entry is None
                        or entry.request_hash != request_hash("hold", customer_id, asset, amount)):
                    raise IdempotencyConflict(key)
                return {"hold": hold_view(hold_of(existing)),
                        "balance": balance_view(balance_of(conn, mode, customer_id, asset))}
            placed = reserve_in(conn, mode=mode, customer_id=customer_id, asset=asset, amount=amount,
                                hold_id=hold_id, ttl_ms=ttl_ms, now=now, overdraw=False)
            if placed is None:
                balance = balance_of(conn, mode, customer_id, asset)
                raise InsufficientFunds(asset=asset, available=balance.available, required=amount)
            hold, balance = placed
            return {"hold": hold_view(hold), "balance": balance_view(balance)}

        return await self._call(mode, hold_id, key, hashed, fn)

    async def extend(self, mode: Mode, hold_id: str, *, key: str, amount: int, ttl_ms: int) -> Answer:
        hashed = request_hash("extend", amount, ttl_ms)

        def fn(conn: Connection, now: int) -> Answer:
            hold = self._locked(conn, mode, hold_id)
            if hold.state != "pending":
                raise HoldNotPending(hold_id, hold.state)
            extended = extend_in(conn, hold, amount, key=f"extend:{hold_id}:{key}", ttl_ms=ttl_ms, now=now,
                                 overdraw=False)
            if extended is None:
                balance = balance_of(conn, mode, hold.customer_id, hold.asset)
                raise InsufficientFunds(asset=hold.asset, available=balance.available, required=amount)
            return {"hold": hold_view(extended), "extended": amount,
                    "balance": balance_view(balance_of(conn, mode, hold.customer_id, hold.asset))}

        return await self._call(mode, hold_id, key, hashed, fn)

    async def capture(self, mode: Mode, hold_id: str, *, key: str, amount: int, final: bool) -> Answer:
        """Capture ``amount`` more; ``final`` resolves the hold and releases the rest (a void is a final capture of
        nothing more)."""
        hashed = request_hash("capture", amount, final)

        def fn(conn: Connection, now: int) -> Answer:
            hold = self._locked(conn, mode, hold_id)
            if hold.state in ("captured", "voided") or (hold.state == "expired" and not final):
                raise HoldNotPending(hold_id, hold.state)
            if final:
                total = hold.captured_amount + amount
                done = capture_in(conn, hold, amount, key=f"settle:{hold_id}", hashed=request_hash("settle", total),
                                  final=True, now=now, overdraw=False)
            else:
                done = capture_in(conn, hold, amount, key=f"capture:{hold_id}:{key}",
                                  hashed=request_hash("capture", amount), final=False, now=now, overdraw=False)
            return {"hold": hold_view(done.hold), "charged": done.charged, "written_off": done.written_off,
                    "balance": balance_view(done.balance)}

        return await self._call(mode, hold_id, key, hashed, fn)

    async def void(self, mode: Mode, hold_id: str, *, key: str) -> Answer:
        return await self.capture(mode, hold_id, key=key, amount=0, final=True)

    async def heartbeat(self, mode: Mode, hold_id: str, *, key: str, used: int, next_amount: int, ttl_ms: int,
                        partial: bool = True) -> Answer:
        hashed = request_hash("heartbeat", used, next_amount, ttl_ms, partial)

        def fn(conn: Connection, now: int) -> Answer:
            hold = self._locked(conn, mode, hold_id)
            if hold.state != "pending":
                return {"action": "stop", "reason": "hold_not_pending", "allowance": 0, "charged": 0,
                        "written_off": 0, "hold": hold_view(hold),
                        "balance": balance_view(balance_of(conn, mode, hold.customer_id, hold.asset))}
            if used < hold.captured_amount:
                raise CaptureBelowCaptured(hold_id, hold.captured_amount, used)
            charged = written_off = 0
            if used > hold.captured_amount:
                delta = used - hold.captured_amount
                done = capture_in(conn, hold, delta, key=f"capture:{hold_id}:{key}",
                                  hashed=request_hash("capture", delta), final=False, now=now, overdraw=False)
                hold, charged, written_off = done.hold, done.charged, done.written_off
            want = next_amount - hold.pending
            if want > 0:
                extended = extend_in(conn, hold, want, key=f"extend:{hold_id}:{key}", ttl_ms=ttl_ms, now=now,
                                     overdraw=False)
                if extended is None and partial:
                    left = balance_of(conn, mode, hold.customer_id, hold.asset).available
                    if 0 < left < want:
                        extended = extend_in(conn, hold, left, key=f"extend:{hold_id}:{key}", ttl_ms=ttl_ms,
                                             now=now, overdraw=False)
                hold = extended or touch_in(conn, hold, ttl_ms=ttl_ms, now=now)
            else:
                hold = touch_in(conn, hold, ttl_ms=ttl_ms, now=now)
            stop = hold.pending == 0 or (not partial and hold.pending < next_amount)
            return {"action": "stop" if stop else "continue", "reason": "insufficient_funds" if stop else None,
                    "allowance": 0 if stop else hold.pending, "charged": charged, "written_off": written_off,
                    "hold": hold_view(hold),
                    "balance": balance_view(balance_of(conn, mode, hold.customer_id, hold.asset))}

        return await self._call(mode, hold_id, key, hashed, fn)

    async def get(self, mode: Mode, hold_id: str) -> Answer:
        def fn(conn: Connection) -> Answer:
            row = hold_row(conn, hold_id)
            if row is None or row.mode != mode:
                raise HoldNotFound(hold_id)
            hold = hold_of(row)
            allocations = [{"grant_id": a.grant_id or None, "held": int(a.a_held), "captured": int(a.a_captured)}
                           for a in gr.allocations(conn, hold_id)]
            return {"hold": hold_view(hold), "allocations": allocations}

        return await self._store.read(fn)


__all__ = ["HoldService", "balance_view", "hold_view", "new_hold_id"]
