"""Many sidecars, one wallet: >= 1,000 concurrent requests from 3 ``metergate serve`` processes sharing one
Redis prefix and one PostgreSQL ledger, on a wallet funded for K requests.

Method: every request has the same estimate (the hold), and the upstream answers slowly so that the holds
overlap; whatever the interleaving, the wallet never goes below zero, the charges never exceed the funds,
and once the streams have drained into PostgreSQL the ledger audits clean, every served request has exactly
one usage record, and the projection equals the ledger (reconciliation: no drift).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.wallet.redis.reconcile import reconcile
from tests.conftest import Upstream, _reset_pg
from tests.proxy.test_storm import FLAT_FEE, FLAT_PRICING, hold_estimate
from tests.redis.cluster import Cluster, chat, wait_drained

pytestmark = pytest.mark.postgres
REQUESTS = 1000
K = 60


@pytest.fixture
async def cluster(upstream: Upstream, pg_url: str, redis_url: str, prefix: str,
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    await _reset_pg(pg_url)
    c = Cluster(upstream.url, pg_url, redis_url, prefix, tmp_path)
    yield c
    await c.stop()


@pytest.mark.parametrize("flat", [False, True], ids=["price-below-hold", "price-equal-to-hold"])
async def test_storm_from_three_processes_never_overspends(cluster: Cluster, flat: bool) -> None:
    """With a flat fee per request the hold is the price, so the funds cover exactly K requests: at most K
    are accepted (exactly K, the wallet ending empty). Priced by tokens, each costs less than its hold and
    released holds let more through, each paid for."""
    if flat:
        cluster.overrides["pricing"] = FLAT_PRICING
    await cluster.start(3)
    hold = FLAT_FEE if flat else hold_estimate()
    await cluster.fund("acme", hold * K)
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        statuses = await asyncio.gather(*(
            chat(client, cluster.proxies[i % 3].url, "acme", "slow:2,words:3") for i in range(REQUESTS)))
    served = statuses.count(200)
    assert set(statuses) <= {200, 402}, {s: statuses.count(s) for s in set(statuses)}
    if flat:
        assert served == K  # at most K: the funds pay for exactly K
    else:
        assert K <= served < REQUESTS  # at most K holds at a time; settled holds free funds for more
    store = cluster.store()
    await store.open()
    try:
        await wait_drained(store)
        balance = await store.sql.balance("test", "acme", "USD")
        live = await store.balance("test", "acme", "USD")
        assert live == balance
        assert balance.available >= 0 and balance.debits_pending == 0
        records = [r for _, r in await store.usage("test", "acme", limit=5000)]
        assert len(records) == served
        assert sum(r.charged_amount for r in records) == hold * K - balance.available == balance.debits_posted
        assert all(r.written_off_amount == 0 for r in records)
        assert await store.audit() == []
        assert [row.status for row in await reconcile(store)] == ["ok"]
    finally:
        await store.close()
