"""Budgets through the real proxy: the admin API builds a tree, the official ``openai`` SDK sends requests
that name their node (the trusted header) or carry a proxy key attached to one, and refusals say where.

Method: a real gateway (SQLite) in front of the mock upstream; every expectation is read from HTTP answers
(status, the error envelope the SDK raises, headers) and the admin API (usage records, the tree's use).
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import LIVE_ADMIN_KEY, Gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
LIMIT = 400  # micro-dollars: a few dozen small requests


async def tree(gw: Gateway, *, agent_limits: list[dict[str, Any]] | None = None,
               project: dict[str, Any] | None = None) -> None:
    await gw.customer("acme", funds=1_000_000)
    r = await gw.admin.post("/customers/acme/budget-nodes", json={"id": "p", "kind": "project", "name": "Search",
                                                                  **(project or {})})
    assert r.status_code == 201, r.text
    for agent in ("a1", "a2"):
        r = await gw.admin.post("/customers/acme/budget-nodes", json={"id": agent, "kind": "agent", "parent_id": "p"})
        assert r.status_code == 201, r.text
    for limit in agent_limits or []:
        r = await gw.admin.post("/customers/acme/budget-nodes/a1/limits", json=limit)
        assert r.status_code == 201, r.text


async def chat(client: openai.AsyncOpenAI, node: str | None = None, model: str = "gpt-4o-mini") -> Any:
    headers = {"X-Mock-Behavior": "words:3", **({"X-Metergate-Budget-Node": node} if node else {})}
    return await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20,
                                                extra_headers=headers)


async def test_a_node_over_its_limit_answers_429_naming_the_node_limit_use_and_retry(gateway: Gateway) -> None:
    await tree(gateway, agent_limits=[{"id": "a1-daily", "dimension": "requests", "amount": 2,
                                       "window": {"kind": "day"}}])
    client = gateway.openai()
    await chat(client, "a1")
    await chat(client, "a1")
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(client, "a1")
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["code"] == "budget_exceeded" and body["type"] == "rate_limit_error"
    assert body["node"] == "a1" and body["node_path"] == "root/p/a1"
    assert body["limit"] == {"id": "a1-daily", "node_id": "a1", "dimension": "requests", "amount": 2,
                             "window": {"kind": "day"}, "asset": None, "version": 1}
    assert body["used"] == 2 and 1 <= body["retry_after_s"] <= 86_400
    assert refused.value.response.headers["Retry-After"] == str(body["retry_after_s"])
    assert refused.value.response.headers["x-should-retry"] == "false"  # a day away: no automatic retry
    assert "portal_url" not in body  # paying cannot lift a limit
    await chat(client, "a2")  # the sibling is not limited by a1's limit
    records = await gateway.usage()
    assert sorted(r["budget_path"] for r in records) == ["root/p/a1", "root/p/a1", "root/p/a2"]
    view = (await gateway.admin.get("/customers/acme/budget-nodes/a1")).json()
    assert view["limits"][0]["used"] >= 2 and view["path"] == "root/p/a1"


async def test_a_project_that_allows_some_models_refuses_others_for_its_whole_subtree(gateway: Gateway) -> None:
    await tree(gateway, project={"allowed_models": ["gpt-4o-mini*"]})
    client = gateway.openai()
    await chat(client, "a1", "gpt-4o-mini")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await chat(client, "a2", "gpt-4o")
    body = refused.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["node"], body["node_path"]) == ("model_not_allowed", "p", "root/p/a2")
    assert len(await gateway.usage()) == 1  # the refused request was never held nor forwarded


async def test_a_proxy_key_is_charged_to_its_node_and_cannot_name_another(gateway: Gateway) -> None:
    await tree(gateway, agent_limits=[{"id": "a1-req", "dimension": "requests", "amount": 1,
                                       "window": {"kind": "rolling", "length_s": 60}}])
    issued = (await gateway.admin.post("/customers/acme/api-keys")).json()
    r = await gateway.admin.put(f"/api-keys/{issued['id']}/budget-node", json={"node_id": "a1"})
    assert r.status_code == 200 and r.json()["node_id"] == "a1", r.text
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/openai/v1", api_key=issued["key"], max_retries=0)
    gateway.clients.append(client)
    await chat(client)
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(client)
    assert isinstance(refused.value.body, dict) and refused.value.body["node_path"] == "root/p/a1"
    with pytest.raises(openai.PermissionDeniedError) as untrusted:
        await chat(client, "a2")  # a key's client cannot move its spending to another node
    assert isinstance(untrusted.value.body, dict) and untrusted.value.body["code"] == "untrusted_budget_node_header"
    r = await gateway.admin.put(f"/api-keys/{issued['id']}/budget-node", json={"node_id": None})
    assert r.status_code == 200
    await chat(client)  # detached: charged to the customer's root, which has no limit


async def test_an_unknown_node_header_is_refused_and_changes_nothing(gateway: Gateway) -> None:
    await tree(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        await chat(gateway.openai(), "nobody")
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "unknown_budget_node"
    assert await gateway.usage() == []


async def test_a_wallet_refusal_names_the_customer_node_and_gives_the_budget_back(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1)
    await gateway.admin.post("/customers/acme/budget-nodes", json={"id": "p", "kind": "project"})
    r = await gateway.admin.post("/customers/acme/budget-nodes/p/limits", json={
        "id": "p-req", "dimension": "requests", "amount": 1, "window": {"kind": "day"}})
    assert r.status_code == 201
    client = gateway.openai()
    for _ in range(3):  # each 402 gives back the request it was admitted for: never a 429 here
        with pytest.raises(openai.APIStatusError) as refused:
            await chat(client, "p")
        assert refused.value.status_code == 402
        body = refused.value.body
        assert isinstance(body, dict) and body["node"] == "root" and body["node_path"] == "root/p"
        assert body["portal_url"].startswith("http")


async def test_spend_limits_admit_the_hold_and_keep_the_charge(gateway: Gateway) -> None:
    await tree(gateway)
    r = await gateway.admin.post("/customers/acme/budget-nodes/p/limits", json={
        "id": "p-spend", "dimension": "spend", "amount": LIMIT, "window": {"kind": "month"}})
    assert r.status_code == 201 and r.json()["asset"] == "USD"
    client = gateway.openai()
    served, refusal = 0, None
    for _ in range(400):
        try:
            await chat(client, "a1")
        except openai.RateLimitError as refused:
            refusal = refused.body
            break
        served += 1
    assert isinstance(refusal, dict) and refusal["limit"]["id"] == "p-spend", "the limit must refuse in the end"
    records = await gateway.usage()
    assert len(records) == served > 0
    charged = sum(r["charged_amount"] for r in records)
    hold = max(r["detail"]["hold"] for r in records)
    assert LIMIT - hold < charged <= LIMIT  # refused only once the next hold no longer fits
    # Charges are far below their holds here, so the limit admits many more requests than hold-sized ones.
    assert served > LIMIT // hold


async def test_admin_api_is_idempotent_validated_and_mode_scoped(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=0)
    node = {"id": "p", "kind": "project", "name": "P"}
    first = await gateway.admin.post("/customers/acme/budget-nodes", json=node)
    again = await gateway.admin.post("/customers/acme/budget-nodes", json=node)
    assert (first.status_code, again.status_code) == (201, 200) and first.json() == again.json()
    other = await gateway.admin.post("/customers/acme/budget-nodes", json={**node, "name": "Q"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "already_exists"
    bad = [({"id": "x", "kind": "planet"}, "invalid_request"), ({"id": "x", "kind": "agent", "color": 1},
                                                                 "unknown_field"),
           ({"id": "x", "kind": "agent", "parent_id": "nope"}, "unknown_budget_node"),
           ({"id": "root", "kind": "agent"}, "invalid_budget_node"), ({"id": "../x", "kind": "agent"},
                                                                      "invalid_budget_node")]
    for body, code in bad:
        r = await gateway.admin.post("/customers/acme/budget-nodes", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["code"] == code, (body, r.text)
    limits = [({"id": "l", "dimension": "requests", "amount": 1, "window": {"kind": "rolling"}}, "invalid_request"),
              ({"id": "l", "dimension": "requests", "amount": 0, "window": {"kind": "day"}}, "invalid_amount"),
              ({"id": "l", "dimension": "requests", "amount": 1, "window": {"kind": "day", "length_s": 5}},
               "invalid_request"),
              ({"id": "l", "dimension": "tokens", "amount": 1, "window": {"kind": "day"}, "asset": "USD"},
               "invalid_request"),
              ({"id": "l", "dimension": "spend", "amount": 1, "window": {"kind": "day"}, "asset": "EUR"},
               "unknown_asset"),
              ({"id": "l", "dimension": "requests", "amount": 1,
                "window": {"kind": "rolling", "length_s": 7, "buckets": 3000}}, "invalid_request")]
    for body, code in limits:
        r = await gateway.admin.post("/customers/acme/budget-nodes/p/limits", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
    ok = {"id": "l", "dimension": "requests", "amount": 5, "window": {"kind": "rolling", "length_s": 3600}}
    assert (await gateway.admin.post("/customers/acme/budget-nodes/p/limits", json=ok)).status_code == 201
    assert (await gateway.admin.post("/customers/acme/budget-nodes/p/limits", json=ok)).status_code == 200
    changed = await gateway.admin.patch("/customers/acme/budget-limits/l", json={"amount": 7})
    assert changed.status_code == 200 and changed.json()["amount"] == 7 and changed.json()["version"] == 2
    assert changed.json()["window"] == {"kind": "rolling", "length_s": 3600, "buckets": 60}
    await gateway.admin.post("/customers/acme/budget-nodes", json={"id": "a", "kind": "agent", "parent_id": "p"})
    r = await gateway.admin.delete("/customers/acme/budget-nodes/p")
    assert r.status_code == 409 and r.json()["error"]["code"] == "node_has_children"
    async with httpx.AsyncClient(base_url=str(gateway.admin.base_url),
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        assert (await live.get("/customers/acme/budget-nodes")).status_code == 404
        assert (await live.delete("/customers/acme/budget-nodes/a")).status_code == 404
    assert (await gateway.admin.delete("/customers/acme/budget-nodes/a")).status_code == 200
    assert (await gateway.admin.delete("/customers/acme/budget-limits/l")).status_code == 200
    assert (await gateway.admin.delete("/customers/acme/budget-limits/l")).status_code == 404
    listed = (await gateway.admin.get("/customers/acme/budget-nodes")).json()["data"]
    assert [(n["id"], n["path"]) for n in listed] == [("root", "root"), ("p", "root/p")]
