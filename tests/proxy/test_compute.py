"""Generic compute endpoints: metered by time, by a reported header or JSON field, or per request, in a
custom asset (GPU-seconds), with holds that grow as a job runs and stop it when the wallet runs dry.

Method: a gateway with compute routes in front of the mock upstream's ``/compute/run`` job (it works for
``seconds`` and reports how long it measured itself working); amounts are checked against the ledger
and the usage records through the admin API.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import Gateway, Upstream, start_gateway

HEADERS = {"X-Metergate-Customer": "lab", "X-Metergate-Mode": "test"}


def route(prefix: str, upstream: Upstream, **compute: Any) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": upstream.url, "provider": "compute",
            "compute": {"asset": "GPU_SECONDS", "unit_price": "1", **compute}}


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(
        upstream, f"sqlite:///{tmp_path / 'c.db'}",
        assets=[{"code": "USD", "scale": 6}, {"code": "GPU_SECONDS", "name": "GPU seconds", "scale": 3}],
        routes=[route("/gpu", upstream, hold_units="5", cost_per_unit_usd="0.0008"),
                route("/gpu-long", upstream, hold_units="0.6", extend_units="0.6"),
                route("/gpu-header", upstream, meter="header", unit_price="0.5", hold_units="10"),
                route("/gpu-json", upstream, meter="json", usage_json_field="usage.units", hold_units="5"),
                route("/gpu-call", upstream, meter="request", unit_price="2")])
    await gateway.customer("lab", funds=0)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def fund(gw: Gateway, amount: int, asset: str = "GPU_SECONDS") -> None:
    """Credit ``amount`` in the asset's smallest unit (milli-GPU-seconds, micro-dollars)."""
    r = await gw.admin.post("/customers/lab/credits", json={"asset": asset, "amount": amount,
                                                           "idempotency_key": f"{asset}-{amount}"})
    assert r.status_code == 201, r.text


async def wallet_balance(gw: Gateway, asset: str = "GPU_SECONDS") -> dict[str, Any]:
    r = await gw.admin.get("/customers/lab/balance")
    return next(b for b in r.json()["balances"] if b["asset"] == asset)


async def run(gw: Gateway, prefix: str, **query: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{gw.url}{prefix}/compute/run", params=query, headers=HEADERS,
                                 content=b"job spec")


async def only_record(gw: Gateway) -> dict[str, Any]:
    [record] = await gw.usage("lab")
    assert await gw.store.audit() == []
    return record


async def test_time_metering_is_within_one_percent_of_the_measured_duration(gw: Gateway) -> None:
    await fund(gw, 60_000)
    started = time.perf_counter()
    # metergate's clock also runs while the request and the answer cross the network and wait for the event
    # loops: on a loaded CI machine that took 12 ms once, more than 1% of a 1-second job. 3 s (inside the
    # route's 5 held seconds) keeps the 1% claim and leaves 30 ms for it.
    response = await run(gw, "/gpu", seconds="3.0")
    client_seconds = time.perf_counter() - started
    assert response.status_code == 200
    upstream_seconds = Decimal(str(response.json()["elapsed_s"]))
    record = await only_record(gw)
    billed = Decimal(record["charged_amount"]) / 1000  # GPU-seconds, scale 3
    assert abs(billed - upstream_seconds) <= upstream_seconds / 100, (billed, upstream_seconds)
    assert billed <= Decimal(str(client_seconds))
    assert record["usage_source"] == "measured" and record["asset"] == "GPU_SECONDS"
    assert record["cost_nanos"] == int((Decimal(record["detail"]["units"]) * Decimal("0.0008") * 10**9)
                                       .quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    balance = await wallet_balance(gw)
    assert balance["available"] == 60_000 - record["charged_amount"] and balance["pending"] == 0


async def test_long_job_extends_its_hold_as_it_runs(gw: Gateway) -> None:
    await fund(gw, 10_000)
    response = await run(gw, "/gpu-long", seconds="2.0")
    assert response.status_code == 200
    record = await only_record(gw)
    assert record["detail"]["extensions"] >= 2
    assert 1_900 <= record["charged_amount"] <= 2_500
    assert (await wallet_balance(gw))["pending"] == 0


async def test_gpu_job_stops_at_zero_instead_of_running_up_debt(gw: Gateway) -> None:
    await fund(gw, 1_500)  # 1.5 GPU-seconds for a 5-second job
    started = time.perf_counter()
    response = await run(gw, "/gpu-long", seconds="5.0")
    elapsed = time.perf_counter() - started
    assert elapsed < 4.0  # stopped, not run to completion
    assert response.status_code == 200  # the job had started: the stream ends early
    record = await only_record(gw)
    assert record["detail"]["stopped_for_funds"] is True
    assert record["charged_amount"] <= 1_500 and record["written_off_amount"] == 0
    balance = await wallet_balance(gw)
    assert balance["available"] >= 0 and balance["pending"] == 0
    assert balance["available"] == 1_500 - record["charged_amount"]


@pytest.mark.parametrize(("prefix", "query", "expected"), [
    ("/gpu-header", {"units": "7"}, 3_500),  # 7 units at 0.5
    ("/gpu-json", {"units": "2.5"}, 2_500),  # 2.5 units at 1
    ("/gpu-call", {}, 2_000),  # one request at 2
])
async def test_reported_units_and_per_request_pricing(gw: Gateway, prefix: str, query: dict[str, str],
                                                      expected: int) -> None:
    await fund(gw, 10_000)
    response = await run(gw, prefix, **query)
    assert response.status_code == 200 and response.json()["status"] == "running"
    record = await only_record(gw)
    assert record["charged_amount"] == expected
    assert (await wallet_balance(gw))["available"] == 10_000 - expected


async def test_compute_upstream_error_is_relayed_and_free(gw: Gateway) -> None:
    await fund(gw, 10_000)
    response = await run(gw, "/gpu", fail="503")
    assert response.status_code == 503
    record = await only_record(gw)
    assert record["charged_amount"] == 0
    assert (await wallet_balance(gw))["available"] == 10_000


async def test_compute_hold_is_refused_with_402_when_the_wallet_cannot_cover_it(gw: Gateway) -> None:
    await fund(gw, 1_000)  # less than the 5 GPU-seconds /gpu holds up front
    response = await run(gw, "/gpu", seconds="0.1")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_funds" and error["asset"] == "GPU_SECONDS"
    assert error["portal_url"].startswith(gw.url + "/portal/")
    assert gw.upstream.requests == []


# ------------------------------------------------------------------------------------------ price rules


async def publish_rules(gw: Gateway, rules: list[dict[str, Any]]) -> None:
    r = await gw.admin.post("/price-versions", json={"rules": rules, "note": "compute pricing"})
    assert r.status_code == 201, r.text
    r = await gw.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})
    assert r.status_code == 200, r.text


# A rule for one compute route, drawing US dollars: a cent per job plus $0.002 per unit.
GPU_IN_USD = {"id": "gpu-usd", "match": {"type": "compute", "route": "/gpu-header"}, "asset": "USD",
              "event_fee": "0.01", "rates": {"units": "0.002"}}
# A catch-all rule for token requests, which must not price GPU time.
TOKENS = {"id": "tokens", "match": {}, "asset": "USD", "per_units": "1000000", "rates": {"input_tokens": "1"}}


async def test_a_compute_rule_prices_its_route_in_its_own_asset(gw: Gateway) -> None:
    await publish_rules(gw, [GPU_IN_USD, TOKENS])
    await fund(gw, 10_000)
    await fund(gw, 100_000, "USD")
    response = await run(gw, "/gpu-header", units="7")
    assert response.status_code == 200
    assert response.headers["X-Metergate-Asset"] == "USD"
    record = await only_record(gw)
    # $0.01 + 7 x $0.002 = $0.024 = 24,000 micro-dollars
    assert record["asset"] == "USD" and record["charged_amount"] == 24_000
    assert record["detail"]["price"]["rule"] == "gpu-usd" and "unit_price" not in record["detail"]
    usd = await wallet_balance(gw, "USD")
    assert usd["available"] == 100_000 - 24_000 and usd["pending"] == 0
    assert (await wallet_balance(gw))["available"] == 10_000  # the route's own asset is not drawn


async def test_the_hold_is_the_rules_price_of_the_held_units(gw: Gateway) -> None:
    await publish_rules(gw, [GPU_IN_USD])
    await fund(gw, 10_000)
    await fund(gw, 29_999, "USD")  # the hold is $0.01 + 10 held units x $0.002 = $0.03
    response = await run(gw, "/gpu-header", units="1")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["asset"] == "USD" and error["required"] == "0.030000"
    assert gw.upstream.requests == []
    assert (await wallet_balance(gw, "USD"))["available"] == 29_999


async def test_routes_without_a_compute_rule_keep_their_unit_price(gw: Gateway) -> None:
    await publish_rules(gw, [GPU_IN_USD, TOKENS])  # TOKENS matches every request, but names no type: compute
    await fund(gw, 10_000)
    response = await run(gw, "/gpu-call")
    assert response.status_code == 200
    record = await only_record(gw)
    assert record["asset"] == "GPU_SECONDS" and record["charged_amount"] == 2_000
    assert record["detail"]["unit_price"] == "2"


async def test_a_failed_compute_request_pays_no_fee(gw: Gateway) -> None:
    await publish_rules(gw, [GPU_IN_USD])
    await fund(gw, 100_000, "USD")
    response = await run(gw, "/gpu-header", fail="502")
    assert response.status_code == 502
    record = await only_record(gw)
    assert record["charged_amount"] == 0
    assert (await wallet_balance(gw, "USD"))["available"] == 100_000


async def test_graduated_units_carry_over_from_job_to_job(gw: Gateway) -> None:
    tiered = {"id": "gpu-tiers", "match": {"type": "compute", "route": "/gpu-json"}, "asset": "GPU_SECONDS",
              "tiers": [{"quantity": "units", "mode": "graduated", "period": "month", "key": "gpu",
                         "steps": [{"up_to": "10", "rate": "1"}, {"up_to": None, "rate": "0.5"}]}]}
    await publish_rules(gw, [tiered])
    await fund(gw, 100_000)
    assert (await run(gw, "/gpu-json", units="7")).status_code == 200
    assert (await run(gw, "/gpu-json", units="7")).status_code == 200
    records = list(reversed(await gw.usage("lab")))  # the API lists newest first
    # 7 units at 1; then 3 more at 1 and 4 at 0.5 = 5 GPU-seconds
    assert [r["charged_amount"] for r in records] == [7_000, 5_000]
    assert (await wallet_balance(gw))["available"] == 100_000 - 12_000
    assert await gw.store.audit() == []
