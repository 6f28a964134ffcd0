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
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.proxy.ratelimit import WINDOW_MS
from metergate.wallet.models import RateLimitDenial
from metergate.wallet.quota import QuotaClaim
from metergate.wallet.redis.quota import window_key
from metergate.wallet.redis.store import RedisWalletStore
from tests.conftest import Upstream, _reset_pg
from tests.redis.cluster import Cluster, chat

LIMIT = 120
PER_PROCESS = 130


@pytest.fixture(params=["redis wallet", "wallets in SQL"])
async def cluster(request: pytest.FixtureRequest, upstream: Upstream, pg_url: str, redis_url: str, prefix: str,
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    """The Redis wallet, or the SQL wallet with only its rate-limit windows in Redis: the same windows."""
    await _reset_pg(pg_url)
    c = Cluster(upstream.url, pg_url, redis_url, prefix, tmp_path,
                overrides={"redis_wallet": request.param == "redis wallet"})
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


@pytest.mark.postgres
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


@pytest.mark.parametrize("seed", range(3))
async def test_the_lua_claim_grants_what_the_sql_claim_grants(rstore: RedisWalletStore, seed: int) -> None:
    """The Lua script mirrors :func:`metergate.wallet.quota.grant`: the same random sequence of claims
    (needs, wants and limits of two subjects, all or none) gets the same grants and refusals from Redis as
    from the SQL store under it, and neither ever claims past a limit."""
    rng = random.Random(seed)
    customer, window = f"c{seed}-{uuid.uuid4().hex[:8]}", 1_900_000_020_000 - 1_900_000_020_000 % WINDOW_MS
    rpm, tpm = rng.randint(5, 60), rng.randint(100, 5000)
    claimed = {"customer": [0, 0], "key": [0, 0]}
    for _ in range(60):
        claims = []
        for name in rng.sample(["customer", "key"], rng.randint(1, 2)):
            need_r, need_t = rng.randint(0, 1), rng.randint(0, 400)
            claims.append(QuotaClaim(f"{name}:{customer}", rpm, tpm if name == "customer" else None, need_r,
                                     need_r + rng.randint(0, 8), need_t if name == "customer" else 0,
                                     need_t + rng.randint(0, 900) if name == "customer" else 0))
        in_sql = await rstore.sql.claim_rate_quota("test", customer, claims, window_start_ms=window)
        in_redis = await rstore.claim_rate_quota("test", customer, claims, window_start_ms=window)
        assert in_redis == in_sql
        if not isinstance(in_sql, RateLimitDenial):
            for g in in_sql:
                claimed[g.subject.split(":")[0]] = [g.claimed_requests, g.claimed_tokens]
        assert claimed["customer"][0] <= rpm and claimed["key"][0] <= rpm and claimed["customer"][1] <= tpm
    await rstore.release_rate_quota("test", customer, [(f"customer:{customer}", 1, 0)], window_start_ms=window)
    key = window_key(rstore, "test", customer, f"customer:{customer}", window)
    assert await rstore.redis.hget(key, "r") == str(max(0, claimed["customer"][0] - 1))
