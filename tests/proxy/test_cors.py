"""CORS for browser clients of the proxy routes: allowed origins get answers they can read, nothing else opens.

Method: a gateway with ``cors_allow_origins`` set, asked over raw HTTP the way a browser asks (preflights,
then requests carrying ``Origin``) for metered, free, refused and streamed answers and for metergate's own
paths; then real Chromium (Playwright) on a page served from another loopback port calls the gateway with
``fetch`` and a proxy key, from an allowed origin and from one that is not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web

from metergate.config.settings import SettingsError, load_settings
from tests.conftest import Gateway, Upstream, serve, start_gateway
from tests.payments.test_portal_browser import CHROMIUM, CHROMIUM_ARGS, _browser_available

APP = "https://app.example.com"
CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'cors.db'}", cors_allow_origins=[APP])
    await gateway.customer("acme", funds=1_000_000)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def proxy_key(gw: Gateway, customer: str = "acme") -> str:
    issued = await gw.admin.post(f"/customers/{customer}/api-keys")
    assert issued.status_code == 201, issued.text
    key: str = issued.json()["key"]
    return key


async def test_preflight_from_an_allowed_origin_allows_what_the_sdks_send_and_no_more(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.options(CHAT, headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-metergate-customer"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in r.headers.get_list("Vary")
    assert "Access-Control-Allow-Credentials" not in r.headers


async def test_answers_to_an_allowed_origin_are_readable_refusals_and_streams_included(gw: Gateway) -> None:
    key = await proxy_key(gw)
    await gw.customer("broke", funds=0)
    broke_key = await proxy_key(gw, "broke")
    async with httpx.AsyncClient(base_url=gw.url, headers={"Origin": APP}) as client:
        metered = await client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
        refused = await client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {broke_key}"})
        anonymous = await client.post(CHAT, json=BODY)
        free = await client.get("/openai/v1/models", headers={"Authorization": f"Bearer {key}"})
        async with client.stream("POST", CHAT, json={**BODY, "stream": True},
                                 headers={"Authorization": f"Bearer {key}"}) as streamed:
            await streamed.aread()
    assert [r.status_code for r in (metered, refused, anonymous, free, streamed)] == [200, 402, 401, 200, 200]
    for r in (metered, refused, anonymous, free, streamed):
        assert r.headers["Access-Control-Allow-Origin"] == APP
        exposed = r.headers["Access-Control-Expose-Headers"]
        assert "X-Metergate-Request-Id" in exposed and "x-should-retry" in exposed


async def test_other_origins_and_metergates_own_paths_get_no_cors_answer(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        preflight = await client.options(CHAT, headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        other = await client.post(CHAT, json=BODY, headers={"Origin": "https://evil.example"})
        admin = await client.options("/admin/v1/customers", headers={"Origin": APP,
                                                                     "Access-Control-Request-Method": "GET"})
        health = await client.get("/livez", headers={"Origin": APP})
    assert (preflight.status_code, preflight.headers["Allow"]) == (204, "POST, OPTIONS")  # plain OPTIONS answer
    for r in (preflight, other, admin, health):
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_is_off_unless_configured(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        r = await client.options(CHAT, headers={"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_any_origin_when_configured_so(upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'any.db'}", cors_allow_origins=["*"])
    try:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post(CHAT, json=BODY, headers={"Origin": "https://anyone.example"})
        assert (r.status_code, r.headers["Access-Control-Allow-Origin"]) == (401, "*")
    finally:
        await gw.close()
        await runner.cleanup()


@pytest.mark.parametrize(("overrides", "named"), [
    ({"cors_allow_origins": ["https://app.example.com/"]}, "cors_allow_origins"),
    ({"cors_allow_origins": ["app.example.com"]}, "cors_allow_origins"),
    ({"cors_allow_origins": ["*", APP]}, "cors_allow_origins"),
    ({"cors_allow_headers": ["x-metergate-*"]}, "X-Metergate-Customer"),
    ({"cors_allow_headers": ["X-Metergate-Mode"]}, "X-Metergate-Mode"),
    ({"cors_allow_headers": ["bad header"]}, "cors_allow_headers"),
], ids=["trailing-slash", "no-scheme", "star-and-more", "customer-header-by-prefix", "mode-header", "not-a-name"])
def test_invalid_cors_settings_fail_at_start_up(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError) as invalid:
        load_settings(**overrides)
    assert named in str(invalid.value)


# --- a real browser


PAGE = """<!doctype html><title>app</title><script>
async function call(url, key, body) {
  try {
    const r = await fetch(url, {method: "POST", headers: {"Authorization": "Bearer " + key,
                                "Content-Type": "application/json"}, body: JSON.stringify(body)});
    return {status: r.status, requestId: r.headers.get("X-Metergate-Request-Id"),
            charged: r.headers.get("X-Metergate-Charged"), body: await r.json()};
  } catch (e) { return {blocked: String(e)}; }
}
</script>"""


async def _page_server() -> tuple[web.AppRunner, str]:
    app = web.Application()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", index)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}"


async def test_a_browser_page_on_an_allowed_origin_calls_the_gateway_and_reads_its_402(
        upstream: Upstream, tmp_path: Path) -> None:
    _browser_available()
    from playwright.async_api import async_playwright

    pages, origin = await _page_server()
    other_pages, other_origin = await _page_server()
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'browser.db'}", cors_allow_origins=[origin])
    try:
        await gw.customer("acme", funds=1_000_000)
        await gw.customer("broke", funds=0)
        key, broke_key = await proxy_key(gw), await proxy_key(gw, "broke")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(origin)
                paid = await page.evaluate("([u, k, b]) => call(u, k, b)", [gw.url + CHAT, key, BODY])
                refused = await page.evaluate("([u, k, b]) => call(u, k, b)", [gw.url + CHAT, broke_key, BODY])
                await page.goto(other_origin)
                blocked = await page.evaluate("([u, k, b]) => call(u, k, b)", [gw.url + CHAT, key, BODY])
            finally:
                await browser.close()
        assert (paid["status"], paid["requestId"][:4]) == (200, "req_"), json.dumps(paid)
        assert float(paid["charged"]) > 0
        assert refused["status"] == 402
        assert refused["body"]["error"]["message"].endswith(refused["body"]["error"]["portal_url"])
        assert "blocked" in blocked  # fetch rejects: the gateway did not allow that origin
        assert len(upstream.requests) == 1  # only the paid call reached the upstream
    finally:
        await gw.close()
        await runner.cleanup()
        await pages.cleanup()
        await other_pages.cleanup()
