"""The storm in every topology (one SQLite file, PostgreSQL alone, PostgreSQL with Redis windows): 1,000
concurrent requests from 3 ``metergate serve`` processes on one hot wallet, funded for K requests at price =
hold, with escrow leases on (the default). Every process leases the wallet while it is large; as it drains,
leases shrink, then stop, and the last requests recall what sits in the others' leases. Exactly K are served,
nothing overspends, nothing is written off, the ledger audits clean and, once the processes have stopped,
nothing is left pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Upstream
from tests.proxy.test_storm import FLAT_FEE, FLAT_PRICING
from tests.redis.cluster import PROCESS_TOPOLOGIES, Cluster, chat, cluster_in

REQUESTS = 1000
K = 400  # large enough that the wallet is leased: a lease is at most 1/16 of it and covers >= 8 requests


@pytest.fixture(params=PROCESS_TOPOLOGIES)
async def cluster(request: pytest.FixtureRequest, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await cluster_in(request, request.param, upstream.url, tmp_path)
    yield c
    await c.stop()


async def test_storm_from_three_processes_with_leases(cluster: Cluster) -> None:
    cluster.overrides["pricing"] = FLAT_PRICING
    cluster.overrides["escrow"] = {"hot_per_s": 5, "recall_wait_s": 5}
    await cluster.start(3)
    await cluster.fund("acme", FLAT_FEE * K)
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        warm = await asyncio.gather(*(chat(client, cluster.proxies[i % 3].url, "acme") for i in range(30)))
        statuses = warm + list(await asyncio.gather(*(
            chat(client, cluster.proxies[i % 3].url, "acme", "slow:0.2,words:3") for i in range(REQUESTS))))
    assert set(statuses) <= {200, 402}, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) == K
    store = SqlWalletStore(cluster.database_url)
    await store.open()
    try:
        leases = await store.read(lambda conn: conn.exec_driver_sql(
            "SELECT count(*) FROM holds WHERE id LIKE 'lease:%'").scalar())
        assert leases > 0  # the wallet was served from leases
        balance = await store.balance("test", "acme", "USD")
        assert (balance.available, balance.debits_posted) == (0, FLAT_FEE * K)
        records = [r for _, r in await store.usage("test", "acme", limit=5000)]
        assert len(records) == K and all(r.written_off_amount == 0 for r in records)
        assert await store.audit() == []
        await cluster.stop()  # each process returns its leases on the way out
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending == 0
        assert await store.audit() == []
    finally:
        await store.close()
