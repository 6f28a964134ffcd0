"""The event batcher delivers every event exactly once, also when the server restarts while it delivers.

Method: a real ``metergate serve`` (SQLite) and the sync client's background batcher; 10,000 one-call events
(each costs exactly 1 CALLS) are queued, the server is killed (SIGKILL: answers in flight are lost) and
started again once delivery is under way, then the client is closed, which flushes. Exactly once means: the
server answered every event accepted or duplicate, none failed or was rejected, the wallet paid exactly
10,000, and the margin report counts 10,000 usage records.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx2 as httpx

from metergate_client import Client
from tests.cli.conftest import publish_rules
from tests.cli.server import MeterServer
from tests.conftest import ADMIN_KEY

EVENTS = 10_000
WAIT_LIMIT_S = 120.0  # a bound on waiting for delivery to begin, not a speed assertion


def test_ten_thousand_events_are_delivered_exactly_once_across_a_server_restart(tmp_path: Path) -> None:
    server = MeterServer(tmp_path)
    server.start()
    try:
        with Client(server.url, ADMIN_KEY, events_give_up_after_s=120) as client:
            publish_rules(client)
            client.create_customer("batchy")
            client.credit("batchy", 20_000, asset="CALLS", idempotency_key="seed")
            for i in range(EVENTS // 2):
                client.events.send("batchy", "api.call", quantity=1, id=f"call-{i}")
            deadline = time.monotonic() + WAIT_LIMIT_S
            while client.events.tally.accepted == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.restart()  # SIGKILL mid-delivery, then the same port and database again
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
            assert [(row["key"], row["requests"]) for row in report["data"]] == [("batchy", EVENTS)]
    finally:
        server.stop()
