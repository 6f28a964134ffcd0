"""A wallet is topped up through a Stripe Checkout Session created with the official SDK, and credited
by the signed ``checkout.session.completed`` webhook.

Method: metergate talks to the fake Stripe (``fake_stripe.py``, Stripe's wire format) through the
``stripe`` SDK; the test plays Stripe's part of the flow by marking the session paid and delivering the
signed event to ``/webhooks/stripe/test``, then reads the wallet back.
"""

from __future__ import annotations

import pytest

from metergate.errors import BadRequest
from tests.payments.conftest import PayGate
from tests.payments.fake_stripe import TEST_KEY, FakeStripe


async def test_stripe_customer_is_created_once_per_wallet_and_stored(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    topups = paygate.payments.topups
    for _ in range(2):
        await topups.start_checkout("test", "acme", 2_500, success_url="http://x/ok", cancel_url="http://x/no")
    assert len(paygate.fake.customers) == 1
    (stripe_id,) = paygate.fake.customers
    assert await paygate.payments.store.stripe_customer("test", "acme") == stripe_id
    assert paygate.fake.customers[stripe_id]["livemode"] is False  # reached with the test key
    created = paygate.fake.calls("POST", "/customers")
    assert created[0]["metadata"] == {"metergate_customer": "acme", "metergate_mode": "test"}


async def test_test_mode_uses_the_test_key_and_live_mode_the_live_key(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    await paygate.gw.customer("acme", funds=0, mode="live")
    test_id = await paygate.payments.stripe.customer("test", "acme")
    live_id = await paygate.payments.stripe.customer("live", "acme")
    assert test_id != live_id
    assert paygate.fake.customers[test_id]["livemode"] is False
    assert paygate.fake.customers[live_id]["livemode"] is True
    assert paygate.payments.stripe.client("test")._requestor.api_key == TEST_KEY  # type: ignore[attr-defined]


async def test_checkout_session_carries_amount_wallet_and_idempotency_key(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    url = await paygate.payments.topups.start_checkout("test", "acme", 2_500, success_url="http://x/ok",
                                                       cancel_url="http://x/no")
    (session,) = paygate.fake.sessions.values()
    assert url == session["url"] and url.startswith(paygate.fake.url)
    assert session["amount_total"] == 2_500 and session["currency"] == "usd"
    assert session["metadata"]["metergate_customer"] == "acme"
    assert session["metadata"]["metergate_mode"] == "test"
    keys = [idem for method, path, _, idem in paygate.fake.requests if path == "/checkout/sessions"]
    assert keys and keys[0] is not None and keys[0].startswith("metergate-checkout-tu_")
    (topup,) = await paygate.payments.store.topups("test", "acme")
    assert topup.state == "pending" and topup.stripe_id == session["id"] and topup.amount == 25_000_000


async def test_completed_checkout_credits_the_wallet(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    await paygate.payments.topups.start_checkout("test", "acme", 2_500, success_url="http://x/ok",
                                                 cancel_url="http://x/no")
    (session_id,) = paygate.fake.sessions
    r = await paygate.deliver(FakeStripe.event("checkout.session.completed",
                                               paygate.fake.completed_session(session_id)))
    assert r.status_code == 200, r.text
    assert r.json()["result"] == "credited"
    assert await paygate.available() == 25_000_000  # 25.00 USD in micro-dollars
    (topup,) = await paygate.payments.store.topups("test", "acme")
    assert topup.state == "succeeded"
    assert await paygate.gw.store.audit() == []


@pytest.mark.parametrize(("typed", "cents"), [
    ("5", 500), ("25.00", 2_500), ("500.00", 50_000),  # within the operator's limits, inclusive
])
def test_topup_amount_within_limits_is_accepted(paygate: PayGate, typed: str, cents: int) -> None:
    assert paygate.payments.topups.parse_topup(typed) == cents


@pytest.mark.parametrize("typed", [
    "4.99", "500.01", "0", "-10",  # outside the operator's limits
    "10.001", "abc", "", "NaN", "Infinity", "1e3",  # not an amount in cents
])
def test_topup_amount_outside_limits_or_malformed_is_refused(paygate: PayGate, typed: str) -> None:
    with pytest.raises(BadRequest) as info:
        paygate.payments.topups.parse_topup(typed)
    assert info.value.code == "invalid_amount"
