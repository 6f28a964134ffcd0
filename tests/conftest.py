"""Shared fixtures: real servers on loopback, never mocks of our own code.

* ``pg_url``: a fresh PostgreSQL database on the shared server (127.0.0.1:5432), created for this
  test session and dropped afterwards. Without a server the PostgreSQL tests are skipped with a reason
  — except under ``CI=true``, where a missing service is a failure.
* ``store_url``: a test of the SQL store runs on SQLite (a temp file) and on PostgreSQL.
* ``store``: the wallet contract, in each topology (``tests/topologies.py``): SQLite, PostgreSQL with two
  replicas, PostgreSQL with its rate-limit windows in Redis, two replicas.
* ``upstream``: the OpenAI-compatible mock upstream (real wire format) on a loopback port.
* ``gateway``: metergate itself, built by ``build_app`` and served on a loopback port, in front of it.
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx as sdk_httpx  # the openai SDK's own HTTP client library
import httpx2 as httpx
import openai
import pytest
import redis
from aiohttp import web

from metergate.config.settings import Settings, load_settings
from metergate.demo.mock_upstream import REQUESTS, build_mock_upstream
from metergate.http import JsonErrorAppRunner
from metergate.proxy.app import STORE, build_app
from metergate.wallet.store import WalletStore
from tests.topologies import TOPOLOGIES, database_url, make_store, opened, redis_for, round_robin

REDIS_URL = os.environ.get("METERGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("METERGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"
ADMIN_KEY = "mg_test_" + "k" * 24
LIVE_ADMIN_KEY = "mg_live_" + "l" * 24
PROVIDER_KEY = "sk-provider-secret-" + "x" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    import asyncio

    name = f"metergate_test_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def admin(sql: str) -> None:
        # In a thread of its own: this fixture may be first requested from inside a running loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run(sql)).result()

    try:
        admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {PG_DSN}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_DSN} ({exc}); PostgreSQL tests skipped")
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'wallet.db'}"
        return
    base: str = request.getfixturevalue("pg_url")
    yield base


async def _reset_pg(url: str) -> None:
    """Give each PostgreSQL test an empty schema inside the session's throwaway database."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from metergate.wallet import schema

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(schema.metadata.drop_all)
    await engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis; without one, Redis tests are skipped with a reason, except under ``CI=true``."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis is required in CI but unreachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL} ({exc}); Redis tests skipped")
    return REDIS_URL


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis, deleted afterwards."""
    name = f"mgtest-{uuid.uuid4().hex[:10]}"
    yield name
    drop_prefix(redis_url, name)


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> str:
    """Where the wallet lives (tests/topologies.py): embedded SQLite, PostgreSQL with two replicas, PostgreSQL
    with its rate-limit windows in Redis, two replicas."""
    return str(request.param)


@pytest.fixture
async def store(request: pytest.FixtureRequest, topology: str, tmp_path: Path) -> AsyncIterator[WalletStore]:
    """The wallet contract's store, in each topology; a PostgreSQL one starts from an empty schema."""
    url = database_url(request, topology, tmp_path)
    if url.startswith("postgresql"):
        await _reset_pg(url)
    async with opened(make_store(topology, url, redis_for(request, topology))) as s:
        yield s


@dataclass
class Upstream:
    url: str
    app: web.Application

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.app[REQUESTS]


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = JsonErrorAppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = build_mock_upstream()
    runner, port = await serve(app)
    yield Upstream(f"http://127.0.0.1:{port}", app)
    await runner.cleanup()


DEFAULT_PRICING = {"asset": "USD", "models": {
    "gpt-4o-mini": {"input_per_mtok": "0.30", "cached_input_per_mtok": "0.15", "output_per_mtok": "1.20"},
    "gpt-4o": {"input_per_mtok": "5.00", "cached_input_per_mtok": "2.50", "output_per_mtok": "20.00",
               "request_fee": "0.0001"},
    "text-embedding-3-small": {"input_per_mtok": "0.04"},
}}


@dataclass
class Gateway:
    """metergate in this process, or several replicas of it on one database (:func:`start_replicas`): then
    ``url`` is the first's and every client made here spreads its requests over all of them in turn."""

    url: str
    settings: Settings
    app: web.Application
    upstream: Upstream
    admin: httpx.AsyncClient
    clients: list[openai.AsyncOpenAI]
    ports: list[int] = field(default_factory=list)  # of every replica, with more than one
    apps: list[web.Application] = field(default_factory=list)  # every replica's, with more than one

    @property
    def store(self) -> WalletStore:
        return self.app[STORE]

    def openai(self, customer: str = "acme", *, mode: str = "test", **kwargs: Any) -> openai.AsyncOpenAI:
        """An official SDK client identified by the trusted customer header (the sidecar case)."""
        headers = {"X-Metergate-Customer": customer, "X-Metergate-Mode": mode, **kwargs.pop("headers", {})}
        if len(self.ports) > 1 and "http_client" not in kwargs:
            kwargs["http_client"] = sdk_httpx.AsyncClient(transport=round_robin(sdk_httpx, self.ports))
        client = openai.AsyncOpenAI(base_url=f"{self.url}/openai/v1", api_key="sk-app-does-not-hold-the-key",
                                    default_headers=headers, max_retries=0, **kwargs)
        self.clients.append(client)
        return client

    def http(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client of the gateway (all its replicas in turn)."""
        if len(self.ports) > 1:
            kwargs["transport"] = round_robin(httpx, self.ports)
        return httpx.AsyncClient(**kwargs)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.admin.aclose()

    async def customer(self, customer_id: str = "acme", funds: int = 1_000_000, *, mode: str = "test") -> None:
        """Create a customer and credit ``funds`` (smallest unit) through the admin API."""
        admin = self.admin if mode == "test" else self.http(
            base_url=self.admin.base_url, headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"})
        r = await admin.post("/customers", json={"id": customer_id, "name": customer_id.title()})
        assert r.status_code == 201, r.text
        if funds:
            r = await admin.post(f"/customers/{customer_id}/credits",
                                 json={"amount": funds, "idempotency_key": f"seed-{customer_id}"})
            assert r.status_code == 201, r.text
        if admin is not self.admin:
            await admin.aclose()

    async def usage(self, customer_id: str = "acme") -> list[dict[str, Any]]:
        r = await self.admin.get(f"/customers/{customer_id}/usage", params={"limit": 200})
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    async def balance(self, customer_id: str = "acme") -> dict[str, Any]:
        r = await self.admin.get(f"/customers/{customer_id}/balance")
        assert r.status_code == 200, r.text
        balances: list[dict[str, Any]] = r.json()["balances"]
        return balances[0] if balances else {"available": 0, "pending": 0, "posted": 0}


async def start_gateway(upstream: Upstream, database_url: str, *, store: WalletStore | None = None,
                        **overrides: Any) -> tuple[Gateway, web.AppRunner]:
    """A gateway on ``database_url`` (or on ``store``, a store made by the test) in this process."""
    port = free_port()
    settings = load_settings(**{
        "port": port, "database_url": database_url,
        "routes": [{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY}],
        "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY, LIVE_ADMIN_KEY],
        "portal_secrets": {"k1": secrets.token_urlsafe(32)}, "drain_timeout_s": 5, "upstream_timeout_s": 30,
        **overrides})
    url = f"http://127.0.0.1:{port}"
    app = build_app(settings, store, public_url=url)
    runner, _ = await serve(app, port)
    admin = httpx.AsyncClient(base_url=f"{url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              timeout=30)
    return Gateway(url, settings, app, upstream, admin, []), runner


class Runners:
    """The runners of several replicas, cleaned up together."""

    def __init__(self, runners: list[web.AppRunner]) -> None:
        self.runners = runners

    async def cleanup(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_replicas(upstream: Upstream, database_url: str, replicas: int = 2, *,
                         first: Callable[[Gateway], Awaitable[None]] | None = None,
                         **overrides: Any) -> tuple[Gateway, Runners]:
    """``replicas`` gateways on one database (and one Redis prefix, if the overrides name one), each with its
    own store, as separate processes would be; one portal secret for all, so a link made by one opens on
    another. The gateway answered reaches them in turn (:func:`tests.topologies.round_robin`). ``first`` runs
    on the first replica before the others start (price versions they load at start-up)."""
    overrides.setdefault("portal_secrets", {"k1": secrets.token_urlsafe(32)})
    started = [await start_gateway(upstream, database_url, **overrides)]
    if first is not None:
        await first(started[0][0])
    started += [await start_gateway(upstream, database_url, **overrides) for _ in range(replicas - 1)]
    gw = started[0][0]
    for other, _ in started[1:]:
        await other.close()
    gw.ports = [httpx.URL(g.url).port or 80 for g, _ in started]
    gw.apps = [g.app for g, _ in started]
    if replicas > 1:
        await gw.admin.aclose()
        gw.admin = gw.http(base_url=f"{gw.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           timeout=30)
    return gw, Runners([runner for _, runner in started])


async def start_in(request: pytest.FixtureRequest, topology: str, upstream: Upstream, tmp_path: Path,
                   **kwargs: Any) -> tuple[Gateway, Runners]:
    """The gateway in ``topology`` (tests/topologies.py): on SQLite one process; on PostgreSQL, and on
    PostgreSQL with its rate-limit windows in Redis, two replicas that the test's clients reach in turn.
    ``kwargs``: :func:`start_replicas`'s."""
    url = database_url(request, topology, tmp_path)
    if url.startswith("postgresql"):
        await _reset_pg(url)
    redis = redis_for(request, topology)
    extra = {"redis_url": redis[0], "redis_key_prefix": redis[1], "redis_shards": 4} if redis else {}
    return await start_replicas(upstream, url, 1 if topology == "sqlite" else 2, **extra, **kwargs)


@pytest.fixture
async def topology_gateway(request: pytest.FixtureRequest, upstream: Upstream, topology: str,
                           tmp_path: Path) -> AsyncIterator[Gateway]:
    """:func:`start_in` each topology."""
    gw, runners = await start_in(request, topology, upstream, tmp_path)
    yield gw
    await gw.close()
    await runners.cleanup()


@pytest.fixture
async def gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'gateway.db'}")
    yield gw
    await gw.close()
    await runner.cleanup()
