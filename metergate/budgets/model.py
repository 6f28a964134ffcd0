"""Budget nodes and their limits: a tree below each customer, all spending from the customer's one wallet.

A customer's tree has an implicit root, :data:`ROOT` (the customer itself, which may carry limits too), and
below it projects, teams, agents and end users, each with a parent. A request is charged along its *path*,
the root down to the node that made it: the node its proxy key is attached to, or the one the app names in
the trusted ``X-Metergate-Budget-Node`` header, or just the root. Every node on the path must admit the
request; the wallet stays the one balance and the one ledger.

A limit is one counter in one window (:mod:`metergate.budgets.windows`): ``requests`` (1 per request),
``tokens`` (the admission estimate, corrected to the provider's count at settlement) or ``spend`` (the
hold in the limit's asset, corrected to the charge at settlement). A node may also restrict the models its
requests may use (``allowed_models``: exact names or ``fnmatch`` patterns such as ``gpt-4o*``), which
applies to its whole subtree.

Values here are immutable and validated on construction; a :class:`Tree` is the in-memory view of one
customer's nodes, limits and key attachments that admission reads.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from metergate.budgets.windows import Window
from metergate.money import format_minor

if TYPE_CHECKING:  # not at run time: the wallet package imports the budget tables (a cycle otherwise)
    from metergate.wallet.models import Mode

ROOT = "root"
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
NodeKind = Literal["customer", "project", "team", "agent", "end_user"]
KINDS: tuple[NodeKind, ...] = ("project", "team", "agent", "end_user")
Dimension = Literal["requests", "tokens", "spend"]
DIMENSIONS: tuple[Dimension, ...] = ("requests", "tokens", "spend")
MAX_DEPTH = 8  # nodes below the root on one path
MAX_NODES = 10_000  # per customer and mode
MAX_LIMITS_PER_NODE = 8
MAX_MODELS = 64
MAX_AMOUNT = 10**15


@dataclass(frozen=True, slots=True)
class Node:
    mode: Mode
    customer_id: str
    id: str
    parent_id: str | None  # None only for the root
    kind: NodeKind
    name: str = ""
    allowed_models: tuple[str, ...] | None = None  # None: any model
    created_at_ms: int = 0

    def __post_init__(self) -> None:
        assert NODE_ID.fullmatch(self.id), "invalid node id"
        assert (self.parent_id is None) == (self.id == ROOT), "the root, and only it, has no parent"
        assert self.allowed_models is None or len(self.allowed_models) <= MAX_MODELS

    def allows(self, model: str) -> bool:
        if self.allowed_models is None:
            return True
        return any(model == p or fnmatch.fnmatchcase(model, p) for p in self.allowed_models)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "parent_id": self.parent_id, "kind": self.kind, "name": self.name,
                "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
                "created_at_ms": self.created_at_ms}


@dataclass(frozen=True, slots=True)
class Limit:
    mode: Mode
    customer_id: str
    id: str
    node_id: str
    dimension: Dimension
    amount: int  # requests, tokens, or the asset's smallest unit
    window: Window
    asset: str | None = None  # spend limits only
    version: int = 1  # bumped by every change of the amount: leases of an older version are dropped

    def __post_init__(self) -> None:
        assert NODE_ID.fullmatch(self.id), "invalid limit id"
        assert self.dimension in DIMENSIONS
        assert 1 <= self.amount <= MAX_AMOUNT, "a limit is a positive amount"
        assert (self.asset is not None) == (self.dimension == "spend"), "spend limits, and only they, name an asset"

    def describe(self) -> str:
        unit = {"requests": "requests", "tokens": "tokens", "spend": f"{self.asset} (smallest unit)"}[self.dimension]
        return f"{self.amount} {unit} {self.window.describe()}"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "node_id": self.node_id, "dimension": self.dimension, "amount": self.amount,
                "window": self.window.as_json(), "asset": self.asset, "version": self.version}


@dataclass(frozen=True, slots=True)
class Tree:
    """One customer's nodes (by id), their limits (by node) and which node each proxy key is attached to."""

    mode: Mode
    customer_id: str
    nodes: Mapping[str, Node] = field(default_factory=dict)
    limits: Mapping[str, tuple[Limit, ...]] = field(default_factory=dict)
    key_nodes: Mapping[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.nodes

    def path(self, node_id: str) -> tuple[Node, ...]:
        """The root down to ``node_id``; ``()`` for an unknown node (or a tree without nodes)."""
        out: list[Node] = []
        current: str | None = node_id
        while current is not None:
            node = self.nodes.get(current)
            if node is None or len(out) > MAX_DEPTH:
                return ()
            out.append(node)
            current = node.parent_id
        return tuple(reversed(out))

    def limit(self, limit_id: str) -> Limit | None:
        return next((limit for limits in self.limits.values() for limit in limits if limit.id == limit_id), None)

    def children(self, node_id: str) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.parent_id == node_id), key=lambda n: n.id)

    def subtree(self, node_id: str) -> list[Node]:
        """``node_id`` and every node below it, depth first."""
        node = self.nodes.get(node_id)
        if node is None:
            return []
        out = [node]
        for child in self.children(node_id):
            out.extend(self.subtree(child.id))
        return out


def path_text(path: tuple[Node, ...]) -> str:
    """A path as stored with usage records and shown in denials: ``root/project/agent``."""
    return "/".join(n.id for n in path)


@dataclass(frozen=True, slots=True)
class FiredAlert:
    """One crossing of an alert threshold (:mod:`metergate.budgets.alerts`): when it fired and, once the use
    fell back below it, when it recovered. ``period_start_ms`` is the fixed window's period it fired in (0 for a
    rolling window or a balance, whose crossings are episodes that end when they recover)."""

    mode: Mode
    customer_id: str
    rule_id: str
    target: str  # "limit:<id>" | "balance:<asset>"
    threshold: str  # "percent:80" | "amount:5000"
    period_start_ms: int
    fired_at_ms: int
    recovered_at_ms: int | None

    @property
    def active(self) -> bool:
        return self.recovered_at_ms is None

    def describe_threshold(self, *, asset: str | None = None, scale: int | None = None) -> str:
        """The threshold in words: a percentage, a count, or an amount of ``asset`` in its major unit when its
        ``scale`` is known (else in its smallest unit); a balance's is a level it falls to."""
        kind, _, value = self.threshold.partition(":")
        if kind == "percent":
            return f"{value}%"
        if self.target.startswith("balance:"):
            asset = self.target.partition(":")[2]
        if asset is None:
            text = value
        elif scale is None:
            text = f"{value} {asset} (smallest unit)"
        else:
            text = f"{format_minor(int(value), scale)} {asset}"
        return f"{text} or below" if self.target.startswith("balance:") else text

    def as_json(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, "rule_id": self.rule_id, "target": self.target,
                "threshold": self.threshold, "period_start_ms": self.period_start_ms,
                "fired_at_ms": self.fired_at_ms, "recovered_at_ms": self.recovered_at_ms, "active": self.active}
