"""Threshold alerts fire once: crossing 50, 80 and 95% of a node's spend limit fires each threshold exactly
once across three replicas evaluating at the same time and across a restart, and ``recovered`` once each when
the use falls back below (a new window).

Method: three :class:`BudgetAlerts`, each on its own store over one database (an SQLite file, then PostgreSQL),
evaluate concurrently after each settlement; a restart closes them and opens new ones. Settlements are real
holds settled with usage records along the node's path. The webhook outbox's rows are the evidence.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from metergate.budgets.alerts import CROSSED, RECOVERED, BudgetAlerts, Rule
from metergate.budgets.model import ROOT, Limit, Node
from metergate.budgets.windows import DAY_MS, Window
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.webhooks import schema as ws
from tests.budgets.world import Clock
from tests.conftest import _reset_pg


@pytest.fixture
async def url(store_url: str) -> AsyncIterator[str]:
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    yield store_url


async def replicas(url: str, clock: Clock, n: int = 3) -> list[BudgetAlerts]:
    out = []
    for _ in range(n):
        store = SqlWalletStore(url)
        await store.open()
        alerts = BudgetAlerts(store, deliver=False, clock=clock)
        await alerts.start(3600)  # creates the outbox table; the loop itself never runs within the test
        out.append(alerts)
    return out


async def close(alerts: list[BudgetAlerts]) -> None:
    for a in alerts:
        await a.stop()
        await a.sql.close()


async def spend(store: SqlWalletStore, n: int, amount: int, at_ms: int, path: str = "root/p/a1") -> None:
    hold, _ = await store.reserve("test", "acme", "USD", amount, hold_id=f"h{n}", ttl_ms=60_000)
    record = UsageRecord(id=f"req{n}", mode="test", customer_id="acme", hold_id=hold.id, route="/openai",
                         endpoint="chat.completions", model="m", feature=None, stream=False, status_code=200,
                         usage_source="provider", tokens_input=1, tokens_cached_input=0, tokens_output=1,
                         tokens_reasoning=0, asset="USD", price_amount=amount, created_at_ms=at_ms, budget_path=path)
    await store.settle(hold.id, amount, record)


async def events(store: SqlWalletStore) -> Counter[tuple[str, str]]:
    o = ws.webhook_outbox.c
    rows = await store.read(lambda conn: conn.execute(select(o.type, o.payload)).all())
    return Counter((r.type, json.loads(r.payload)["data"]["threshold"]) for r in rows)


async def evaluate_all(alerts: list[BudgetAlerts]) -> None:
    await asyncio.gather(*(a.evaluate("test", "acme") for a in alerts))


async def test_thresholds_fire_once_across_three_replicas_and_a_restart(url: str) -> None:
    clock = Clock(now_ms())
    alerts = await replicas(url, clock)
    store = alerts[0].sql
    await store.create_customer("test", "acme", "Acme")
    await store.credit("test", "acme", "USD", 100_000, idempotency_key="seed")
    await store.put_budget_node(Node("test", "acme", "p", ROOT, "project"))
    await store.put_budget_node(Node("test", "acme", "a1", "p", "agent"))
    await store.put_budget_limit(Limit("test", "acme", "p-spend", "p", "spend", 1_000, Window("day"), "USD"))
    await alerts[1].put_rule(Rule("test", "acme", "p-alerts", "limit:p-spend",
                                  (("percent", 50), ("percent", 80), ("percent", 95))))
    await spend(store, 1, 400, clock.now)
    await evaluate_all(alerts)
    assert await events(store) == Counter()
    await spend(store, 2, 150, clock.now)  # 550: past 50%
    await evaluate_all(alerts)
    await evaluate_all(alerts)
    assert await events(store) == Counter({(CROSSED, "percent:50"): 1})
    await spend(store, 3, 300, clock.now)  # 850: past 80%
    await evaluate_all(alerts)
    await close(alerts)
    alerts = await replicas(url, clock)  # a restart of every replica: nothing fires twice
    store = alerts[0].sql
    await evaluate_all(alerts)
    assert await events(store) == Counter({(CROSSED, "percent:50"): 1, (CROSSED, "percent:80"): 1})
    await spend(store, 4, 100, clock.now)  # 950: exactly 95%
    await evaluate_all(alerts)
    assert (await events(store))[(CROSSED, "percent:95")] == 1
    clock.now += DAY_MS  # a new day: the use falls back to nothing
    await evaluate_all(alerts)
    await evaluate_all(alerts)
    assert await events(store) == Counter({(CROSSED, "percent:50"): 1, (CROSSED, "percent:80"): 1,
                                           (CROSSED, "percent:95"): 1, (RECOVERED, "percent:50"): 1,
                                           (RECOVERED, "percent:80"): 1, (RECOVERED, "percent:95"): 1})
    await close(alerts)


async def test_a_balance_threshold_fires_once_and_recovers_once_after_a_top_up(url: str) -> None:
    clock = Clock(now_ms())
    alerts = await replicas(url, clock)
    store = alerts[0].sql
    await store.create_customer("test", "acme", "Acme")
    await store.credit("test", "acme", "USD", 1_000, idempotency_key="seed")
    await alerts[0].put_rule(Rule("test", "acme", "low", "balance:USD", (("amount", 300),)))
    await spend(store, 1, 800, clock.now, path="root")
    await evaluate_all(alerts)
    await evaluate_all(alerts)
    assert await events(store) == Counter({(CROSSED, "amount:300"): 1})
    await store.credit("test", "acme", "USD", 5_000, idempotency_key="top-up")
    await evaluate_all(alerts)
    await evaluate_all(alerts)
    assert await events(store) == Counter({(CROSSED, "amount:300"): 1, (RECOVERED, "amount:300"): 1})
    await close(alerts)
