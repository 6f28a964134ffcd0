"""Immutable values the wallet hands out: customers, keys, balances, holds, ledger entries, usage.

All amounts are integers in the asset's smallest unit (see :mod:`metergate.money`); all times are
integer milliseconds since the Unix epoch, so that SQLite and PostgreSQL compare them alike.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["test", "live"]
HoldState = Literal["pending", "captured", "voided", "expired"]
# activate: a scheduled grant became effective; lapse: a grant's unused remainder expired; revoke: it was voided.
EntryKind = Literal["credit", "hold", "extend", "shrink", "capture", "void", "expire", "activate", "lapse", "revoke"]
GrantPurpose = Literal["paid", "promotional", "trial", "entitlement", "adjustment"]
GrantState = Literal["scheduled", "active", "expired", "voided"]
UsageSource = Literal["provider", "estimated", "measured", "none"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The usage record's strings that requests and upstreams fill, and their columns' sizes in wallet.schema.
USAGE_TEXT_CHARS = {"route": 128, "endpoint": 64, "model": 128, "feature": 128}


def stored_text(text: str, limit: int) -> str:
    """``text`` as a record stores it: without control characters, at most ``limit`` characters."""
    if len(text) <= limit and text.isprintable():  # no control character (every one is unprintable): as it is
        return text
    return _CONTROL.sub("", text)[:limit]


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
    # Pricing attributes of the key's requests (e.g. {"feature": "search"}), set only through the admin API.
    attributes: dict[str, str] = field(default_factory=dict)


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

    @property
    def pending(self) -> int:
        """What the hold still reserves: its amount less what was captured from it, while it is open."""
        return self.amount - self.captured_amount if self.state == "pending" else 0


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
    grant_id: str | None = None


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
    tokens_cache_write: int = 0
    cost_nanos: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created_at_ms: int = field(default_factory=now_ms)
    budget_path: str | None = None  # the budget nodes it was charged along, "root/project/agent"

    def __post_init__(self) -> None:
        # Whatever a request or an upstream put in these strings, a record stores them sanitized and bounded
        # (a 20 MB model name once reached the reports).
        for name, limit in USAGE_TEXT_CHARS.items():
            value = getattr(self, name)
            # A short printable non-empty string is stored as it is (the usual case: nothing to set).
            if value is not None and not (0 < len(value) <= limit and value.isprintable()):
                object.__setattr__(self, name, stored_text(value, limit) or (None if name == "feature" else ""))


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of settling a hold: what was charged and what the wallet holds afterwards."""

    hold_id: str
    charged: int
    written_off: int
    balance: Balance
    replayed: bool = False


# Reporting and rate limits.

UsageGrouping = Literal["customer", "feature", "model", "day", "total", "budget_node"]


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    """Sums over the usage records of one group in one asset, as stored: nothing converted, nothing rounded.

    ``key`` is the customer id, the feature (``""`` for none), the model, the UTC day number (days since
    the Unix epoch, as a string) or ``""`` for the overall total. Amounts are in the asset's smallest unit
    except ``cost_nanos``. A record whose cost is unknown adds to ``cost_unknown_count`` (or, when it had
    no usage at all, ``no_usage_count``) and to ``unmargined_charged``, never to ``costed_charged``.
    """

    key: str
    asset: str
    requests: int
    price_amount: int
    charged_amount: int
    written_off_amount: int
    costed_charged: int  # charged over the records whose cost is known
    cost_nanos: int  # summed over the records whose cost is known
    cost_unknown_count: int
    no_usage_count: int
    unmargined_charged: int  # charged over the records whose cost is unknown


@dataclass(frozen=True, slots=True)
class RateLimitOverride:
    """A customer's own limits, replacing the configured defaults; ``None`` lifts that limit."""

    mode: Mode
    customer_id: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class RateLimitCharge:
    """One counter to charge at admission: a subject (``customer:<id>`` or ``key:<id>``) and its limits."""

    subject: str
    requests_per_minute: int | None
    tokens_per_minute: int | None


@dataclass(frozen=True, slots=True)
class RateLimitDenial:
    """Which limit refused a request, and what the window had counted before it."""

    subject: str
    dimension: Literal["requests", "tokens"]
    limit: int
    used: int
    window_start_ms: int


# Grants, assets and subscriptions.


@dataclass(frozen=True, slots=True)
class Grant:
    """One credit and what became of it; ``free = amount - consumed - held - removed`` is spendable while the
    grant is active, effective and unexpired (see :mod:`metergate.wallet.grants`)."""

    id: str
    mode: Mode
    customer_id: str
    asset: str
    purpose: GrantPurpose
    amount: int
    consumed: int
    held: int
    removed: int
    priority: int
    effective_at_ms: int
    expires_at_ms: int | None
    state: GrantState
    source: str
    memo: str
    created_at_ms: int

    @property
    def free(self) -> int:
        return self.amount - self.consumed - self.held - self.removed


@dataclass(frozen=True, slots=True)
class Allocation:
    """The part of a hold one grant covers (``grant_id == ""``: an overdraft or an overdraw covers it)."""

    hold_id: str
    grant_id: str
    held: int
    captured: int


@dataclass(frozen=True, slots=True)
class Capture:
    """The outcome of one capture against a hold: ``charged`` now (and in all, ``captured_total``),
    ``written_off`` what the wallet could not cover of what was asked."""

    hold: Hold
    charged: int
    written_off: int
    balance: Balance
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Asset:
    mode: Mode
    code: str
    name: str
    scale: int
    value_per_unit: str | None  # a Decimal string, fiat per major unit, for margin reporting
    value_currency: str | None
    configured: bool = False  # from settings.assets (always present, not editable through the API)


@dataclass(frozen=True, slots=True)
class Conversion:
    mode: Mode
    from_asset: str
    to_asset: str
    rate: str  # Decimal string: major units of to_asset per major unit of from_asset
    purpose: GrantPurpose


@dataclass(frozen=True, slots=True)
class Entitlement:
    asset: str
    amount: int
    rollover_cap: int | None = None  # None: the unused allowance lapses at period end
    priority: int = 100


@dataclass(frozen=True, slots=True)
class Plan:
    mode: Mode
    id: str
    name: str
    period: Literal["month", "week", "days"]
    period_days: int | None
    entitlements: tuple[Entitlement, ...]
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class Subscription:
    mode: Mode
    id: str
    customer_id: str
    plan_id: str
    anchor_ms: int
    next_period: int
    state: Literal["active", "canceled"]
    canceled_at_ms: int | None
    created_at_ms: int
