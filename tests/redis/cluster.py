"""Several real ``metergate serve`` processes sharing one Redis prefix and one SQL ledger, for the
multi-replica tests. Each process is a subprocess with its own YAML config, started and waited for ready."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, free_port

SHARDS = 4
MESSAGES = [{"role": "user", "content": "storm"}]


@dataclass
class Proxy:
    process: asyncio.subprocess.Process
    url: str
    log: Path


@dataclass
class Cluster:
    upstream_url: str
    database_url: str
    redis_url: str | None  # None: the SQL store alone (PostgreSQL with escrow leases)
    prefix: str
    workdir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    proxies: list[Proxy] = field(default_factory=list)

    async def start(self, n: int) -> None:
        await asyncio.gather(*(self.start_one(i) for i in range(n)))

    async def start_one(self, i: int) -> Proxy:
        port = free_port()
        config = self.workdir / f"metergate-{i}-{port}.yaml"
        redis = {"redis_url": self.redis_url, "redis_key_prefix": self.prefix, "redis_wallet": True,
                 "redis_shards": SHARDS} if self.redis_url else {}
        config.write_text(yaml.safe_dump({
            "port": port, "database_url": self.database_url, **redis, "drain_deadline_s": 1,
            "routes": [{"prefix": "/openai", "upstream": self.upstream_url, "api_key": "sk-up-" + "k" * 20}],
            "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": "s" * 40},
            **self.overrides}))
        log = self.workdir / f"metergate-{i}-{port}.log"
        with log.open("w") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "metergate", "serve", "--config", str(config), stdout=out, stderr=out)
        proxy = Proxy(process, f"http://127.0.0.1:{port}", log)
        self.proxies.append(proxy)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(600):
                assert process.returncode is None, log.read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return proxy
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"proxy {i} not ready: {log.read_text()}")

    async def fund(self, customer: str, amount: int) -> None:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=self.proxies[0].url + "/admin/v1", headers=admin) as client:
            r = await client.post("/customers", json={"id": customer, "name": customer})
            assert r.status_code == 201, r.text
            r = await client.post(f"/customers/{customer}/credits", json={"amount": amount, "idempotency_key": "seed"})
            assert r.status_code == 201, r.text

    def kill(self, proxy: Proxy) -> None:
        proxy.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        for p in self.proxies:
            if p.process.returncode is None:
                p.process.send_signal(signal.SIGTERM)
        for p in self.proxies:
            try:
                await asyncio.wait_for(p.process.wait(), 20)
            except TimeoutError:
                p.process.kill()
                await p.process.wait()

    def store(self) -> RedisWalletStore:
        """A store on the same Redis and ledger that drains nothing itself (for checks)."""
        assert self.redis_url is not None, "a cluster without Redis: check its SqlWalletStore"
        return RedisWalletStore(SqlWalletStore(self.database_url), self.redis_url, prefix=self.prefix, shards=SHARDS,
                                run_sink=False)


async def keep_chatting(client: httpx.AsyncClient, cluster: Cluster, worker: int, statuses: list[int],
                        stop: asyncio.Event) -> None:
    """One worker of a steady load on ``acme``: slowed chats through the proxies in turn, until ``stop``,
    each answer's status appended to ``statuses`` (0: the connection failed)."""
    while not stop.is_set():
        url = cluster.proxies[worker % len(cluster.proxies)].url
        statuses.append(await chat(client, url, "acme", "slow:0.05,words:3"))


async def chat(client: httpx.AsyncClient, url: str, customer: str, behavior: str = "words:3",
               stream: bool = False) -> int:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 20}
    if stream:
        body["stream"] = True
    try:
        r = await client.post(f"{url}/openai/v1/chat/completions", json=body,
                              headers={"X-Metergate-Customer": customer, "X-Metergate-Mode": "test",
                                       "X-Mock-Behavior": behavior})
        return r.status_code
    except httpx.TransportError:
        return 0


async def wait_drained(store: RedisWalletStore, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    lengths: list[int] = []
    while time.monotonic() < deadline:
        try:
            lengths = [await store.redis.xlen(store.keys.stream(s)) for s in range(SHARDS)]
            if not any(lengths):
                return
        except Exception as exc:  # Redis restarting
            lengths = [-1]
            _ = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"the ledger did not drain in {timeout_s} s: {lengths}")


# The homes of the wallet as processes meet them: one SQLite file (its locks order the processes' writers),
# PostgreSQL alone, PostgreSQL with the rate-limit windows in Redis (the default with ``redis_url``).
PROCESS_TOPOLOGIES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                      pytest.param("postgres+redis-windows", marks=pytest.mark.postgres)]


async def cluster_in(request: pytest.FixtureRequest, topology: str, upstream_url: str, tmp_path: Path,
                     overrides: dict[str, Any] | None = None) -> Cluster:
    """A :class:`Cluster` (not started) in one of :data:`PROCESS_TOPOLOGIES`, on an empty database."""
    if topology == "sqlite":
        return Cluster(upstream_url, f"sqlite:///{tmp_path / 'cluster.db'}", None, "", tmp_path,
                       overrides=dict(overrides or {}))
    from tests.conftest import _reset_pg

    pg_url: str = request.getfixturevalue("pg_url")
    await _reset_pg(pg_url)
    if topology == "postgres":
        return Cluster(upstream_url, pg_url, None, "", tmp_path, overrides=dict(overrides or {}))
    return Cluster(upstream_url, pg_url, request.getfixturevalue("redis_url"), request.getfixturevalue("prefix"),
                   tmp_path, overrides={**(overrides or {}), "redis_wallet": False})
