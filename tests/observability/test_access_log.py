"""Signed links never reach a log line: the access log writes paths without their query strings, and no
other logger (Stripe's SDK included) writes a link, at any level.

Method: log everything at DEBUG — captured raw, before metergate's redaction can rewrite it, and as
metergate's JSON handler writes it — while links are served through the gateway (with the fake Stripe
behind it): a 402's portal link (page, live summary, CSV, a top-up through Checkout, a refused settings
form, a request whose Referer is the link), an admin-issued billing link (its page and forms, the Stripe
billing portal) and a dashboard link (opened, then replayed). Every signature, CSRF token and session
cookie the clients saw is then searched for in every log line: there must be no hit.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from metergate.observability.logs import configure_logging
from tests.conftest import Upstream
from tests.payments.conftest import PayGate, start_paygate
from tests.payments.fake_stripe import running_fake_stripe

_CLIENT_LOGGERS = ("httpx", "httpcore", "hpack")  # the test's own HTTP client


class Snapshot(logging.Handler):
    """Every record as emitted, formatted before any other handler (redaction included) rewrites it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, self.format(record)))
        record.exc_text = None


@pytest.fixture
def logs() -> Iterator[tuple[Snapshot, io.StringIO]]:
    root = logging.getLogger()
    level = root.level
    snapshot, stream = Snapshot(), io.StringIO()
    root.addHandler(snapshot)  # first: it sees each record before metergate's redaction
    configure_logging("DEBUG", "json", stream=stream)
    yield snapshot, stream
    for handler in [h for h in root.handlers if h is snapshot or h.get_name() == "metergate"]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
async def pg(upstream: Upstream, tmp_path: Path) -> AsyncIterator[PayGate]:
    async with running_fake_stripe() as fake:
        async for gate in start_paygate(upstream, tmp_path, fake):
            yield gate


def _server_lines(snapshot: Snapshot) -> list[str]:
    """What the gateway (and its Stripe SDK, its database, aiohttp) logged; the test's own HTTP client logs
    the URLs it fetches, which says nothing about metergate."""
    return [line for name, line in snapshot.lines if not name.startswith(_CLIENT_LOGGERS)]


def _action(url: str, action: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/portal/{action}?{parts.query}"


def _csrf(text: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', text)
    assert match is not None
    return match.group(1)


async def test_no_link_signature_reaches_any_log_line_at_any_level(
        pg: PayGate, logs: tuple[Snapshot, io.StringIO]) -> None:
    snapshot, stream = logs
    http, gw = pg.http, pg.gw
    await gw.customer("acme", funds=10)
    pg.fake.default_payment_method(await pg.payments.stripe.customer("test", "acme"), "pm_card_visa")
    secrets: list[str] = []

    # A 402's link, and what it opens.
    r = await http.post(f"{gw.url}/openai/v1/chat/completions",
                        json={"model": "gpt-4o", "max_tokens": 1_000_000,
                              "messages": [{"role": "user", "content": "x"}]},
                        headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    assert r.status_code == 402
    view = r.json()["error"]["portal_url"]
    secrets.append(dict(parse_qsl(urlsplit(view).query))["s"])
    page = await http.get(view)
    assert page.status_code == 200
    csrf = _csrf(page.text)
    secrets.append(csrf)
    assert (await http.get(_action(view, "summary"))).status_code == 200
    assert (await http.get(_action(view, "history.csv"))).status_code == 200
    assert (await http.get(f"{gw.url}/portal/summary", headers={"Referer": view})).status_code == 403
    r = await http.post(_action(view, "top-up"), data={"amount": "25.00", "csrf": csrf})
    assert r.status_code == 303
    (session,) = pg.fake.sessions.values()
    secrets.append(dict(parse_qsl(urlsplit(session["success_url"]).query))["s"])
    r = await http.post(_action(view, "spend-caps"), data={"daily": "0.01", "csrf": csrf})
    assert r.status_code == 403 and r.json()["error"]["code"] == "portal_scope"

    # The operator's billing link.
    admin = (await gw.admin.post("/customers/acme/portal-link")).json()["url"]
    secrets.append(dict(parse_qsl(urlsplit(admin).query))["s"])
    page = await http.get(admin)
    admin_csrf = _csrf(page.text)
    secrets.append(admin_csrf)
    r = await http.post(_action(admin, "auto-top-up"),
                        data={"enabled": "on", "threshold": "5.00", "amount": "20.00", "csrf": admin_csrf})
    assert r.status_code == 303
    r = await http.post(_action(admin, "payment-methods"), data={"csrf": admin_csrf})
    assert r.status_code == 303
    (portal_session,) = pg.fake.calls("POST", "/billing_portal/sessions")
    secrets.append(dict(parse_qsl(urlsplit(portal_session["return_url"]).query))["s"])

    # The operator dashboard's link: opened once, then replayed.
    dashboard = (await gw.admin.post("/dashboard-link")).json()["url"]
    secrets.append(dict(parse_qsl(urlsplit(dashboard).query))["s"])
    r = await http.get(dashboard)
    assert r.status_code == 303
    cookie = r.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
    secrets.append(cookie.rsplit(".", 1)[1])
    http.cookies.clear()
    r = await http.get(dashboard)
    assert r.status_code == 403 and r.json()["error"]["code"] == "link_used"

    await pg.payments.notifier.flush()
    lines = _server_lines(snapshot)
    written = [line for line in stream.getvalue().splitlines()
               if not json.loads(line)["logger"].startswith(_CLIENT_LOGGERS)]
    # The access log did log these requests, by path.
    access = [line for name, line in snapshot.lines if name == "aiohttp.access"]
    for path in ("GET /portal/ ", "GET /portal/summary ", "GET /portal/history.csv ", "POST /portal/top-up ",
                 "POST /portal/spend-caps ", "POST /portal/auto-top-up ", "GET /admin/dashboard "):
        assert any(path in line for line in access), path
    assert all("?" not in line for line in access)
    assert all(len(s) >= 32 for s in secrets)
    for secret in secrets:
        assert not [line for line in lines if secret in line], secret
        assert not [line for line in written if secret in line], secret
