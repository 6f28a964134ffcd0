"""A customer refused with 402 opens the portal from the answer's ``portal_url`` in a real browser, sees
the balance and no billing settings (that link views and tops up only), tops up through Checkout, then sets
auto top-up through a billing-administration link from the admin API and watches a new usage line appear
without a reload; expired, tampered and other customers' links show nothing.

Method: Debian's Chromium driven by Playwright against the running gateway and the fake Stripe. The test
plays Stripe's part: when the browser has reached the fake Checkout page, it delivers the signed
``checkout.session.completed`` webhook and sends the browser to the session's success URL, as Stripe
would. Screenshots go to ``test-artifacts/portal-*.png``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import openai
import pytest

from metergate.portal.links import LinkSigner
from tests.conftest import IN_CI
from tests.payments.conftest import PayGate
from tests.payments.fake_stripe import FakeStripe

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say something short."}]


def _browser_available() -> None:
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is required under CI=true (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser test")


async def _portal_url_from_402(pg: PayGate) -> str:
    client = pg.gw.openai("acme")
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200)  # type: ignore[arg-type]
    assert info.value.status_code == 402
    body = info.value.body
    assert isinstance(body, dict)
    url = body.get("portal_url") or body.get("error", {}).get("portal_url")
    assert isinstance(url, str) and "/portal/?" in url
    return url


async def test_customer_tops_up_sets_auto_top_up_and_sees_usage_live(paygate: PayGate) -> None:
    _browser_available()
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(exist_ok=True)
    await paygate.gw.customer("acme", funds=10)  # ten micro-dollars: the next request is refused
    portal_url = await _portal_url_from_402(paygate)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            await page.goto(portal_url)
            await expect(page.get_by_role("heading", name="Billing for acme")).to_be_visible()
            await expect(page.locator('#balances [data-asset="USD"]')).to_have_text("0.000010")
            # Whoever caused the 402 holds this link: it offers a top-up and no billing settings.
            await expect(page.get_by_role("button", name="Top up", exact=True)).to_be_visible()
            await expect(page.get_by_role("heading", name="Billing settings")).to_be_visible()
            for control in ("Top up automatically", "Daily limit (USD)", "Monthly limit (USD)"):
                await expect(page.get_by_label(control)).to_have_count(0)
            await expect(page.get_by_role("button", name="Manage payment methods")).to_have_count(0)
            await page.screenshot(path=str(ARTIFACTS / "portal-1-refused.png"), full_page=True)

            # Top up 25.00 through Checkout.
            await page.get_by_label("Amount (USD)").fill("25.00")
            await page.get_by_role("button", name="Top up", exact=True).click()
            await expect(page.get_by_role("heading", name="Fake Checkout")).to_be_visible()
            assert page.url.startswith(paygate.fake.url + "/checkout/cs_test_")
            await page.screenshot(path=str(ARTIFACTS / "portal-2-checkout.png"), full_page=True)
            (session_id,) = paygate.fake.sessions
            session = paygate.fake.completed_session(session_id)
            r = await paygate.deliver(FakeStripe.event("checkout.session.completed", session))
            assert r.status_code == 200 and r.json()["result"] == "credited"
            await page.goto(session["success_url"])
            await expect(page.get_by_role("status")).to_contain_text("Thank you")
            await expect(page.locator('#balances [data-asset="USD"]')).to_have_text("25.000010")
            await expect(page.get_by_label("Top up automatically")).to_have_count(0)  # back on a view link

            # Auto top-up, saved through the CSRF-protected form of a billing-administration link.
            admin_link = (await paygate.gw.admin.post("/customers/acme/portal-link")).json()
            assert admin_link["access"] == "billing_admin"
            await page.goto(admin_link["url"])
            await page.get_by_label("Top up automatically").check()
            await page.get_by_label("When the balance falls below").fill("5.00")
            await page.get_by_label("Add", exact=True).fill("20.00")
            await page.get_by_role("button", name="Save automatic top-up").click()
            await expect(page.get_by_role("status")).to_have_text("Automatic top-up saved.")
            setting = await paygate.payments.store.auto_topup("test", "acme", "USD")
            assert setting is not None and (setting.threshold, setting.amount) == (5_000_000, 20_000_000)

            # A request made elsewhere shows up on the open page without a reload.
            await expect(page.locator("#usage")).to_contain_text("No usage yet.")
            await paygate.gw.openai("acme").chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
            await expect(page.locator("#usage")).to_contain_text("gpt-4o-mini", timeout=15_000)
            await expect(page.locator("#history")).to_contain_text("Top-ups and credits")
            await page.screenshot(path=str(ARTIFACTS / "portal-3-topped-up-live-usage.png"), full_page=True)

            # Links that are not this customer's, or no longer valid, show nothing.
            params = dict(parse_qsl(urlsplit(portal_url).query))
            base = portal_url.split("?", 1)[0]
            await paygate.gw.customer("globex", funds=5_000_000)
            refused = {
                "tampered": {**params, "s": params["s"][:-2] + ("AA" if params["s"][-2:] != "AA" else "BB")},
                "other-customer": {**params, "c": "globex"},
                "expired": dict(parse_qsl(LinkSigner(
                    {k: v.get_secret_value() for k, v in paygate.gw.settings.portal_secrets.items()}, ttl_s=60,
                    base_url=paygate.gw.url).query("test", "acme", now=time.time() - 3600))),
            }
            for name, query in refused.items():
                response = await page.goto(f"{base}?{urlencode(query)}")
                assert response is not None and response.status == 403, name
                text = await page.content()
                assert ("expired_portal_link" if name == "expired" else "invalid_portal_link") in text
                assert "5.000000" not in text and "25.000010" not in text
            await page.screenshot(path=str(ARTIFACTS / "portal-4-refused-link.png"), full_page=True)
        finally:
            await browser.close()
