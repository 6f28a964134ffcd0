"""``metergate webhooks listen --forward-to URL`` forwards one mode's notifications to a local app, each
once and in order, with headers the app verifies with the ``standardwebhooks`` package; the follow
endpoint it reads starts after the newest notification and hands out each one after a cursor once.

Method: metergate served on loopback without a ``notify_url`` (the development case: notifications are
kept as ``skipped`` and still followed), the real ``metergate webhooks listen`` command as a subprocess
forwarding to a local aiohttp app (tests/webhooks/conftest.py), and the follow endpoint called directly.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from metergate.admin.openapi import document
from tests.billing.conftest import eventually
from tests.conftest import ADMIN_KEY, Upstream
from tests.payments.conftest import PayGate
from tests.payments.fake_stripe import FakeStripe
from tests.webhooks.conftest import Receiver, body_of, low_balance, start_hookgate, stop_hookgate


@pytest.fixture
async def devgate(upstream: Upstream, webhook_db: str, fake_stripe: FakeStripe) -> AsyncIterator[PayGate]:
    pg, runner = await start_hookgate(upstream, webhook_db, fake_stripe, "")
    yield pg
    await stop_hookgate(pg, runner)


def _valid(answer: dict[str, Any], path: str, method: str = "get") -> None:
    """The answer matches the schema the admin OpenAPI document gives it."""
    doc = document()
    schema = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(answer, {**schema, "components": doc["components"]})


async def test_listen_forwards_the_modes_notifications_signed_once_each_in_order(devgate: PayGate,
                                                                                  receiver: Receiver) -> None:
    await low_balance(devgate, "acme")  # before the listener starts: forwarded with --from-start
    await devgate.payments.notifier.notify("balance.low", "live", "live-only", {"asset": "USD"})  # other mode
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "metergate", "webhooks", "listen", "--forward-to", receiver.url, "--url",
        devgate.gw.url, "--admin-key", ADMIN_KEY, "--from-start", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        await eventually(_count(receiver, 2), what="the earlier notifications forwarded")
        await low_balance(devgate, "globex")  # while it listens
        await eventually(_count(receiver, 4), what="the new notifications forwarded")
    finally:
        listener.send_signal(signal.SIGINT)
        output, _ = await listener.communicate()
    assert listener.returncode == 0, output.decode()
    events = [body_of(d) for d in receiver.deliveries]
    assert [(e["customer_id"], e["type"]) for e in events] == [
        ("acme", "balance.low"), ("acme", "topup.failed"), ("globex", "balance.low"), ("globex", "topup.failed")]
    assert list(receiver.processed) == [e["id"] for e in events]  # verified, once each
    listed = {row["id"]: row for row in (await devgate.gw.admin.get("/webhooks")).json()["data"]}
    assert all(listed[e["id"]]["status"] == "skipped" for e in events)  # no notify_url: kept, not sent
    assert b"topup.failed " + events[-1]["id"].encode() + b" -> 200" in output


def _count(receiver: Receiver, n: int) -> Any:
    async def check() -> bool:
        return len(receiver.processed) >= n

    return check


async def test_follow_starts_after_the_newest_and_hands_out_each_notification_once(devgate: PayGate) -> None:
    await low_balance(devgate, "acme")
    r = await devgate.gw.admin.get("/webhooks/follow")
    assert r.status_code == 200 and r.json()["data"] == []
    _valid(r.json(), "/admin/v1/webhooks/follow")
    cursor = r.json()["next_cursor"]
    await low_balance(devgate, "globex")
    r = await devgate.gw.admin.get("/webhooks/follow", params={"after": cursor, "wait_s": 5})
    _valid(r.json(), "/admin/v1/webhooks/follow")
    first = r.json()["data"]
    assert [body_of(({}, e["body"].encode()))["customer_id"] for e in first] == ["globex", "globex"]
    assert all(e["headers"]["webhook-id"] == e["id"] for e in first)
    r = await devgate.gw.admin.get("/webhooks/follow", params={"after": r.json()["next_cursor"]})
    assert r.json()["data"] == []
    for bad in ({"after": "yesterday"}, {"wait_s": "31"}, {"wait_s": "soon"}):
        r = await devgate.gw.admin.get("/webhooks/follow", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] in bad, r.text


async def test_list_filters_by_status_and_pages_by_cursor(devgate: PayGate) -> None:
    for customer in ("a1", "a2", "a3"):
        await low_balance(devgate, customer)
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4, "status": "skipped"}
    while True:
        r = await devgate.gw.admin.get("/webhooks", params=params)
        assert r.status_code == 200, r.text
        _valid(r.json(), "/admin/v1/webhooks")
        seen += [row["id"] for row in r.json()["data"]]
        if r.json()["next_cursor"] is None:
            break
        params["cursor"] = r.json()["next_cursor"]
    assert len(seen) == len(set(seen)) == 6
    created = [row["created_at_ms"] for row in (await devgate.gw.admin.get("/webhooks")).json()["data"]]
    assert created == sorted(created, reverse=True)  # newest first
    assert (await devgate.gw.admin.get("/webhooks", params={"status": "delivered"})).json()["data"] == []
    r = await devgate.gw.admin.get("/webhooks", params={"status": "lost"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"
    one = await devgate.gw.admin.get(f"/webhooks/{seen[0]}")
    _valid(one.json(), "/admin/v1/webhooks/{webhook_id}")
    assert (await devgate.gw.admin.get("/webhooks/ntf_nosuch")).status_code == 404
