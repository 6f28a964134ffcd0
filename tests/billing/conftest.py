"""Billing fixtures: the fake Stripe (with meter events) and metergate gateways configured to reach it.

``start_billgate`` starts metergate on a given database with both modes' Stripe keys, its Stripe API base at
the fake, and a fast meter-event reporter (short interval, timeout and backoff), so that outage and restart
scenarios play out in seconds. Several gateways may be started on one database (replicas, restarts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web

from metergate.billing.service import BILLING, Billing
from tests.conftest import LIVE_ADMIN_KEY, Gateway, Runners, Upstream, _reset_pg, start_gateway, start_replicas
from tests.payments.conftest import stripe_settings
from tests.payments.fake_stripe import FakeStripe, running_fake_stripe
from tests.topologies import database_url, redis_for

FAST_BILLING = {"report_interval_s": 0.05, "retry_base_s": 0.05, "retry_max_s": 0.2, "send_timeout_s": 0.5,
                "lease_s": 5, "batch_size": 50}


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe() as fake:
        yield fake


@dataclass
class BillGate:
    gw: Gateway
    runner: web.AppRunner | Runners
    live: httpx.AsyncClient

    @property
    def billing(self) -> Billing:
        return self.gw.app[BILLING]

    def admin(self, mode: str = "test") -> httpx.AsyncClient:
        return self.gw.admin if mode == "test" else self.live

    async def set_billing(self, customer: str, mode: str = "test", **body: Any) -> dict[str, Any]:
        r = await self.admin(mode).put(f"/customers/{customer}/billing", json=body)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def outbox(self, customer: str, mode: str = "test") -> list[dict[str, Any]]:
        r = await self.admin(mode).get(f"/customers/{customer}/meter-events")
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        return rows

    async def usage(self, customer: str, mode: str = "test") -> list[dict[str, Any]]:
        r = await self.admin(mode).get(f"/customers/{customer}/usage", params={"limit": 200})
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        return rows

    async def audits(self) -> list[str]:
        return await self.gw.store.audit() + await self.billing.store.audit()

    stopped: bool = False

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.live.aclose()
        await self.gw.close()
        await self.runner.cleanup()


_running: list[BillGate] = []


@pytest.fixture(autouse=True)
async def _stop_billgates() -> AsyncIterator[None]:
    """Stop every gateway a test started and did not stop (it failed midway): its sockets and database
    connections would otherwise be collected inside some later test, which then fails for them."""
    yield
    while _running:
        await _running.pop().stop()


async def start_billgate(upstream: Upstream, database_url: str, fake: FakeStripe, *,
                         settings: dict[str, Any] | None = None, replicas: int = 1, **billing: Any) -> BillGate:
    """``billing`` overrides the fast reporter settings; ``settings`` any other setting; ``replicas`` gateways
    on the database, reached in turn (:func:`tests.conftest.start_replicas`), each with its own reporter."""
    overrides = stripe_settings(fake, billing={**FAST_BILLING, **billing}, **(settings or {}))
    gw, runner = await (start_gateway(upstream, database_url, **overrides) if replicas == 1
                        else start_replicas(upstream, database_url, replicas, **overrides))
    live = gw.http(base_url=f"{gw.url}/admin/v1", headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"},
                   timeout=30)
    bg = BillGate(gw, runner, live)
    _running.append(bg)
    return bg


@pytest.fixture
async def billing_db(store_url: str) -> str:
    """An empty database for a test: a SQLite file, or the session's PostgreSQL database emptied."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    return store_url


@pytest.fixture
async def billgate(request: pytest.FixtureRequest, upstream: Upstream, topology: str, tmp_path: Path,
                   fake_stripe: FakeStripe) -> AsyncIterator[BillGate]:
    """Billing in each topology (tests/topologies.py): SQLite; PostgreSQL, and PostgreSQL with Redis windows,
    with two replicas reached in turn, each running its own meter-event reporter."""
    url = database_url(request, topology, tmp_path)
    if url.startswith("postgresql"):
        await _reset_pg(url)
    redis = redis_for(request, topology)
    bg = await start_billgate(upstream, url, fake_stripe, replicas=1 if topology == "sqlite" else 2, settings=(
        {"redis_url": redis[0], "redis_key_prefix": redis[1], "redis_shards": 4} if redis else None))
    yield bg
    await bg.stop()


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 15, what: str = "condition") -> None:
    """Poll ``check`` until it holds (the reporter works in the background)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
