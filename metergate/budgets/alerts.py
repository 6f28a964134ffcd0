"""Threshold alerts on balances and node budgets that fire once, and say once when they are over.

A rule watches one target — a node limit (``limit:<id>``) or a wallet balance (``balance:<asset>``) — with
thresholds, each absolute (``{"amount": n}``) or a percentage (``{"percent": p}``):

* on a limit, a threshold is crossed when the window's *settled* use (from the usage records along the
  node's path, not the quota leased, which runs ahead of it) reaches it — ``p`` percent of the limit, or ``n``;
* on a balance, when the available balance falls to ``n`` or below, or when ``p`` percent of the credit
  posted has been spent.

Each crossing fires ``budget.threshold.crossed`` once per threshold per period (a fixed window's period; a
rolling window's or a balance's "period" is the episode until it recovers), and ``budget.threshold.recovered``
once when the use falls back below it (a new window, a top-up, a raised limit). Once means once across replicas
and restarts: the transition is claimed in SQL — an ``INSERT`` of the key (rule, threshold, period) that at
most one replica's succeeds, or a conditional ``UPDATE`` of it — and the webhook is added to the durable
outbox (:mod:`metergate.webhooks.outbox`) in the same transaction, so a claim is never without its event
nor an event without its claim.

Evaluation is off the request path: :class:`BudgetAlerts` checks the customers whose requests settled since
its last run, every ``interval_s`` (the ``budget_alert_interval_s`` setting in ``serve``), and, in every process
(the control plane's too), the customers with a crossing still active: what recovers does so without traffic
(a top-up, a raised limit, a new window), so it is said when it happens, not at the customer's next request.
What fired is read back by the admin API, the portal's budget page and the operator dashboard
(:meth:`~metergate.wallet.store.WalletStore.fired_budget_alerts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from metergate.budgets.model import Limit, Tree, path_text
from metergate.wallet import schema as t
from metergate.wallet.errors import STORAGE_DOWN
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.webhooks.outbox import WebhookOutbox

log = logging.getLogger(__name__)

CROSSED, RECOVERED = "budget.threshold.crossed", "budget.threshold.recovered"
MAX_THRESHOLDS = 10
MAX_RULES = 100  # per customer


@dataclass(frozen=True, slots=True)
class Rule:
    mode: Mode
    customer_id: str
    id: str
    target: str  # "limit:<id>" | "balance:<asset>"
    thresholds: tuple[tuple[str, int], ...]  # ("percent", 80) | ("amount", 5000)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "target": self.target, "thresholds": [{kind: value} for kind, value in self.thresholds]}


@dataclass(frozen=True, slots=True)
class Reading:
    """A target's current value against which thresholds are judged, and the period it belongs to."""

    used: int  # limits: the window's settled use; balances: the available balance, or the spent share
    period_start_ms: int
    detail: dict[str, Any]


class BudgetAlerts:
    def __init__(self, sql: SqlWalletStore, *, deliver: bool, clock: Callable[[], int] = now_ms) -> None:
        self.sql = sql
        self.deliver = deliver  # a notify_url will send the outbox's rows (else they are kept as skipped)
        self.clock = clock
        self._touched: set[tuple[Mode, str]] = set()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, interval_s: float) -> None:
        await WebhookOutbox(self.sql).open()
        self._task = asyncio.create_task(self._run_forever(interval_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def touch(self, mode: Mode, customer_id: str) -> None:
        """A request of this customer settled: evaluate its rules at the next run (no I/O here)."""
        if len(self._touched) < 100_000:
            self._touched.add((mode, customer_id))

    async def _run_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            touched, self._touched = self._touched, set()
            try:
                touched |= await self.active_customers()
            except STORAGE_DOWN as exc:
                log.warning("budget alerts not read (%s); retrying", type(exc).__name__)
            for mode, customer_id in touched:
                try:
                    await self.evaluate(mode, customer_id)
                except STORAGE_DOWN as exc:
                    log.warning("budget alerts not evaluated (%s); retrying at the next settlement",
                                type(exc).__name__)
                    break
                except Exception:
                    log.exception("evaluating budget alerts failed; retrying at the next settlement")

    async def active_customers(self, limit: int = 1_000) -> set[tuple[Mode, str]]:
        """The customers with a threshold crossed and not yet recovered (at most ``limit``)."""
        e = t.budget_alert_events.c
        rows = await self.sql.read(lambda conn: conn.execute(
            select(e.mode, e.customer_id).where(e.recovered_at_ms.is_(None)).distinct().limit(limit)).all())
        return {(row.mode, row.customer_id) for row in rows}

    # ------------------------------------------------------------------ rules

    async def put_rule(self, rule: Rule) -> Rule:
        values = {"target": rule.target, "thresholds": [{k: v} for k, v in rule.thresholds],
                  "updated_at_ms": now_ms()}

        def op(conn: Connection) -> None:
            self.sql.require_customer(conn, rule.mode, rule.customer_id)
            stmt = self.sql.dialect_insert(t.budget_alert_rules).values(mode=rule.mode, customer_id=rule.customer_id,
                                                                        id=rule.id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["mode", "customer_id", "id"], set_=values))

        await self.sql.write(op)
        return rule

    async def rules(self, mode: Mode, customer_id: str) -> list[Rule]:
        r = t.budget_alert_rules.c
        rows = await self.sql.read(lambda conn: conn.execute(select(t.budget_alert_rules).where(
            r.mode == mode, r.customer_id == customer_id).order_by(r.id)).all())
        return [Rule(row.mode, row.customer_id, row.id, row.target,
                     tuple(next(iter(th.items())) for th in row.thresholds)) for row in rows]

    async def delete_rule(self, mode: Mode, customer_id: str, rule_id: str) -> bool:
        r, e = t.budget_alert_rules.c, t.budget_alert_events.c

        def op(conn: Connection) -> int:
            conn.execute(delete(t.budget_alert_events).where(e.mode == mode, e.customer_id == customer_id,
                                                             e.rule_id == rule_id))
            deleted: int = conn.execute(delete(t.budget_alert_rules).where(
                r.mode == mode, r.customer_id == customer_id, r.id == rule_id)).rowcount
            return deleted

        return bool(await self.sql.write(op))

    # ------------------------------------------------------------------ evaluation

    async def evaluate(self, mode: Mode, customer_id: str) -> list[tuple[str, str, str]]:
        """Judge every rule of the customer now; the (rule, threshold, event type) this call fired."""
        rules = await self.rules(mode, customer_id)
        if not rules:
            return []
        tree = await self.sql.budget_tree(mode, customer_id)
        at = self.clock()
        fired: list[tuple[str, str, str]] = []
        for rule in rules:
            reading = await self._read(rule, tree, at)
            if reading is None:
                continue
            for kind, value in rule.thresholds:
                level, over = self._judge(rule, reading, kind, value, tree)
                threshold = f"{kind}:{value}"
                outcome = await self.sql.write(self._transition, rule, threshold, reading, level, over, at)
                if outcome is not None:
                    fired.append((rule.id, threshold, outcome))
        return fired

    def _judge(self, rule: Rule, reading: Reading, kind: str, value: int, tree: Tree) -> tuple[int, bool]:
        """The threshold's level in the reading's unit, and whether the reading is past it."""
        if rule.target.startswith("limit:"):
            limit = tree.limit(rule.target[6:])
            assert limit is not None
            level = -(-limit.amount * value // 100) if kind == "percent" else value
            return level, reading.used >= level
        if kind == "percent":  # the share of the credit posted that has been spent
            credited = int(reading.detail["credited"])
            level = -(-credited * value // 100)
            return level, credited > 0 and int(reading.detail["spent"]) >= level
        return value, reading.used <= value  # the balance fell to the amount or below

    def _transition(self, conn: Connection, rule: Rule, threshold: str, reading: Reading, level: int, over: bool,
                    at: int) -> str | None:
        """Claim a crossing or a recovery and add its webhook, in one transaction; ``None``: nothing new."""
        e = t.budget_alert_events.c
        key = and_(e.mode == rule.mode, e.customer_id == rule.customer_id, e.rule_id == rule.id,
                   e.threshold == threshold)
        data = {"rule_id": rule.id, "target": rule.target, "threshold": threshold, "level": level,
                "used": reading.used, "period_start_ms": reading.period_start_ms, **reading.detail}
        if over:
            stmt = self.sql.dialect_insert(t.budget_alert_events).values(
                mode=rule.mode, customer_id=rule.customer_id, rule_id=rule.id, threshold=threshold,
                period_start_ms=reading.period_start_ms, fired_at_ms=at, recovered_at_ms=None)
            claimed = conn.execute(stmt.on_conflict_do_nothing()).rowcount == 1
            if not claimed and reading.period_start_ms == 0:
                # An episodic target (a rolling window, a balance) that recovered may cross again; a fixed
                # window's threshold fires once in its period, whatever happens in between.
                claimed = conn.execute(update(t.budget_alert_events).where(
                    key, e.period_start_ms == 0, e.recovered_at_ms.is_not(None),
                ).values(fired_at_ms=at, recovered_at_ms=None)).rowcount == 1
            if claimed:
                WebhookOutbox.insert(conn, CROSSED, rule.mode, rule.customer_id, data, deliver=self.deliver, at_ms=at)
                return CROSSED
            return None
        # Below: every crossing of this threshold not recovered yet (this period's, or an earlier one's) is.
        recovered = conn.execute(update(t.budget_alert_events).where(key, e.recovered_at_ms.is_(None))
                                 .values(recovered_at_ms=at)).rowcount
        if recovered:
            WebhookOutbox.insert(conn, RECOVERED, rule.mode, rule.customer_id, data, deliver=self.deliver, at_ms=at)
            return RECOVERED
        return None

    async def _read(self, rule: Rule, tree: Tree, at: int) -> Reading | None:
        kind, _, name = rule.target.partition(":")
        if kind == "balance":
            balance = await self.sql.balance(rule.mode, rule.customer_id, name)
            return Reading(balance.available, 0, {"asset": name, "credited": balance.credits_posted,
                                                  "spent": balance.debits_posted + balance.debits_pending})
        limit = tree.limit(name)
        if limit is None:
            return None  # the limit was deleted: its rule judges nothing
        bucket = limit.window.bucket_start(at)
        since = limit.window.counted_from(bucket)
        path = path_text(tree.path(limit.node_id))
        used = await self.sql.read(_settled_use, limit, path, since)
        period = bucket if limit.window.kind != "rolling" else 0
        return Reading(used, period, {"limit_id": limit.id, "node": limit.node_id, "node_path": path,
                                      "dimension": limit.dimension, "amount": limit.amount,
                                      "window": limit.window.as_json()})


def _settled_use(conn: Connection, limit: Limit, path: str, since_ms: int) -> int:
    """What the requests along ``path`` (the node and its subtree) used since ``since_ms``, as settled."""
    u = t.usage_records.c
    measure: Any = {"requests": func.count(), "tokens": func.coalesce(func.sum(u.tokens_input + u.tokens_output), 0),
                    "spend": func.coalesce(func.sum(u.charged_amount), 0)}[limit.dimension]
    where = [u.mode == limit.mode, u.customer_id == limit.customer_id, u.created_at_ms >= since_ms,
             or_(u.budget_path == path, u.budget_path.like(path.replace("%", r"\%").replace("_", r"\_") + "/%",
                                                           escape="\\"))]
    if limit.dimension == "spend":
        where.append(u.asset == limit.asset)
    return int(conn.execute(select(measure).where(*where)).scalar() or 0)


__all__ = ["CROSSED", "RECOVERED", "BudgetAlerts", "Rule"]
