"""Typed, immutable views of the admin API's answers.

Money is exact: a ``Decimal`` in the asset's major unit wherever the server gives a decimal string (or the
client knows the asset's scale), and the integer in the smallest unit beside it (``*_minor``). Nothing is a
float. ``raw`` keeps the whole answer for fields a model does not name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Json = dict[str, Any]


def to_major(minor: int, scale: int) -> Decimal:
    """An integer in the smallest unit as an exact Decimal in the major unit (``1500000``, 6 -> ``1.500000``)."""
    return Decimal(minor).scaleb(-scale) if scale else Decimal(minor)


def scale_of(decimal_text: str) -> int:
    """The scale a server-formatted decimal string shows (the server always prints all of the asset's places)."""
    return len(decimal_text.partition(".")[2])


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Balance:
    asset: str
    available: Decimal
    available_minor: int
    pending_minor: int
    raw: Json = field(repr=False)

    @property
    def pending(self) -> Decimal:
        return to_major(self.pending_minor, scale_of(self.raw.get("available_decimal", "")))

    @classmethod
    def of(cls, j: Json) -> Balance:
        return cls(j["asset"], Decimal(j["available_decimal"]), int(j["available"]), int(j["pending"]), j)


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    name: str
    mode: str
    created_at_ms: int
    balances: list[Balance]
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Customer:
        return cls(j["id"], j.get("name", ""), j["mode"], int(j["created_at_ms"]),
                   [Balance.of(b) for b in j.get("balances", [])], j)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    customer_id: str
    prefix: str
    created_at_ms: int
    revoked_at_ms: int | None
    secret: str | None  # only when just issued: the server shows it once
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> ApiKey:
        return cls(j["id"], j["customer_id"], j["prefix"], int(j["created_at_ms"]), j.get("revoked_at_ms"),
                   j.get("key"), j)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: int
    kind: str
    asset: str
    amount: Decimal
    amount_minor: int
    hold_id: str | None
    grant_id: str | None
    memo: str
    idempotency_key: str
    created_at_ms: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> LedgerEntry:
        return cls(int(j["seq"]), j["kind"], j["asset"], Decimal(j["amount_decimal"]), int(j["amount"]),
                   j.get("hold_id"), j.get("grant_id"), j.get("memo", ""), j["idempotency_key"],
                   int(j["created_at_ms"]), j)


@dataclass(frozen=True, slots=True)
class Credit:
    entry: LedgerEntry
    balance: Balance

    @classmethod
    def of(cls, j: Json) -> Credit:
        return cls(LedgerEntry.of(j["entry"]), Balance.of(j["balance"]))


@dataclass(frozen=True, slots=True)
class UsageRecord:
    id: str
    customer_id: str
    route: str
    model: str
    asset: str
    charged: Decimal
    charged_minor: int
    price_minor: int
    written_off_minor: int
    tokens_input: int
    tokens_output: int
    cost_nanos: int | None
    created_at_ms: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> UsageRecord:
        return cls(j["id"], j["customer_id"], j["route"], j["model"], j["asset"], Decimal(j["charged_decimal"]),
                   int(j["charged_amount"]), int(j["price_amount"]), int(j.get("written_off_amount", 0)),
                   int(j.get("tokens_input", 0)), int(j.get("tokens_output", 0)), j.get("cost_nanos"),
                   int(j["created_at_ms"]), j)


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    customer_id: str
    asset: str
    purpose: str
    state: str
    amount: Decimal
    free: Decimal
    priority: int
    effective_at_ms: int
    expires_at_ms: int | None
    memo: str
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Grant:
        return cls(j["id"], j["customer_id"], j["asset"], j["purpose"], j["state"], Decimal(j["amount_decimal"]),
                   Decimal(j["free_decimal"]), int(j["priority"]), int(j["effective_at_ms"]), j.get("expires_at_ms"),
                   j.get("memo", ""), j)


@dataclass(frozen=True, slots=True)
class Asset:
    code: str
    name: str
    scale: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Asset:
        return cls(j["code"], j.get("name", ""), int(j["scale"]), j)


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold's amounts are the server's integers in the smallest unit (the hold API shows no decimals)."""

    id: str
    customer_id: str
    asset: str
    state: str
    amount_minor: int
    captured_minor: int
    pending_minor: int
    expires_at_ms: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Hold:
        h = j.get("hold", j)
        return cls(h["id"], h["customer_id"], h["asset"], h["state"], int(h["amount"]), int(h["captured"]),
                   int(h["pending"]), int(h["expires_at_ms"]), j)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat's answer: ``stop`` when the wallet cannot cover any more (``allowance`` is then 0)."""

    action: str
    reason: str | None
    allowance_minor: int
    charged_minor: int
    written_off_minor: int
    hold: Hold
    raw: Json = field(repr=False)

    @property
    def stop(self) -> bool:
        return self.action == "stop"

    @classmethod
    def of(cls, j: Json) -> Heartbeat:
        return cls(j["action"], j.get("reason"), int(j["allowance"]), int(j["charged"]), int(j["written_off"]),
                   Hold.of(j), j)


@dataclass(frozen=True, slots=True)
class Link:
    url: str
    expires_in_s: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Link:
        return cls(j["url"], int(j["expires_in_s"]), j)


@dataclass(frozen=True, slots=True)
class Quote:
    customer_id: str
    asset: str
    amount: Decimal
    amount_minor: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Quote:
        return cls(j["customer_id"], j["asset"], Decimal(j["amount_decimal"]), int(j["amount"]), j)


@dataclass(frozen=True, slots=True)
class Preflight:
    """Would this be allowed, and what would it cost: a quote beside the balance; nothing is held."""

    allowed: bool
    quote: Quote
    available: Decimal
    shortfall: Decimal  # what is missing; 0 when allowed


@dataclass(frozen=True, slots=True)
class EventResult:
    id: str
    status: str  # accepted, duplicate, rejected
    code: str | None
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> EventResult:
        return cls(j["id"], j["status"], j.get("code"), j)


# ---------------------------------------------------------------------- budgets

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """``90s``, ``5m``, ``1h``, ``7d`` (or plain seconds) as whole seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"not a duration: {text!r} (say 90s, 5m, 1h or 7d)")
    return int(number) * _DURATION_UNITS[unit]


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    """A limit's window: ``day``, ``week``, ``month`` (UTC calendar periods), ``fixed`` (epoch-aligned, of
    ``length_s``) or ``rolling`` (the last ``length_s``, counted in ``buckets``)."""

    kind: str
    length_s: int | None = None
    buckets: int | None = None

    @classmethod
    def parse(cls, text: str) -> BudgetWindow:
        """``day``, ``week``, ``month``, ``fixed:5m``, ``rolling:1h`` or ``rolling:1h/60`` (60 buckets)."""
        kind, _, rest = text.partition(":")
        if kind in ("day", "week", "month") and not rest:
            return cls(kind)
        if kind not in ("fixed", "rolling") or not rest:
            raise ValueError(f"not a window: {text!r} (say day, week, month, fixed:5m, rolling:1h or rolling:1h/60)")
        length, _, buckets = rest.partition("/")
        if buckets and (kind != "rolling" or not buckets.isdigit()):
            raise ValueError(f"not a window: {text!r} (only rolling windows have /buckets)")
        return cls(kind, duration_s(length), int(buckets) if buckets else None)

    def as_json(self) -> Json:
        body: Json = {"kind": self.kind}
        if self.length_s is not None:
            body["length_s"] = self.length_s
        if self.buckets is not None:
            body["buckets"] = self.buckets
        return body

    def __str__(self) -> str:
        if self.length_s is None:
            return self.kind
        return f"{self.kind}:{self.length_s}s" + (f"/{self.buckets}" if self.buckets is not None else "")

    @classmethod
    def of(cls, j: Json) -> BudgetWindow:
        length, buckets = j.get("length_s"), j.get("buckets")
        return cls(j["kind"], None if length is None else int(length), None if buckets is None else int(buckets))


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """``amount`` counts requests, tokens, or (spend) the smallest unit of ``asset``."""

    id: str
    node_id: str
    dimension: str
    amount: int
    window: BudgetWindow
    asset: str | None
    version: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> BudgetLimit:
        return cls(j["id"], j["node_id"], j["dimension"], int(j["amount"]), BudgetWindow.of(j["window"]),
                   j.get("asset"), int(j["version"]), j)


@dataclass(frozen=True, slots=True)
class BudgetLimitUse:
    """A limit with its use in the current window (the quota claimed, which may run ahead of what was spent)."""

    limit: BudgetLimit
    used: int
    remaining: int

    @classmethod
    def of(cls, j: Json) -> BudgetLimitUse:
        return cls(BudgetLimit.of(j), int(j["used"]), int(j["remaining"]))


@dataclass(frozen=True, slots=True)
class BudgetNode:
    id: str
    parent_id: str | None  # None only for the root (the customer itself)
    kind: str
    name: str
    allowed_models: list[str] | None  # None: any model
    created_at_ms: int
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> BudgetNode:
        models = j["allowed_models"]
        return cls(j["id"], j["parent_id"], j["kind"], j["name"], None if models is None else list(models),
                   int(j["created_at_ms"]), j)


@dataclass(frozen=True, slots=True)
class BudgetNodeView:
    """A node with its path (``root/.../id``), its limits and their use, and the proxy keys attached to it."""

    node: BudgetNode
    path: str
    limits: list[BudgetLimitUse]
    api_keys: list[str]

    @classmethod
    def of(cls, j: Json) -> BudgetNodeView:
        return cls(BudgetNode.of(j), j["path"], [BudgetLimitUse.of(u) for u in j["limits"]],
                   [str(k) for k in j["api_keys"]])


@dataclass(frozen=True, slots=True)
class BudgetTree:
    """A customer's nodes, each parent before its children."""

    customer_id: str
    nodes: list[BudgetNodeView]
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> BudgetTree:
        return cls(j["customer_id"], [BudgetNodeView.of(n) for n in j["data"]], j)


@dataclass(frozen=True, slots=True)
class BudgetAlertRule:
    """Thresholds (``("percent", 80)``, ``("amount", 5000)``) on ``limit:<id>`` or ``balance:<asset>``."""

    id: str
    target: str
    thresholds: list[tuple[str, int]]
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> BudgetAlertRule:
        return cls(j["id"], j["target"], [(k, int(v)) for th in j["thresholds"] for k, v in th.items()], j)


@dataclass(frozen=True, slots=True)
class FiredBudgetAlert:
    """A crossing of an alert threshold (``percent:80``, ``amount:5000``): when it fired and, once the use fell
    back below it, when it recovered (``None``: still active)."""

    customer_id: str
    rule_id: str
    target: str
    threshold: str
    period_start_ms: int  # the fixed window's period; 0 for a rolling window or a balance
    fired_at_ms: int
    recovered_at_ms: int | None
    active: bool
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> FiredBudgetAlert:
        recovered = j["recovered_at_ms"]
        return cls(j["customer_id"], j["rule_id"], j["target"], j["threshold"], int(j["period_start_ms"]),
                   int(j["fired_at_ms"]), None if recovered is None else int(recovered), bool(j["active"]), j)


@dataclass(frozen=True, slots=True)
class KeyAttachment:
    key_id: str
    customer_id: str
    node_id: str | None  # None: detached
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> KeyAttachment:
        return cls(j["key_id"], j["customer_id"], j["node_id"], j)


@dataclass(frozen=True, slots=True)
class Deleted:
    id: str
    raw: Json = field(repr=False)

    @classmethod
    def of(cls, j: Json) -> Deleted:
        return cls(j["id"], j)
