"""Several real ``metergate serve`` processes on one database (and optionally one Redis prefix), for the
budget storms: each a subprocess with its own YAML config, started and waited for ready, stopped with SIGTERM
(so that each gives its unused budget leases back)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, free_port


@dataclass
class Replicas:
    upstream_url: str
    database_url: str
    workdir: Path
    redis: dict[str, Any] = field(default_factory=dict)  # redis_url, redis_key_prefix, redis_shards
    urls: list[str] = field(default_factory=list)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    async def start(self, n: int) -> None:
        await asyncio.gather(*(self._start_one(i) for i in range(n)))

    async def _start_one(self, i: int) -> None:
        port = free_port()
        config = self.workdir / f"replica-{i}.yaml"
        config.write_text(yaml.safe_dump({
            "port": port, "database_url": self.database_url, "drain_deadline_s": 1,
            "routes": [{"prefix": "/openai", "upstream": self.upstream_url, "api_key": "sk-up-" + "k" * 20}],
            "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": "s" * 40},
            **self.redis}))
        log = self.workdir / f"replica-{i}.log"
        with log.open("w") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "metergate", "serve", "--config", str(config), stdout=out, stderr=out)
        self.processes.append(process)
        self.logs.append(log)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(600):
                assert process.returncode is None, log.read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        self.urls.append(url)
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"replica {i} not ready: {log.read_text()}")

    def admin(self, i: int = 0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.urls[i] + "/admin/v1", timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    @contextlib.asynccontextmanager
    async def check_store(self) -> AsyncIterator[WalletStore]:
        """A store on the same database (and Redis) that drains nothing itself, once the ledger has drained."""
        sql = SqlWalletStore(self.database_url)
        if not self.redis.get("redis_wallet", False):  # SQL alone, or the wallets in SQL anyway
            await sql.open()
            try:
                yield sql
            finally:
                await sql.close()
            return
        from metergate.wallet.redis.store import RedisWalletStore
        from tests.redis.cluster import wait_drained

        store = RedisWalletStore(sql, self.redis["redis_url"], prefix=self.redis["redis_key_prefix"],
                                 shards=self.redis["redis_shards"], run_sink=False)
        await store.open()
        try:
            await wait_drained(store)
            yield store
        finally:
            await store.close()

    async def stop(self) -> None:
        for p in self.processes:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
                await p.wait()
