"""The operator dashboard opens from a short-lived signed link in a real browser, draws its charts with
the customers and models at a loss flagged, and refuses every other way in.

Method: requests through the gateway (official ``openai`` SDK against the mock upstream) on a gateway that
prices gpt-4o-mini below its provider cost, plus two weeks of history written through the wallet store
(the pipeline stamps "now"). A link from ``POST /admin/v1/dashboard-link`` is opened in Debian's Chromium
driven by Playwright: the browser follows the link's redirect, keeps the session cookie, shows the
charts, and a screenshot goes to ``test-artifacts/dashboard.png``. Plain HTTP checks the refusals.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2 as httpx
import pytest

from metergate.portal.links import LinkSigner
from metergate.wallet.models import UsageRecord, now_ms
from tests.conftest import DEFAULT_PRICING, IN_CI, Gateway, Upstream, _reset_pg, start_gateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHARTS = ("margin-over-time", "top-customers-margin", "top-customers-loss", "cost-vs-price-per-model")
LOSSY_PRICING: dict[str, Any] = {"asset": "USD", "models": {
    **DEFAULT_PRICING["models"],  # type: ignore[dict-item]
    "gpt-4o-mini": {"input_per_mtok": "0.05", "output_per_mtok": "0.10"},  # provider cost: 0.15 / 0.60
}}
CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
MESSAGES: list[Any] = [{"role": "user", "content": "Summarise what a prepaid wallet is for."}]


@pytest.fixture
async def lossy(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'dashboard.db'}", pricing=LOSSY_PRICING)
    yield gw
    await gw.close()
    await runner.cleanup()


async def _history(gw: Gateway) -> None:
    """Two weeks of usage, written through the wallet store with past timestamps; a few days lose money."""
    rng = random.Random(7)
    today = now_ms() // 86_400_000 * 86_400_000
    # Per model: list price in micro-dollars per request, and provider cost as tenths of that price
    # (gpt-4o-mini is priced below cost; the house model's cost is unknown).
    models: dict[str, tuple[int, tuple[int, int] | None]] = {
        "gpt-4o": (2_000, (3, 7)), "gpt-4o-mini": (400, (12, 20)), "house-model": (900, None)}
    n = 0
    for days_ago in range(14, 0, -1):
        for _ in range(rng.randint(3, 7)):
            customer = rng.choice(CUSTOMERS)
            model = "gpt-4o-mini" if customer == "globex" else rng.choice(list(models))
            base, tenths = models[model]
            price = base * rng.randint(5, 30)
            cost_nanos = None if tenths is None else price * 100 * rng.randint(*tenths)
            if days_ago in (9, 4) and cost_nanos is not None:
                cost_nanos = price * 1000 * 2  # a bad day: everything sold below cost
            n += 1
            hold, _ = await gw.store.reserve("test", customer, "USD", price, hold_id=f"hold_hist{n}", ttl_ms=60_000)
            await gw.store.settle(hold.id, price, UsageRecord(
                id=f"req_hist{n}", mode="test", customer_id=customer, hold_id=hold.id, route="/openai",
                endpoint="chat.completions", model=model, feature=rng.choice(["chat", "search", None]),
                stream=False, status_code=200, usage_source="provider", tokens_input=500, tokens_cached_input=0,
                tokens_output=200, tokens_reasoning=0, asset="USD", price_amount=price, cost_nanos=cost_nanos,
                created_at_ms=today - days_ago * 86_400_000 + rng.randint(0, 86_399_999)))


async def _traffic(gw: Gateway) -> None:
    for customer in CUSTOMERS:
        await gw.customer(customer, funds=100_000_000)
    await _history(gw)
    for customer, model, n in (("acme", "gpt-4o", 3), ("globex", "gpt-4o-mini", 4), ("initech", "gpt-4o", 1),
                               ("hooli", "gpt-4o-mini", 1)):
        client = gw.openai(customer)
        for _ in range(n):
            await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60,
                                                 extra_headers={"X-Metergate-Feature": "chat",
                                                                "X-Mock-Behavior": "words:40"})


async def _link(gw: Gateway) -> dict[str, Any]:
    r = await gw.admin.post("/dashboard-link")
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _browser_available() -> None:
    if not Path(CHROMIUM).exists():
        if IN_CI or os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is required under CI=true (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser test")


# ---------------------------------------------------------------------------------------------- the browser


async def test_the_dashboard_draws_its_charts_and_flags_losses_in_a_browser(lossy: Gateway) -> None:
    _browser_available()
    from playwright.async_api import async_playwright

    await _traffic(lossy)
    link = await _link(lossy)
    assert link["mode"] == "test" and link["expires_in_s"] == lossy.settings.dashboard_link_ttl_s
    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            response = await page.goto(link["url"])
            assert response is not None and response.status == 200
            assert urlsplit(page.url).path == "/admin/dashboard" and "s=" not in page.url  # the link is gone
            for chart in CHARTS:
                svg = page.locator(f'svg[data-chart="{chart}"]')
                assert await svg.is_visible(), chart
                box = await svg.bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 100, (chart, box)
            assert await page.locator('svg[data-chart="margin-over-time"] polyline').count() == 3
            assert await page.locator('svg[data-chart="cost-vs-price-per-model"] rect').count() >= 4
            flagged_models = await page.locator('li[data-flag="model"] b').all_inner_texts()
            flagged_customers = await page.locator('li[data-flag="customer"] b').all_inner_texts()
            assert "gpt-4o-mini" in flagged_models and "gpt-4o" not in flagged_models
            assert "globex" in flagged_customers and "acme" not in flagged_customers
            assert "globex" in (await page.locator('svg[data-chart="top-customers-loss"]').text_content() or "")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            # The range form reloads the page through the session cookie, without the link.
            await page.select_option("select[name=period]", "week")
            await page.click("header button[type=submit]")
            await page.wait_for_load_state()
            assert "period=week" in page.url
            assert await page.locator('svg[data-chart="margin-over-time"]').is_visible()
            assert "per week" in await page.locator("#h-time").inner_text()
        finally:
            await browser.close()
    assert problems == []  # no CSP violation, no script error


# ---------------------------------------------------------------------------------------------- the ways in


async def test_the_link_becomes_an_httponly_session_cookie_and_a_clean_redirect(gateway: Gateway) -> None:
    link = await _link(gateway)
    async with httpx.AsyncClient(base_url=gateway.url) as browser:
        r = await browser.get(link["path"])
        assert r.status_code == 303 and r.headers["Location"] == "/admin/dashboard"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin/dashboard" in cookie
        page = await browser.get("/admin/dashboard")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script-src" not in csp
    assert "<script" not in page.text and "http://" not in page.text.split("</style>", 1)[1].replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    assert "test mode" in page.text


async def test_a_portal_link_never_opens_the_dashboard_nor_the_reverse(gateway: Gateway) -> None:
    await gateway.customer("acme")
    r = await gateway.admin.post("/customers/acme/portal-link")
    portal = dict(parse_qsl(urlsplit(r.json()["url"]).query))
    dashboard = dict(parse_qsl(urlsplit((await _link(gateway))["url"]).query))
    async with httpx.AsyncClient(base_url=gateway.url) as browser:
        r = await browser.get(f"/admin/dashboard?{urlencode(portal)}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
        forged = {**portal, "c": "operator"}  # the dashboard's subject with a portal signature
        r = await browser.get(f"/admin/dashboard?{urlencode(forged)}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
        r = await browser.get(f"/portal/?{urlencode(dashboard)}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_portal_link"


async def test_expired_tampered_and_missing_links_are_refused(gateway: Gateway) -> None:
    secret = gateway.settings.portal_secrets["k1"].get_secret_value()
    signer = LinkSigner({"k1": secret}, ttl_s=60, base_url=gateway.url, scope="dashboard-link")
    expired = dict(parse_qsl(signer.query("test", "operator", now=now_ms() / 1000 - 3600)))
    tampered = {**dict(parse_qsl((await _link(gateway))["path"].split("?", 1)[1])), "m": "live"}
    async with httpx.AsyncClient(base_url=gateway.url) as browser:
        r = await browser.get(f"/admin/dashboard?{urlencode(expired)}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "expired_dashboard_link"
        r = await browser.get(f"/admin/dashboard?{urlencode(tampered)}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
        r = await browser.get("/admin/dashboard")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
        browser.cookies.set("metergate_dashboard", "live.99999999999.k1.forged", path="/admin/dashboard")
        r = await browser.get("/admin/dashboard")
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
    async with httpx.AsyncClient(base_url=gateway.admin.base_url) as anonymous:
        r = await anonymous.post("/dashboard-link")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"


async def test_a_session_shows_only_its_own_mode(gateway: Gateway) -> None:
    await gateway.customer("acme")
    await gateway.openai("acme").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    async with httpx.AsyncClient(base_url=gateway.admin.base_url,
                                 headers={"Authorization": "Bearer mg_live_" + "l" * 24}) as live:
        link = (await live.post("/dashboard-link")).json()
    assert link["mode"] == "live"
    async with httpx.AsyncClient(base_url=gateway.url, follow_redirects=True) as browser:
        page = await browser.get(link["path"])
    assert page.status_code == 200 and "live mode" in page.text
    assert "No usage in this range." in page.text


@pytest.mark.parametrize("query", ["days=3", "days=abc", "period=year"])
async def test_bad_dashboard_parameters_are_refused(gateway: Gateway, query: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, follow_redirects=True) as browser:
        assert (await browser.get((await _link(gateway))["path"])).status_code == 200
        r = await browser.get(f"/admin/dashboard?{query}")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"



# ---------------------------------------------------------------------------------------------- single use


async def test_a_dashboard_link_opens_one_session_and_a_replay_is_refused(gateway: Gateway) -> None:
    link = await _link(gateway)
    async with httpx.AsyncClient(base_url=gateway.url) as operator:
        r = await operator.get(link["path"])
        assert r.status_code == 303 and "Secure" not in r.headers["Set-Cookie"]  # public_url is plain http
        assert (await operator.get("/admin/dashboard")).status_code == 200
        async with httpx.AsyncClient(base_url=gateway.url) as replayer:  # whoever else saw the link
            r = await replayer.get(link["path"])
            assert r.status_code == 403 and r.json()["error"]["code"] == "link_used"
            assert "Set-Cookie" not in r.headers and set(r.json()) == {"error"}
            r = await replayer.get("/admin/dashboard")
            assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
        # The session the first use opened goes on; the link cannot open another, even for its owner.
        assert (await operator.get("/admin/dashboard")).status_code == 200
        assert (await operator.get(link["path"])).json()["error"]["code"] == "link_used"


async def test_a_link_opened_on_two_replicas_at_once_opens_one_session(upstream: Upstream, store_url: str) -> None:
    """Two replicas on one database (SQLite, PostgreSQL) race to open the same link: one session, one refusal."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    secrets = {"k1": "shared-portal-secret-" + "s" * 24}
    first, first_runner = await start_gateway(upstream, store_url, portal_secrets=secrets)
    second, second_runner = await start_gateway(upstream, store_url, portal_secrets=secrets)
    try:
        for _ in range(3):
            link = await _link(first)
            async with (httpx.AsyncClient(base_url=first.url) as a, httpx.AsyncClient(base_url=second.url) as b):
                answers = await asyncio.gather(a.get(link["path"]), b.get(link["path"]))
            assert sorted(r.status_code for r in answers) == [303, 403]
            (refused,) = [r for r in answers if r.status_code == 403]
            assert refused.json()["error"]["code"] == "link_used" and "Set-Cookie" not in refused.headers
    finally:
        for gw, runner in ((first, first_runner), (second, second_runner)):
            await gw.close()
            await runner.cleanup()


async def test_the_session_cookie_is_secure_when_public_url_is_https(upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'https.db'}",
                                     public_url="https://billing.example.com")
    try:
        async with httpx.AsyncClient(base_url=gw.url) as browser:
            r = await browser.get((await _link(gw))["path"])
        cookie = r.headers["Set-Cookie"]
        assert r.status_code == 303 and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    finally:
        await gw.close()
        await runner.cleanup()


async def test_a_link_without_an_id_is_refused(gateway: Gateway) -> None:
    """A correctly signed link of the original kind (no id) cannot be remembered as used, so it opens nothing."""
    secret = gateway.settings.portal_secrets["k1"].get_secret_value()
    signer = LinkSigner({"k1": secret}, ttl_s=60, base_url=gateway.url, scope="dashboard-link")
    async with httpx.AsyncClient(base_url=gateway.url) as browser:
        r = await browser.get(f"/admin/dashboard?{signer.query('test', 'operator')}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_dashboard_link"
    assert "Set-Cookie" not in r.headers
