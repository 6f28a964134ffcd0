"""How escrow leases (:mod:`metergate.wallet.escrow`) are sized: the policy, the spend rate a lease is sized
from, and the one sizing rule that taking, topping up and shrinking a lease all use.

Why one rule: a lease is grown when its free part runs low and shrunk when its free part is well above what the
rule asks for now. If growing and shrinking sized differently, a lease could be topped up and shrunk back in
turn, a round trip to the shared store each time; with one target and a wide band between the two triggers (a
top-up below half of it, a shrink only above ``shrink_factor`` times it) a steady spend rate leaves a lease
alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EscrowPolicy:
    """How leases are sized and kept (the ``escrow`` settings)."""

    horizon_s: float = 1.0  # a lease covers about this long of its wallet's spend through this process
    share: int = 16  # a lease is at most 1/share of what the wallet has available when it is taken or grown
    min_requests: int = 8  # a lease that would cover fewer requests like the one asking is not worth taking
    hot_per_s: int = 20  # a wallet is leased once this process sees this many reserves on it in a second
    ttl_s: float = 30.0  # a lease's TTL, renewed by the heartbeat: how long a crashed process's lease lives
    idle_s: float = 2.0  # a lease unused this long is returned
    tick_s: float = 0.25  # the heartbeat: renewals, returns, recalls, shrinks
    recall_wait_s: float = 2.0  # how long a refused request waits for recalled leases to come back
    cooldown_s: float = 5.0  # after a recall or a refused lease, the wallet is served without a lease this long
    shrink_factor: int = 4  # a lease whose free part is more than this many times its target is shrunk to it


@dataclass(slots=True)
class Heat:
    """Reserves seen on one wallet by this process, per whole second: the spend rate leases are sized from."""

    second: int = 0
    count: int = 0
    last: int = 0  # the count of the previous whole second

    def seen(self, second: int) -> None:
        """Count one reserve in ``second`` (every leased request's: the usual case, the same second, is one
        comparison)."""
        if self.second != second:
            self.roll(second)
        self.count += 1

    def roll(self, second: int) -> None:
        if self.second != second:
            self.last = self.count if self.second == second - 1 else 0
            self.second, self.count = second, 0

    def rate(self) -> int:
        """Reserves a second, as of the last one counted (the current second's count, or the last whole
        second's if higher)."""
        return max(self.last, self.count)


def target(policy: EscrowPolicy, *, unit: int, rate: int, waiting: int, available: int) -> int:
    """The size a lease should have free: about ``horizon_s`` of spend at ``rate`` requests of ``unit`` a second,
    at least ``min_requests`` of them and at least the ``waiting`` ones, and at most ``1/share`` of what the
    wallet has ``available`` (outside leases), so that no lease takes what other replicas' requests need."""
    want = max(unit * policy.min_requests, int(rate * unit * policy.horizon_s), unit * waiting)
    return min(want, available // policy.share)


def worth_leasing(policy: EscrowPolicy, size: int, unit: int) -> bool:
    """A lease covering fewer than ``min_requests`` requests is not worth its round trips: the wallet is small
    for its traffic, and is served hold by hold from the shared store."""
    return size >= unit * policy.min_requests


def excess(policy: EscrowPolicy, free: int, size: int) -> int:
    """What a lease with ``free`` unused whose target is ``size`` should release now: all above ``size`` once
    ``free`` is more than ``shrink_factor`` times it, else nothing (a lease a little above its target is left
    alone: shrinking costs a round trip, and the next top-up would bring it back)."""
    return free - size if free > policy.shrink_factor * size else 0


__all__ = ["EscrowPolicy", "Heat", "excess", "target", "worth_leasing"]
