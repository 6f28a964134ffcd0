"""The operator is told, by signed webhooks, when a wallet runs low or dry and when a top-up succeeds or
fails; the signature (HMAC-SHA256 over timestamp and body) verifies, and a tampered or stale one does not.

Method: a local aiohttp receiver stands in for the operator's endpoint (``notify_url``); the gateway is
driven through the admin API, the wallet store and ``TopUps.check`` against the fake Stripe, and the
deliveries the receiver got are checked with :func:`metergate.payments.notify.verify`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from metergate.payments.notify import SIGNATURE_HEADER, sign, verify
from tests.conftest import Upstream
from tests.payments.conftest import PayGate, start_paygate
from tests.payments.fake_stripe import FakeStripe

SECRET = "notify-secret-" + "n" * 24


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[bytes, str]]]]:
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers.get(SIGNATURE_HEADER, "")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hooks/metergate", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/metergate", received
    await runner.cleanup()


@pytest.fixture
async def notifying(upstream: Upstream, tmp_path: Path, fake_stripe: FakeStripe,
                    receiver: tuple[str, list[tuple[bytes, str]]]) -> AsyncIterator[PayGate]:
    async for pg in start_paygate(upstream, tmp_path, fake_stripe, notify_url=receiver[0], notify_secret=SECRET):
        yield pg


async def _events(pg: PayGate, received: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    await pg.payments.notifier.flush()
    for body, header in received:
        assert verify(body, header, SECRET), header
    return [json.loads(body) for body, _ in received]


async def _armed(pg: PayGate, card: str) -> None:
    await pg.gw.customer("acme", funds=1_000_000)
    pg.fake.default_payment_method(await pg.payments.stripe.customer("test", "acme"), card)
    await pg.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": 5_000_000, "amount": 20_000_000})


async def test_low_balance_then_top_up_succeeded(notifying: PayGate,
                                                 receiver: tuple[str, list[tuple[bytes, str]]]) -> None:
    await _armed(notifying, "pm_card_visa")
    await notifying.payments.topups.check("test", "acme", "USD")
    events = await _events(notifying, receiver[1])
    assert [e["type"] for e in events] == ["balance.low", "topup.succeeded"]
    assert events[0]["customer_id"] == "acme" and events[0]["mode"] == "test"
    assert events[0]["data"] == {"asset": "USD", "available": 1_000_000, "threshold": 5_000_000}
    assert events[1]["data"]["amount"] == 20_000_000 and events[1]["data"]["kind"] == "auto"


async def test_top_up_failed_names_the_reason(notifying: PayGate,
                                              receiver: tuple[str, list[tuple[bytes, str]]]) -> None:
    await _armed(notifying, "pm_card_chargeDeclined")
    await notifying.payments.topups.check("test", "acme", "USD")
    await notifying.payments.topups.check("test", "acme", "USD")  # no second charge, no second notice
    events = await _events(notifying, receiver[1])
    assert [e["type"] for e in events] == ["balance.low", "topup.failed"]
    assert events[1]["data"]["error_code"] == "card_declined"


async def test_checkout_top_up_succeeded_is_notified_once(notifying: PayGate,
                                                          receiver: tuple[str, list[tuple[bytes, str]]]) -> None:
    await notifying.gw.customer("acme", funds=0)
    await notifying.payments.topups.start_checkout("test", "acme", 1_000, success_url="http://x/ok",
                                                   cancel_url="http://x/no")
    (session_id,) = notifying.fake.sessions
    payload = FakeStripe.event("checkout.session.completed", notifying.fake.completed_session(session_id))
    for _ in range(3):
        assert (await notifying.deliver(payload)).status_code == 200
    events = await _events(notifying, receiver[1])
    assert [e["type"] for e in events] == ["topup.succeeded"]
    assert events[0]["data"]["kind"] == "checkout" and events[0]["data"]["amount"] == 10_000_000


async def test_wallet_depleted(notifying: PayGate, receiver: tuple[str, list[tuple[bytes, str]]]) -> None:
    await notifying.gw.customer("acme", funds=1_000)
    hold, _ = await notifying.gw.store.reserve("test", "acme", "USD", 1_000, hold_id="hold_all", ttl_ms=60_000)
    await notifying.gw.store.settle(hold.id, 1_000)
    await notifying.payments.after_settlement("test", "acme", "USD")
    await notifying.payments.after_settlement("test", "acme", "USD")  # still empty: told once
    events = await _events(notifying, receiver[1])
    assert [e["type"] for e in events] == ["wallet.depleted"]


@pytest.mark.parametrize("case", ["tampered", "stale", "other_secret", "garbage"])
def test_receiver_refuses_bad_signatures(case: str) -> None:
    body, now = b'{"type": "topup.succeeded"}', int(time.time())
    header = sign(body, SECRET, now)
    assert verify(body, header, SECRET)
    if case == "tampered":
        assert not verify(body.replace(b"succeeded", b"failed"), header, SECRET)
    elif case == "stale":
        assert not verify(body, sign(body, SECRET, now - 301), SECRET)
    elif case == "other_secret":
        assert not verify(body, sign(body, "another-secret", now), SECRET)
    else:
        assert not verify(body, "t=abc,v1=00", SECRET)
