"""The admin API v1 as an operator uses it: authentication, customers, credits, mode isolation, lists.

Method: plain HTTP against a real gateway (httpx), checking status codes, error codes in the JSON
envelope, and the ledger and balances that each call leaves behind.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ADMIN_KEY, LIVE_ADMIN_KEY, Gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def _live(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.admin.base_url, headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"},
                             timeout=30)


def _code(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


async def _walk(gw: Gateway, path: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of a list endpoint, following next_cursor."""
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        r = await gw.admin.get(path, params=params)
        assert r.status_code == 200, r.text
        pages.append(r.json()["data"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not terminate"
        params = {"limit": limit, "cursor": cursor}


# ---------------------------------------------------------------------------------- authentication


ENDPOINTS = [("GET", "/customers"), ("POST", "/customers"), ("GET", "/customers/acme"),
             ("POST", "/customers/acme/credits"), ("POST", "/customers/acme/api-keys"),
             ("GET", "/customers/acme/ledger"), ("POST", "/customers/acme/portal-link"), ("DELETE", "/api-keys/key_x")]


@pytest.mark.parametrize("authorization", [
    None,
    "Bearer mg_test_" + "w" * 24,  # well-formed, not configured
    "Bearer " + ADMIN_KEY[:-1],  # a prefix of the real key
    "Bearer " + ADMIN_KEY + "x",  # the real key plus one character
    "Basic " + ADMIN_KEY,  # the real key, wrong scheme
    "Bearer mgk_test_" + "k" * 30,  # a proxy key is not an admin key
    "Bearer",
])
async def test_requests_without_a_valid_admin_key_are_refused(gateway: Gateway, authorization: str | None) -> None:
    await gateway.customer("acme", funds=500)
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient(base_url=gateway.admin.base_url, headers=headers) as anonymous:
        for method, path in ENDPOINTS:
            r = await anonymous.request(method, path, json={"id": "evil", "amount": 10**9, "idempotency_key": "x"})
            assert (r.status_code, _code(r)) == (401, "invalid_admin_key"), (method, path)
            assert ADMIN_KEY not in r.text
    listed = await gateway.admin.get("/customers")
    assert [c["id"] for c in listed.json()["data"]] == ["acme"]
    assert (await gateway.balance("acme"))["available"] == 500
    assert len((await gateway.admin.get("/customers/acme/ledger")).json()["data"]) == 1


# ---------------------------------------------------------------------------------- customers


async def test_create_get_and_duplicate_customer(gateway: Gateway) -> None:
    created = await gateway.admin.post("/customers", json={"id": "acme", "name": "Acme Corp"})
    assert created.status_code == 201
    assert created.json()["id"] == "acme" and created.json()["name"] == "Acme Corp"
    assert created.json()["mode"] == "test"

    got = await gateway.admin.get("/customers/acme")
    assert got.status_code == 200
    assert (got.json()["id"], got.json()["name"], got.json()["balances"]) == ("acme", "Acme Corp", [])

    again = await gateway.admin.post("/customers", json={"id": "acme", "name": "Someone else"})
    assert again.status_code == 409 and _code(again) == "already_exists"
    assert (await gateway.admin.get("/customers/acme")).json()["name"] == "Acme Corp"

    missing = await gateway.admin.get("/customers/nobody")
    assert missing.status_code == 404 and _code(missing) == "customer_not_found"


INVALID_CUSTOMERS: list[tuple[dict[str, Any], str]] = [
    ({"id": "has space"}, "invalid_customer"),
    ({"id": ""}, "invalid_customer"),
    ({"id": "-leading-dash"}, "invalid_customer"),
    ({"id": "x" * 129}, "invalid_customer"),
    ({"id": 42}, "invalid_customer"),
    ({"name": "no id"}, "invalid_customer"),
    ({"id": "acme", "name": "n" * 257}, "invalid_request"),
]


async def test_invalid_customer_is_refused(gateway: Gateway) -> None:
    for body, code in INVALID_CUSTOMERS:
        r = await gateway.admin.post("/customers", json=body)
        assert (r.status_code, _code(r)) == (400, code), body
    assert (await gateway.admin.get("/customers")).json()["data"] == []


async def test_admin_body_that_is_not_a_json_object_is_refused(gateway: Gateway) -> None:
    for content in (b"{not json", b"[1, 2]", b"\"acme\"", b"\xff", b"", b"[" * 100_000):
        r = await gateway.admin.post("/customers", content=content, headers={"Content-Type": "application/json"})
        assert (r.status_code, _code(r)) == (400, "invalid_json"), content[:20]
    assert (await gateway.admin.get("/customers")).json()["data"] == []


async def test_customers_list_is_paginated_by_cursor(gateway: Gateway) -> None:
    ids = [f"cust-{i:02d}" for i in range(7)]
    for customer_id in reversed(ids):
        assert (await gateway.admin.post("/customers", json={"id": customer_id})).status_code == 201

    pages = await _walk(gateway, "/customers", limit=3)

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [c["id"] for page in pages for c in page] == ids  # ordered by id, each exactly once


async def test_bad_page_size_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    for limit in (0, 201, "ten"):
        for path in ("/customers", "/customers/acme/ledger", "/customers/acme/usage"):
            r = await gateway.admin.get(path, params={"limit": limit})
            assert (r.status_code, _code(r), r.json()["error"]["param"]) == (400, "invalid_request", "limit"), path


async def test_bad_ledger_cursor_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme")
    r = await gateway.admin.get("/customers/acme/ledger", params={"cursor": "acme"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cursor"


# ---------------------------------------------------------------------------------- credits


async def test_credit_with_the_same_idempotency_key_twice_credits_once(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    body = {"amount": 2_500_000, "idempotency_key": "topup-1", "memo": "card ending 4242"}
    first = await gateway.admin.post("/customers/acme/credits", json=body)
    second = await gateway.admin.post("/customers/acme/credits", json=body)

    assert first.status_code == second.status_code == 201
    assert first.json()["entry"] == second.json()["entry"]
    assert first.json()["entry"]["amount_decimal"] == "2.500000"
    assert second.json()["balance"]["available"] == 2_500_000
    ledger = (await gateway.admin.get("/customers/acme/ledger")).json()["data"]
    assert [(e["kind"], e["amount"]) for e in ledger] == [("credit", 2_500_000)]


async def test_idempotency_key_header_works_like_the_body_field(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    for _ in range(2):
        r = await gateway.admin.post("/customers/acme/credits", json={"amount": 7},
                                     headers={"Idempotency-Key": "hdr-1"})
        assert r.status_code == 201
    assert (await gateway.balance("acme"))["available"] == 7


@pytest.mark.parametrize("changed", [{"amount": 2_500_001}, {"memo": "another memo"}])
async def test_same_idempotency_key_with_different_content_conflicts(
        gateway: Gateway, changed: dict[str, Any]) -> None:
    await gateway.customer("acme", funds=0)
    body = {"amount": 2_500_000, "idempotency_key": "topup-1", "memo": "m"}
    assert (await gateway.admin.post("/customers/acme/credits", json=body)).status_code == 201
    conflict = await gateway.admin.post("/customers/acme/credits", json={**body, **changed})
    assert conflict.status_code == 409 and _code(conflict) == "idempotency_conflict"
    assert (await gateway.balance("acme"))["available"] == 2_500_000


async def test_idempotency_key_used_for_another_customer_conflicts(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    await gateway.customer("globex", funds=0)
    body = {"amount": 100, "idempotency_key": "shared"}
    assert (await gateway.admin.post("/customers/acme/credits", json=body)).status_code == 201
    r = await gateway.admin.post("/customers/globex/credits", json=body)
    assert r.status_code == 409 and _code(r) == "idempotency_conflict"
    assert (await gateway.admin.get("/customers/globex/balance")).json()["balances"] == []


async def test_amount_decimal_is_exact(gateway: Gateway) -> None:
    for i, (amount_decimal, minor) in enumerate([("1.5", 1_500_000), ("0.000001", 1), ("12", 12_000_000),
                                                  ("0.100000", 100_000)]):
        customer_id = f"cust-{i}"
        await gateway.customer(customer_id, funds=0)
        r = await gateway.admin.post(f"/customers/{customer_id}/credits",
                                     json={"amount_decimal": amount_decimal, "idempotency_key": f"d{i}"})
        assert r.status_code == 201, r.text
        assert r.json()["entry"]["amount"] == minor
        assert (await gateway.balance(customer_id))["available"] == minor


INVALID_AMOUNTS: list[dict[str, Any]] = [
    # --- amount_decimal that cannot be credited exactly or at all
    {"amount_decimal": "0.0000001"},  # finer than a micro-dollar: refused, never rounded
    {"amount_decimal": "-1"},
    {"amount_decimal": "0"},
    {"amount_decimal": "abc"},
    {"amount_decimal": "NaN"},
    {"amount_decimal": "Infinity"},
    {"amount_decimal": "1e999999999"},  # exponent notation would build a gigantic integer
    {"amount_decimal": "1.5\n"},
    {"amount_decimal": 1.5},  # must be a string, as documented
    # --- amount in the smallest unit
    {"amount": 0},
    {"amount": -5},
    {"amount": 1.5},
    {"amount": "100"},
    {"amount": True},
    {"amount": 10**15 + 1},
    {},
]


async def test_invalid_amount_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    for body in INVALID_AMOUNTS:
        r = await gateway.admin.post("/customers/acme/credits", json={**body, "idempotency_key": "bad"})
        assert (r.status_code, _code(r)) == (400, "invalid_amount"), body
    assert (await gateway.admin.get("/customers/acme/ledger")).json()["data"] == []


INVALID_CREDITS: list[tuple[dict[str, Any], str]] = [
    ({"amount": 5}, "invalid_request"),  # no idempotency key
    ({"amount": 5, "idempotency_key": ""}, "invalid_request"),
    ({"amount": 5, "idempotency_key": "k" * 129}, "invalid_request"),
    ({"amount": 5, "idempotency_key": "k", "asset": "EUR"}, "unknown_asset"),
    ({"amount": 5, "idempotency_key": "k", "memo": "m" * 501}, "invalid_request"),
]


async def test_invalid_credit_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    for body, code in INVALID_CREDITS:
        r = await gateway.admin.post("/customers/acme/credits", json=body)
        assert (r.status_code, _code(r)) == (400, code), body
    assert (await gateway.admin.get("/customers/acme/ledger")).json()["data"] == []


# ---------------------------------------------------------------------------------- modes


@pytest.mark.parametrize(("owner", "intruder"), [("test", "live"), ("live", "test")])
async def test_an_admin_key_cannot_see_or_change_the_other_modes_customers(
        gateway: Gateway, owner: str, intruder: str) -> None:
    await gateway.customer("acme", funds=1_000, mode=owner)
    async with _live(gateway) as live:
        clients = {"test": gateway.admin, "live": live}
        own, other = clients[owner], clients[intruder]
        issued = await own.post("/customers/acme/api-keys")
        assert issued.status_code == 201

        attempts = [
            await other.get("/customers/acme"),
            await other.get("/customers/acme/balance"),
            await other.get("/customers/acme/ledger"),
            await other.get("/customers/acme/usage"),
            await other.post("/customers/acme/credits", json={"amount": 10**6, "idempotency_key": "steal"}),
            await other.post("/customers/acme/api-keys"),
            await other.post("/customers/acme/portal-link"),
            await other.delete(f"/api-keys/{issued.json()['id']}"),
        ]
        assert [r.status_code for r in attempts] == [404] * len(attempts)
        assert {_code(r) for r in attempts} <= {"customer_not_found", "not_found"}
        assert (await other.get("/customers")).json()["data"] == []

        # The owner's view is untouched: same balance, one ledger entry, key still live.
        balance = (await own.get("/customers/acme/balance")).json()["balances"][0]
        assert balance["available"] == 1_000
        assert len((await own.get("/customers/acme/ledger")).json()["data"]) == 1
        revoke = await own.delete(f"/api-keys/{issued.json()['id']}")
        assert revoke.status_code == 200

        # The same id may exist independently in the other mode.
        assert (await other.post("/customers", json={"id": "acme"})).status_code == 201
        assert (await other.get("/customers/acme/balance")).json()["balances"] == []


# ---------------------------------------------------------------------------------- lists


async def test_ledger_is_newest_first_and_paginated(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    amounts = [1, 2, 3, 4, 5]
    for amount in amounts:
        r = await gateway.admin.post("/customers/acme/credits",
                                     json={"amount": amount, "idempotency_key": f"c{amount}"})
        assert r.status_code == 201

    pages = await _walk(gateway, "/customers/acme/ledger", limit=2)

    entries = [e for page in pages for e in page]
    assert [e["amount"] for e in entries] == list(reversed(amounts))
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)


async def test_usage_is_newest_first_and_paginated(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    client = gateway.openai()
    request_ids, output_tokens = [], []
    for words in (3, 4, 5):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20,
            extra_headers={"X-Mock-Behavior": f"words:{words}"})
        request_ids.append(raw.headers["X-Metergate-Request-Id"])
        usage = raw.parse().usage
        assert usage is not None
        output_tokens.append(usage.completion_tokens)

    pages = await _walk(gateway, "/customers/acme/usage", limit=2)

    records = [u for page in pages for u in page]
    assert [u["id"] for u in records] == list(reversed(request_ids))
    assert [u["tokens_output"] for u in records] == list(reversed(output_tokens))
    assert all(u["charged_decimal"] == f"0.{u['charged_amount']:06d}" for u in records)


# ---------------------------------------------------------------------------------- the document


async def test_openapi_document_is_json_and_describes_every_admin_route(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:  # the document is public
        r = await anonymous.get("/admin/v1/openapi.json")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    doc = json.loads(r.text)
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]

    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {(route.method, route.resource.canonical) for route in gateway.app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/admin/v1/")
              and route.method != "HEAD" and not route.resource.canonical.endswith("openapi.json")}
    assert documented == served
    for path in ("/admin/v1/customers/{customer_id}/ledger", "/admin/v1/customers/{customer_id}/usage"):
        assert {p["name"] for p in doc["paths"][path]["get"]["parameters"]} >= {"customer_id", "limit", "cursor"}
