"""Webhook fixtures: a receiver on a loopback port that can be down and come back on the same port, and
metergate (with the fake Stripe) sending it notifications, on SQLite or PostgreSQL.

The receiver is the operator's endpoint as the Standard Webhooks spec expects one to be written: it
verifies each delivery with the ``standardwebhooks`` package and processes a ``webhook-id`` once, however
often it is delivered.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web

from tests.conftest import Upstream, _reset_pg, free_port, serve
from tests.payments.conftest import PayGate, stripe_settings
from tests.payments.fake_stripe import FakeStripe, running_fake_stripe

SIGNING_SECRET = "whsec_" + base64.b64encode(b"metergate-webhook-test-key-32by").decode()
LEGACY_SECRET = "notify-secret-" + "n" * 24
FAST = {"signing_secret": SIGNING_SECRET, "retry_base_s": 0.05, "retry_max_s": 0.2, "max_attempts": 1000,
        "poll_interval_s": 0.05}


@dataclass
class Receiver:
    """``deliveries``: every request, in order; ``processed``: the events acted on, once per webhook-id."""

    port: int = field(default_factory=free_port)
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_first: int = 0  # answer 500 to this many deliveries first
    hang: bool = False  # never answer (until the receiver stops)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        self.deliveries.append((headers, body))
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "not now"}, status=500)
        try:
            event = standardwebhooks.Webhook(SIGNING_SECRET).verify(body, headers)
        except standardwebhooks.WebhookVerificationError:
            return web.json_response({"error": "bad signature"}, status=400)
        self.processed.setdefault(request.headers["webhook-id"], event)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner, _ = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.deliveries]


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe() as fake:
        yield fake


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def down_receiver() -> AsyncIterator[Receiver]:
    """A receiver whose port nothing listens on until the test starts it."""
    r = Receiver()
    yield r
    await r.stop()


@pytest.fixture
async def webhook_db(store_url: str) -> str:
    """An empty database: a SQLite file, or the session's PostgreSQL database emptied."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    return store_url


async def start_hookgate(upstream: Upstream, database_url: str, fake: FakeStripe, notify_url: str,
                         **webhooks: Any) -> tuple[PayGate, Any]:
    import httpx2 as httpx

    from tests.conftest import start_gateway

    overrides: dict[str, Any] = {"webhooks": {**FAST, **webhooks}}
    if notify_url:
        overrides |= {"notify_url": notify_url, "notify_secret": LEGACY_SECRET}
    gw, runner = await start_gateway(upstream, database_url, **stripe_settings(fake, **overrides))
    return PayGate(gw, fake, httpx.AsyncClient(timeout=30)), runner


async def stop_hookgate(pg: PayGate, runner: Any) -> None:
    await pg.http.aclose()
    await pg.gw.close()
    await runner.cleanup()


async def low_balance(pg: PayGate, customer_id: str) -> None:
    """Cause notifications through the admin API and the auto top-up check: a customer whose balance is
    below its auto top-up threshold and who has no saved card gets ``balance.low`` and ``topup.failed``."""
    await pg.gw.customer(customer_id, funds=1_000_000)
    r = await pg.gw.admin.put(f"/customers/{customer_id}/auto-top-up",
                              json={"threshold": 5_000_000, "amount": 20_000_000})
    assert r.status_code == 200, r.text
    await pg.payments.topups.check("test", customer_id, "USD")


def body_of(delivery: tuple[dict[str, str], bytes]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(delivery[1])
    return parsed

