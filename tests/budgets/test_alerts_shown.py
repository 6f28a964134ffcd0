"""Fired alerts are visible where people look: the admin API (and the Python client), the customer's portal
budget page and the operator dashboard, with a crossing shown as active until it recovers.

Method: a real gateway (SQLite) whose alert loop runs every 50 ms (``budget_alert_interval_s``), the mock
upstream and the official ``openai`` SDK. A project has a limit of 4 requests a day and a rule at 50% and
75%; two requests cross 50% only. The admin API is polled (bounded) until the crossing is listed; the
portal page (through a signed portal link) and the dashboard (through a signed dashboard link and its
session cookie) must then show it. Raising the limit brings the use back below, with no request after it:
the crossing is then listed, and shown, as recovered. The other mode's admin key sees none of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from metergate_client import AsyncClient
from tests.admin.test_answer_schemas import Checked
from tests.conftest import ADMIN_KEY, LIVE_ADMIN_KEY, Gateway, Upstream, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'alerts.db'}", budget_alert_interval_s=0.05)
    yield gw
    await gw.close()
    await runner.cleanup()


async def fired(gw: Gateway) -> list[dict[str, Any]]:
    """The admin API's list, each answer checked against the OpenAPI document's schema for it."""
    checked = Checked(gw, (await gw.admin.get("/openapi.json")).json())
    data: list[dict[str, Any]] = (await checked("GET", "/customers/acme/budget-alert-events"))["data"]
    return data


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(200):  # 10 s at most: the loop runs every 50 ms
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def request(gw: Gateway) -> None:
    await gw.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                              extra_headers={"X-Metergate-Budget-Node": "p"})


async def dashboard(gw: Gateway, browser: httpx.AsyncClient) -> str:
    link = (await gw.admin.post("/dashboard-link")).json()["url"]
    page = await browser.get(link if link.startswith("http") else gw.url + link, follow_redirects=True)
    assert page.status_code == 200, page.text
    return page.text


async def test_a_crossing_is_listed_and_shown_in_the_portal_and_dashboard_until_it_recovers(gateway: Gateway) -> None:
    gw = gateway
    await gw.customer("acme", funds=1_000_000)
    assert (await gw.admin.post("/customers/acme/budget-nodes", json={
        "id": "p", "kind": "project", "name": "Search <b>bot</b>"})).status_code == 201
    assert (await gw.admin.post("/customers/acme/budget-nodes/p/limits", json={
        "id": "p-req", "dimension": "requests", "amount": 4, "window": {"kind": "day"}})).status_code == 201
    r = await gw.admin.put("/customers/acme/budget-alerts/near", json={
        "target": "limit:p-req", "thresholds": [{"percent": 50}, {"percent": 75}]})
    assert r.status_code == 200, r.text
    assert await fired(gw) == []

    for _ in range(2):
        await request(gw)

    async def crossed() -> bool:
        return len(await fired(gw)) == 1

    await until(crossed, "the 50% crossing")
    [alert] = await fired(gw)
    assert (alert["rule_id"], alert["target"], alert["threshold"], alert["active"]) == (
        "near", "limit:p-req", "percent:50", True)
    assert alert["recovered_at_ms"] is None and alert["period_start_ms"] > 0  # a day window: its period

    async with AsyncClient(f"{gw.url}", ADMIN_KEY) as client:  # the Python client reads the same list
        [typed] = await client.list_fired_budget_alerts("acme")
        assert (typed.rule_id, typed.threshold, typed.active, typed.recovered_at_ms) == ("near", "percent:50", True,
                                                                                        None)
    async with httpx.AsyncClient(base_url=f"{gw.url}/admin/v1",
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        r = await live.get("/customers/acme/budget-alert-events")
        assert r.status_code == 404  # acme is a test-mode customer: the live key does not see it at all

    link = (await gw.admin.post("/customers/acme/portal-link")).json()["url"]
    budgets = link.replace("/portal/?", "/portal/budgets?")
    async with httpx.AsyncClient() as browser:
        page = (await browser.get(budgets)).text
        section = page[page.index('id="alerts"'):]
        assert "Active" in section and "near" in section and "50%" in section and "75%" not in section
        assert "Search &lt;b&gt;bot&lt;/b&gt;: 4 requests per day" in section  # the limit in words, escaped
        board = await dashboard(gw, browser)
        shown = board[board.index('id="h-alerts"'):]
        assert "1 active" in shown and "acme" in shown and "limit:p-req" in shown and ">Active<" in shown

    r = await gw.admin.patch("/customers/acme/budget-limits/p-req", json={"amount": 100})
    assert r.status_code == 200, r.text  # 2 of 100: below 50% again, said with no request after it

    async def recovered() -> bool:
        return [a["active"] for a in await fired(gw)] == [False]

    await until(recovered, "the recovery")
    [alert] = await fired(gw)
    assert alert["recovered_at_ms"] >= alert["fired_at_ms"]
    async with httpx.AsyncClient() as browser:
        section = (await browser.get(budgets)).text.split('id="alerts"', 1)[1]
        assert "Recovered" in section and "Active" not in section
        shown = (await dashboard(gw, browser)).split('id="h-alerts"', 1)[1]
        assert "0 active" in shown and "Recovered " in shown


async def test_a_portal_with_no_alert_says_so(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000)
    link = (await gateway.admin.post("/customers/acme/portal-link")).json()["url"]
    async with httpx.AsyncClient() as browser:
        page = (await browser.get(link.replace("/portal/?", "/portal/budgets?"))).text
        assert "No alert has fired." in page
        assert "No budget alert has fired in this mode." in await dashboard(gateway, browser)


async def test_a_balance_alert_is_shown_in_the_assets_major_unit(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)  # 1.00 USD, under the 2.00 USD threshold
    r = await gateway.admin.put("/customers/acme/budget-alerts/low", json={
        "target": "balance:USD", "thresholds": [{"amount": 2_000_000}]})
    assert r.status_code == 200, r.text
    await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)

    async def crossed() -> bool:
        return [a["threshold"] for a in await fired(gateway)] == ["amount:2000000"]

    await until(crossed, "the balance crossing")
    link = (await gateway.admin.post("/customers/acme/portal-link")).json()["url"]
    async with httpx.AsyncClient() as browser:
        section = (await browser.get(link.replace("/portal/?", "/portal/budgets?"))).text.split('id="alerts"', 1)[1]
        assert "USD balance" in section and "2.000000 USD or below" in section
        shown = (await dashboard(gateway, browser)).split('id="h-alerts"', 1)[1]
        assert "balance:USD" in shown and "2.000000 USD or below" in shown
