"""The wallet's homes, as the contract tests meet them: embedded SQLite, PostgreSQL with two replicas, and
PostgreSQL with the rate-limit windows in Redis, two replicas.

Why two stores stand for two processes: what a process keeps of the wallet is its own connection pool, its
group commit (the SQLite writer, PostgreSQL's batches) and its caches; two store objects over one database
share none of those, exactly as two ``metergate serve`` processes do, so a contract test that alternates its
calls between them meets every cross-replica hazard (a cached key or hold that the other replica changed, two
group commits racing on one row) without a process boundary's cost per call. The storms and fault tests run
real processes (``tests/redis/cluster.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from metergate.wallet.sql import SqlWalletStore

TOPOLOGIES = [
    "sqlite",
    pytest.param("postgres-x2", marks=pytest.mark.postgres),
    pytest.param("redis-postgres-x2", marks=pytest.mark.postgres),
]


class Replicas:
    """Several stores over one database, called in turn: each method call goes to the next replica (a
    load balancer's round robin), plain attributes are the first replica's. ``replicas`` are real stores;
    a test that needs one replica in particular takes it from there."""

    def __init__(self, replicas: list[SqlWalletStore]) -> None:
        self.replicas = replicas
        self._turn = itertools.cycle(replicas)

    def __getattr__(self, name: str) -> Any:
        first = getattr(self.replicas[0], name)
        return getattr(next(self._turn), name) if callable(first) else first

    async def open(self) -> None:
        for r in self.replicas:
            await r.open()

    async def close(self) -> None:
        for r in self.replicas:
            await r.close()

    async def ping(self) -> None:
        for r in self.replicas:
            await r.ping()

    @property
    def system_of_record(self) -> SqlWalletStore:
        return self.replicas[0]


def database_url(request: pytest.FixtureRequest, topology: str, tmp_path: Path) -> str:
    """The database of ``topology``: a fresh SQLite file, or the session's PostgreSQL database."""
    if topology == "sqlite":
        return f"sqlite:///{tmp_path / 'wallet.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def redis_for(request: pytest.FixtureRequest, topology: str) -> tuple[str, str] | None:
    """The shared Redis and this test's own key prefix, for a topology that keeps windows in Redis."""
    if topology != "redis-postgres-x2":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("prefix")


def make_store(topology: str, url: str, redis: tuple[str, str] | None = None, **kwargs: Any) -> Any:
    """The store (or :class:`Replicas`) a contract test drives in ``topology``, not yet opened; ``redis``:
    :func:`redis_for`'s answer."""
    if topology == "sqlite":
        return SqlWalletStore(url, **kwargs)
    if topology == "postgres-x2":
        return Replicas([SqlWalletStore(url, **kwargs) for _ in range(2)])
    from metergate.wallet.redis.windows import SqlWalletWithRedisWindows

    assert redis is not None, "the Redis topology needs redis_for()"
    return Replicas([SqlWalletWithRedisWindows(url, redis[0], prefix=redis[1], shards=4, **kwargs)
                     for _ in range(2)])


def round_robin(lib: Any, ports: list[int]) -> Any:
    """An HTTP transport of ``lib`` (httpx, or the httpx2 the tests use) that sends each request to the next of
    ``ports`` on loopback in turn, as a load balancer in front of replicas would: a test's consecutive calls
    (a hold placed, its heartbeat, its capture) meet different replicas."""
    turn = itertools.cycle(ports)

    class RoundRobin(lib.AsyncBaseTransport):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.inner = lib.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            if request.url.port in ports:
                request.url = request.url.copy_with(port=next(turn))
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return RoundRobin()


@asynccontextmanager
async def opened(store: Any) -> AsyncIterator[Any]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()
