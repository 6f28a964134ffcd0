"""The events API over HTTP in each topology (SQLite; PostgreSQL and PostgreSQL with Redis windows, two
replicas): a batch with duplicates, an unknown customer and an event the wallet cannot cover; rules published
through one replica and events posted through the other; retries; concurrent submissions of one batch; and the
ledger afterwards — one capture per accepted event, balances equal to the sum of what was accepted, the audit
clean."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LIVE_ADMIN_KEY, Gateway, Upstream, start_in

GPU = {"id": "gpu", "match": {"type": "gpu.job"}, "asset": "USD", "event_fee": "0.01",
       "rates": {"gpu_seconds": "0.0015"}}
EXPORT = {"id": "export", "match": {"type": "export"}, "asset": "USD", "rates": {"quantity": "0.25"},
          "minimum": "0.5"}


async def publish(gw: Gateway) -> None:
    r = await gw.admin.post("/price-versions", json={"rules": [GPU, EXPORT]})
    assert r.status_code == 201, r.text
    r = await gw.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})
    assert r.status_code == 200, r.text


@pytest.fixture
async def events_gateway(request: pytest.FixtureRequest, upstream: Upstream, topology: str,
                         tmp_path: Path) -> AsyncIterator[Gateway]:
    """In each topology; the rules are published through the first replica before the others start."""
    gw, runners = await start_in(request, topology, upstream, tmp_path, first=publish)
    yield gw
    await gw.close()
    await runners.cleanup()


def gpu(event_id: str, seconds: str, customer: str = "acme", **extra: Any) -> dict[str, Any]:
    return {"id": event_id, "customer_id": customer, "type": "gpu.job", "quantities": {"gpu_seconds": seconds},
            **extra}


def gpu_price(seconds: str) -> int:
    """$0.01 + seconds x $0.0015, in micro-dollars, rounded half-up."""
    exact = (Decimal("0.01") + Decimal(seconds) * Decimal("0.0015")) * 1_000_000
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def post(gateway: Gateway, events: list[dict[str, Any]]) -> dict[str, Any]:
    r = await gateway.admin.post("/events", json={"events": events})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def captures(gateway: Gateway, customer: str = "acme") -> list[dict[str, Any]]:
    r = await gateway.admin.get(f"/customers/{customer}/ledger", params={"limit": 200})
    return [e for e in r.json()["data"] if e["kind"] in ("capture", "void")]


async def test_batch_with_duplicates_unknown_customer_and_over_budget(events_gateway: Gateway) -> None:
    gw = events_gateway
    await gw.customer("acme", funds=100_000)  # $0.10
    batch = [gpu("e1", "20"),  # $0.01 + 20 x $0.0015 = $0.04
             gpu("e1", "20"),  # the same event again in one batch
             gpu("e2", "5", customer="nobody"),
             gpu("e3", "100"),  # $0.16: more than what is left ($0.06)
             {"id": "e4", "customer_id": "acme", "type": "export", "quantity": "1"},  # max($0.25, minimum $0.50)
             gpu("e5", "2.5")]  # $0.01375
    result = await post(gw, batch)
    statuses = [(r["id"], r["status"], r.get("code")) for r in result["data"]]
    assert statuses == [("e1", "accepted", None), ("e1", "duplicate", None), ("e2", "rejected", "unknown_customer"),
                        ("e3", "rejected", "insufficient_funds"), ("e4", "rejected", "insufficient_funds"),
                        ("e5", "accepted", None)]
    assert (result["accepted"], result["duplicate"], result["rejected"]) == (2, 1, 3)
    charged = {r["id"]: r["charged"] for r in result["data"] if r["status"] == "accepted"}
    assert charged == {"e1": gpu_price("20"), "e5": gpu_price("2.5")} == {"e1": 40_000, "e5": 13_750}
    assert result["data"][3]["required"] == "0.160000" and result["data"][3]["available"] == "0.060000"

    # A retry of the whole batch counts nothing twice; what was refused is refused again.
    again = await post(gw, batch)
    assert [r["status"] for r in again["data"]] == ["duplicate", "duplicate", "rejected", "rejected", "rejected",
                                                    "duplicate"]
    assert [r["charged"] for r in again["data"] if r["status"] == "duplicate"] == [40_000, 40_000, 13_750]

    # After a top-up the refused event goes through on its next retry: counted once, not zero times.
    r = await gw.admin.post("/customers/acme/credits", json={"amount": 1_000_000, "idempotency_key": "top-up"})
    assert r.status_code == 201
    third = await post(gw, [gpu("e3", "100"), gpu("e1", "20")])
    assert [(r["status"], r["charged"]) for r in third["data"]] == [("accepted", 160_000), ("duplicate", 40_000)]

    assert len(await captures(gw)) == 3
    balance = await gw.balance()
    assert balance["available"] == 1_100_000 - 40_000 - 13_750 - 160_000 and balance["pending"] == 0
    records = await gw.usage()
    assert sorted((r["detail"]["event"]["id"], r["charged_amount"]) for r in records) == [
        ("e1", 40_000), ("e3", 160_000), ("e5", 13_750)]
    assert all(r["route"] == "events" and r["model"] == "gpu.job" for r in records)
    assert await gw.store.audit() == []


async def test_concurrent_submissions_of_one_batch_count_once(events_gateway: Gateway) -> None:
    gw = events_gateway
    await gw.customer("acme", funds=10_000_000)
    batch = [gpu(f"c{i}", str(i)) for i in range(1, 21)]
    results = await asyncio.gather(*(post(gw, batch) for _ in range(4)))
    for i in range(20):
        outcomes = [result["data"][i]["status"] for result in results]
        assert sorted(outcomes) == ["accepted", "duplicate", "duplicate", "duplicate"], (i, outcomes)
    assert len(await captures(gw)) == 20
    expected = sum(gpu_price(str(i)) for i in range(1, 21))
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (10_000_000 - expected, 0)
    assert len(await gw.usage()) == 20
    assert await gw.store.audit() == []


@pytest.mark.parametrize(("event", "param"), [
    ({"id": "x", "customer_id": "acme", "type": "gpu.job"}, "events[1].quantity"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantity": 1.5}, "events[1].quantity"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantity": "-1"}, "events[1].quantity"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantities": {"q": "0.0000001"}}, "events[1].quantities.q"),
    ({"id": "", "customer_id": "acme", "type": "gpu.job", "quantity": "1"}, "events[1].id"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantity": "1", "extra": 1}, "events[1].extra"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantity": "1", "timestamp": "2001-01-01"},
     "events[1].timestamp"),
    ({"id": "x", "customer_id": "acme", "type": "gpu.job", "quantity": "1", "attributes": {"type": "a"}},
     "events[1].attributes.type"),
])
async def test_a_malformed_batch_is_refused_whole_and_changes_nothing(events_gateway: Gateway,
                                                                      event: dict[str, Any], param: str) -> None:
    gw = events_gateway
    await gw.customer("acme", funds=1_000_000)
    r = await gw.admin.post("/events", json={"events": [gpu("fine", "1"), event]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert (await gw.balance())["available"] == 1_000_000
    assert await gw.usage() == []


async def test_events_are_priced_by_the_version_in_force_at_their_timestamp(events_gateway: Gateway) -> None:
    gw = events_gateway
    await gw.customer("acme", funds=1_000_000)
    before = int(time.time() * 1000) - 3_600_000  # before the version was published: the config prices no events
    result = await post(gw, [gpu("old", "1", timestamp=before), gpu("now", "1")])
    assert [(r["status"], r.get("code")) for r in result["data"]] == [("rejected", "no_matching_rule"),
                                                                     ("accepted", None)]
    [record] = await gw.usage()
    assert record["detail"]["price"]["rule"] == "gpu"


async def test_volume_tiers_count_each_customers_period_usage_once(events_gateway: Gateway) -> None:
    gw = events_gateway
    storage = {"id": "storage", "match": {"type": "storage"}, "asset": "USD", "tiers": [
        {"quantity": "gb", "mode": "volume", "steps": [{"up_to": "100", "rate": "0.001"},
                                                        {"up_to": None, "rate": "0.0005"}]}]}
    r = await gw.admin.post("/price-versions", json={"rules": [GPU, EXPORT, storage]})
    assert (await gw.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})).status_code == 200
    await gw.customer("acme", funds=1_000_000)
    await gw.customer("globex", funds=1_000_000)

    def store(event_id: str, gb: str, customer: str = "acme") -> dict[str, Any]:
        return {"id": event_id, "customer_id": customer, "type": "storage", "quantities": {"gb": gb}}

    first = await post(gw, [store("s1", "80")])  # period total 80 <= 100: 80 x $0.001 = $0.08
    second = await post(gw, [store("s2", "30"), store("s1", "80")])  # total 110: 30 x $0.0005; s1 not recounted
    third = await post(gw, [store("s3", "10"), store("g1", "30", customer="globex")])  # 120: 10 x $0.0005; globex 30
    charged = [(r["id"], r["status"], r["charged"]) for batch in (first, second, third) for r in batch["data"]]
    assert charged == [("s1", "accepted", 80_000), ("s2", "accepted", 15_000), ("s1", "duplicate", 80_000),
                       ("s3", "accepted", 5_000), ("g1", "accepted", 30_000)]
    assert await gw.store.audit() == []


async def test_a_rule_can_draw_an_operator_defined_asset(events_gateway: Gateway) -> None:
    from metergate.wallet.assets import AssetRegistry
    from metergate.wallet.sql import SqlWalletStore

    gw = events_gateway
    store = gw.store
    assert isinstance(store, SqlWalletStore)
    await AssetRegistry(store, gw.settings.assets).create("test", code="TOKENS", name="Tokens", scale=0,
                                                          value_per_unit=None, value_currency=None)
    await gw.customer("acme", funds=0)
    await store.credit("test", "acme", "TOKENS", 10, idempotency_key="tokens")
    calls = {"id": "calls", "match": {"type": "api.call"}, "asset": "TOKENS", "event_fee": "3"}
    r = await gw.admin.post("/price-versions", json={"rules": [GPU, calls]})
    assert r.status_code == 201, r.text
    assert (await gw.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})).status_code == 200
    result = await post(gw, [{"id": f"call-{i}", "customer_id": "acme", "type": "api.call", "quantity": "1"}
                             for i in range(4)])
    assert [(r["status"], r.get("code"), r.get("charged")) for r in result["data"]] == [
        ("accepted", None, 3), ("accepted", None, 3), ("accepted", None, 3),
        ("rejected", "insufficient_funds", None)]  # 10 tokens cover three calls
    assert result["data"][0]["asset"] == "TOKENS" and result["data"][0]["charged_decimal"] == "3"
    assert (await store.balance("test", "acme", "TOKENS")).available == 1
    # The asset is test mode's own: a live-mode rule set cannot name it.
    async with gw.http(base_url=gw.admin.base_url,
                       headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        r = await live.post("/price-versions", json={"rules": [calls]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_asset"
    assert await store.audit() == []


async def test_an_event_whose_first_attempt_died_after_its_hold_is_completed_once(events_gateway: Gateway) -> None:
    from metergate.pricing.events import event_hold_id

    gw = events_gateway
    await gw.customer("acme", funds=1_000_000)
    # The first attempt reserved the event (at the price then) and died before capturing it.
    await gw.store.reserve("test", "acme", "USD", 40_000, hold_id=event_hold_id("test", "crashed"), ttl_ms=60_000)
    result = await post(gw, [gpu("crashed", "20")])
    assert [(r["status"], r["charged"]) for r in result["data"]] == [("accepted", 40_000)]
    again = await post(gw, [gpu("crashed", "20")])
    assert [(r["status"], r["charged"]) for r in again["data"]] == [("duplicate", 40_000)]
    assert len(await captures(gw)) == 1
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (960_000, 0)
    assert await gw.store.audit() == []


async def test_events_respect_the_customers_spend_cap(events_gateway: Gateway) -> None:
    gw = events_gateway
    await gw.customer("acme", funds=1_000_000)
    r = await gw.admin.put("/customers/acme/spend-caps", json={"daily": 50_000, "monthly": None})
    assert r.status_code == 200, r.text
    result = await post(gw, [gpu("a", "20"), gpu("b", "20")])  # $0.04 each; the day's cap is $0.05
    assert [(r["status"], r.get("code")) for r in result["data"]] == [("accepted", None),
                                                                     ("rejected", "spend_cap_reached")]
    assert (await gw.balance())["available"] == 960_000
    assert await gw.store.audit() == []
