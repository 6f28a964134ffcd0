"""A storm on a budget tree: 1,000 concurrent requests from 3 ``metergate serve`` processes, spread over 10
agents under one project whose limit is K requests, each agent limited to A.

Method: three real processes share one database — an SQLite file (multi-process, ``BEGIN IMMEDIATE``),
PostgreSQL, or Redis in front of PostgreSQL — and each leases budget quota in chunks. Requests name their
agent with the trusted node header and go to the processes in turn. Whatever the interleaving: at most K are
served in all and at most A per agent (counted from the usage records, whose budget path names the agent);
every other answer is a 429 naming the project or the agent; the wallet (funded for every request) never
goes below zero, no hold stays open and the ledger audits clean.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.budgets.processes import Replicas
from tests.conftest import Upstream, _reset_pg
from tests.redis.conftest import prefix, redis_url  # noqa: F401  (fixtures)

REQUESTS = 1000
AGENTS = 10
K = 60  # the project's requests
A = 9  # each agent's: 10 x 9 = 90 > K, so both levels refuse
FUNDS = 10**9


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.postgres),
                        pytest.param("redis-windows", marks=pytest.mark.postgres)])
async def replicas(request: pytest.FixtureRequest, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Replicas]:
    redis: dict[str, Any] = {}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'storm.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        await _reset_pg(url)
        if request.param.startswith("redis"):
            redis = {"redis_url": request.getfixturevalue("redis_url"),
                     "redis_key_prefix": request.getfixturevalue("prefix"), "redis_shards": 4,
                     "redis_wallet": request.param == "redis"}
    r = Replicas(upstream.url, url, tmp_path, redis)
    try:
        await r.start(3)
        yield r
    finally:
        await r.stop()


async def setup_tree(replicas: Replicas) -> None:
    async with replicas.admin() as admin:
        assert (await admin.post("/customers", json={"id": "acme"})).status_code == 201
        r = await admin.post("/customers/acme/credits", json={"amount": FUNDS, "idempotency_key": "seed"})
        assert r.status_code == 201, r.text
        r = await admin.post("/customers/acme/budget-nodes", json={"id": "p", "kind": "project"})
        assert r.status_code == 201, r.text
        r = await admin.post("/customers/acme/budget-nodes/p/limits", json={
            "id": "p-req", "dimension": "requests", "amount": K, "window": {"kind": "day"}})
        assert r.status_code == 201, r.text
        for i in range(AGENTS):
            r = await admin.post("/customers/acme/budget-nodes", json={"id": f"a{i}", "kind": "agent",
                                                                       "parent_id": "p"})
            assert r.status_code == 201, r.text
            r = await admin.post(f"/customers/acme/budget-nodes/a{i}/limits", json={
                "id": f"a{i}-req", "dimension": "requests", "amount": A, "window": {"kind": "rolling",
                                                                                   "length_s": 3600}})
            assert r.status_code == 201, r.text


async def one(client: httpx.AsyncClient, url: str, agent: str) -> tuple[int, str | None]:
    try:
        r = await client.post(f"{url}/openai/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "storm"}], "max_tokens": 20},
            headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test", "X-Mock-Behavior": "words:3",
                     "X-Metergate-Budget-Node": agent})
    except httpx.TransportError:
        return 0, None
    return r.status_code, r.json()["error"]["node"] if r.status_code == 429 else None


async def test_a_storm_never_admits_past_the_project_or_an_agent(replicas: Replicas) -> None:
    await setup_tree(replicas)
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        answers = await asyncio.gather(*(one(client, replicas.urls[i % 3], f"a{i % AGENTS}")
                                         for i in range(REQUESTS)))
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert {node for status, node in answers if status == 429} <= {"p", *(f"a{i}" for i in range(AGENTS))}
    served = statuses[200]
    print(f"storm: {dict(statuses)}")
    assert K // 2 <= served <= K, statuses  # refused early by at most the other replicas' unused leases
    async with replicas.check_store() as store:
        records = [r for _, r in await store.usage("test", "acme", limit=5000)]
        assert len(records) == served
        per_agent = Counter(r.budget_path for r in records)
        assert all(path is not None and path.startswith("root/p/a") and n <= A
                   for path, n in per_agent.items()), per_agent
        balance = await store.balance("test", "acme", "USD")
        for _ in range(60):  # the replicas' escrow leases on the wallet go back after escrow.idle_s without use
            if not balance.debits_pending:
                break
            await asyncio.sleep(0.25)
            balance = await store.balance("test", "acme", "USD")
        assert balance.available >= 0 and balance.debits_pending == 0
        assert sum(r.charged_amount for r in records) == FUNDS - balance.available == balance.debits_posted
        assert await store.audit() == []
