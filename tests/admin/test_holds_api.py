"""The hold API over HTTP: a GPU-style job that heartbeats until its wallet is empty and is told to stop at zero;
every call replayed answers the same and changes nothing; a reused key with other content is a 409.

Method: a real gateway (``gateway``: metergate on loopback in each topology) driven with httpx through the
admin API exactly as an operator's job runner would, checking balances, the ledger and ``audit()``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import LIVE_ADMIN_KEY, Gateway


@pytest.fixture
def gateway(topology_gateway: Gateway) -> Gateway:
    """Every test here in each topology: SQLite; PostgreSQL and PostgreSQL with Redis windows, two replicas."""
    return topology_gateway


async def gpu_wallet(gateway: Gateway, seconds_millis: int) -> None:
    """A customer whose wallet holds ``seconds_millis`` GPU milliseconds, in a custom asset."""
    r = await gateway.admin.post("/assets", json={"code": "GPU_SECONDS", "name": "GPU seconds", "scale": 3,
                                                  "value_per_unit": "0.0008", "value_currency": "USD"})
    assert r.status_code == 201, r.text
    await gateway.customer("trainer", funds=0)
    r = await gateway.admin.post("/customers/trainer/grants", json={
        "asset": "GPU_SECONDS", "amount_decimal": str(seconds_millis / 1000), "purpose": "paid",
        "idempotency_key": "pack"})
    assert r.status_code == 201, r.text


async def available(gateway: Gateway) -> int:
    r = await gateway.admin.get("/customers/trainer/balance")
    [gpu] = [b for b in r.json()["balances"] if b["asset"] == "GPU_SECONDS"]
    return int(gpu["available"])


async def test_a_gpu_job_heartbeats_until_the_wallet_is_empty_and_stops_at_zero(gateway: Gateway) -> None:
    await gpu_wallet(gateway, 10_000)  # 10 s of GPU time
    increment = 3_000  # each heartbeat asks for 3 s more
    r = await gateway.admin.post("/holds", headers={"Idempotency-Key": "job-1"}, json={
        "customer_id": "trainer", "asset": "GPU_SECONDS", "amount": increment, "ttl_s": 60})
    assert r.status_code == 201, r.text
    hold_id = r.json()["hold"]["id"]
    used, beats, answer = 0, 0, {}
    while True:
        used += min(increment, answer.get("allowance", increment))  # the job uses what it was allowed
        beats += 1
        r = await gateway.admin.post(f"/holds/{hold_id}/heartbeat", headers={"Idempotency-Key": f"beat-{beats}"},
                                     json={"used": used, "next": increment, "ttl_s": 60})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["charged"] <= increment and answer["written_off"] == 0
        if answer["action"] == "stop":
            break
        assert answer["allowance"] > 0
    assert (used, beats, answer["reason"]) == (10_000, 4, "insufficient_funds")  # 3 + 3 + 3 + 1 seconds
    assert await available(gateway) == 0
    async with gateway.http(follow_redirects=True) as browser:  # the job runner shows its user where to top up
        assert "c=trainer" in answer["portal_url"]
        assert (await browser.get(answer["portal_url"])).status_code == 200
        r = await gateway.admin.post("/holds", headers={"Idempotency-Key": "job-2"}, json={
            "customer_id": "trainer", "asset": "GPU_SECONDS", "amount": increment, "ttl_s": 60})
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["balance"], error["required"]) == (
            402, "insufficient_funds", 0, increment)
        assert "c=trainer" in error["portal_url"] and (await browser.get(error["portal_url"])).status_code == 200
    r = await gateway.admin.post(f"/holds/{hold_id}/capture", headers={"Idempotency-Key": "done"},
                                 json={"amount": 0, "final": True})
    assert r.status_code == 200, r.text
    assert (r.json()["hold"]["state"], r.json()["hold"]["captured"]) == ("captured", 10_000)
    assert await available(gateway) == 0
    r = await gateway.admin.get(f"/holds/{hold_id}")
    assert r.json()["allocations"] and sum(a["captured"] for a in r.json()["allocations"]) == 10_000
    kinds = [e["kind"] for e in (await gateway.admin.get("/customers/trainer/ledger")).json()["data"]]
    assert kinds.count("capture") == 5 and kinds.count("extend") == 3  # 4 heartbeats + the final
    assert await gateway.store.audit() == []


async def test_every_hold_call_replayed_answers_the_same_and_changes_nothing(gateway: Gateway) -> None:
    await gpu_wallet(gateway, 20_000)
    create = {"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 1_000, "ttl_s": 60}
    hold_id = "job-replay"
    calls: list[tuple[str, dict[str, Any], str]] = [
        ("/holds", {**create, "hold_id": hold_id}, "create"),
        (f"/holds/{hold_id}/extend", {"amount": 500}, "ext-1"),
        (f"/holds/{hold_id}/capture", {"amount": 700}, "cap-1"),
        (f"/holds/{hold_id}/heartbeat", {"used": 1_200, "next": 2_000}, "hb-1"),
        (f"/holds/{hold_id}/capture", {"amount": 300, "final": True}, "final"),
        (f"/holds/{hold_id}/void", {}, "void-after-final"),
    ]
    for path, body, key in calls:
        first = await gateway.admin.post(path, json=body, headers={"Idempotency-Key": key})
        before = (await available(gateway), len((await gateway.admin.get("/customers/trainer/ledger")).json()["data"]))
        again = await gateway.admin.post(path, json=body, headers={"Idempotency-Key": key})
        after = (await available(gateway), len((await gateway.admin.get("/customers/trainer/ledger")).json()["data"]))
        assert (again.status_code, again.content) == (first.status_code, first.content), path
        assert after == before, path
    # the void after the final capture is refused (the hold is resolved), and stays refused
    assert first.status_code == 409 and first.json()["error"]["code"] == "hold_not_pending"
    r = await gateway.admin.get(f"/holds/{hold_id}")
    assert (r.json()["hold"]["state"], r.json()["hold"]["captured"]) == ("captured", 1_500)
    assert await available(gateway) == 20_000 - 1_500
    assert await gateway.store.audit() == []


async def test_a_reused_key_with_other_content_is_a_409(gateway: Gateway) -> None:
    await gpu_wallet(gateway, 20_000)
    r = await gateway.admin.post("/holds", headers={"Idempotency-Key": "k"}, json={
        "customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 1_000})
    hold_id = r.json()["hold"]["id"]
    conflicts = [
        ("/holds", {"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 1_001}, "k"),
        (f"/holds/{hold_id}/extend", {"amount": 10}, "e"),
        (f"/holds/{hold_id}/extend", {"amount": 11}, "e"),
        (f"/holds/{hold_id}/capture", {"amount": 10}, "c"),
        (f"/holds/{hold_id}/capture", {"amount": 10, "final": True}, "c"),
        (f"/holds/{hold_id}/heartbeat", {"used": 100, "next": 500}, "h"),
        (f"/holds/{hold_id}/heartbeat", {"used": 100, "next": 600}, "h"),
    ]
    statuses = []
    for path, body, key in conflicts:
        r = await gateway.admin.post(path, json=body, headers={"Idempotency-Key": key})
        statuses.append((r.status_code, r.json().get("error", {}).get("code")))
    ok, conflict = (200, None), (409, "idempotency_conflict")
    assert statuses == [conflict, ok, conflict, ok, conflict, ok, conflict]
    assert await available(gateway) == 20_000 - 1_010  # held 1000 + 10; 100 of it captured, 910 still held
    assert await gateway.store.audit() == []


async def test_hold_api_refuses_bad_input_and_other_modes(gateway: Gateway) -> None:
    await gpu_wallet(gateway, 1_000)
    bad = [
        ({"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 10}, {}, 400, "invalid_request"),  # no key
        ({"customer_id": "trainer", "asset": "NOPE", "amount": 10}, {"Idempotency-Key": "a"}, 400, "unknown_asset"),
        ({"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": -1}, {"Idempotency-Key": "b"}, 400,
         "invalid_amount"),
        ({"customer_id": "trainer", "asset": "GPU_SECONDS", "amount_decimal": "0.0001"}, {"Idempotency-Key": "c"},
         400, "invalid_amount"),
        ({"customer_id": "ghost", "asset": "GPU_SECONDS", "amount": 1}, {"Idempotency-Key": "d"}, 404,
         "customer_not_found"),
        ({"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 1_001}, {"Idempotency-Key": "e"}, 402,
         "insufficient_funds"),
    ]
    for body, headers, status, code in bad:
        r = await gateway.admin.post("/holds", json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    r = await gateway.admin.post("/holds", json={"customer_id": "trainer", "asset": "GPU_SECONDS", "amount": 10,
                                                 "hold_id": "mine"})
    assert r.status_code == 201
    async with gateway.http(base_url=gateway.admin.base_url,
                            headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        r = await live.get("/holds/mine")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "hold_not_found")
        r = await live.post("/holds/mine/void", json={})
        assert r.status_code == 404
    assert await available(gateway) == 990
    assert await gateway.store.audit() == []
