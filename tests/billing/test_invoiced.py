"""Invoiced beside prepaid through the real proxy: an invoiced customer with nothing in the wallet is served
and its usage becomes Stripe meter events, a prepaid one in the same run is refused with 402, a credit limit
stops an invoiced customer at the limit, and bad billing settings are refused without changing anything.

Method: metergate in front of the mock OpenAI upstream, driven by the official ``openai`` SDK; billing set
through the admin API; meter events read back from the fake Stripe (real ``stripe`` SDK on the way out).
Expected prices are recomputed independently (``tests.proxy.test_openai_sdk.expected_price``).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.billing.conftest import BillGate, eventually
from tests.payments.fake_stripe import FakeStripe
from tests.proxy.test_openai_sdk import MESSAGES, expected_price


async def ask(bg: BillGate, customer: str, *, mode: str = "test") -> tuple[str, int]:
    """One chat completion; returns its request id and its independently computed price."""
    raw = await bg.gw.openai(customer, mode=mode).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=40)
    usage = raw.parse().usage
    assert usage is not None
    return raw.headers["X-Metergate-Request-Id"], expected_price("gpt-4o-mini", usage.prompt_tokens,
                                                                 usage.completion_tokens)


async def test_invoiced_customer_with_zero_balance_is_served_and_prepaid_one_gets_402(
        billgate: BillGate, fake_stripe: FakeStripe) -> None:
    await billgate.gw.customer("inv", funds=0)
    await billgate.gw.customer("pre", funds=0)
    view = await billgate.set_billing("inv", billing_mode="invoiced", memo="moved to monthly invoice")
    assert view["changed"] and view["effective"]["USD"] == "invoiced"

    served = [await ask(billgate, "inv") for _ in range(3)]
    # The receipt shows what is owed, not the credit line: negative, exactly the three prices.
    raw = await billgate.gw.openai("inv").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=40)
    usage = raw.parse().usage
    assert usage is not None
    served.append((raw.headers["X-Metergate-Request-Id"],
                   expected_price("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)))
    owed_micros = sum(price for _, price in served)
    assert raw.headers["X-Metergate-Balance"] == f"-{owed_micros // 10**6}.{owed_micros % 10**6:06d}"
    assert Decimal(raw.headers["X-Metergate-Available"]) > 0  # the credit line still covers more
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(billgate, "pre")
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_funds"  # type: ignore[index]

    owed = sum(price for _, price in served)
    [balance] = (await billgate.gw.admin.get("/customers/inv/balance")).json()["balances"]
    assert (balance["posted"], balance["pending"]) == (-owed, 0)  # the negative balance is what is owed

    async def all_sent() -> bool:
        return len(fake_stripe.meter_events) == len(served)

    await eventually(all_sent, what="meter events")
    stripe_customer = await billgate.billing.reporter.stripe.customer("test", "inv")
    for request_id, price in served:
        event = fake_stripe.meter_events[request_id]
        assert event["event_name"] == "metergate_usage" and event["livemode"] is False
        assert event["payload"] == {"stripe_customer_id": stripe_customer, "value": str(price)}
    rows = await billgate.outbox("inv")
    assert sorted(r["usage_id"] for r in rows) == sorted(r for r, _ in served)
    assert {r["state"] for r in rows} == {"sent"}
    assert await billgate.outbox("pre") == []  # never invoiced: nothing to report
    assert await billgate.audits() == []


async def test_credit_limit_stops_an_invoiced_customer_at_the_limit(billgate: BillGate) -> None:
    limit = 300  # micro-dollars: a few requests' worth
    await billgate.gw.customer("capped", funds=0)
    await billgate.set_billing("capped", billing_mode="invoiced", credit_limits={"USD": limit})
    prices = []
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(50):
            prices.append((await ask(billgate, "capped"))[1])
    assert refused.value.status_code == 402 and prices
    [balance] = (await billgate.gw.admin.get("/customers/capped/balance")).json()["balances"]
    assert balance["posted"] == -sum(prices) and sum(prices) <= limit
    view = (await billgate.gw.admin.get("/customers/capped/billing")).json()
    assert view["credit_limits"] == {"USD": limit}
    assert view["balances"]["USD"]["overdraft_limit"] == limit
    assert await billgate.audits() == []


async def test_lowering_a_credit_limit_below_the_debt_stops_new_holds_and_converges(billgate: BillGate) -> None:
    await billgate.gw.customer("lower", funds=0)
    await billgate.set_billing("lower", billing_mode="invoiced")
    price = (await ask(billgate, "lower"))[1]
    await billgate.set_billing("lower", billing_mode="invoiced", credit_limits={"USD": 1})
    view = (await billgate.gw.admin.get("/customers/lower/billing")).json()
    # The limit stops at what is already owed (available 0), never below it.
    assert view["balances"]["USD"]["overdraft_limit"] == price and view["balances"]["USD"]["available"] == 0
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(billgate, "lower")
    assert refused.value.status_code == 402
    # A payment brings the debt under the limit: the limit converges down to the target.
    r = await billgate.gw.admin.post("/customers/lower/credits", json={"amount": price, "idempotency_key": "pay-1"})
    assert r.status_code == 201

    async def converged() -> bool:
        got = (await billgate.gw.admin.get("/customers/lower/billing")).json()
        return bool(got["balances"]["USD"]["overdraft_limit"] == 1)

    await eventually(converged, what="overdraft converging to the credit limit")
    history = (await billgate.gw.admin.get("/customers/lower/billing")).json()["overdraft_changes"]
    assert [h["reason"].split(":")[0] for h in history] == ["mode_change", "mode_change", "converge"]
    assert history[-1]["to_limit"] == 1
    assert await billgate.audits() == []


async def test_per_asset_override_keeps_one_asset_prepaid(billgate: BillGate) -> None:
    await billgate.gw.customer("mixed", funds=0)
    view = await billgate.set_billing("mixed", billing_mode="invoiced", asset_modes={"USD": "prepaid"})
    assert view["effective"] == {"USD": "prepaid"} and view["asset_modes"] == {"USD": "prepaid"}
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(billgate, "mixed")
    assert refused.value.status_code == 402  # USD stays prepaid although the customer is invoiced


@pytest.mark.parametrize(("body", "param"), [
    ({"billing_mode": "monthly"}, "billing_mode"),
    ({}, "billing_mode"),
    ({"billing_mode": "invoiced", "credit_limits": {"USD": -1}}, "credit_limits"),
    ({"billing_mode": "invoiced", "credit_limits": {"USD": 1.5}}, "credit_limits"),
    ({"billing_mode": "invoiced", "credit_limits": {"EUR": 10}}, "credit_limits"),
    ({"billing_mode": "invoiced", "asset_modes": {"USD": "free"}}, "asset_modes"),
    ({"billing_mode": "invoiced", "asset_modes": ["USD"]}, "asset_modes"),
    ({"billing_mode": "invoiced", "surprise": 1}, "surprise"),
    ({"billing_mode": "invoiced", "memo": 7}, "memo"),
])
async def test_bad_billing_settings_are_refused_and_change_nothing(billgate: BillGate, body: dict[str, Any],
                                                                   param: str) -> None:
    await billgate.gw.customer("acme", funds=0)
    r = await billgate.gw.admin.put("/customers/acme/billing", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    view = (await billgate.gw.admin.get("/customers/acme/billing")).json()
    assert view["billing_mode"] == "prepaid" and view["changes"] == [] and view["overdraft_changes"] == []


async def test_unknown_customer_and_export_format_are_clear_errors(billgate: BillGate) -> None:
    r = await billgate.gw.admin.put("/customers/nobody/billing", json={"billing_mode": "invoiced"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "customer_not_found"
    r = await billgate.gw.admin.get("/exports/usage", params={"format": "xlsx"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    r = await billgate.gw.admin.get("/exports/ledger", params={"from": "2026-02-01", "to": "2026-01-01"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "from"


async def test_a_request_that_charged_nothing_sends_no_meter_event(billgate: BillGate,
                                                                   fake_stripe: FakeStripe) -> None:
    await billgate.gw.customer("inv", funds=0)
    await billgate.set_billing("inv", billing_mode="invoiced")
    with pytest.raises(openai.APIStatusError):
        await billgate.gw.openai("inv").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=40, extra_headers={"X-Mock-Behavior": "error:500"})
    paid, _ = await ask(billgate, "inv")

    async def decided() -> bool:
        return {r["state"] for r in await billgate.outbox("inv")} == {"sent", "skipped"}

    await eventually(decided, what="both records decided")
    rows = {r["usage_id"]: r for r in await billgate.outbox("inv")}
    [free] = [r for r in rows.values() if r["state"] == "skipped"]
    assert (free["skip_reason"], free["value"], free["billing_mode"]) == ("zero", 0, "invoiced")
    assert set(fake_stripe.meter_events) == {paid}


async def test_concurrent_requests_never_pass_the_credit_limit(billgate: BillGate) -> None:
    limit = 400
    await billgate.gw.customer("burst", funds=0)
    await billgate.set_billing("burst", billing_mode="invoiced", credit_limits={"USD": limit})

    async def one() -> int:
        try:
            return (await ask(billgate, "burst"))[1]
        except openai.APIStatusError as error:
            assert error.status_code == 402
            return 0

    prices = await asyncio.gather(*(one() for _ in range(20)))
    served = [p for p in prices if p]
    assert served and len(served) < 20
    [balance] = (await billgate.gw.admin.get("/customers/burst/balance")).json()["balances"]
    assert balance["posted"] == -sum(served) and -balance["posted"] <= limit and balance["pending"] == 0
    assert await billgate.audits() == []


async def test_the_portal_shows_an_invoiced_customer_what_is_owed_not_the_credit_line(billgate: BillGate) -> None:
    await billgate.gw.customer("inv", funds=0)
    await billgate.set_billing("inv", billing_mode="invoiced", credit_limits={"USD": 50_000_000})
    _, price = await ask(billgate, "inv")
    link = (await billgate.gw.admin.post("/customers/inv/portal-link", json={})).json()["url"]
    async with httpx.AsyncClient() as browser:
        page = (await browser.get(link)).text
    owed = f"-0.{price:06d}"
    assert f'data-asset="USD">{owed}</div>' in page
    assert "owed, invoiced" in page and "credit limit 50.000000" in page
    assert f"{50 - price / 1e6:.6f} left" in page
