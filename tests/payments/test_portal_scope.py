"""A 402 hands its ``portal_url`` to whoever caused it, so that link views and tops up and changes nothing
else: auto top-up, spend caps and payment methods answer it 403 ``portal_scope``, its page offers no such
control, and its access cannot be raised by editing the link. Billing settings change only through a
``billing_admin`` link from the admin API (at most 15 minutes), and each change is notified to the operator.

Method: a customer with a saved card is refused with 402 through the gateway (raw HTTP, as any proxy-key
holder would send it, with a huge ``max_tokens``); the link from that answer is opened and its forms posted
with the page's own CSRF token. Afterwards the admin API, the fake Stripe and the operator's notification
receiver (a local aiohttp server) are read back: no auto top-up, no spend cap, no card charged, nothing
notified. The operator's link is then shown to do what the 402's cannot, and to be notified.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from aiohttp import web

from metergate.payments.notify import SIGNATURE_HEADER, verify
from tests.conftest import Upstream
from tests.payments.conftest import PayGate, start_paygate
from tests.payments.fake_stripe import FakeStripe

SECRET = "notify-secret-" + "s" * 24
HUGE: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 1_000_000,
                        "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[bytes, str]]]]:
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers.get(SIGNATURE_HEADER, "")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hooks", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hooks", received
    await runner.cleanup()


@pytest.fixture
async def pg(upstream: Upstream, tmp_path: Path, fake_stripe: FakeStripe,
             receiver: tuple[str, list[tuple[bytes, str]]]) -> AsyncIterator[PayGate]:
    async for gate in start_paygate(upstream, tmp_path, fake_stripe, notify_url=receiver[0], notify_secret=SECRET):
        yield gate


async def _events(pg: PayGate, received: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    await pg.payments.notifier.flush()
    assert all(verify(body, header, SECRET) for body, header in received)
    return [json.loads(body) for body, _ in received]


async def _customer_with_a_card(pg: PayGate) -> None:
    await pg.gw.customer("acme", funds=10)  # ten micro-dollars: any real request is refused
    pg.fake.default_payment_method(await pg.payments.stripe.customer("test", "acme"), "pm_card_visa")


async def _refused(pg: PayGate) -> dict[str, Any]:
    """The 402 a proxy-key holder gets for a request the wallet cannot cover."""
    r = await pg.http.post(f"{pg.gw.url}/openai/v1/chat/completions", json=HUGE,
                           headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    assert r.status_code == 402, r.text
    error: dict[str, Any] = r.json()["error"]
    return error


async def _csrf(pg: PayGate, url: str) -> tuple[str, str]:
    page = await pg.http.get(url)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match is not None
    return page.text, match.group(1)


def _action(url: str, action: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/portal/{action}?{parts.query}"


async def _nothing_changed(pg: PayGate) -> None:
    """No auto top-up, no spend cap, no card charged, no Stripe session that could change the card."""
    admin = pg.gw.admin
    assert (await admin.get("/customers/acme/auto-top-up")).json()["auto_top_up"] is None
    assert (await admin.get("/customers/acme/spend-caps")).json()["spend_caps"] is None
    await pg.payments.topups.check("test", "acme", "USD")  # what runs after every settlement
    assert (await admin.get("/customers/acme/top-ups")).json()["data"] == []
    assert pg.fake.payment_intents == {} and pg.fake.calls("POST", "/payment_intents") == []
    assert pg.fake.calls("POST", "/billing_portal/sessions") == []
    assert await pg.available() == 10


# ------------------------------------------------------------------ the 402's link


async def test_a_402_link_cannot_set_auto_top_up_spend_caps_or_payment_methods(
        pg: PayGate, receiver: tuple[str, list[tuple[bytes, str]]]) -> None:
    await _customer_with_a_card(pg)
    portal_url = (await _refused(pg))["portal_url"]
    assert dict(parse_qsl(urlsplit(portal_url).query))["a"] == "view_topup"
    page, csrf = await _csrf(pg, portal_url)
    # The page offers a top-up and no control it would refuse.
    assert 'action="top-up?' in page
    for control in ("auto-top-up?", "spend-caps?", "payment-methods?", 'id="auto-threshold"', 'id="cap-daily"'):
        assert control not in page
    attacks: list[tuple[str, dict[str, str]]] = [
        ("auto-top-up", {"enabled": "on", "threshold": "499.00", "amount": "500.00", "csrf": csrf}),
        ("spend-caps", {"daily": "0.01", "monthly": "0.01", "csrf": csrf}),
        ("payment-methods", {"csrf": csrf}),
    ]
    for action, form in attacks:
        r = await pg.http.post(_action(portal_url, action), data=form)
        assert r.status_code == 403, (action, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == "portal_scope", action
    await _nothing_changed(pg)
    # The customer is still refused for want of funds, not locked out by a spend cap.
    assert (await _refused(pg))["code"] == "insufficient_funds"
    assert [e for e in await _events(pg, receiver[1]) if e["type"] == "billing_settings.changed"] == []


@pytest.mark.parametrize("edit", ["raised", "access_dropped", "id_changed", "unknown_access"])
async def test_editing_a_402_links_access_makes_it_invalid(pg: PayGate, edit: str) -> None:
    await _customer_with_a_card(pg)
    portal_url = (await _refused(pg))["portal_url"]
    _, csrf = await _csrf(pg, portal_url)
    params = dict(parse_qsl(urlsplit(portal_url).query))
    if edit == "raised":
        params["a"] = "billing_admin"
    elif edit == "access_dropped":  # the original four-field message: a different signature altogether
        del params["a"], params["n"]
    elif edit == "id_changed":
        params["n"] = "lnk_" + "0" * 24
    else:
        params["a"] = "owner"
    forged = f"{pg.gw.url}/portal/?{urlencode(params)}"
    assert (await pg.http.get(forged)).json()["error"]["code"] == "invalid_portal_link"
    r = await pg.http.post(_action(forged, "auto-top-up"),
                           data={"enabled": "on", "threshold": "499.00", "amount": "500.00", "csrf": csrf})
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_portal_link"
    await _nothing_changed(pg)


async def test_a_402_link_still_tops_up_and_checkout_returns_to_a_view_link(pg: PayGate) -> None:
    await _customer_with_a_card(pg)
    portal_url = (await _refused(pg))["portal_url"]
    _, csrf = await _csrf(pg, portal_url)
    r = await pg.http.post(_action(portal_url, "top-up"), data={"amount": "25.00", "csrf": csrf})
    assert r.status_code == 303
    (session,) = pg.fake.sessions.values()
    assert r.headers["Location"] == session["url"] and session["amount_total"] == 2_500
    assert dict(parse_qsl(urlsplit(session["success_url"]).query))["a"] == "view_topup"


# ------------------------------------------------------------------ the operator's link


async def test_admin_links_administer_billing_for_a_bounded_time_and_changes_are_notified(
        pg: PayGate, receiver: tuple[str, list[tuple[bytes, str]]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="metergate.payments.notify")
    await _customer_with_a_card(pg)
    r = await pg.gw.admin.post("/customers/acme/portal-link")
    link = r.json()
    assert r.status_code == 200 and link["access"] == "billing_admin" and link["expires_in_s"] == 900
    params = dict(parse_qsl(urlsplit(link["url"]).query))
    assert int(params["e"]) <= time.time() + 900
    page, csrf = await _csrf(pg, link["url"])
    assert 'id="auto-threshold"' in page and 'id="cap-daily"' in page and "payment-methods?" in page
    r = await pg.http.post(_action(link["url"], "auto-top-up"),
                           data={"enabled": "on", "threshold": "5.00", "amount": "20.00", "csrf": csrf})
    assert r.status_code == 303
    r = await pg.http.post(_action(link["url"], "spend-caps"), data={"daily": "50", "monthly": "", "csrf": csrf})
    assert r.status_code == 303
    r = await pg.http.post(_action(link["url"], "payment-methods"), data={"csrf": csrf})
    assert r.status_code == 303
    # Stripe gets a link back that views and tops up only, never the administration link.
    (portal_session,) = pg.fake.calls("POST", "/billing_portal/sessions")
    assert params["s"] not in portal_session["return_url"] and "a=view_topup" in portal_session["return_url"]
    changes = [e for e in await _events(pg, receiver[1]) if e["type"] == "billing_settings.changed"]
    assert [(e["customer_id"], e["mode"], e["data"]["setting"]) for e in changes] == [
        ("acme", "test", "auto_top_up"), ("acme", "test", "spend_caps"), ("acme", "test", "payment_methods")]
    assert all(e["data"]["changed_by"] == "portal" and e["data"]["link_id"] == params["n"] for e in changes)
    assert changes[0]["data"]["before"] is None
    assert changes[0]["data"]["after"] == {"asset": "USD", "threshold": 5_000_000, "amount": 20_000_000}
    assert changes[1]["data"]["after"] == {"asset": "USD", "daily": 50_000_000, "monthly": None}
    # On record in the log too (for an operator without notify_url), by link id: never the link itself.
    logged = [r.getMessage() for r in caplog.records if r.name == "metergate.payments.notify"]
    assert [m for m in logged if "changed through the portal" in m and params["n"] in m] != []
    assert all(params["s"] not in m for m in logged)


async def test_admin_can_ask_for_a_view_link_and_a_bad_access_is_refused(pg: PayGate) -> None:
    await _customer_with_a_card(pg)
    r = await pg.gw.admin.post("/customers/acme/portal-link", json={"access": "view_topup"})
    assert r.status_code == 200 and r.json()["access"] == "view_topup"
    assert r.json()["expires_in_s"] == pg.gw.settings.portal_link_ttl_s
    page, _ = await _csrf(pg, r.json()["url"])
    assert "auto-top-up?" not in page
    for body in ({"access": "owner"}, {"access": None}, {"access": ["billing_admin"]}):
        r = await pg.gw.admin.post("/customers/acme/portal-link", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["param"] == "access"
