"""A metergate restart loses no notification: what was recorded before the process died is delivered by
the next one, to a receiver that was down the whole time the first one ran, once per webhook-id.

Method: ``metergate serve`` as a real subprocess on a SQLite file; notifications are caused through the
admin API (customers below their auto top-up threshold, found by the periodic check; no Stripe keys, so
no charge follows); the receiver's port is closed while the first process retries, the process is killed
(SIGKILL: no graceful anything, a claim left behind), then the receiver and a second process start on the
same database and the receiver's deliveries are checked with the ``standardwebhooks`` package.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from tests.billing.conftest import eventually
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, Upstream, free_port
from tests.webhooks.conftest import FAST, Receiver

CUSTOMERS = ("acme", "globex", "initech")


async def _serve(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("a") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "metergate", "serve", "--config", str(config), stdout=out, stderr=out)
    return process


def _text(log: Path) -> str:
    return log.read_text()


async def _ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(300):
        assert process.returncode is None, _text(log)
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"metergate did not start: {_text(log)}")


async def _webhooks(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await client.get("/admin/v1/webhooks", params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def test_notifications_recorded_before_a_crash_are_delivered_after_the_restart(
        upstream: Upstream, tmp_path: Path, down_receiver: Receiver) -> None:
    port = free_port()
    config, log = tmp_path / "metergate.yaml", tmp_path / "metergate.log"
    config.write_text(yaml.safe_dump({
        "port": port, "database_url": f"sqlite:///{tmp_path / 'metergate.db'}",
        "routes": [{"prefix": "/openai", "upstream": upstream.url, "api_key": "sk-upstream-" + "k" * 20}],
        "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": "s" * 40},
        "notify_url": down_receiver.url, "auto_topup_interval_s": 0.1,
        "webhooks": {**FAST, "lease_s": 2, "timeout_s": 1}}))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    first = await _serve(config, log)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=admin, timeout=30) as client:
        try:
            await _ready(client, first, log)
            for customer in CUSTOMERS:
                assert (await client.post("/admin/v1/customers", json={"id": customer})).status_code == 201
                r = await client.post(f"/admin/v1/customers/{customer}/credits",
                                      json={"amount": 1_000_000, "idempotency_key": f"seed-{customer}"})
                assert r.status_code == 201, r.text
                r = await client.put(f"/admin/v1/customers/{customer}/auto-top-up",
                                     json={"threshold": 5_000_000, "amount": 20_000_000})
                assert r.status_code == 200, r.text

            async def tried() -> bool:
                rows = await _webhooks(client)
                return len(rows) == len(CUSTOMERS) and all(row["attempts"] >= 2 for row in rows)

            await eventually(tried, what="every notification recorded and retried")
            for customer in CUSTOMERS:  # so that the next process has nothing new to say
                assert (await client.delete(f"/admin/v1/customers/{customer}/auto-top-up")).status_code == 200
            recorded = await _webhooks(client)
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        assert {row["type"] for row in recorded} == {"balance.low"}
        assert {row["customer_id"] for row in recorded} == set(CUSTOMERS)
        assert all(row["status"] == "pending" and row["last_error"] for row in recorded)

        await down_receiver.start()
        second = await _serve(config, log)
        try:
            await _ready(client, second, log)

            async def delivered() -> bool:
                return len(await _webhooks(client, status="delivered")) == len(CUSTOMERS)

            await eventually(delivered, what="every notification delivered after the restart")
            assert await _webhooks(client) == await _webhooks(client, status="delivered")
        finally:
            second.send_signal(signal.SIGTERM)
            assert await second.wait() == 0, _text(log)
    ids = {row["id"] for row in recorded}
    assert sorted(down_receiver.ids()) == sorted(ids)  # each delivered once, none lost, none made up
    assert set(down_receiver.processed) == ids  # and each verified with the standardwebhooks package
    assert {event["customer_id"] for event in down_receiver.processed.values()} == set(CUSTOMERS)
