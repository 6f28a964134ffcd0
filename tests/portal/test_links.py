"""Signed portal links open one customer's billing page in one mode, and nothing else.

Method: links come from the admin API or, to craft expired, foreign-key and rotated ones, from
``LinkSigner`` with the gateway's own secrets; each is opened over HTTP and must give the page (200)
or a 403 with a stable JSON error code. The JSON summary is read before and after a metered request.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2 as httpx
import pytest
from aiohttp import web

from metergate.money import format_minor
from metergate.portal.links import LinkSigner
from tests.conftest import Gateway, Upstream, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def open_gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start gateways on one database (with settings ``overrides``); stop them all afterwards."""
    running: list[tuple[Gateway, web.AppRunner]] = []

    async def open_(**overrides: Any) -> Gateway:
        gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'gateway.db'}", **overrides)
        running.append((gw, runner))
        return gw

    yield open_
    for gw, runner in running:
        await gw.close()
        await runner.cleanup()


def _signer(gw: Gateway, kid: str = "k1", *, ttl_s: int = 600) -> LinkSigner:
    """A signer holding one of the gateway's own portal secrets."""
    return LinkSigner({kid: gw.settings.portal_secrets[kid].get_secret_value()}, ttl_s=ttl_s, base_url=gw.url)


async def _link(gw: Gateway, customer_id: str = "acme") -> dict[str, str]:
    r = await gw.admin.post(f"/customers/{customer_id}/portal-link")
    assert r.status_code == 200, r.text
    url = urlsplit(r.json()["url"])
    assert f"{url.scheme}://{url.netloc}" == gw.url and url.path == "/portal/"
    return dict(parse_qsl(url.query))


async def _open(gw: Gateway, params: dict[str, str], page: str = "") -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as browser:
        return await browser.get(f"/portal/{page}?{urlencode(params)}")


def _refused(r: httpx.Response, code: str) -> None:
    assert r.status_code == 403, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert set(r.json()) == {"error"}  # a refusal carries no billing data
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "permission_error"


async def test_admin_link_opens_the_billing_page_with_the_balance(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=2_500_000)
    r = await _open(gateway, await _link(gateway))
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "Billing for acme" in r.text
    assert "2.500000" in r.text and "test mode" in r.text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.parametrize("access", ["billing_admin", "view_topup"])
async def test_link_lifetime_matches_what_the_admin_api_reports(gateway: Gateway, access: str) -> None:
    """A view link lives ``portal_link_ttl_s``; a billing-administration link 15 minutes at most."""
    await gateway.customer("acme")
    before = int(time.time())
    r = await gateway.admin.post("/customers/acme/portal-link", json={"access": access})
    expires_at = int(dict(parse_qsl(urlsplit(r.json()["url"]).query))["e"])
    ttl = r.json()["expires_in_s"]
    configured = gateway.settings.portal_link_ttl_s
    assert ttl == (min(configured, 900) if access == "billing_admin" else configured)
    assert before + ttl <= expires_at <= int(time.time()) + ttl


@pytest.mark.parametrize(("tamper", "code"), [
    # --- the signature itself
    (lambda p: {**p, "s": p["s"][:-2] + ("AA" if p["s"][-2:] != "AA" else "BB")}, "invalid_portal_link"),
    (lambda p: {**p, "s": ""}, "invalid_portal_link"),
    (lambda p: {**p, "s": "é" * 43}, "invalid_portal_link"),  # non-ASCII must not become a 500
    # --- the signed fields, each changed under the same signature
    (lambda p: {**p, "c": "globex"}, "invalid_portal_link"),  # another customer who exists
    (lambda p: {**p, "m": "live"}, "invalid_portal_link"),  # the same customer id in the other mode
    (lambda p: {**p, "m": "prod"}, "invalid_portal_link"),
    (lambda p: {**p, "e": str(int(p["e"]) + 86_400)}, "invalid_portal_link"),  # a longer life
    (lambda p: {**p, "k": "k2"}, "invalid_portal_link"),  # a key id the gateway does not have
    # --- pieces missing or unreadable
    (lambda p: {k: v for k, v in p.items() if k != "s"}, "invalid_portal_link"),
    (lambda p: {k: v for k, v in p.items() if k != "c"}, "invalid_portal_link"),
    (lambda p: {**p, "e": "soon"}, "invalid_portal_link"),
    (lambda p: {}, "invalid_portal_link"),
], ids=["flipped-signature", "empty-signature", "non-ascii-signature", "other-customer", "other-mode",
        "unknown-mode", "extended-expiry", "unknown-key-id", "no-signature", "no-customer", "bad-expiry",
        "no-parameters"])
async def test_tampered_link_is_refused(gateway: Gateway, tamper: Callable[[dict[str, str]], dict[str, str]],
                                        code: str) -> None:
    await gateway.customer("acme")
    await gateway.customer("globex")
    await gateway.customer("acme", mode="live")
    params = await _link(gateway)
    for page in ("", "summary"):
        _refused(await _open(gateway, tamper(params), page), code)
    assert (await _open(gateway, params)).status_code == 200  # the untampered link still opens


async def test_expired_link_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme")
    an_hour_ago = time.time() - 3600
    expired = dict(parse_qsl(_signer(gateway, ttl_s=600).query("test", "acme", now=an_hour_ago)))
    for page in ("", "summary"):
        _refused(await _open(gateway, expired, page), "expired_portal_link")
    fresh = dict(parse_qsl(_signer(gateway, ttl_s=600).query("test", "acme")))
    assert (await _open(gateway, fresh)).status_code == 200  # the same signer, in date: accepted


async def test_validly_signed_link_for_an_unknown_customer_is_refused(gateway: Gateway) -> None:
    params = dict(parse_qsl(_signer(gateway).query("test", "nobody")))
    _refused(await _open(gateway, params), "invalid_portal_link")


async def test_link_signed_with_another_secret_under_a_known_key_id_is_refused(gateway: Gateway) -> None:
    await gateway.customer("acme")
    forged = LinkSigner({"k1": secrets.token_urlsafe(32)}, ttl_s=600, base_url=gateway.url)
    _refused(await _open(gateway, dict(parse_qsl(forged.query("test", "acme")))), "invalid_portal_link")


async def test_key_rotation_old_links_verify_while_both_keys_are_configured(
        open_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    old_secret, new_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    before = await open_gateway(portal_secrets={"k1": old_secret})
    await before.customer("acme")
    old_link = await _link(before)
    assert old_link["k"] == "k1"

    # Rotation step 1: the new key is added first, so it signs; the old one still verifies.
    during = await open_gateway(portal_secrets={"k2": new_secret, "k1": old_secret})
    assert (await _open(during, old_link)).status_code == 200
    new_link = await _link(during)
    assert new_link["k"] == "k2"
    assert (await _open(during, new_link)).status_code == 200

    # Rotation step 2: the old key is removed; its links stop working, the new ones do not.
    after = await open_gateway(portal_secrets={"k2": new_secret})
    _refused(await _open(after, old_link), "invalid_portal_link")
    assert (await _open(after, new_link)).status_code == 200


async def test_summary_reflects_a_new_usage_line_after_a_request(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    params = await _link(gateway)
    before = await _open(gateway, params, "summary")
    assert before.status_code == 200 and before.headers["Cache-Control"] == "no-store"
    assert before.json()["usage_count"] == 0
    assert before.json()["balances"] == [
        {"asset": "USD", "available": 1_000_000, "balance": 1_000_000, "credit_limit": 0}]

    raw = await gateway.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    charged = int(raw.headers["X-Metergate-Charged"].replace(".", ""))

    after = (await _open(gateway, params, "summary")).json()
    assert after["usage_count"] == 1
    assert after["balances"] == [{"asset": "USD", "available": 1_000_000 - charged, "balance": 1_000_000 - charged,
                                  "credit_limit": 0}]
    assert "gpt-4o-mini" in after["usage_html"]
    assert format_minor(1_000_000 - charged, 6) in after["balances_html"]


async def test_a_link_shows_only_its_own_customer_and_mode(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    await gateway.customer("acme", funds=3_000_000, mode="live")
    await gateway.customer("globex", funds=7_000_000)
    await gateway.openai("globex").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)

    summary = (await _open(gateway, await _link(gateway, "acme"), "summary")).json()
    assert summary["balances"] == [{"asset": "USD", "available": 1_000_000, "balance": 1_000_000, "credit_limit": 0}]
    assert summary["usage_count"] == 0
