"""Payment fixtures: the fake Stripe on loopback and a gateway configured to reach it.

``paygate`` is metergate with both modes' Stripe keys and webhook secrets, its Stripe API base pointed at
the fake, and (for the notification tests) ``notify_url`` pointing at a local receiver when one is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from metergate.payments.service import PAYMENTS, Payments
from tests.conftest import Gateway, Upstream, start_gateway
from tests.payments.fake_stripe import LIVE_KEY, LIVE_WHSEC, TEST_KEY, TEST_WHSEC, FakeStripe, running_fake_stripe


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe() as fake:
        yield fake


def stripe_settings(fake: FakeStripe, **overrides: Any) -> dict[str, Any]:
    return {"stripe_test_key": TEST_KEY, "stripe_live_key": LIVE_KEY, "stripe_test_webhook_secret": TEST_WHSEC,
            "stripe_live_webhook_secret": LIVE_WHSEC, "stripe_api_base": fake.url, "topup_min": "5",
            "topup_max": "500", "auto_topup_interval_s": 3600, **overrides}


@dataclass
class PayGate:
    gw: Gateway
    fake: FakeStripe
    http: httpx.AsyncClient

    @property
    def payments(self) -> Payments:
        return self.gw.app[PAYMENTS]

    async def deliver(self, payload: str, *, mode: str = "test", secret: str | None = None,
                      timestamp: int | None = None) -> httpx.Response:
        """POST an event to the mode's webhook endpoint, signed as Stripe signs it."""
        secret = secret or (TEST_WHSEC if mode == "test" else LIVE_WHSEC)
        header = FakeStripe.sign(payload, secret, timestamp=timestamp)
        return await self.http.post(f"{self.gw.url}/webhooks/stripe/{mode}", content=payload.encode(),
                                    headers={"Stripe-Signature": header, "Content-Type": "application/json"})

    async def available(self, customer_id: str = "acme", mode: str = "test") -> int:
        balance = await self.gw.store.balance(mode, customer_id, "USD")  # type: ignore[arg-type]
        return balance.available


async def start_paygate(upstream: Upstream, tmp_path: Path, fake: FakeStripe,
                        **overrides: Any) -> AsyncIterator[PayGate]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'pay.db'}",
                                     **stripe_settings(fake, **overrides))
    http = httpx.AsyncClient(timeout=30)
    try:
        yield PayGate(gw, fake, http)
    finally:
        await http.aclose()
        await gw.close()
        await runner.cleanup()


@pytest.fixture
async def paygate(upstream: Upstream, tmp_path: Path, fake_stripe: FakeStripe) -> AsyncIterator[PayGate]:
    async for pg in start_paygate(upstream, tmp_path, fake_stripe):
        yield pg
