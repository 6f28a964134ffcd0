"""A process killed with its escrow lease open, in every topology (one SQLite file, PostgreSQL alone, PostgreSQL
with Redis windows): 2 ``metergate serve`` processes, both leasing one hot wallet under load, one ``kill -9``-ed
mid-load. The survivor keeps serving; the victim's lease
expires past its TTL and the sweeper releases what its committed settlements did not capture; once the
survivor stops (returning its own lease), nothing is pending, the ledger audits clean, and the balance is the
funds less exactly what the usage records charged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Upstream
from tests.redis.cluster import PROCESS_TOPOLOGIES, Cluster, chat, cluster_in

FUNDS = 50_000_000
FAST = {"hold_ttl_s": 10, "sweep_interval_s": 0.5, "upstream_timeout_s": 4, "drain_timeout_s": 1,
        "escrow": {"hot_per_s": 2, "ttl_s": 3, "tick_s": 0.2}}


@pytest.fixture(params=PROCESS_TOPOLOGIES)
async def cluster(request: pytest.FixtureRequest, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await cluster_in(request, request.param, upstream.url, tmp_path, FAST)
    yield c
    await c.stop()


async def test_kill_9_with_a_lease_open_loses_nothing_committed(cluster: Cluster) -> None:
    url = cluster.database_url
    await cluster.start(2)
    await cluster.fund("acme", FUNDS)
    victim, survivor = cluster.proxies
    statuses: dict[str, list[int]] = {victim.url: [], survivor.url: []}
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, url: str) -> None:
        while not stop.is_set():
            statuses[url].append(await chat(client, url, "acme", "slow:0.05,words:3"))

    store = SqlWalletStore(url)
    await store.open()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            workers = [asyncio.create_task(load(client, p.url)) for p in (victim, survivor) for _ in range(8)]
            await asyncio.sleep(3)
            leased = await store.read(lambda conn: conn.exec_driver_sql(
                "SELECT count(*) FROM holds WHERE id LIKE 'lease:%' AND state = 'pending'").scalar())
            assert leased >= 1  # the hot wallet is being served from leases
            cluster.kill(victim)
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*workers)
        assert statuses[survivor.url].count(200) > 20 and set(statuses[survivor.url]) == {200}
        await cluster.stop()  # the survivor returns its lease; the victim's expires
        deadline = time.monotonic() + FAST["escrow"]["ttl_s"] + 20  # type: ignore[index]
        sweeper = SqlWalletStore(url)  # the sweep a control plane runs, here by hand
        await sweeper.open()
        try:
            while (await store.balance("test", "acme", "USD")).debits_pending and time.monotonic() < deadline:
                await sweeper.expire_holds(now_ms=int(time.time() * 1000))
                await asyncio.sleep(0.5)
        finally:
            await sweeper.close()
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending == 0
        records = [r for _, r in await store.usage("test", "acme", limit=100_000)]
        assert len({r.id for r in records}) == len(records)  # each request billed once
        assert len(records) >= statuses[survivor.url].count(200)
        assert balance.available == FUNDS - sum(r.charged_amount for r in records)
        expired = [e for e in await store.ledger("test", "acme", limit=100_000)
                   if e.kind == "expire" and (e.hold_id or "").startswith("lease:")]
        assert expired, "the killed process's lease expired"
        assert await store.audit() == []
    finally:
        await store.close()
