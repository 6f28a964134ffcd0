"""Admin API for assets, conversions, grants, consumption order, plans and subscriptions.

Method: a real gateway on loopback in each topology (SQLite; PostgreSQL and PostgreSQL with Redis windows,
two replicas reached in turn), driven through the admin API with httpx; each bad input must
answer a stable error code and change nothing; objects of one mode are invisible to the other's key.
"""

from __future__ import annotations

import pytest

from tests.conftest import LIVE_ADMIN_KEY, Gateway


@pytest.fixture
def gateway(topology_gateway: Gateway) -> Gateway:
    """Every test here in each topology: SQLite; PostgreSQL and PostgreSQL with Redis windows, two replicas."""
    return topology_gateway


async def test_custom_assets_are_validated_and_scoped_to_a_mode(gateway: Gateway) -> None:
    r = await gateway.admin.post("/assets", json={"code": "TOKENS", "name": "Tokens", "scale": 0})
    assert r.status_code == 201 and r.json()["scale"] == 0
    again = await gateway.admin.post("/assets", json={"code": "TOKENS", "name": "Tokens", "scale": 0})
    assert again.status_code == 201  # the same asset again is a no-op
    bad = [
        ({"code": "TOKENS", "name": "Tokens", "scale": 2}, 409, "already_exists"),
        ({"code": "USD", "name": "mine", "scale": 2}, 409, "already_exists"),  # configured assets are fixed
        ({"code": "9LIVES", "scale": 0}, 400, "invalid_asset"),
        ({"code": "X", "scale": 13}, 400, "invalid_request"),
        ({"code": "Y", "scale": 0, "value_per_unit": "0.1"}, 400, "invalid_asset"),  # currency missing
        ({"code": "Z", "scale": 0, "value_per_unit": "-1", "value_currency": "USD"}, 400, "invalid_request"),
    ]
    for body, status, code in bad:
        r = await gateway.admin.post("/assets", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    codes = [a["code"] for a in (await gateway.admin.get("/assets")).json()["data"]]
    assert codes == ["USD", "TOKENS"]
    async with gateway.http(base_url=gateway.admin.base_url,
                            headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        assert [a["code"] for a in (await live.get("/assets")).json()["data"]] == ["USD"]


async def test_convert_buys_a_token_pack_at_the_configured_rate(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=5_000_000)  # $5
    await gateway.admin.post("/assets", json={"code": "TOKENS", "name": "Tokens", "scale": 0})
    body = {"from_asset": "USD", "to_asset": "TOKENS", "amount_decimal": "2.000001", "idempotency_key": "pack-1"}
    r = await gateway.admin.post("/customers/acme/convert", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "conversion_not_allowed")
    r = await gateway.admin.post("/conversions", json={"from_asset": "USD", "to_asset": "TOKENS", "rate": "1000"})
    assert r.status_code == 201
    r = await gateway.admin.post("/customers/acme/convert", json=body)
    assert r.status_code == 201, r.text
    # 2.000001 USD * 1000 tokens/USD = 2000.001 tokens, rounded down to 2000
    assert (r.json()["debited"], r.json()["granted"]) == (2_000_001, 2000)
    replay = await gateway.admin.post("/customers/acme/convert", json=body)
    assert replay.json()["grant_id"] == r.json()["grant_id"]
    balances = {b["asset"]: b["available"] for b in (await gateway.admin.get("/customers/acme/balance")).json()[
        "balances"]}
    assert balances == {"USD": 2_999_999, "TOKENS": 2000}
    r = await gateway.admin.post("/customers/acme/convert", json={**body, "amount_decimal": "9"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "idempotency_conflict")
    assert await gateway.store.audit() == []


async def test_grants_are_created_listed_voided_and_drawn_in_the_chosen_order(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    r = await gateway.admin.post("/customers/acme/grants", json={
        "amount": 1000, "purpose": "trial", "priority": 5, "idempotency_key": "trial"})
    assert r.status_code == 201, r.text
    trial = r.json()
    assert (trial["purpose"], trial["priority"], trial["free"], trial["state"]) == ("trial", 5, 1000, "active")
    r = await gateway.admin.post("/customers/acme/grants", json={"amount": 500, "idempotency_key": "paid"})
    paid = r.json()
    bad = [
        ({"amount": 1, "purpose": "gift", "idempotency_key": "x"}, 400, "invalid_request"),
        ({"amount": 1, "expires_at_ms": 1000, "idempotency_key": "y"}, 400, "invalid_request"),
        ({"amount": 0, "idempotency_key": "z"}, 400, "invalid_amount"),
        ({"amount": 1}, 400, "invalid_request"),
        ({"amount": 1, "asset": "NOPE", "idempotency_key": "w"}, 400, "unknown_asset"),
        ({"amount": 999, "purpose": "trial", "priority": 5, "idempotency_key": "trial"}, 409, "idempotency_conflict"),
    ]
    for body, status, code in bad:
        r = await gateway.admin.post("/customers/acme/grants", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    listed = (await gateway.admin.get("/customers/acme/grants")).json()["data"]
    assert [g["id"] for g in listed] == [paid["id"], trial["id"]]  # newest first
    r = await gateway.admin.get("/customers/acme/consumption-order")
    assert r.json()["order"] == "priority"
    r = await gateway.admin.put("/customers/acme/consumption-order", json={"order": "fifo"})
    assert r.status_code == 200 and r.json()["order"] == "fifo"
    r = await gateway.admin.put("/customers/acme/consumption-order", json={"order": "random"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
    r = await gateway.admin.post("/holds", json={"customer_id": "acme", "amount": 1200, "hold_id": "h1"})
    assert r.status_code == 201
    drawn = {a["grant_id"]: a["held"] for a in (await gateway.admin.get("/holds/h1")).json()["allocations"]}
    assert drawn == {trial["id"]: 1000, paid["id"]: 200}  # fifo: the trial is older
    r = await gateway.admin.post(f"/grants/{paid['id']}/void")
    assert r.status_code == 200 and (r.json()["state"], r.json()["removed"], r.json()["held"]) == ("voided", 300, 200)
    assert (await gateway.admin.post("/grants/nope/void")).json()["error"]["code"] == "grant_not_found"
    assert (await gateway.balance("acme"))["available"] == 0
    assert await gateway.store.audit() == []


async def test_plans_and_subscriptions_through_the_admin_api(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    plan = {"id": "pro", "name": "Pro", "period": "month",
            "entitlements": [{"asset": "USD", "amount_decimal": "0.50", "rollover_cap": 100_000}]}
    r = await gateway.admin.post("/plans", json=plan)
    assert r.status_code == 201, r.text
    assert r.json()["entitlements"] == [{"asset": "USD", "amount": 500_000, "rollover_cap": 100_000, "priority": 100}]
    assert (await gateway.admin.post("/plans", json=plan)).status_code == 201  # the same plan again
    bad = [
        ({**plan, "name": "Other"}, 409, "already_exists"),
        ({**plan, "id": "p2", "period": "year"}, 400, "invalid_request"),
        ({**plan, "id": "p3", "period": "days"}, 400, "invalid_request"),  # period_days missing
        ({**plan, "id": "p4", "entitlements": []}, 400, "invalid_request"),
        ({**plan, "id": "p5", "entitlements": [{"asset": "NOPE", "amount": 1}]}, 400, "unknown_asset"),
    ]
    for body, status, code in bad:
        r = await gateway.admin.post("/plans", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    r = await gateway.admin.post("/customers/acme/subscriptions", json={"id": "sub-1", "plan_id": "pro"})
    assert r.status_code == 201, r.text
    assert r.json()["next_period"] == 1
    assert (await gateway.balance("acme"))["available"] == 1_500_000
    r = await gateway.admin.post("/subscriptions/sub-1/tick")
    assert r.json()["periods_granted"] == 0
    r = await gateway.admin.post("/customers/acme/subscriptions", json={"id": "sub-2", "plan_id": "nope"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "plan_not_found")
    assert [s["id"] for s in (await gateway.admin.get("/customers/acme/subscriptions")).json()["data"]] == ["sub-1"]
    r = await gateway.admin.post("/subscriptions/sub-1/cancel")
    assert r.json()["state"] == "canceled"
    grants = (await gateway.admin.get("/customers/acme/grants")).json()["data"]
    assert [g["purpose"] for g in grants] == ["entitlement", "paid"]
    async with gateway.http(base_url=gateway.admin.base_url,
                            headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        assert (await live.get("/subscriptions/sub-1")).status_code == 404
        assert (await live.get("/plans")).json()["data"] == []
    assert await gateway.store.audit() == []


async def test_a_misspelt_field_is_refused_not_ignored(gateway: Gateway) -> None:
    """A trial grant sent with ``expires_at`` (the field is ``expires_at_ms``) must not become a grant that
    never expires: the call is refused, naming the field, and nothing is granted; the same holds for the
    hold API's calls."""
    await gateway.customer("acme", funds=1_000_000)
    before = (await gateway.admin.get("/customers/acme/grants")).json()["data"]
    r = await gateway.admin.post("/customers/acme/grants", json={
        "asset": "USD", "amount": 500, "purpose": "trial", "expires_at": "2027-01-01T00:00:00Z",
        "idempotency_key": "trial-typo"})
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("unknown_field", "expires_at")
    assert "expires_at_ms" in r.json()["error"]["message"]
    assert (await gateway.admin.get("/customers/acme/grants")).json()["data"] == before

    r = await gateway.admin.post("/holds", json={"customer_id": "acme", "amount": 1_000, "hold_id": "job-1"})
    assert r.status_code == 201, r.text
    r = await gateway.admin.post("/holds/job-1/heartbeat", json={"use": 10, "next": 100, "idempotency_key": "h1"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "use")
    hold = (await gateway.admin.get("/holds/job-1")).json()["hold"]
    assert (hold["captured"], hold["amount"]) == (0, 1_000)  # the refused heartbeat changed nothing
    r = await gateway.admin.post("/holds/job-404/heartbeat", json={"use": 10})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "hold_not_found")  # the path's object first
