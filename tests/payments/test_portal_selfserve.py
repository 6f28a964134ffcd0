"""The self-service portal serves only the customer its signed link names: every form needs the link and
its CSRF token, a top-up leaves for Stripe Checkout, settings are saved within the operator's limits,
history filters, pages and exports, and the spend caps a customer sets refuse spending beyond them.

Method: plain HTTP against the running gateway (no redirects followed), with the fake Stripe behind it;
the page's HTML is parsed just enough to read the CSRF token; the database is read back after each form.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_args
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2 as httpx
import pytest

from metergate.errors import PaymentRequired
from metergate.payments.spendcaps import SpendCapGuard
from metergate.payments.store import SpendCaps
from metergate.portal.links import LinkSigner
from metergate.portal.selfserve import KINDS
from metergate.wallet.models import EntryKind
from tests.conftest import Upstream
from tests.payments.conftest import PayGate, start_paygate
from tests.payments.fake_stripe import FakeStripe


@pytest.fixture
async def branded(upstream: Upstream, tmp_path: Path, fake_stripe: FakeStripe) -> AsyncIterator[PayGate]:
    async for pg in start_paygate(upstream, tmp_path, fake_stripe, portal_brand_name="Acme Cloud",
                                  portal_logo_url="https://cdn.example.com/logo.png",
                                  portal_primary_color="#102a43", portal_accent_color="#0b6e4f",
                                  portal_frame_ancestors="https://app.example.com"):
        yield pg


async def _portal(pg: PayGate, customer: str = "acme") -> tuple[str, str]:
    """The customer's portal link (from the admin API) and the CSRF token its page carries."""
    r = await pg.gw.admin.post(f"/customers/{customer}/portal-link")
    url = r.json()["url"]
    page = await pg.http.get(url)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match is not None
    return url, match.group(1)


def _action(url: str, action: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/portal/{action}?{parts.query}"


async def test_page_is_branded_labelled_and_framed_as_configured(branded: PayGate) -> None:
    await branded.gw.customer("acme", funds=2_500_000)
    url, _ = await _portal(branded)
    r = await branded.http.get(url)
    assert "Acme Cloud" in r.text and "#102a43" in r.text and "#0b6e4f" in r.text
    assert '<img src="https://cdn.example.com/logo.png" alt="Acme Cloud logo"' in r.text
    csp = r.headers["Content-Security-Policy"]
    assert "frame-ancestors https://app.example.com;" in csp and "img-src 'self' data: https://cdn.example.com" in csp
    for field in ("topup-amount", "auto-threshold", "auto-amount", "cap-daily", "cap-monthly", "kind"):
        assert f'<label for="{field}"' in r.text and f'id="{field}"' in r.text
    assert "2.500000" in r.text


async def test_top_up_redirects_to_checkout(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    url, csrf = await _portal(paygate)
    r = await paygate.http.post(_action(url, "top-up"), data={"amount": "30.00", "csrf": csrf})
    assert r.status_code == 303
    (session,) = paygate.fake.sessions.values()
    assert r.headers["Location"] == session["url"]
    assert session["amount_total"] == 3_000 and session["metadata"]["metergate_customer"] == "acme"
    assert "notice=paid" in session["success_url"] and "/portal/?" in session["success_url"]


@pytest.mark.parametrize(("amount", "status"), [("4.00", 400), ("9999", 400), ("ten", 400)])
async def test_top_up_outside_limits_is_refused(paygate: PayGate, amount: str, status: int) -> None:
    await paygate.gw.customer("acme", funds=0)
    url, csrf = await _portal(paygate)
    r = await paygate.http.post(_action(url, "top-up"), data={"amount": amount, "csrf": csrf})
    assert r.status_code == status and r.json()["error"]["code"] == "invalid_amount"
    assert paygate.fake.sessions == {}


@pytest.mark.parametrize("case", ["no_token", "wrong_token", "cross_site", "other_links_token"])
async def test_forms_without_the_links_csrf_token_change_nothing(paygate: PayGate, case: str) -> None:
    await paygate.gw.customer("acme", funds=0)
    await paygate.gw.customer("globex", funds=0)
    url, csrf = await _portal(paygate)
    data, headers = {"enabled": "on", "threshold": "5.00", "amount": "20.00", "csrf": csrf}, {}
    if case == "no_token":
        del data["csrf"]
    elif case == "wrong_token":
        data["csrf"] = "0" * 64
    elif case == "cross_site":
        headers["Sec-Fetch-Site"] = "cross-site"
    else:
        data["csrf"] = (await _portal(paygate, "globex"))[1]
    r = await paygate.http.post(_action(url, "auto-top-up"), data=data, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_csrf_token"
    assert await paygate.payments.store.auto_topup("test", "acme", "USD") is None


async def test_auto_top_up_and_spend_caps_forms_save(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    url, csrf = await _portal(paygate)
    r = await paygate.http.post(_action(url, "auto-top-up"),
                                data={"enabled": "on", "threshold": "5.00", "amount": "20.00", "csrf": csrf})
    assert r.status_code == 303 and "notice=auto_saved" in r.headers["Location"]
    setting = await paygate.payments.store.auto_topup("test", "acme", "USD")
    assert setting is not None and (setting.threshold, setting.amount) == (5_000_000, 20_000_000)
    r = await paygate.http.post(_action(url, "spend-caps"), data={"daily": "2.50", "monthly": "", "csrf": csrf})
    assert r.status_code == 303
    caps = await paygate.payments.store.spend_caps("test", "acme", "USD")
    assert caps == SpendCaps("test", "acme", "USD", 2_500_000, None)
    page = await paygate.http.get(r.headers["Location"])
    assert "Spending limits saved." in page.text and 'value="2.50"' in page.text and " checked" in page.text
    r = await paygate.http.post(_action(url, "auto-top-up"), data={"threshold": "5", "amount": "20", "csrf": csrf})
    assert r.status_code == 303 and await paygate.payments.store.auto_topup("test", "acme", "USD") is None


async def test_payment_methods_open_the_stripe_billing_portal(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    url, csrf = await _portal(paygate)
    r = await paygate.http.post(_action(url, "payment-methods"), data={"csrf": csrf})
    assert r.status_code == 303
    stripe_id = await paygate.payments.store.stripe_customer("test", "acme")
    assert r.headers["Location"] == f"{paygate.fake.url}/billing/{stripe_id}"


async def test_expired_tampered_and_other_customer_links_are_refused(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=1_000_000)
    await paygate.gw.customer("globex", funds=0)
    url, csrf = await _portal(paygate)
    params = dict(parse_qsl(urlsplit(url).query))
    base = f"{paygate.gw.url}/portal/"
    signer = LinkSigner({"k1": "x" * 40}, ttl_s=60, base_url=paygate.gw.url)
    other = {**params, "c": "globex"}  # acme's signature on globex's name
    r = await paygate.http.get(f"{base}?{urlencode(other)}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_portal_link"
    r = await paygate.http.post(_action(f"{base}?{urlencode(other)}", "top-up"), data={"amount": "10", "csrf": csrf})
    assert r.status_code == 403
    # A link signed with another key, and one whose expiry was pushed out, are forgeries.
    forged = dict(parse_qsl(signer.query("test", "acme")))
    r = await paygate.http.get(f"{base}?{urlencode(forged)}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_portal_link"
    stretched = {**params, "e": str(int(params["e"]) + 3600)}
    r = await paygate.http.get(f"{base}?{urlencode(stretched)}")
    assert r.status_code == 403
    # An expired link: signed by the gateway's own key, an hour in the past.
    real = LinkSigner({k: v.get_secret_value() for k, v in paygate.gw.settings.portal_secrets.items()},
                      ttl_s=60, base_url=paygate.gw.url)
    expired = real.url("test", "acme", now=time.time() - 3600)
    r = await paygate.http.get(expired)
    assert r.status_code == 403 and r.json()["error"]["code"] == "expired_portal_link"
    r = await paygate.http.get(_action(expired, "history.csv"))
    assert r.status_code == 403
    assert paygate.fake.sessions == {}


async def test_history_filters_pages_and_exports_csv(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=0)
    store = paygate.gw.store
    for i in range(23):
        await store.credit("test", "acme", "USD", 1_000 + i, idempotency_key=f"c{i}",
                           memo="=HYPERLINK(\"x\")" if i == 0 else f"credit {i}")
    hold, _ = await store.reserve("test", "acme", "USD", 500, hold_id="hold_h1", ttl_ms=60_000)
    await store.settle(hold.id, 400)
    url, _ = await _portal(paygate)
    page = await paygate.http.get(url)
    assert page.text.count('<tr data-kind="') == 20 and 'rel="next"' in page.text
    older = re.search(r'href="\?([^"]+)" rel="next"', page.text)
    assert older is not None
    second = await paygate.http.get(f"{paygate.gw.url}/portal/?{older.group(1).replace('&amp;', '&')}")
    assert second.status_code == 200 and second.text.count('<tr data-kind="') == 5
    captures = await paygate.http.get(f"{url}&kind=capture")
    assert captures.text.count('<tr data-kind="capture"') == 1 and 'data-kind="credit"' not in captures.text
    r = await paygate.http.get(_action(url, "history.csv") + "&kind=credit")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0] == "seq,time_utc,kind,amount,asset,memo" and len(lines) == 24
    assert all(",credit," in line for line in lines[1:])
    assert lines[-1].endswith(',"\'=HYPERLINK(""x"")"')  # a formula is defused
    bad = await paygate.http.get(f"{url}&kind=everything")
    assert bad.status_code == 400


async def test_spend_caps_refuse_spending_beyond_them(paygate: PayGate) -> None:
    await paygate.gw.customer("acme", funds=10_000_000)
    store = paygate.payments.store
    guard = SpendCapGuard(store, cache_ttl_s=0)  # read caps on every call: this test changes them
    await guard.admit("test", "acme", "USD", 5_000_000)  # no caps: anything the wallet covers
    await store.set_spend_caps(SpendCaps("test", "acme", "USD", daily=1_000_000, monthly=None))
    await guard.admit("test", "acme", "USD", 600_000)
    hold, _ = await paygate.gw.store.reserve("test", "acme", "USD", 600_000, hold_id="hold_c1", ttl_ms=60_000)
    with pytest.raises(PaymentRequired) as info:  # the open hold counts as spent
        await guard.admit("test", "acme", "USD", 600_000)
    assert info.value.code == "spend_cap_reached" and info.value.extra["period"] == "daily"
    await paygate.gw.store.settle(hold.id, 500_000)
    await guard.admit("test", "acme", "USD", 500_000)  # exactly up to the cap
    with pytest.raises(PaymentRequired):
        await guard.admit("test", "acme", "USD", 500_001)
    await store.set_spend_caps(SpendCaps("test", "acme", "USD", daily=None, monthly=400_000))
    with pytest.raises(PaymentRequired) as info:
        await guard.admit("test", "acme", "USD", 1)
    assert info.value.extra["period"] == "monthly"
    assert isinstance(paygate.http, httpx.AsyncClient)


def test_every_ledger_entry_kind_has_a_name_in_the_history_filter() -> None:
    """A kind the ledger writes and the portal cannot name would show raw and could not be filtered on."""
    assert set(KINDS) == set(get_args(EntryKind))
