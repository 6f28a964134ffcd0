"""Rate limits across replicas in Redis: 3 ``metergate serve`` processes sharing one Redis prefix (and one
PostgreSQL ledger) hammer one customer's limit, and together admit exactly the limit, never more.

Method: real processes on the real clock, so a storm must fall inside one minute: it starts early in a
window (waiting for the next one if needed) and counts only if it ended in the window it started in,
else it is replayed for a fresh customer. Each process alone sends more than the limit, so each ends with
its lease spent or has admitted the whole limit itself: the total is exact. Afterwards the window's one
key in Redis shows the limit claimed, and expires by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.proxy.ratelimit import WINDOW_MS
from tests.conftest import Upstream, _reset_pg
from tests.redis.cluster import Cluster, chat

pytestmark = pytest.mark.postgres
LIMIT = 120
PER_PROCESS = 130


@pytest.fixture
async def cluster(upstream: Upstream, pg_url: str, redis_url: str, prefix: str,
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    await _reset_pg(pg_url)
    c = Cluster(upstream.url, pg_url, redis_url, prefix, tmp_path)
    c.overrides["rate_limits"] = {"customer": {"requests_per_minute": LIMIT, "tokens_per_minute": 10**9}}
    yield c
    await c.stop()


async def wait_for_window_start() -> int:
    """Sleep until at most 40 s into a minute (a precondition, not a measurement); that minute's start."""
    into = int(time.time() * 1000) % WINDOW_MS
    if into > 40_000:
        await asyncio.sleep((WINDOW_MS - into) / 1000 + 0.05)
    now = int(time.time() * 1000)
    return now - now % WINDOW_MS


async def test_three_processes_on_one_redis_admit_exactly_the_limit(cluster: Cluster) -> None:
    await cluster.start(3)
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for attempt in range(3):
            customer = f"acme{attempt}"
            await cluster.fund(customer, 10**9)
            window = await wait_for_window_start()
            statuses = await asyncio.gather(*(
                chat(client, cluster.proxies[i % 3].url, customer) for i in range(3 * PER_PROCESS)))
            if int(time.time() * 1000) - window < WINDOW_MS:
                break
        else:
            pytest.fail("three storms in a row crossed a minute boundary")
    assert set(statuses) <= {200, 429}, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) == LIMIT
    store = cluster.store()
    await store.open()
    try:
        keys = [k async for k in store.redis.scan_iter(match=f"{cluster.prefix}:*:rl:test:customer:{customer}:*")]
        assert keys == [f"{store.keys.base(store.keys.shard('test', customer))}:rl:test:customer:{customer}:{window}"]
        assert await store.redis.hget(keys[0], "r") == str(LIMIT)  # claimed: the limit, all of it admitted
        assert 0 < await store.redis.pttl(keys[0]) <= 3 * WINDOW_MS
    finally:
        await store.close()
