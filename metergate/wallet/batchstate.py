"""The batch engine's state: the rows one group commit loads (its holds, accounts, grants, allocations and the
ledger keys it names), held as mutable values the decisions move, and the rows the batch will write.

Why: a batch reads what it touches once and writes back one multi-row statement per table, so the state keeps,
beside each row's current values, what this batch moved (``d_*``) or created (``new``), which is exactly what
:mod:`metergate.wallet.batchsql` writes. The row layouts (``*_COLUMNS``) are the contract between the two: the
statements load and write in these orders. Deciding (:mod:`metergate.wallet.engine`) only reads and moves this
state; nothing here touches the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from metergate.wallet.batchops import CaptureOp, EngineOp, ExtendOp, ReserveOp
from metergate.wallet.execution import json_dumps
from metergate.wallet.grants import stale_from
from metergate.wallet.models import Balance, Hold, Mode, UsageRecord

AccountKey = tuple[str, str, str]  # (mode, customer_id, asset)
ALWAYS = -(2**62)  # a "stale from" that every ``now`` has passed


@dataclass(slots=True)
class GrantState:
    """A grant row; ``d_*`` is what this batch moved (written as one UPDATE per grant)."""

    id: str
    seq: int
    amount: int
    consumed: int
    held: int
    removed: int
    priority: int
    effective_at_ms: int
    expires_at_ms: int | None
    state: str
    d_held: int = 0
    d_consumed: int = 0
    d_removed: int = 0

    def move(self, held: int = 0, consumed: int = 0, removed: int = 0) -> None:
        self.held += held
        self.consumed += consumed
        self.removed += removed
        self.d_held += held
        self.d_consumed += consumed
        self.d_removed += removed


@dataclass(slots=True)
class AccountState:
    mode: Mode
    customer_id: str
    asset: str
    credits: int
    posted: int
    pending: int
    overdraft: int
    order: str
    grants: list[GrantState] = field(default_factory=list)  # the grants it may draw: open, or held by its holds
    grant_ids: set[str] = field(default_factory=set)
    d_credits: int = 0
    d_posted: int = 0
    d_pending: int = 0
    stale_from: int | None = None  # the first time one of ``grants`` is stale, worked out at the first decision

    @property
    def available(self) -> int:
        return self.credits + self.overdraft - self.posted - self.pending

    def stale_at(self, now: int) -> bool:
        """A grant's clock ran out since the aggregate was last brought up to date: the classic path refreshes
        it (one ``activate`` or ``lapse`` entry per grant) before anything else is decided on this account.
        Deciding never changes a grant's state or times, so the earliest such time is worked out once per
        batch (after its rows are loaded) and each decision compares ``now`` with it."""
        found = self.stale_from
        if found is None:
            found = self.stale_from = min((stale_from(g) for g in self.grants), default=-ALWAYS)
        return now >= found

    def move(self, credits: int = 0, posted: int = 0, pending: int = 0) -> None:
        self.credits += credits
        self.posted += posted
        self.pending += pending
        self.d_credits += credits
        self.d_posted += posted
        self.d_pending += pending

    def balance(self) -> Balance:
        return Balance(self.mode, self.customer_id, self.asset, self.credits, self.posted, self.pending,
                       self.overdraft)


@dataclass(slots=True)
class HoldState:
    id: str
    mode: Mode
    customer_id: str
    asset: str
    amount: int
    state: str
    captured_amount: int
    expires_at_ms: int
    created_at_ms: int
    resolved_at_ms: int | None = None
    new: bool = False  # created by this batch (INSERT), else changed (UPDATE) when ``dirty``
    dirty: bool = False
    hold_hash: str | None = None  # for a hold created by this batch: its ``hold:`` entry's request hash
    settle_hash: str | None = None  # for a hold settled by this batch: its ``settle:`` entry's request hash
    settle_amount: int = 0
    # As loaded: a write that does not lock first (PostgreSQL's) applies only if the row still has these.
    amount0: int = 0
    captured0: int = 0
    allocs_stale_from: int | None = None  # as ``AccountState.stale_from``, over the grants its allocations name

    def value(self) -> Hold:
        return Hold(self.id, self.mode, self.customer_id, self.asset, self.amount, self.state,  # type: ignore[arg-type]
                    self.expires_at_ms, self.created_at_ms, self.captured_amount)


@dataclass(slots=True)
class AllocState:
    grant_id: str
    held: int
    captured: int
    new: bool = False
    d_held: int = 0
    d_captured: int = 0

    def move(self, held: int = 0, captured: int = 0) -> None:
        self.held += held
        self.captured += captured
        self.d_held += held
        self.d_captured += captured


@dataclass(slots=True)
class BatchState:
    """Everything a batch reads, keyed for the decisions, and everything it writes."""

    holds: dict[str, HoldState] = field(default_factory=dict)
    accounts: dict[AccountKey, AccountState] = field(default_factory=dict)
    grants: dict[str, GrantState] = field(default_factory=dict)
    allocs: dict[str, dict[str, AllocState]] = field(default_factory=dict)  # hold id -> grant id -> allocation
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (mode, idempotency key) -> request hash
    entries: list[tuple[Any, ...]] = field(default_factory=list)  # ledger rows, in ENTRY_COLUMNS order
    usage: list[list[Any]] = field(default_factory=list)  # usage record rows, in USAGE_COLUMNS order
    # Whether the ledger keys the batch's extensions and captures write were read (``keys``). When they were not,
    # a refusal of one of them may be wrong: its key may say it is a replay of one applied before (say, an
    # extension of a hold settled since), whose first result is its answer. Such an operation goes to the
    # per-operation path, which reads its key first.
    keys_read: bool = True


ENTRY_COLUMNS = ("idempotency_key", "request_hash", "mode", "customer_id", "asset", "kind", "amount",
                 "credits_delta", "posted_delta", "pending_delta", "hold_id", "memo", "created_at_ms", "grant_id")
HOLD_COLUMNS = ("id", "mode", "customer_id", "asset", "amount", "state", "captured_amount", "expires_at_ms",
                "created_at_ms", "resolved_at_ms")
GRANT_COLUMNS = ("id", "seq", "amount", "consumed", "held", "removed", "priority", "effective_at_ms",
                 "expires_at_ms", "state")


# ------------------------------------------------------------------ what a batch must load


def hold_ids(ops: Sequence[EngineOp]) -> list[str]:
    return sorted({op.hold_id for op in ops})


def account_keys(ops: Sequence[EngineOp], holds: dict[str, HoldState]) -> list[AccountKey]:
    """The accounts the batch touches, sorted: one lock order for every batch and every replica."""
    keys: set[AccountKey] = set()
    for op in ops:
        if isinstance(op, ReserveOp):
            keys.add((op.mode, op.customer_id, op.asset))
        else:
            hold = holds.get(op.hold_id)
            if hold is not None:
                keys.add((hold.mode, hold.customer_id, hold.asset))
    return sorted(keys)


def extend_keys(ops: Sequence[EngineOp], holds: dict[str, HoldState]) -> list[tuple[str, str]]:
    """The (mode, idempotency key) pairs of the batch's extensions and captures, whose earlier use the batch
    must know."""
    return sorted({(holds[op.hold_id].mode, op.key) for op in ops
                   if isinstance(op, ExtendOp | CaptureOp) and op.hold_id in holds})


def add_grant(state: BatchState, row: Sequence[Any]) -> GrantState:
    """Register a grant row (``GRANT_COLUMNS`` order) once; the same grant seen twice is one object."""
    found = state.grants.get(row[0])
    if found is None:
        found = state.grants[row[0]] = GrantState(
            str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]), int(row[5]), int(row[6]),
            int(row[7]), None if row[8] is None else int(row[8]), str(row[9]))
    return found



USAGE_COLUMNS: tuple[str, ...] = tuple(UsageRecord.__dataclass_fields__)
_USAGE_GET = attrgetter(*USAGE_COLUMNS)
_CHARGED, _WRITTEN_OFF, _DETAIL = (USAGE_COLUMNS.index(c) for c in ("charged_amount", "written_off_amount", "detail"))


def usage_row(usage: UsageRecord, charged: int, written_off: int) -> list[Any]:
    """The usage record's row (``USAGE_COLUMNS`` order) as settled: what it was charged and what was written
    off, its detail as JSON text (the JSON columns' serialiser)."""
    row = list(_USAGE_GET(usage))
    row[_CHARGED], row[_WRITTEN_OFF] = charged, written_off
    row[_DETAIL] = json_dumps(row[_DETAIL]) if row[_DETAIL] else "{}"
    return row
