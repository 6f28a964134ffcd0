"""A proxy key reads its own budget and usage without an admin key, and a rolling window frees capacity at the
right instant through the real proxy (the guard's injected clock; no sleeps).

Method: a real gateway (SQLite) and the mock upstream; requests through the official ``openai`` SDK with a
proxy key attached to an agent node; the self-service endpoints read back over HTTP with that key only.
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import openai
import pytest

from metergate.proxy.app import PIPELINE
from tests.budgets.world import START_MS, Clock
from tests.conftest import Gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


async def keyed_agent(gw: Gateway, limit: dict[str, Any]) -> str:
    await gw.customer("acme", funds=1_000_000)
    for node in ({"id": "p", "kind": "project"}, {"id": "a1", "kind": "agent", "parent_id": "p"}):
        assert (await gw.admin.post("/customers/acme/budget-nodes", json=node)).status_code == 201
    assert (await gw.admin.post("/customers/acme/budget-nodes/a1/limits", json=limit)).status_code == 201
    issued = (await gw.admin.post("/customers/acme/api-keys")).json()
    assert (await gw.admin.put(f"/api-keys/{issued['id']}/budget-node", json={"node_id": "a1"})).status_code == 200
    key: str = issued["key"]
    return key


async def test_a_key_reads_its_remaining_budget_and_recent_usage(gateway: Gateway) -> None:
    key = await keyed_agent(gateway, {"id": "a1-req", "dimension": "requests", "amount": 5,
                                      "window": {"kind": "day"}})
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    gateway.clients.append(client)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # root
    async with httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}) as own:
        balance = (await own.get("/v1/metergate/balance")).json()
        assert (balance["customer_id"], balance["node"], balance["node_path"]) == ("acme", "a1", "root/p/a1")
        assert balance["balances"][0]["asset"] == "USD" and 0 < balance["balances"][0]["available"] < 1_000_000
        [a1] = [n for n in balance["budget"] if n["node"] == "a1"]
        assert a1["limits"][0]["id"] == "a1-req" and a1["limits"][0]["used"] >= 2
        assert a1["limits"][0]["remaining"] == 5 - a1["limits"][0]["used"]
        usage = (await own.get("/v1/metergate/usage", params={"limit": 10})).json()
        assert [r["budget_path"] for r in usage["data"]] == ["root/p/a1", "root/p/a1"]  # not the root's request
        bad = await own.get("/v1/metergate/usage", params={"limit": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
        moved = await own.get("/v1/metergate/balance", headers={"X-Metergate-Budget-Node": "p"})
        assert moved.status_code == 403 and moved.json()["error"]["code"] == "untrusted_budget_node_header"
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        r = await anonymous.get("/v1/metergate/balance")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_customer"
        r = await anonymous.get("/v1/metergate/balance", headers={"Authorization": "Bearer mgk_test_" + "x" * 30})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_a_rolling_window_frees_capacity_exactly_when_its_first_bucket_leaves(gateway: Gateway) -> None:
    """Three requests per rolling minute counted in 60 one-second buckets: a request made at 0.5 s counts
    until 60.0 s (its bucket started at 0 s), and not a millisecond longer."""
    key = await keyed_agent(gateway, {"id": "a1-roll", "dimension": "requests", "amount": 3,
                                      "window": {"kind": "rolling", "length_s": 60, "buckets": 60}})
    clock = Clock(START_MS + 500)
    gateway.app[PIPELINE].budgets.clock = clock
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/openai/v1", api_key=key, max_retries=0)
    gateway.clients.append(client)

    async def send() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        except openai.RateLimitError as refused:
            body = refused.body
            assert isinstance(body, dict) and body["limit"]["id"] == "a1-roll"
            return int(body["retry_after_s"])
        return 0

    assert await send() == 0  # at 0.5 s
    clock.now = START_MS + 20_000
    assert await send() == 0
    assert await send() == 0
    clock.now = START_MS + 59_999
    assert await send() == 1  # the first request's bucket leaves the window at 60.000 s: 1 ms, rounded up to 1 s
    clock.now = START_MS + 60_000
    assert await send() == 0  # freed exactly then
    retry = await send()
    assert retry == 20  # the next to leave: the two made at 20 s, whose bucket leaves at 80 s
    clock.now = START_MS + 80_000
    assert await send() == 0


@pytest.mark.parametrize("path", ["/v1/metergate/balance", "/v1/metergate/usage"])
async def test_a_customer_without_a_tree_reads_its_balance_from_the_app(gateway: Gateway, path: str) -> None:
    await gateway.customer("acme", funds=1_000)
    async with httpx.AsyncClient(base_url=gateway.url, headers={"X-Metergate-Customer": "acme",
                                                                 "X-Metergate-Mode": "test"}) as app:
        r = await app.get(path)
        assert r.status_code == 200 and r.json()["node"] == "root" and r.json()["budget"] == []


async def test_the_portal_shows_the_tree_with_use_and_limits_escaped(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    nodes = [{"id": "p", "kind": "project", "name": "<script>alert(1)</script>"},
             {"id": "a1", "kind": "agent", "parent_id": "p", "name": "Agent one"}]
    for node in nodes:
        assert (await gateway.admin.post("/customers/acme/budget-nodes", json=node)).status_code == 201
    r = await gateway.admin.post("/customers/acme/budget-nodes/a1/limits", json={
        "id": "a1-req", "dimension": "requests", "amount": 4, "window": {"kind": "day"}})
    assert r.status_code == 201
    await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                                   extra_headers={"X-Metergate-Budget-Node": "a1"})
    link = (await gateway.admin.post("/customers/acme/portal-link")).json()["url"]
    async with httpx.AsyncClient() as browser:
        page = await browser.get(link.replace("/portal/?", "/portal/budgets?"))
        assert page.status_code == 200 and page.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert "Agent one" in page.text and "4 requests per day" in page.text
        assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;" in page.text
        forged = await browser.get(link.replace("/portal/?", "/portal/budgets?").replace("&s=", "&s=x"))
        assert forged.status_code == 403
