"""Drafts created under an idempotency key, and the simulation of a rule set that is not stored — the two
server halves of ``metergate prices push`` and ``prices diff``.

Method: the admin API of an in-process gateway on SQLite and PostgreSQL. Concurrent creates with one key must
store one draft (the key's primary key and the draft are one transaction); the unstored simulation must answer
what the simulation of the same rules stored as a draft answers, and store nothing. Usage comes from a real
request through the official ``openai`` SDK against the mock upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import LIVE_ADMIN_KEY, Gateway, Upstream, _reset_pg, start_gateway
from tests.pricing.test_versions import NEW_MINI
from tests.proxy.test_openai_sdk import MESSAGES

OTHER = {**NEW_MINI, "rates": {"input_tokens": "8", "output_tokens": "12"}}


@pytest.fixture
async def shared_gateway(upstream: Upstream, store_url: str) -> AsyncIterator[Gateway]:
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    gw, runner = await start_gateway(upstream, store_url)
    yield gw
    await gw.close()
    await runner.cleanup()


async def stored(gateway: Gateway) -> list[str]:
    r = await gateway.admin.get("/price-versions", params={"limit": 200})
    assert r.status_code == 200, r.text
    return [v["id"] for v in r.json()["data"]]


async def test_concurrent_creates_with_one_key_store_one_draft(shared_gateway: Gateway) -> None:
    gateway = shared_gateway
    body = {"rules": [NEW_MINI], "note": "push"}
    answers = await asyncio.gather(*(gateway.admin.post("/price-versions", json=body,
                                                        headers={"Idempotency-Key": "push-1"}) for _ in range(8)))
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in answers}) == 1
    assert await stored(gateway) == [answers[0].json()["id"]]

    # The key in the body works as the header does; the key with other rules is a conflict, storing nothing.
    again = await gateway.admin.post("/price-versions", json={**body, "idempotency_key": "push-1"})
    assert (again.status_code, again.json()["id"]) == (200, answers[0].json()["id"])
    conflict = await gateway.admin.post("/price-versions", json={"rules": [OTHER]},
                                        headers={"Idempotency-Key": "push-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    # A published draft is answered as it is now: published (the caller then publishes nothing).
    version_id = answers[0].json()["id"]
    assert (await gateway.admin.post(f"/price-versions/{version_id}/publish", json={})).status_code == 200
    replay = await gateway.admin.post("/price-versions", json=body, headers={"Idempotency-Key": "push-1"})
    assert (replay.status_code, replay.json()["state"]) == (200, "published")
    # Keys are per mode, and a key is bounded.
    async with httpx.AsyncClient(base_url=gateway.admin.base_url,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        other_mode = await live.post("/price-versions", json=body, headers={"Idempotency-Key": "push-1"})
    assert other_mode.status_code == 201 and other_mode.json()["id"] != version_id
    assert other_mode.json()["mode"] == "live"
    too_long = await gateway.admin.post("/price-versions", json=body, headers={"Idempotency-Key": "k" * 129})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "idempotency_key"
    assert await stored(gateway) == [version_id]


async def test_an_unstored_rule_set_simulates_as_the_same_draft_would(shared_gateway: Gateway) -> None:
    gateway = shared_gateway
    await gateway.customer("acme", funds=10_000_000)
    await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    now = int(time.time() * 1000)
    window = {"from": now - 3_600_000, "to": now + 60_000}
    inline = await gateway.admin.post("/price-versions/simulate", json={"rules": [NEW_MINI], **window})
    assert inline.status_code == 200, inline.text
    assert await stored(gateway) == []  # nothing was written
    draft = await gateway.admin.post("/price-versions", json={"rules": [NEW_MINI]})
    by_id = await gateway.admin.post(f"/price-versions/{draft.json()['id']}/simulate", json=window)
    report: dict[str, Any] = inline.json()
    assert report["version"] == "draft"
    assert {k: v for k, v in report.items() if k != "version"} == \
        {k: v for k, v in by_id.json().items() if k != "version"}
    [acme] = report["customers"]
    assert acme["customer_id"] == "acme" and acme["records"] == 1 and acme["new_total"] != acme["old_total"]

    # Refused as a draft is: the rule path, nothing stored.
    bad = await gateway.admin.post("/price-versions/simulate", json={
        "rules": [{**NEW_MINI, "rates": {"output_tokens": "-1"}}], **window})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "rules[0].rates.output_tokens"
    missing = await gateway.admin.post("/price-versions/simulate", json={"rules": [NEW_MINI], "from": now})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "to"
    assert len(await stored(gateway)) == 1
