"""Redis + PostgreSQL with the wallets in SQL (``redis_wallet: false``): two ``metergate serve`` processes share
one PostgreSQL database for their wallets and one Redis prefix for their rate-limit windows.

Method: real processes; the admin API of one and the proxy routes of both. Every wallet feature is the SQL
store's, so the ones the Redis wallet does not serve are served here: a grant consumed before the paid credit,
the hold API (a hold placed through one process, heartbeats and a partial capture through the other), a hot
wallet served from escrow leases. The rate-limit windows are Redis keys (the SQL table stays empty), and a
``FLUSHDB`` of the throwaway Redis forgets them without touching a wallet. At the end nothing is pending and the
ledger audits clean.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest
import redis.asyncio as aioredis
import yaml

from metergate.wallet.errors import StoreInUse
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.redis.windows import SqlWalletWithRedisWindows
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, Upstream, _reset_pg, free_port
from tests.redis.cluster import Cluster, chat, wait_drained
from tests.redis.conftest import RedisServer

pytestmark = pytest.mark.postgres
FUNDS = 10_000_000


@pytest.fixture
async def cluster(upstream: Upstream, pg_url: str, redis_server: RedisServer, tmp_path: Path,
                  prefix: str) -> AsyncIterator[Cluster]:
    await _reset_pg(pg_url)
    c = Cluster(upstream.url, pg_url, redis_server.url, prefix, tmp_path, overrides={
        "redis_wallet": False, "hold_ttl_s": 10, "sweep_interval_s": 0.5, "upstream_timeout_s": 4,
        "drain_timeout_s": 1,
        "escrow": {"hot_per_s": 2, "ttl_s": 5, "tick_s": 0.2},
        "rate_limits": {"customer": {"requests_per_minute": 100_000, "tokens_per_minute": 10**9}}})
    yield c
    await c.stop()


def admin(cluster: Cluster, i: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cluster.proxies[i].url + "/admin/v1",
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


async def test_every_wallet_feature_with_rate_limits_in_redis(cluster: Cluster, pg_url: str,
                                                              redis_server: RedisServer, prefix: str) -> None:
    await cluster.start(2)
    await cluster.fund("acme", FUNDS)
    one, two = admin(cluster, 0), admin(cluster, 1)
    async with one, two, httpx.AsyncClient(timeout=30) as client:
        r = await one.post("/customers/acme/grants", json={"amount": 5_000, "purpose": "promotional",
                                                           "expires_at_ms": 4_102_444_800_000,
                                                           "idempotency_key": "promo-1"})
        assert r.status_code == 201, r.text  # grants: served in this topology (the Redis wallet refuses them)
        grant_id = r.json()["id"]

        held = await one.post("/holds", json={"customer_id": "acme", "amount": 50_000, "ttl_s": 60},
                              headers={"Idempotency-Key": "job-1"})
        assert held.status_code == 201, held.text
        hold_id = held.json()["hold"]["id"]
        beat = await two.post(f"/holds/{hold_id}/heartbeat", json={"used": 1_000, "next": 2_000,
                                                                  "idempotency_key": "beat-1"})
        assert beat.status_code == 200, beat.text  # the other process heartbeats the same hold
        part = await two.post(f"/holds/{hold_id}/capture", json={"amount": 3_000, "idempotency_key": "cap-1"})
        assert part.status_code == 200, part.text
        assert (await one.post(f"/holds/{hold_id}/void", json={"idempotency_key": "void-1"})).status_code == 200
        job = (await two.get(f"/holds/{hold_id}")).json()
        captured = (job.get("hold") or job)["captured"]
        assert captured >= 3_000

        statuses = await asyncio.gather(*(chat(client, cluster.proxies[i % 2].url, "acme") for i in range(200)))
        assert statuses.count(200) == 200, statuses

        grant = (await one.get(f"/grants/{grant_id}")).json()
        assert grant["consumed"] > 0  # the expiring promo grant is drawn before the paid credit

    store = SqlWalletStore(pg_url)
    await store.open()
    try:
        leases = await store.read(lambda conn: conn.exec_driver_sql(
            "SELECT count(*) FROM holds WHERE id LIKE 'lease:%'").scalar())
        assert leases >= 1  # the hot wallet was served from escrow leases
        windows = await store.read(lambda conn: conn.exec_driver_sql(
            "SELECT count(*) FROM rate_limit_windows").scalar())
        assert windows == 0  # the windows are Redis's
    finally:
        await store.close()
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*:rl:test:*")]
        assert keys, "no rate-limit window in Redis"
        await r.flushdb()  # Redis forgets the windows; the wallets are not there to lose
    finally:
        await r.aclose()
    async with httpx.AsyncClient(timeout=30) as client:
        assert await chat(client, cluster.proxies[0].url, "acme") == 200  # served on after the flush

    await cluster.stop()
    store = SqlWalletStore(pg_url)
    await store.open()
    try:
        balance = await store.balance("test", "acme", "USD")
        records = [r for _, r in await store.usage("test", "acme", limit=10_000)]
        assert len(records) == 201 and balance.debits_pending == 0
        assert balance.available == FUNDS + 5_000 - captured - sum(r.charged_amount for r in records)
        assert await store.audit() == []
    finally:
        await store.close()


async def test_wallets_in_sql_refuse_to_start_beside_a_live_redis_wallet(pg_url: str, redis_url: str,
                                                                         prefix: str, tmp_path: Path) -> None:
    """Both on one prefix would admit against two balances: the SQL-wallet store refuses to open while the Redis
    wallet's sink holds a shard or its streams hold events, and `serve` says so in one line and exits 2; once
    that wallet has stopped, drained and its leases lapsed, it opens."""
    await _reset_pg(pg_url)
    wallet = RedisWalletStore(BatchingSqlWalletStore(pg_url), redis_url, prefix=prefix, shards=2, run_sink=False)
    await wallet.open()
    await wallet.create_customer("test", "acme", "Acme")
    await wallet.credit("test", "acme", "USD", 5_000, idempotency_key="seed")
    await wallet.reserve("test", "acme", "USD", 1_000, hold_id="h-1", ttl_ms=60_000)  # an event not yet in SQL
    windows = SqlWalletWithRedisWindows(pg_url, redis_url, prefix=prefix, shards=2)
    with pytest.raises(StoreInUse, match="1 ledger events not yet written to SQL"):
        await windows.open()
    await windows.close()

    config = tmp_path / "metergate.yaml"
    config.write_text(yaml.safe_dump({"database_url": pg_url, "redis_url": redis_url, "redis_key_prefix": prefix,
                                      "redis_shards": 2, "port": free_port(), "pricing": DEFAULT_PRICING}))
    served = await asyncio.create_subprocess_exec(sys.executable, "-m", "metergate", "serve", "--config",
                                                  str(config), stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(served.communicate(), 60)
    assert served.returncode == 2, err
    assert "metergate: Redis key prefix" in err.decode() and "Traceback" not in err.decode()

    await wallet.close()
    drained = RedisWalletStore(BatchingSqlWalletStore(pg_url), redis_url, prefix=prefix, shards=2)
    await drained.open()  # its sink moves the event to SQL and holds the shards' leases while it runs
    await wait_drained(drained)
    with pytest.raises(StoreInUse, match="a ledger sink alive"):
        await windows.open()
    await windows.close()
    await drained.close()
    deadline = time.monotonic() + 15  # the sink's leases lapse (5 s)
    while True:
        try:
            await windows.open()
            break
        except StoreInUse:
            await windows.close()
            assert time.monotonic() < deadline, "the Redis wallet's leases never lapsed"
            await asyncio.sleep(0.5)
    try:
        hold = await windows.get_hold("h-1")
        assert hold is not None and hold.amount == 1_000  # the drained hold is in SQL, as its wallet left it
        assert await windows.audit() == []
    finally:
        await windows.close()


async def test_a_redis_restart_refuses_requests_while_down_and_charges_nothing(
        cluster: Cluster, pg_url: str, redis_server: RedisServer, upstream: Upstream) -> None:
    """Rate limits fail closed: while Redis is down a request is refused 503 ``wallet_unavailable`` before it
    is forwarded or charged, and ``/readyz`` says so; once Redis is back (empty: no persistence) both
    processes serve again without a restart of their own, and the ledger is whole."""
    await cluster.start(2)
    await cluster.fund("acme", FUNDS)
    async with httpx.AsyncClient(timeout=30) as client:
        before = await asyncio.gather(*(chat(client, cluster.proxies[i % 2].url, "acme") for i in range(20)))
        assert before.count(200) == 20
        redis_server.kill()
        down = await asyncio.gather(*(chat(client, cluster.proxies[i % 2].url, "acme") for i in range(20)))
        ready = [await client.get(f"{p.url}/readyz") for p in cluster.proxies]
        redis_server.start()
        # A process still holding a leased chunk of its window may serve from it while Redis is away.
        assert set(down) <= {200, 503} and down.count(503) >= 1, down
        assert all(r.status_code == 503 for r in ready), [r.text for r in ready]
        deadline, served_after = time.monotonic() + 20, 0
        while True:
            after = await asyncio.gather(*(chat(client, cluster.proxies[i % 2].url, "acme") for i in range(10)))
            served_after += after.count(200)
            if after.count(200) == 10:
                break
            assert time.monotonic() < deadline, after
            await asyncio.sleep(0.5)
    served = before.count(200) + down.count(200) + served_after
    assert len(upstream.requests) == served  # a refused request never reached the upstream
    await cluster.stop()
    store = SqlWalletStore(pg_url)
    await store.open()
    try:
        records = [r for _, r in await store.usage("test", "acme", limit=10_000)]
        balance = await store.balance("test", "acme", "USD")
        assert len(records) == served and balance.debits_pending == 0
        assert balance.available == FUNDS - sum(r.charged_amount for r in records)
        assert await store.audit() == []
    finally:
        await store.close()
