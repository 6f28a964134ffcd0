"""An invoiced customer with a prepaid wallet for one asset: dollars for chat completions are invoiced and
reported to Stripe, GPU-seconds on a compute route are prepaid (402 at zero, paid from the wallet, never
reported) until the override is lifted, after which GPU usage goes to its own Stripe meter.

Method: one gateway with an OpenAI route (USD) and a per-request compute route (GPU_SECONDS, 2 s a call),
both through the real proxy; outbox decisions and the fake Stripe's events are compared per asset.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2 as httpx
import pytest

from tests.billing.conftest import BillGate, eventually, start_billgate
from tests.billing.test_invoiced import ask
from tests.conftest import PROVIDER_KEY, Upstream
from tests.payments.fake_stripe import FakeStripe

GPU_CALL = 2000  # milli-GPU-seconds: unit_price 2 per request


@pytest.fixture
async def mixed(upstream: Upstream, billing_db: str, fake_stripe: FakeStripe) -> AsyncIterator[BillGate]:
    bg = await start_billgate(upstream, billing_db, fake_stripe, meter_event_names={"GPU_SECONDS": "gpu_ms"},
                              settings={
        "assets": [{"code": "USD", "scale": 6}, {"code": "GPU_SECONDS", "name": "GPU seconds", "scale": 3}],
        "routes": [{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
                   {"prefix": "/gpu", "upstream": upstream.url, "provider": "compute",
                    "compute": {"asset": "GPU_SECONDS", "meter": "request", "unit_price": "2"}}]})
    yield bg
    await bg.stop()


async def gpu(bg: BillGate) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{bg.gw.url}/gpu/compute/run", content=b"job",
                                 headers={"X-Metergate-Customer": "lab", "X-Metergate-Mode": "test"})


async def test_gpu_seconds_stay_prepaid_while_dollars_are_invoiced(mixed: BillGate, fake_stripe: FakeStripe) -> None:
    await mixed.gw.customer("lab", funds=0)
    view = await mixed.set_billing("lab", billing_mode="invoiced", asset_modes={"GPU_SECONDS": "prepaid"})
    assert view["effective"] == {"USD": "invoiced", "GPU_SECONDS": "prepaid"}

    usd, price = await ask(mixed, "lab")  # served on credit
    assert (await gpu(mixed)).status_code == 402  # the GPU wallet is prepaid and empty
    r = await mixed.gw.admin.post("/customers/lab/credits", json={"asset": "GPU_SECONDS", "amount": 5000,
                                                                  "idempotency_key": "gpu-5"})
    assert r.status_code == 201
    paid = await gpu(mixed)
    assert paid.status_code == 200, paid.text
    prepaid_gpu = paid.headers["X-Metergate-Request-Id"]

    # Lift the override: GPU-seconds are invoiced too, reported on their own meter.
    await mixed.set_billing("lab", billing_mode="invoiced")
    for _ in range(3):  # 5000 - 2000 left: the third call runs on credit
        assert (await gpu(mixed)).status_code == 200
    invoiced_gpu = {r["id"] for r in await mixed.usage("lab") if r["asset"] == "GPU_SECONDS"} - {prepaid_gpu}

    async def decided() -> bool:
        rows = await mixed.outbox("lab")
        return len(rows) == 5 and all(r["state"] in ("sent", "skipped") for r in rows)

    await eventually(decided, what="every record decided")
    rows = {r["usage_id"]: r for r in await mixed.outbox("lab")}
    assert (rows[prepaid_gpu]["billing_mode"], rows[prepaid_gpu]["skip_reason"]) == ("prepaid", "prepaid")
    assert fake_stripe.meter_events[usd]["event_name"] == "metergate_usage"
    assert fake_stripe.meter_events[usd]["payload"]["value"] == str(price)
    assert set(fake_stripe.meter_events) == {usd} | invoiced_gpu and len(invoiced_gpu) == 3
    for request_id in invoiced_gpu:
        event = fake_stripe.meter_events[request_id]
        assert (event["event_name"], event["payload"]["value"]) == ("gpu_ms", str(GPU_CALL))
    balances = {b["asset"]: b for b in (await mixed.gw.admin.get("/customers/lab/balance")).json()["balances"]}
    assert balances["GPU_SECONDS"]["posted"] == 5000 - 4 * GPU_CALL  # the invoiced part is owed
    assert await mixed.audits() == []
