"""Auto top-up charges the saved card off-session when a wallet falls below its threshold — once at a
time, within a daily cap — and records a declined or authentication-requiring card without retrying it.

Method: the operator sets auto top-up through the admin API; the wallet is drained by real requests
through the gateway (official ``openai`` SDK against the mock upstream); ``TopUps.check`` — the hook run
after a settlement and by the periodic pass — then creates an off-session PaymentIntent on the fake Stripe,
whose test payment methods succeed, decline or require authentication as Stripe's test cards do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2 as httpx

from tests.payments.conftest import PayGate

THRESHOLD, AMOUNT = 5_000_000, 20_000_000  # 5.00 and 20.00 USD in micro-dollars


async def _armed(pg: PayGate, card: str, *, funds: int = 1_000_000, threshold: int = THRESHOLD,
                 amount: int = AMOUNT) -> None:
    """A customer below its threshold, with a saved card and auto top-up set by the operator."""
    await pg.gw.customer("acme", funds=funds)
    stripe_id = await pg.payments.stripe.customer("test", "acme")
    pg.fake.default_payment_method(stripe_id, card)
    r = await pg.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": threshold, "amount": amount})
    assert r.status_code == 200, r.text


async def test_admin_sets_reads_and_removes_auto_top_up(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    r = await paygate.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": THRESHOLD, "amount": AMOUNT})
    assert r.status_code == 200 and r.json()["auto_top_up"]["amount"] == AMOUNT
    r = await paygate.gw.admin.get("/customers/acme/auto-top-up")
    assert r.json()["auto_top_up"]["threshold"] == THRESHOLD
    assert (await paygate.gw.admin.delete("/customers/acme/auto-top-up")).status_code == 200
    assert (await paygate.gw.admin.get("/customers/acme/auto-top-up")).json()["auto_top_up"] is None


async def test_admin_refuses_auto_top_up_outside_limits(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    bad: list[dict[str, Any]] = [
        {"threshold": THRESHOLD, "amount": 1_000_000},  # 1.00: below topup_min
        {"threshold": THRESHOLD, "amount": 501_000_000},  # above topup_max
        {"threshold": THRESHOLD, "amount": 10_000_001},  # not whole cents
        {"threshold": 0, "amount": AMOUNT}, {"threshold": "5", "amount": AMOUNT}, {"amount": AMOUNT},
        {"threshold": THRESHOLD, "amount": AMOUNT, "asset": "GPU"},
    ]
    for body in bad:
        r = await paygate.gw.admin.put("/customers/acme/auto-top-up", json=body)
        assert r.status_code == 400, body
    assert (await paygate.gw.admin.get("/customers/acme/auto-top-up")).json()["auto_top_up"] is None


async def test_wallet_drained_by_requests_is_topped_up_off_session(paygate: PayGate) -> None:
    """The settlement that takes the balance under the threshold triggers the top-up itself."""
    await _armed(paygate, "pm_card_visa", funds=THRESHOLD + 10)
    client = paygate.gw.openai("acme")
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=50)
    [record] = await paygate.gw.usage("acme")
    expected = THRESHOLD + 10 - record["charged_amount"] + AMOUNT
    for _ in range(100):  # the hook runs right after the settlement, off the request's path
        topups = await paygate.payments.store.topups("test", "acme", limit=10)
        if topups and topups[0].state == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert await paygate.available() == expected
    (params,) = paygate.fake.calls("POST", "/payment_intents")
    assert params["off_session"] == "true" and params["confirm"] == "true"
    assert params["amount"] == "2000" and params["payment_method"] == "pm_card_visa"
    [topup] = await paygate.payments.store.topups("test", "acme", limit=10)
    assert topup.state == "succeeded" and topup.kind == "auto"
    (idem,) = [i for m, p, _, i in paygate.fake.requests if p == "/payment_intents"]
    assert idem == f"metergate-auto-{topup.id}"
    # Above the threshold now: another check starts nothing.
    assert await paygate.payments.topups.check("test", "acme", "USD") is None
    assert len(paygate.fake.calls("POST", "/payment_intents")) == 1
    assert await paygate.gw.store.audit() == []


async def test_webhook_for_a_synchronously_credited_top_up_credits_nothing_more(paygate: PayGate) -> None:
    from tests.payments.fake_stripe import FakeStripe

    await _armed(paygate, "pm_card_visa")
    topup = await paygate.payments.topups.check("test", "acme", "USD")
    assert topup is not None and topup.stripe_id is not None
    intent = paygate.fake.payment_intents[topup.stripe_id]
    assert (await paygate.deliver(FakeStripe.event("payment_intent.succeeded", intent))).status_code == 200
    assert await paygate.available() == 1_000_000 + AMOUNT


async def test_declined_card_is_recorded_and_not_retried(paygate: PayGate) -> None:
    await _armed(paygate, "pm_card_chargeDeclined")
    topups = paygate.payments.topups
    topup = await topups.check("test", "acme", "USD")
    assert topup is not None and topup.state == "failed"
    assert topup.error_code == "card_declined" and "generic_decline" in (topup.error_message or "")
    assert await paygate.available() == 1_000_000
    for _ in range(3):  # the next checks (after settlements, periodic) do not charge the card again
        assert await topups.check("test", "acme", "USD") is None
    assert await topups.check_all() == 0
    assert len(paygate.fake.calls("POST", "/payment_intents")) == 1
    r = await paygate.gw.admin.get("/customers/acme/top-ups")
    assert [t["error_code"] for t in r.json()["data"]] == ["card_declined"]


async def test_changed_settings_rearm_after_a_failure(paygate: PayGate) -> None:
    await _armed(paygate, "pm_card_chargeDeclined")
    assert (await paygate.payments.topups.check("test", "acme", "USD")).state == "failed"  # type: ignore[union-attr]
    stripe_id = await paygate.payments.stripe.customer("test", "acme")
    paygate.fake.default_payment_method(stripe_id, "pm_card_visa")  # the customer fixed the card ...
    await asyncio.sleep(0.002)
    r = await paygate.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": THRESHOLD, "amount": AMOUNT})
    assert r.status_code == 200  # ... and saved the settings again
    topup = await paygate.payments.topups.check("test", "acme", "USD")
    assert topup is not None and topup.state == "succeeded"
    assert await paygate.available() == 1_000_000 + AMOUNT


async def test_card_requiring_authentication_is_recorded(paygate: PayGate) -> None:
    await _armed(paygate, "pm_card_authenticationRequired")
    topup = await paygate.payments.topups.check("test", "acme", "USD")
    assert topup is not None and topup.state == "failed" and topup.error_code == "authentication_required"
    assert topup.stripe_id is not None and topup.stripe_id.startswith("pi_")
    assert await paygate.available() == 1_000_000
    assert await paygate.payments.topups.check("test", "acme", "USD") is None


async def test_no_saved_card_is_recorded(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=1_000_000)
    await paygate.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": THRESHOLD, "amount": AMOUNT})
    topup = await paygate.payments.topups.check("test", "acme", "USD")
    assert topup is not None and topup.state == "failed" and topup.error_code == "no_payment_method"
    assert paygate.fake.calls("POST", "/payment_intents") == []


async def test_at_most_one_auto_top_up_in_flight_per_wallet(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    store = paygate.payments.store
    claims = await asyncio.gather(*(store.begin_auto_topup("test", "acme", "USD", AMOUNT, day_start_ms=0,
                                                           daily_cap=100) for _ in range(20)))
    claimed = [c for c in claims if c is not None]
    assert len(claimed) == 1
    # Another wallet (or asset) has a slot of its own.
    await paygate.gw.customer("globex", funds=0)
    assert await store.begin_auto_topup("test", "globex", "USD", AMOUNT, day_start_ms=0, daily_cap=100)
    await store.finish_topup(claimed[0].id, "failed", error_code="card_declined")
    assert await store.begin_auto_topup("test", "acme", "USD", AMOUNT, day_start_ms=0, daily_cap=100)


async def test_concurrent_checks_charge_once(paygate: PayGate) -> None:
    await _armed(paygate, "pm_card_visa")
    results = await asyncio.gather(*(paygate.payments.topups.check("test", "acme", "USD") for _ in range(10)))
    assert len([r for r in results if r is not None]) == 1
    assert len(paygate.fake.calls("POST", "/payment_intents")) == 1
    assert await paygate.available() == 1_000_000 + AMOUNT


async def test_daily_cap_bounds_auto_top_ups(paygate: PayGate) -> None:
    # A threshold far above each top-up: every success still leaves the wallet below it.
    await _armed(paygate, "pm_card_visa", threshold=400_000_000, amount=5_000_000)
    topups = paygate.payments.topups
    made = [await topups.check("test", "acme", "USD") for _ in range(6)]
    assert len([t for t in made if t is not None]) == paygate.gw.settings.auto_topup_daily_cap == 3
    assert len(paygate.fake.calls("POST", "/payment_intents")) == 3
    assert await paygate.available() == 1_000_000 + 3 * 5_000_000


async def test_test_admin_key_cannot_set_live_auto_top_up(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0, mode="live")
    r = await paygate.gw.admin.put("/customers/acme/auto-top-up", json={"threshold": THRESHOLD, "amount": AMOUNT})
    assert r.status_code == 404  # the test key sees no live customer
    assert await paygate.payments.store.auto_topup("live", "acme", "USD") is None
    assert isinstance(paygate.gw.admin, httpx.AsyncClient)


async def test_orphaned_attempt_is_resumed_without_charging_twice(paygate: PayGate) -> None:
    """A process that died mid-charge leaves its attempt in flight; the periodic pass finishes it, and the
    attempt's idempotency key makes Stripe answer with the PaymentIntent it already made."""
    from sqlalchemy import update

    from metergate.payments import schema

    await _armed(paygate, "pm_card_visa")
    store = paygate.payments.store
    topup = await store.begin_auto_topup("test", "acme", "USD", AMOUNT, day_start_ms=0, daily_cap=5)
    assert topup is not None
    # The charge reached Stripe, then the process died before recording anything.
    stripe_customer = await paygate.payments.stripe.customer("test", "acme")
    await paygate.payments.stripe.off_session_payment("test", stripe_customer, "pm_card_visa", topup_id=topup.id,
                                                      customer_id="acme", asset="USD", amount_cents=2_000,
                                                      currency="usd")
    await store.wallet.write(lambda conn: conn.execute(update(schema.topups).where(
        schema.topups.c.id == topup.id).values(updated_at_ms=0)))
    await paygate.payments.topups.check_all()
    found = await store.get_topup(topup.id)
    assert found is not None and found.state == "succeeded"
    assert len(paygate.fake.payment_intents) == 1  # the replay returned the first PaymentIntent
    assert await paygate.available() == 1_000_000 + AMOUNT
    await paygate.payments.topups.check_all()
    assert await paygate.available() == 1_000_000 + AMOUNT
