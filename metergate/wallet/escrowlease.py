"""One escrow lease (:mod:`metergate.wallet.escrow`): a durable hold on a hot wallet that this process owns,
what it counts of it, and the changes it makes to it in the shared store besides top-ups — shrinking it in
place and giving it back.

The count is this process's view of the hold and errs one way only: ``amount`` is never more than the hold
holds, and ``captured`` never less than it captured (a capture in flight counts, a shrink counts when sent).
Admission against ``free`` can then refuse a request the hold could have covered, never admit one it cannot.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from metergate.wallet.errors import CaptureBelowCaptured, HoldNotFound, HoldNotPending
from metergate.wallet.models import Balance, Capture, Hold, Mode, Settlement, UsageRecord

log = logging.getLogger(__name__)

AccountKey = tuple[Mode, str, str]  # (mode, customer_id, asset)


class LeaseBackend(Protocol):
    """What a lease needs of the durable store (:class:`metergate.wallet.sql.SqlWalletStore`)."""

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]: ...
    async def extend_hold(self, hold_id: str, amount: int, *, step: int, ttl_ms: int) -> Hold: ...
    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement: ...
    def capture_usage(self, hold_id: str, amount: int, *, key: str, usage: UsageRecord | None,
                      held: int | None = None) -> Awaitable[Capture]: ...
    async def touch_hold(self, hold_id: str, *, ttl_ms: int) -> Hold: ...
    async def shrink_hold(self, hold_id: str, amount: int, *, step: int | str) -> tuple[Hold, int]: ...
    async def get_hold(self, hold_id: str) -> Hold | None: ...
    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance: ...
    async def recall_leases(self, mode: Mode, customer_id: str, asset: str, *, owner: str, at_ms: int) -> int: ...
    async def lease_recalls(self, keys: list[AccountKey]) -> dict[AccountKey, int]: ...


@dataclass(slots=True)
class Lease:
    key: AccountKey
    hold_id: str
    # What the durable hold holds in all, as this process counts it: grown by top-ups and by captures beyond it,
    # less what shrinks gave back (counted when sent). Moved by deltas, never set from an answer: answers come
    # in any order, and with shrinks the hold's amount goes down as well as up.
    amount: int
    expires_at_ms: int
    taken_at_ms: int
    captured: int = 0  # captured from it, committed or in flight
    local: int = 0  # held by the requests admitted against it and not yet settled
    inflight: int = 0  # captures submitted and not yet answered
    steps: itertools.count[int] = field(default_factory=lambda: itertools.count(1))  # extensions' and shrinks'
    last_grant: int = 0
    used_at: float = field(default_factory=time.monotonic)
    retiring: bool = False  # admits nothing more; returned once its requests have settled
    growing: bool = False
    shrinking: bool = False
    unshrunk: tuple[int, int] | None = None  # a shrink sent and not answered: (step, amount), sent again as is
    unit: int = 0  # the last request admitted against it: the size its target is counted in
    dead: bool = False  # its hold expired: the requests admitted against it are charged to the wallet directly

    @property
    def free(self) -> int:
        return self.amount - self.captured - self.local

    def admits(self, amount: int, now: int, margin_ms: int) -> bool:
        return not (self.retiring or self.dead) and self.free >= amount and now < self.expires_at_ms - margin_ms

    async def shrink(self, store: LeaseBackend, keep: int) -> bool:
        """Give back what the lease holds free beyond ``keep`` (one store operation); what its requests in flight
        hold (``local``) and its captures in flight take (``captured``) are never part of it. Counted before it
        is sent, so that nothing admitted meanwhile counts on those funds. A shrink whose answer was lost stays
        counted and is sent again, with the same step, the next time (:attr:`unshrunk`): the store answers a
        retry with the first result, so nothing is given back twice; until then the lease counts less than its
        hold holds, which can refuse a request but never overspend. True if a shrink was answered."""
        if self.dead or self.shrinking:
            return False
        if self.unshrunk is None:
            n = self.free - keep
            if n <= 0:
                return False
            self.amount -= n
            self.unshrunk = (next(self.steps), n)
        step, n = self.unshrunk
        self.shrinking = True
        try:
            await store.shrink_hold(self.hold_id, n, step=step)
        except (HoldNotFound, HoldNotPending):
            pass  # it ran out meanwhile: it holds nothing to give back
        finally:
            self.shrinking = False
        self.unshrunk = None
        return True

    async def give_back(self, store: LeaseBackend) -> None:
        """Resolve the lease's hold at what its settlements captured, releasing the rest to the wallet."""
        try:
            await store.settle(self.hold_id, self.captured)
        except CaptureBelowCaptured:
            hold = await store.get_hold(self.hold_id)  # this process lost count (it never should)
            if hold is not None and hold.state == "pending":
                log.error("escrow: lease %s captured %d, counted %d", self.hold_id, hold.captured_amount,
                          self.captured)
                await store.settle(self.hold_id, hold.captured_amount)
        except (HoldNotFound, HoldNotPending):
            pass


@dataclass(slots=True)
class LocalHold:
    """A request's hold, admitted against a lease in memory."""

    lease: Lease
    hold: Hold
    reserved: int  # what the reserve asked for (the hold grows by extensions)
    steps: set[int | str] | None = None  # the extension steps applied (most requests have none)


__all__ = ["AccountKey", "Lease", "LeaseBackend", "LocalHold"]
