"""Bills kept while the database is down survive a ``kill -9`` of their process (the settlement spool).

Method: a ``metergate serve`` process over a throwaway PostgreSQL (``initdb`` + ``pg_ctl`` in a temp dir) with
``settlement_spool_dir`` set, serving one hot wallet from an escrow lease. PostgreSQL is stopped; requests
admitted from the lease are still answered (their hold lives in the process) and their settlements, refused,
are journaled in the spool. The process is then killed with SIGKILL, PostgreSQL started again and a new process
started on the same spool directory: it takes the dead process's journal over and bills every request it
answered, once (the request ids of the answers are the usage records' ids), through the lease the dead process
held. When the lease has expired and the survivor stopped, nothing is pending, the balance is the funds less
what the records charged, the ledger audits clean and the spool directory is empty.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Upstream
from tests.redis.cluster import MESSAGES, Cluster
from tests.redis.test_pg_outage import throwaway_pg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
FUNDS = 50_000_000


@pytest.fixture
async def cluster(upstream: Upstream, throwaway_pg: tuple[str, list[str], list[str]],  # noqa: F811
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(upstream.url, throwaway_pg[0], None, "", tmp_path, overrides={
        "settlement_spool_dir": str(tmp_path / "spool"), "hold_ttl_s": 10, "sweep_interval_s": 0.5,
        "upstream_timeout_s": 4, "drain_timeout_s": 1, "escrow": {"hot_per_s": 1, "ttl_s": 3, "tick_s": 0.2}})
    yield c
    await c.stop()


async def chat(client: httpx.AsyncClient, url: str) -> tuple[int, dict[str, str]]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 20}
    r = await client.post(f"{url}/openai/v1/chat/completions", json=body,
                          headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    return r.status_code, dict(r.headers)


async def test_bills_kept_while_postgres_is_down_outlive_a_kill_9(
        cluster: Cluster, throwaway_pg: tuple[str, list[str], list[str]], tmp_path: Path) -> None:  # noqa: F811
    url, start_pg, stop_pg = throwaway_pg
    await cluster.start(1)
    await cluster.fund("acme", FUNDS)
    [victim] = cluster.proxies
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(30):  # hot enough to be leased
            assert (await chat(client, victim.url))[0] == 200
        await asyncio.to_thread(subprocess.run, stop_pg, check=True, capture_output=True)
        answers = await asyncio.gather(*(chat(client, victim.url) for _ in range(4)))
    held = [h["x-metergate-request-id"] for status, h in answers if status == 200]
    assert held, [a[0] for a in answers]  # served from the lease while the database was down
    assert all("x-metergate-held" in h and "x-metergate-charged" not in h for s, h in answers if s == 200)
    spooled = "".join(p.read_text() for p in (tmp_path / "spool").glob("*.jsonl"))
    assert all(rid in spooled for rid in held)  # journaled before the kill
    cluster.kill(victim)
    await victim.process.wait()
    await asyncio.to_thread(subprocess.run, start_pg, check=True, capture_output=True)

    successor = await cluster.start_one(1)  # same spool directory: takes the dead process's journal over
    store = SqlWalletStore(url)
    await store.open()
    try:
        deadline = time.monotonic() + 30
        while True:
            ids = {r.id for _, r in await store.usage("test", "acme", limit=100_000)}
            if set(held) <= ids:
                break
            assert time.monotonic() < deadline, f"not billed: {set(held) - ids}"
            await asyncio.sleep(0.5)
        await cluster.stop()
        deadline = time.monotonic() + 30  # the dead process's lease expires (3 s) and the sweep releases it
        while (await store.balance("test", "acme", "USD")).debits_pending and time.monotonic() < deadline:
            await store.expire_holds(now_ms=int(time.time() * 1000))
            await asyncio.sleep(0.5)
        records = [r for _, r in await store.usage("test", "acme", limit=100_000)]
        assert len({r.id for r in records}) == len(records)  # each billed once
        assert all(r.charged_amount > 0 for r in records if r.id in held)
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending == 0
        assert balance.available == FUNDS - sum(r.charged_amount for r in records)
        assert await store.audit() == []
    finally:
        await store.close()
    assert successor.process.returncode == 0
    assert list((tmp_path / "spool").glob("*.jsonl")) == []  # every bill paid, every journal gone
