"""Notifications are durable, retried, signed Standard Webhooks: a receiver that is down gets each one
once it is back, each under one webhook-id; a receiver that keeps refusing sees it marked failed after
the last attempt and can have it redelivered; replicas on PostgreSQL share the outbox without sending a
row twice; every delivery verifies with the ``standardwebhooks`` package and keeps Metergate-Signature.

Method: metergate served on loopback with the fake Stripe, on SQLite and PostgreSQL, delivering to a real
aiohttp receiver (tests/webhooks/conftest.py) with retry delays of a fraction of a second; notifications
are caused through the admin API and the auto top-up check, and the outbox is read through the admin API.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from metergate.config.settings import load_settings
from metergate.payments.notify import SIGNATURE_HEADER, verify
from metergate.webhooks.delivery import WebhookDelivery
from metergate.webhooks.outbox import WebhookOutbox
from tests.billing.conftest import eventually
from tests.conftest import Upstream
from tests.payments.conftest import PayGate
from tests.payments.fake_stripe import FakeStripe
from tests.webhooks.conftest import (
    LEGACY_SECRET,
    SIGNING_SECRET,
    Receiver,
    body_of,
    low_balance,
    start_hookgate,
    stop_hookgate,
)


async def _listed(pg: PayGate, **params: Any) -> list[dict[str, Any]]:
    r = await pg.gw.admin.get("/webhooks", params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def _all_delivered(pg: PayGate, count: int) -> bool:
    return len(await _listed(pg, status="delivered")) == count


async def test_signatures_verify_with_the_standardwebhooks_package(upstream: Upstream, webhook_db: str,
                                                                  fake_stripe: FakeStripe,
                                                                  receiver: Receiver) -> None:
    pg, runner = await start_hookgate(upstream, webhook_db, fake_stripe, receiver.url)
    try:
        await low_balance(pg, "acme")
        await pg.payments.notifier.flush()
    finally:
        await stop_hookgate(pg, runner)
    assert [body_of(d)["type"] for d in receiver.deliveries] == ["balance.low", "topup.failed"]
    for headers, body in receiver.deliveries:
        event = standardwebhooks.Webhook(SIGNING_SECRET).verify(body, headers)
        assert event["id"] == headers["webhook-id"] and event["customer_id"] == "acme"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
        assert verify(body, headers[SIGNATURE_HEADER], LEGACY_SECRET)  # the earlier header, still sent
        # Tampering with the body, the id or the timestamp breaks the standard signature.
        earlier = str(int(headers["webhook-timestamp"]) - 1)
        for changed_body, changed in ((body.replace(b"acme", b"acmf"), headers),
                                      (body, {**headers, "webhook-id": "ntf_other"}),
                                      (body, {**headers, "webhook-timestamp": earlier})):
            try:
                standardwebhooks.Webhook(SIGNING_SECRET).verify(changed_body, changed)
            except standardwebhooks.WebhookVerificationError:
                continue
            raise AssertionError("a changed delivery verified")


async def test_a_receiver_down_for_a_while_gets_each_notification_once_it_is_back(
        upstream: Upstream, webhook_db: str, fake_stripe: FakeStripe, down_receiver: Receiver) -> None:
    pg, runner = await start_hookgate(upstream, webhook_db, fake_stripe, down_receiver.url)
    try:
        for customer in ("acme", "globex", "initech"):
            await low_balance(pg, customer)
        # Recorded at once, and being retried while the receiver is down.
        await eventually(lambda: _tried(pg, 6), what="a failed attempt at every notification")
        pending = await _listed(pg, status="pending")
        assert len(pending) == 6 and all("ClientConnectorError" in (p["last_error"] or "") for p in pending)
        down_receiver.fail_first = 2  # back, but answering 500 for a moment
        await down_receiver.start()
        await eventually(lambda: _all_delivered(pg, 6), what="every notification delivered")
    finally:
        await stop_hookgate(pg, runner)
    outbox_ids = {p["id"] for p in pending}
    assert set(down_receiver.processed) == outbox_ids  # each processed once, by webhook-id
    assert set(down_receiver.ids()) == outbox_ids
    # The two refused deliveries were retried with the same id and the same body.
    assert len(down_receiver.ids()) == 8
    bodies: dict[str, set[bytes]] = {}
    for headers, body in down_receiver.deliveries:
        bodies.setdefault(headers["webhook-id"], set()).add(body)
    assert all(len(b) == 1 for b in bodies.values())


async def _tried(pg: PayGate, count: int) -> bool:
    rows = await _listed(pg)
    return len(rows) == count and all(r["attempts"] >= 1 for r in rows)


async def test_last_attempt_marks_failed_and_redeliver_sends_the_same_message(
        upstream: Upstream, webhook_db: str, fake_stripe: FakeStripe, receiver: Receiver) -> None:
    receiver.fail_first = 3
    pg, runner = await start_hookgate(upstream, webhook_db, fake_stripe, receiver.url, max_attempts=3,
                                      retry_base_s=0.001, retry_max_s=0.001, poll_interval_s=60)
    try:
        await pg.gw.customer("acme", funds=1_000)
        hold, _ = await pg.gw.store.reserve("test", "acme", "USD", 1_000, hold_id="hold_all", ttl_ms=60_000)
        await pg.gw.store.settle(hold.id, 1_000)
        await pg.payments.after_settlement("test", "acme", "USD")
        await pg.payments.notifier.flush()
        (failed,) = await _listed(pg, status="failed")
        assert failed["type"] == "wallet.depleted" and failed["attempts"] == 3
        assert failed["last_error"] == "HTTP 500" and failed["next_attempt_at_ms"] is None
        r = await pg.gw.admin.post(f"/webhooks/{failed['id']}/redeliver")
        assert r.status_code == 200 and r.json()["status"] == "pending" and r.json()["attempts"] == 0
        await pg.payments.notifier.flush()
        r = await pg.gw.admin.get(f"/webhooks/{failed['id']}")
        assert r.json()["status"] == "delivered" and r.json()["attempts"] == 1
        assert (await pg.gw.admin.post("/webhooks/ntf_nosuch/redeliver")).status_code == 404
    finally:
        await stop_hookgate(pg, runner)
    assert receiver.ids() == [failed["id"]] * 4
    assert len({body for _, body in receiver.deliveries}) == 1
    assert list(receiver.processed) == [failed["id"]]


def test_retry_schedule_doubles_to_its_cap_and_spans_about_a_day() -> None:
    settings = load_settings(database_url="sqlite://", admin_keys=["mg_test_" + "k" * 24])
    no_jitter = WebhookDelivery(settings, WebhookOutbox(None), jitter=lambda: 0.0)  # type: ignore[arg-type]
    full_jitter = WebhookDelivery(settings, WebhookOutbox(None), jitter=lambda: 0.999)  # type: ignore[arg-type]
    delays = [no_jitter.retry_delay_s(n) for n in range(1, settings.webhooks.max_attempts)]
    assert delays[:4] == [5, 10, 20, 40] and max(delays) == 3 * 3600 == delays[-1]
    assert delays == sorted(delays)
    total_h = sum(delays) / 3600
    jittered_h = sum(full_jitter.retry_delay_s(n) for n in range(1, settings.webhooks.max_attempts)) / 3600
    assert 20 < jittered_h < total_h < 28  # twenty attempts over about a day, whatever the jitter


@pytest.mark.postgres
async def test_replicas_on_postgresql_share_the_outbox_and_send_each_row_once(
        upstream: Upstream, pg_url: str, fake_stripe: FakeStripe, receiver: Receiver) -> None:
    from tests.conftest import _reset_pg

    await _reset_pg(pg_url)
    first, first_runner = await start_hookgate(upstream, pg_url, fake_stripe, receiver.url, poll_interval_s=60)
    second, second_runner = await start_hookgate(upstream, pg_url, fake_stripe, receiver.url, poll_interval_s=60)
    try:
        for n in range(20):
            await first.gw.customer(f"cust{n}", funds=0)
            await first.payments.notifier.notify("balance.low", "test", f"cust{n}", {"n": n})
        # Both replicas claim and send at once, repeatedly; SKIP LOCKED and the claim keep them apart.
        await asyncio.gather(*(pg.payments.delivery.run_once() for pg in (first, second) for _ in range(3)))
        await first.payments.notifier.flush()
        assert len(await _listed(first, status="delivered")) == 20
    finally:
        await stop_hookgate(first, first_runner)
        await stop_hookgate(second, second_runner)
    assert len(receiver.ids()) == 20 and len(set(receiver.ids())) == 20


async def test_a_shutdown_mid_delivery_gives_the_claim_back_for_the_next_process(
        upstream: Upstream, tmp_path: Path, fake_stripe: FakeStripe, receiver: Receiver) -> None:
    database = f"sqlite:///{tmp_path / 'hooks.db'}"
    receiver.hang = True
    # Leases and timeouts far longer than the test: only the shutdown's release lets the next process send.
    slow = {"lease_s": 3600, "timeout_s": 120}
    first, first_runner = await start_hookgate(upstream, database, fake_stripe, receiver.url, **slow)
    try:
        await low_balance(first, "acme")
        await eventually(lambda: _received(receiver, 2), what="both deliveries under way")
    finally:
        await stop_hookgate(first, first_runner)
    receiver.hang = False
    second, second_runner = await start_hookgate(upstream, database, fake_stripe, receiver.url, **slow)
    try:
        await eventually(lambda: _all_delivered(second, 2), what="the released rows delivered")
    finally:
        await stop_hookgate(second, second_runner)
    assert len(receiver.processed) == 2 and len(receiver.ids()) == 4  # each sent twice, processed once


async def _received(receiver: Receiver, n: int) -> bool:
    return len(receiver.deliveries) >= n
