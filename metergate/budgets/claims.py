"""Budget quota claims: what a process asks the store for, and what it gets back.

The same mechanism as the rate limits' quota leases (:mod:`metergate.wallet.quota`,
:mod:`metergate.proxy.leases`): a process claims a chunk of a limit's window in one round trip and admits
requests against it in memory (:mod:`metergate.budgets.leases`), giving back what it does not use. The store
applies :func:`metergate.wallet.quota.grant_one` to every limit of a claim atomically, all or none: the
window's claimed use plus the grant never exceeds the limit, so what every process admits never does.

A claim is counted in the bucket of the instant it is made (``now_ms``, from the claiming process's clock);
a rolling limit counts that bucket and the ones before it within its window
(:mod:`metergate.budgets.windows`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetClaim:
    """At least ``need`` and at most ``want`` of one limit's window, counted in the bucket of ``now``."""

    limit_id: str
    need: int
    want: int

    def __post_init__(self) -> None:
        assert 0 <= self.need <= self.want, "want must cover need"


@dataclass(frozen=True, slots=True)
class BudgetGrant:
    """What a claim took from one limit, in which bucket, and that limit as the store has it now.

    ``amount is None``: the limit no longer exists (deleted meanwhile): nothing was counted, nothing
    limits the request there, and the process reloads the tree."""

    limit_id: str
    bucket_start_ms: int
    granted: int
    used: int  # the window's claimed use after this grant, all processes
    amount: int | None
    version: int


@dataclass(frozen=True, slots=True)
class BudgetDenial:
    """A limit that cannot give a claim its ``need``: nothing of the claim was taken, from any limit."""

    limit_id: str
    node_id: str
    amount: int
    used: int  # the window's claimed use (leased by all processes, admitted or not)
    need: int
    retry_after_ms: int
