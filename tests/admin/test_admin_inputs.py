"""Malformed admin input is refused by the one validation layer (the OpenAPI document, enforced), with a
stable code and nothing changed; failed admin keys are throttled per address.

Method: plain HTTP against a real gateway (role ``all``, so the proxy's catch-all is there). Each refusal
is checked for status, error code and an unchanged ledger, balance and object under test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ADMIN_KEY, Gateway, Upstream, start_gateway


async def _state(gw: Gateway) -> tuple[Any, ...]:
    ledger = (await gw.admin.get("/customers/acme/ledger")).json()["data"]
    customers = (await gw.admin.get("/customers")).json()["data"]
    return ledger, await gw.balance(), customers


def _code(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    # Item 10: empty ids were a KeyError (500).
    ("GET", "/exports/usage?customer_id=", None, 400, "invalid_request"),
    ("GET", "/exports/ledger?customer_id=", None, 400, "invalid_request"),
    ("GET", "/billing/reconciliation?customer_id=", None, 400, "invalid_request"),
    # Item 10: an object as asset (unhashable dict) and as order.
    ("POST", "/customers/acme/credits", {"asset": {}, "amount": 1, "idempotency_key": "k"}, 400, "invalid_request"),
    ("PUT", "/customers/acme/consumption-order", {"order": {}}, 400, "invalid_request"),
    ("PUT", "/customers/acme/consumption-order", {"order": "newest"}, 400, "invalid_request"),
    # Item 10: schema-violating requests that were accepted.
    ("PUT", "/customers/acme/spend-caps", {"asset": None, "daily": 1}, 400, "invalid_request"),
    ("PUT", "/customers/acme/billing", {"billing_mode": "prepaid", "credit_limits": None}, 400, "invalid_request"),
    # Item 9: integer overflow in a cursor (was 500).
    ("GET", "/customers/acme/ledger?cursor=99999999999999999999999", None, 400, "invalid_request"),
    ("GET", "/customers/acme/usage?cursor=-1", None, 400, "invalid_request"),
    ("GET", "/customers/acme/ledger?cursor=", None, 400, "invalid_request"),
    ("GET", "/customers/acme/ledger?limit=1e3", None, 400, "invalid_request"),
    # Item 9: unknown fields were ignored; amount_decimal silently overrode amount.
    ("POST", "/customers/acme/credits", {"amount": 1, "idempotency_key": "k2", "amout": 5}, 400, "unknown_field"),
    ("POST", "/customers", {"id": "beta", "nmae": "Beta"}, 400, "unknown_field"),
    ("POST", "/customers/acme/credits", {"amount": 1, "amount_decimal": "900", "idempotency_key": "k3"}, 400,
     "invalid_amount"),
    ("POST", "/customers/acme/credits", {"amount": 10**16, "idempotency_key": "k4"}, 400, "invalid_amount"),
    ("POST", "/customers/acme/credits", {"amount": 2**70, "idempotency_key": "k5"}, 400, "invalid_amount"),
])
async def test_malformed_admin_input_is_refused_and_changes_nothing(gateway: Gateway, method: str, path: str,
                                                                    body: Any, status: int, code: str) -> None:
    await gateway.customer("acme", funds=1_000)
    before = await _state(gateway)
    r = await gateway.admin.request(method, path, json=body)
    assert (r.status_code, _code(r)) == (status, code), r.text
    assert await _state(gateway) == before


async def test_integral_numbers_are_integers_as_the_document_says(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    r = await gateway.admin.post("/customers/acme/credits", json={"amount": 500.0, "idempotency_key": "f"})
    assert r.status_code == 201, r.text
    assert (await gateway.balance())["available"] == 500


@pytest.mark.parametrize(("method", "path"), [
    ("TRACE", "/customers"), ("PATCH", "/customers/acme"), ("DELETE", "/customers/acme/credits"),
    ("PUT", "/holds"), ("POST", "/quote/x"),
])
async def test_undeclared_methods_answer_405_with_allow(gateway: Gateway, method: str, path: str) -> None:
    await gateway.customer("acme", funds=1_000)
    before = await _state(gateway)
    r = await gateway.admin.request(method, path)
    if path == "/quote/x":  # not a path of the document: an unknown route
        assert (r.status_code, _code(r)) == (404, "unknown_route")
        return
    assert (r.status_code, _code(r)) == (405, "method_not_allowed")
    assert r.headers["Allow"] and method not in r.headers["Allow"].split(", ")
    assert await _state(gateway) == before


@pytest.fixture
async def strict_gate(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'auth.db'}", admin_auth_max_failures=3,
                                     admin_auth_window_s=3600)
    yield gw
    await gw.close()
    await runner.cleanup()


async def test_failed_admin_keys_are_throttled_per_address(strict_gate: Gateway) -> None:
    await strict_gate.customer("acme", funds=1_000)
    before = await _state(strict_gate)
    async with httpx.AsyncClient(base_url=strict_gate.admin.base_url,
                                 headers={"Authorization": "Bearer mg_test_" + "g" * 24}) as guesser:
        for _ in range(3):
            r = await guesser.post("/customers/acme/credits", json={"amount": 1, "idempotency_key": "x"})
            assert (r.status_code, _code(r)) == (401, "invalid_admin_key")
        r = await guesser.post("/customers/acme/credits", json={"amount": 1, "idempotency_key": "x"})
        assert (r.status_code, _code(r)) == (429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 3600
    # From that address every key is refused until the window ends, the right one too: a guess that hits
    # must not be told apart from one that misses.
    r = await strict_gate.admin.get("/customers/acme/ledger")
    assert (r.status_code, _code(r)) == (429, "rate_limited")
    # A request without any key guesses nothing: still a plain 401.
    async with httpx.AsyncClient(base_url=strict_gate.admin.base_url) as anonymous:
        r = await anonymous.get("/customers")
        assert (r.status_code, _code(r)) == (401, "invalid_admin_key")
    store = strict_gate.store
    assert [e.amount for e in await store.ledger("test", "acme", limit=10)] == [e["amount"] for e in before[0]]
    assert (await store.balance("test", "acme", "USD")).available == before[1]["available"]


def test_throttle_memory_is_bounded() -> None:
    from metergate.admin.validation import AuthThrottle

    throttle = AuthThrottle(max_failures=1, window_s=3600, max_addresses=16)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) == 16
    throttle.check("10.0.0.0")  # forgotten long ago: allowed again
    with pytest.raises(Exception, match="Too many"):
        throttle.check("10.0.3.231")  # the newest is still refused


async def test_admin_key_in_document_is_not_needed_for_the_document(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.admin.base_url) as anonymous:
        r = await anonymous.get("/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.")
    assert ADMIN_KEY not in r.text
