"""The client delivers writes exactly once when the server goes away mid-stream: 10,000 events through the
background batcher across a server restart, and a credit sent while the server is down.

Method: a real ``metergate serve`` (SQLite; the module's ``server`` fixture) and the sync client. For the
batcher, 10,000 one-call events (each costs exactly 1 CALLS) are queued; once delivery is under way the server
is killed (SIGKILL: answers in flight are lost) and started again on the same port and database, then the
client is flushed. Exactly once means: every event answered accepted or duplicate, none failed or rejected,
the wallet paid exactly 10,000, and the margin report counts 10,000 usage records.
"""

from __future__ import annotations

import signal
import threading
import time
from decimal import Decimal

import httpx2 as httpx

from metergate_client import Client, Credit, RetryPolicy
from tests.cli.server import MeterServer
from tests.conftest import ADMIN_KEY

EVENTS = 10_000
WAIT_LIMIT_S = 120.0  # a bound on waiting for delivery to begin, not a speed assertion


def test_ten_thousand_events_are_delivered_exactly_once_across_a_server_restart(server: MeterServer) -> None:
    with Client(server.url, ADMIN_KEY, events_give_up_after_s=120) as client:
        client.create_customer("batchy")
        client.credit("batchy", 20_000, asset="CALLS", idempotency_key="seed-batchy")
        for i in range(EVENTS // 2):
            client.events.send("batchy", "api.call", quantity=1, id=f"call-{i}")
        deadline = time.monotonic() + WAIT_LIMIT_S
        while client.events.tally.accepted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.restart(signal.SIGKILL)  # mid-delivery; then the same port and database again
        delivered_before = client.events.tally.accepted + client.events.tally.duplicate
        for i in range(EVENTS // 2, EVENTS):
            client.events.send("batchy", "api.call", quantity=1, id=f"call-{i}")
        client.events.flush()
        tally = client.events.tally
        assert 0 < delivered_before < EVENTS
        assert (tally.failed, tally.rejected) == ([], [])
        assert tally.accepted + tally.duplicate == EVENTS
        [calls] = [b for b in client.balances("batchy") if b.asset == "CALLS"]
        assert (calls.available_minor, calls.pending_minor) == (20_000 - EVENTS, 0)
        report = httpx.get(f"{server.url}/admin/v1/reports/margin", params={"group_by": "customer"},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
        assert [(row["key"], row["requests"]) for row in report["data"] if row["key"] == "batchy"] == \
            [("batchy", EVENTS)]


def test_a_credit_sent_while_the_server_is_down_is_retried_and_applied_once(server: MeterServer) -> None:
    patient = RetryPolicy(max_retries=400, backoff_s=0.05, max_backoff_s=0.25)  # up to ~100 s of retries
    with Client(server.url, ADMIN_KEY, retry=patient) as client:
        client.create_customer("retrier")
        server.stop()
        done: list[Credit] = []
        sender = threading.Thread(target=lambda: done.append(client.credit("retrier", "5", memo="during restart")))
        sender.start()  # refused while the server is down; retried with the same idempotency key
        server.start()
        sender.join()
        [credit] = done
        assert credit.balance.available == Decimal("5.000000")
        assert [(e.kind, e.amount) for e in client.ledger("retrier").data] == [("credit", Decimal("5.000000"))]
