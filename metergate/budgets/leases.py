"""Budget leases: the part of a limit's current bucket this process has claimed and admits against locally.

The rate limits' lease rules (:mod:`metergate.proxy.leases`), applied to one counter per limit: a process
claims a chunk of a limit's window (:mod:`metergate.budgets.claims`) and admits requests from it without a
round trip until it is spent; a chunk is what the request lacks topped up to at most
:func:`metergate.proxy.leases.lease_cap` (1/16 of the limit) unused, doubling while claims come within
``HORIZON_MS`` of each other and shrinking when they do not. A lease belongs to one bucket of its window and
one version of its limit: when either changes, what is left of it is given back to the store, not kept.

Bounds, per limit and bucket: never over the limit (a process admits only what it leased, and the store never
leases past the limit); refused early by at most the other processes' unused leases, each under 1/16 of the
limit; a refusal the store gave is remembered for ``KNOWN_TTL_MS``, so a client hammering a spent budget
costs the store about one call per second per limit, not one per request.

Pure bookkeeping: no I/O, times are passed in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from metergate.budgets.claims import BudgetClaim, BudgetDenial
from metergate.budgets.model import Limit
from metergate.proxy.leases import HORIZON_MS, KNOWN_TTL_MS, lease_cap
from metergate.wallet.models import Mode

_MAX_SCALE = 1 << 30
_MAX_LEASES = 100_000


@dataclass(slots=True)
class BudgetLease:
    mode: Mode
    customer_id: str
    limit_id: str
    version: int = 0
    amount: int = 0  # the limit, as this process knows it
    bucket_start_ms: int = -1
    left: int = 0  # leased and not yet admitted
    denial: BudgetDenial | None = None  # the store's last refusal, and when it was given
    denied_at_ms: int = 0
    scale: int = 1
    last_claim_ms: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class BudgetLeaseBook:
    """Every budget lease of this process, by (mode, customer, limit), and what is to be given back."""

    def __init__(self) -> None:
        self._leases: dict[tuple[Mode, str, str], BudgetLease] = {}
        #: (mode, customer) -> (limit id, bucket start, amount) to give back to the store.
        self.returns: dict[tuple[Mode, str], list[tuple[str, int, int]]] = {}

    def lease(self, limit: Limit, bucket_start_ms: int) -> BudgetLease:
        """The limit's lease for this bucket and version; what an older one had left is queued for return."""
        key = (limit.mode, limit.customer_id, limit.id)
        lease = self._leases.get(key)
        if lease is None:
            if len(self._leases) >= _MAX_LEASES:
                self.prune(bucket_start_ms)
            lease = self._leases[key] = BudgetLease(limit.mode, limit.customer_id, limit.id)
        if lease.bucket_start_ms != bucket_start_ms or lease.version < limit.version:
            # A new bucket, or a newer version of the limit (a request resolved on an older tree uses the
            # lease as it is: versions only go up).
            if lease.left:
                self.give_back(lease, lease.bucket_start_ms, lease.left)
            lease.bucket_start_ms = bucket_start_ms
            if limit.version >= lease.version:
                lease.version, lease.amount = limit.version, limit.amount
            lease.left = 0
            lease.denial = None
        return lease

    def find(self, limit: Limit) -> BudgetLease | None:
        return self._leases.get((limit.mode, limit.customer_id, limit.id))

    def give_back(self, lease: BudgetLease, bucket_start_ms: int, amount: int) -> None:
        """Queue ``amount`` claimed in ``bucket_start_ms`` and not used for return to the store."""
        if amount <= 0:
            return
        self.returns.setdefault((lease.mode, lease.customer_id), []).append((lease.limit_id, bucket_start_ms, amount))

    def take_returns(self) -> dict[tuple[Mode, str], list[tuple[str, int, int]]]:
        out, self.returns = self.returns, {}
        return out

    @staticmethod
    def known_denial(lease: BudgetLease, need: int, now_ms: int) -> BudgetDenial | None:
        """A refusal this process can give without asking the store: the request alone exceeds the limit,
        or the store refused this much less than ``KNOWN_TTL_MS`` ago."""
        if need > lease.amount:
            return BudgetDenial(lease.limit_id, "", lease.amount, 0, need, 0)
        denial = lease.denial
        if denial is None or now_ms - lease.denied_at_ms >= KNOWN_TTL_MS:
            return None
        if denial.used + (need - lease.left) > lease.amount:
            retry = max(1, denial.retry_after_ms - (now_ms - lease.denied_at_ms))
            return BudgetDenial(denial.limit_id, denial.node_id, denial.amount, denial.used, need, retry)
        return None

    @staticmethod
    def claim(lease: BudgetLease, need: int, now_ms: int) -> BudgetClaim:
        """What to ask the store for: what the request lacks, topped up by a chunk within the lease cap."""
        if lease.last_claim_ms is not None:
            elapsed = now_ms - lease.last_claim_ms
            if elapsed < HORIZON_MS:
                lease.scale = min(_MAX_SCALE, lease.scale * 2)
            else:
                lease.scale = max(1, lease.scale >> min(30, elapsed // HORIZON_MS - 1))
        lease.last_claim_ms = now_ms
        lacking = max(0, need - lease.left)
        want = max(lacking, min(lease.scale * need, lease_cap(lease.amount) - lease.left))
        return BudgetClaim(lease.limit_id, lacking, want)

    def prune(self, bucket_start_ms: int) -> None:
        """Forget idle leases with nothing left (never one being claimed)."""
        stale = [key for key, lease in self._leases.items()
                 if not lease.left and not lease.lock.locked() and lease.bucket_start_ms < bucket_start_ms]
        for key in stale:
            del self._leases[key]

    def unused(self) -> list[BudgetLease]:
        return [lease for lease in self._leases.values() if lease.left]

    def __len__(self) -> int:
        return len(self._leases)
