"""PostgreSQL stopped for 60 s under load, with two ``metergate serve`` processes over PostgreSQL alone, both
serving one hot wallet from escrow leases.

Method: a throwaway PostgreSQL (``initdb`` + ``pg_ctl`` in a temp dir, tests/redis/test_pg_outage.py's fixture)
is the only store. Eight workers keep chatting through the two proxies; once leases sit on the wallet, the
server is stopped for 60 s while the proxies' resident memory is sampled, then started again. Without the
system of record nothing can be promised durably, so every answer during the outage must be a clean refusal
(503 with an error code) or a request served and settled before it: never a 500, never a hang past the client's
timeout. After PostgreSQL is back the proxies recover on their own; when they have stopped (returning their
leases), every served request has its usage record, the balance is the funds less exactly what the records
charged, nothing is left pending and the ledger audits clean.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Upstream
from tests.redis.cluster import Cluster, keep_chatting
from tests.redis.test_pg_outage import recovered, rss_kb, throwaway_pg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
OUTAGE_S = 60
RECOVERY_S = 90
FUNDS = 50_000_000
FAST = {"hold_ttl_s": 10, "sweep_interval_s": 0.5, "upstream_timeout_s": 4, "drain_timeout_s": 1,
        "escrow": {"hot_per_s": 2, "ttl_s": 3, "tick_s": 0.2}}


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> tuple[str, list[str], list[str]]:
    """A PostgreSQL of this test's own: (url, start command, stop command)."""
    server: tuple[str, list[str], list[str]] = request.getfixturevalue("throwaway_pg")
    return server


@pytest.fixture
async def cluster(upstream: Upstream, pg: tuple[str, list[str], list[str]], tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(upstream.url, pg[0], None, "", tmp_path, overrides=FAST)
    yield c
    await c.stop()


async def pending_leases(store: SqlWalletStore) -> int:
    found: int = await store.read(lambda conn: conn.exec_driver_sql(
        "SELECT count(*) FROM holds WHERE id LIKE 'lease:%' AND state = 'pending'").scalar())
    return found


async def test_postgres_down_for_a_minute_with_leases_loses_nothing(
        cluster: Cluster, pg: tuple[str, list[str], list[str]]) -> None:
    url, start, stop_pg = pg
    await cluster.start(2)
    await cluster.fund("acme", FUNDS)
    statuses: list[int] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as client:
        workers = [asyncio.create_task(keep_chatting(client, cluster, i, statuses, stop)) for i in range(8)]
        await asyncio.sleep(3)
        store = SqlWalletStore(url)
        await store.open()
        try:
            assert await pending_leases(store) >= 1  # the hot wallet is served from leases
        finally:
            await store.close()
        await asyncio.to_thread(subprocess.run, stop_pg, check=True, capture_output=True)
        before = len(statuses)
        rss_start = [rss_kb(p.process.pid or 0) for p in cluster.proxies]
        await asyncio.sleep(OUTAGE_S)
        rss_end = [rss_kb(p.process.pid or 0) for p in cluster.proxies]
        during = statuses[before:]
        await asyncio.to_thread(subprocess.run, start, check=True, capture_output=True)
        recovered_after = await recovered(statuses, RECOVERY_S)
        stop.set()
        await asyncio.gather(*workers)
    seen = Counter(during)
    assert set(seen) <= {200, 503}, seen  # refused cleanly (or served from a lease before it ran dry), never 500
    assert seen[503] > 0, seen  # the outage was felt: nothing was promised that could not be made durable
    assert recovered_after is not None, f"still refusing {RECOVERY_S} s after PostgreSQL came back"
    print(f"during the outage {dict(seen)}; recovered {recovered_after:.1f} s after PostgreSQL came back")
    assert all(end - begin < 60_000 for begin, end in zip(rss_start, rss_end, strict=True)), (rss_start, rss_end)

    await cluster.stop()  # the leases go back with the processes
    store = SqlWalletStore(url)
    await store.open()
    try:
        served = statuses.count(200)
        records = [r for _, r in await store.usage("test", "acme", limit=100_000)]
        assert len(records) >= served  # every served request was billed (a refused one may be, if it was sent)
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending == 0 and await pending_leases(store) == 0
        assert balance.available == FUNDS - sum(r.charged_amount for r in records)
        assert await store.audit() == []
    finally:
        await store.close()
