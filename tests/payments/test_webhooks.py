"""Stripe webhooks credit a wallet exactly once, however they arrive, and anything not signed by Stripe
for this mode within five minutes changes nothing.

Method: events built in Stripe's shape, signed with ``stripe.WebhookSignature.generate_signature_header``
and posted to the running gateway: repeated, 20 at once, out of order, forged, stale, signed with the
other mode's secret, and for a wallet that does not exist yet (a failed credit that Stripe retries). The
wallet's balance and ledger audit are read back after each.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.payments.conftest import PayGate
from tests.payments.fake_stripe import LIVE_WHSEC, TEST_WHSEC, FakeStripe

TOPUP = 25_000_000  # 25.00 USD in micro-dollars


async def _paid_session(pg: PayGate, customer: str = "acme") -> dict[str, Any]:
    await pg.payments.topups.start_checkout("test", customer, 2_500, success_url="http://x/ok",
                                            cancel_url="http://x/no")
    session_id = next(reversed(pg.fake.sessions))
    return pg.fake.completed_session(session_id)


async def test_duplicate_deliveries_credit_once(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    for _ in range(3):
        r = await paygate.deliver(payload)
        assert r.status_code == 200, r.text
    assert await paygate.available() == TOPUP
    assert await paygate.gw.store.audit() == []


async def test_twenty_concurrent_deliveries_credit_once(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    answers = await asyncio.gather(*(paygate.deliver(payload) for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert await paygate.available() == TOPUP
    credits = [e for e in await paygate.gw.store.ledger("test", "acme", limit=50) if e.kind == "credit"]
    assert len(credits) == 1
    assert await paygate.gw.store.audit() == []


async def test_two_events_for_one_session_credit_once(paygate: PayGate) -> None:
    """``completed`` and ``async_payment_succeeded`` are different events about the same money."""
    await paygate.gw.customer("acme", funds=0)
    session = await _paid_session(paygate)
    for kind in ("checkout.session.async_payment_succeeded", "checkout.session.completed"):
        assert (await paygate.deliver(FakeStripe.event(kind, session))).status_code == 200
    assert await paygate.available() == TOPUP


async def test_unpaid_completed_session_waits_for_async_payment(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    session = {**await _paid_session(paygate), "payment_status": "unpaid"}
    r = await paygate.deliver(FakeStripe.event("checkout.session.completed", session))
    assert r.status_code == 200 and r.json()["result"] == "ignored"
    assert await paygate.available() == 0
    paid = {**session, "payment_status": "paid"}
    assert (await paygate.deliver(FakeStripe.event("checkout.session.async_payment_succeeded", paid))).json()[
        "result"] == "credited"
    assert await paygate.available() == TOPUP


async def test_failed_credit_is_credited_when_stripe_retries(paygate: PayGate) -> None:
    """The first delivery cannot credit (no such wallet yet): nothing is recorded, so the retry credits."""
    await paygate.gw.customer("acme", funds=0)
    session = await _paid_session(paygate)
    session["metadata"] = {**session["metadata"], "metergate_customer": "newco"}
    payload = FakeStripe.event("checkout.session.completed", session)
    first = await paygate.deliver(payload)
    assert first.status_code >= 400
    await paygate.gw.customer("newco", funds=0)
    assert (await paygate.deliver(payload)).status_code == 200
    assert (await paygate.deliver(payload)).status_code == 200
    assert await paygate.available("newco") == TOPUP


def _auto_intent(pg: PayGate, pi_id: str, topup_id: str) -> dict[str, Any]:
    return {"id": pi_id, "object": "payment_intent", "amount": 2_500, "currency": "usd", "status": "succeeded",
            "metadata": {"metergate_topup": topup_id, "metergate_customer": "acme", "metergate_mode": "test",
                         "metergate_asset": "USD", "metergate_purpose": "auto_topup"},
            "last_payment_error": None}


@pytest.mark.parametrize("order", [("succeeded", "failed"), ("failed", "succeeded")])
async def test_out_of_order_payment_intent_events_end_in_one_credit(paygate: PayGate,
                                                                    order: tuple[str, str]) -> None:
    """A payment that finally succeeded stays succeeded and credited once, in whichever order its events come."""
    await paygate.gw.customer("acme", funds=0)
    store = paygate.payments.store
    topup = await store.begin_auto_topup("test", "acme", "USD", TOPUP, day_start_ms=0, daily_cap=5)
    assert topup is not None
    intent = _auto_intent(paygate, "pi_outoforder1", topup.id)
    failed = {**intent, "status": "requires_payment_method",
              "last_payment_error": {"code": "card_declined", "message": "Your card was declined."}}
    events = {"succeeded": FakeStripe.event("payment_intent.succeeded", intent),
              "failed": FakeStripe.event("payment_intent.payment_failed", failed)}
    for name in order:
        assert (await paygate.deliver(events[name])).status_code == 200
    assert await paygate.available() == TOPUP
    found = await store.get_topup(topup.id)
    assert found is not None and found.state == "succeeded"
    # The in-flight slot is free again: a next auto top-up can be claimed.
    assert await store.begin_auto_topup("test", "acme", "USD", TOPUP, day_start_ms=0, daily_cap=5) is not None


async def test_checkout_payment_intent_event_does_not_credit_twice(paygate: PayGate) -> None:
    """A Checkout's own PaymentIntent event is ignored: its session event is what credits."""
    await paygate.gw.customer("acme", funds=0)
    session = await _paid_session(paygate)
    intent = {"id": session["payment_intent"], "object": "payment_intent", "amount": 2_500, "currency": "usd",
              "status": "succeeded", "metadata": dict(session["metadata"])}
    assert (await paygate.deliver(FakeStripe.event("payment_intent.succeeded", intent))).json()["result"] == "ignored"
    assert (await paygate.deliver(FakeStripe.event("checkout.session.completed", session))).status_code == 200
    assert await paygate.available() == TOPUP


# ------------------------------------------------------------------ refusals: 400 with a code, nothing changed

async def _refused(pg: PayGate, status: int, code: str, **deliver: Any) -> None:
    r = await pg.deliver(**deliver)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert await pg.available() == 0
    assert [e for e in await pg.gw.store.ledger("test", "acme", limit=10) if e.kind == "credit"] == []


async def test_forged_signature_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    await _refused(paygate, 400, "invalid_signature", payload=payload, secret="whsec_not_the_secret_at_all")


async def test_tampered_body_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    header = FakeStripe.sign(payload, TEST_WHSEC)
    tampered = payload.replace('"amount_total": 2500', '"amount_total": 250000')
    assert tampered != payload
    r = await paygate.http.post(f"{paygate.gw.url}/webhooks/stripe/test", content=tampered.encode(),
                                headers={"Stripe-Signature": header})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
    assert await paygate.available() == 0


async def test_missing_signature_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    r = await paygate.http.post(f"{paygate.gw.url}/webhooks/stripe/test", content=payload.encode())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
    assert await paygate.available() == 0


async def test_stale_signature_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    await _refused(paygate, 400, "stale_signature", payload=payload, timestamp=int(time.time()) - 301)


async def test_other_modes_secret_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate))
    await _refused(paygate, 400, "invalid_signature", payload=payload, secret=LIVE_WHSEC)


async def test_live_event_at_the_test_endpoint_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate), livemode=True)
    await _refused(paygate, 400, "wrong_mode", payload=payload)


async def test_test_wallet_event_at_the_live_endpoint_is_refused(paygate: PayGate) -> None:
    """Signed correctly for live, but naming a test-mode wallet: refused, and the live wallet is untouched."""
    await paygate.gw.customer("acme", funds=0)
    await paygate.gw.customer("acme", funds=0, mode="live")
    payload = FakeStripe.event("checkout.session.completed", await _paid_session(paygate), livemode=True)
    r = await paygate.deliver(payload, mode="live")
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_mode"
    assert await paygate.available(mode="live") == 0
    assert await paygate.available() == 0


async def test_unknown_mode_endpoint_is_not_found(paygate: PayGate) -> None:
    payload = FakeStripe.event("checkout.session.completed", {"id": "cs_x"})
    r = await paygate.deliver(payload, mode="prod", secret=TEST_WHSEC)
    assert r.status_code == 404


async def test_body_that_is_not_an_event_is_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    await _refused(paygate, 400, "invalid_payload", payload=json.dumps({"hello": "world"}))
