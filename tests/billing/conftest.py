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
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web

from metergate.billing.service import BILLING, Billing
from tests.conftest import LIVE_ADMIN_KEY, Gateway, Upstream, _reset_pg, start_gateway
from tests.payments.conftest import stripe_settings
from tests.payments.fake_stripe import FakeStripe, running_fake_stripe

FAST_BILLING = {"report_interval_s": 0.05, "retry_base_s": 0.05, "retry_max_s": 0.2, "send_timeout_s": 0.5,
                "lease_s": 5, "batch_size": 50}


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe() as fake:
        yield fake


@dataclass
class BillGate:
    gw: Gateway
    runner: web.AppRunner
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
                         settings: dict[str, Any] | None = None, **billing: Any) -> BillGate:
    """``billing`` overrides the fast reporter settings; ``settings`` any other setting."""
    gw, runner = await start_gateway(upstream, database_url, **stripe_settings(
        fake, billing={**FAST_BILLING, **billing}, **(settings or {})))
    live = httpx.AsyncClient(base_url=f"{gw.url}/admin/v1", headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"},
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
async def billgate(upstream: Upstream, billing_db: str, fake_stripe: FakeStripe) -> AsyncIterator[BillGate]:
    bg = await start_billgate(upstream, billing_db, fake_stripe)
    yield bg
    await bg.stop()


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 15, what: str = "condition") -> None:
    """Poll ``check`` until it holds (the reporter works in the background)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
