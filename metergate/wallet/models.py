"""Immutable values the wallet hands out: customers, keys, balances, holds, ledger entries, usage.

All amounts are integers in the asset's smallest unit (see :mod:`metergate.money`); all times are
integer milliseconds since the Unix epoch, so that SQLite and PostgreSQL compare them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["test", "live"]
HoldState = Literal["pending", "captured", "voided", "expired"]
EntryKind = Literal["credit", "hold", "capture", "void", "expire"]
UsageSource = Literal["provider", "estimated", "none"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Customer:
    mode: Mode
    id: str
    name: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    mode: Mode
    customer_id: str
    prefix: str
    created_at_ms: int
    revoked_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    """A wallet's position in one asset, TigerBeetle style.

    ``available = credits_posted + overdraft_limit - debits_posted - debits_pending``; a hold is
    refused when it would make ``available`` negative.
    """

    mode: Mode
    customer_id: str
    asset: str
    credits_posted: int
    debits_posted: int
    debits_pending: int
    overdraft_limit: int = 0

    @property
    def posted(self) -> int:
        """What the customer owns once every hold resolves to nothing."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.credits_posted + self.overdraft_limit - self.debits_posted - self.debits_pending


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    mode: Mode
    customer_id: str
    asset: str
    amount: int
    state: HoldState
    expires_at_ms: int
    created_at_ms: int
    captured_amount: int = 0


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One append-only mutation; the deltas add up to the wallet's balance columns."""

    seq: int
    idempotency_key: str
    mode: Mode
    customer_id: str
    asset: str
    kind: EntryKind
    amount: int
    credits_delta: int
    posted_delta: int
    pending_delta: int
    hold_id: str | None
    memo: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one metered request used, what it was charged, and what it cost the operator.

    ``price_amount`` is what the usage is worth under the price table; ``charged_amount`` is what
    the wallet paid; ``written_off_amount`` is the difference the wallet could not cover. The provider
    cost is in nano-dollars (:data:`metergate.money.COST_SCALE`), ``None`` when unknown.
    """

    id: str
    mode: Mode
    customer_id: str
    hold_id: str | None
    route: str
    endpoint: str
    model: str
    feature: str | None
    stream: bool
    status_code: int
    usage_source: UsageSource
    tokens_input: int
    tokens_cached_input: int
    tokens_output: int
    tokens_reasoning: int
    asset: str
    price_amount: int
    charged_amount: int = 0
    written_off_amount: int = 0
    cost_nanos: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created_at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of settling a hold: what was charged and what the wallet holds afterwards."""

    hold_id: str
    charged: int
    written_off: int
    balance: Balance
    replayed: bool = False
