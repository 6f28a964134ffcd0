"""Fixtures for the Redis wallet: the shared Redis (127.0.0.1:6379) under a unique key prefix per test,
cleaned up afterwards, and a throwaway ``redis-server`` on a free port for tests that flush, kill or
restart it. Without a reachable Redis these tests are skipped with a reason, except under ``CI=true``."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.store import RedisWalletStore
from tests.conftest import IN_CI, REDIS_URL, _reset_pg, drop_prefix, free_port, prefix, redis_url

__all__ = ["REDIS_URL", "drop_prefix", "prefix", "redis_url"]  # the shared Redis's fixtures, from tests/conftest.py


@dataclass
class RedisServer:
    """A throwaway redis-server (no persistence) that a test may flush, kill and restart."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
def redis_server(redis_url: str, tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server binary not found")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def rstore(store_url: str, redis_url: str, prefix: str) -> AsyncIterator[RedisWalletStore]:
    """Over SQLite and over PostgreSQL (``store_url``'s parameters)."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    store = RedisWalletStore(BatchingSqlWalletStore(store_url), redis_url, prefix=prefix, shards=4)
    await store.open()
    yield store
    await store.close()


async def drained(store: RedisWalletStore, timeout_s: float = 20) -> None:
    """Wait until every shard's stream is empty: all events committed to SQL."""
    client = aioredis.from_url(store._url) if store._client is None else store.redis
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lengths = [await client.xlen(store.keys.stream(s)) for s in range(store.keys.shards)]
        if not any(lengths):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger sink did not drain in {timeout_s} s: {lengths}")


async def racing_reserves(store: RedisWalletStore, n: int, amount: int, *, customer: str = "acme") -> list[bool]:
    """``n`` holds of ``amount`` placed at once (ids ``c0``...); which ones the wallet admitted."""

    async def one(i: int) -> bool:
        try:
            await store.reserve("test", customer, "USD", amount, hold_id=f"c{i}", ttl_ms=60_000)
            return True
        except InsufficientFunds:
            return False

    return list(await asyncio.gather(*(one(i) for i in range(n))))
