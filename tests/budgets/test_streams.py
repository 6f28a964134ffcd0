"""A stream that outruns its node's spend limit stops like one that outruns its wallet: each hold extension is
spending too, so the node's limit applies to every step, and the stream is billed what was delivered.

Method: the mid-stream gateway of tests/proxy/test_midstream.py (output at 10 micro-dollars a token, prompts
free, holds grown 4 tokens at a time) with a wallet far larger than the node's daily spend limit of 300.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Gateway, Upstream, start_gateway
from tests.proxy.test_midstream import MODEL, PER_TOKEN, PRICING
from tests.proxy.test_openai_sdk import record_by_id

LIMIT = 300


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'mid.db'}", pricing=PRICING,
                                          initial_output_tokens=8, stream_extend_tokens=4)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def test_a_stream_past_its_nodes_spend_limit_is_stopped_and_billed_what_was_delivered(gw: Gateway) -> None:
    await gw.customer(funds=1_000_000)
    r = await gw.admin.post("/customers/acme/budget-nodes", json={"id": "p", "kind": "project"})
    assert r.status_code == 201
    r = await gw.admin.post("/customers/acme/budget-nodes/p/limits", json={
        "id": "p-spend", "dimension": "spend", "amount": LIMIT, "window": {"kind": "day"}})
    assert r.status_code == 201
    client = gw.openai(headers={"X-Metergate-Budget-Node": "p"})
    stream = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True,
        extra_headers={"X-Mock-Behavior": "words:200"})
    request_id = stream.headers["X-Metergate-Request-Id"]
    chunks = [chunk async for chunk in stream.parse()]
    assert chunks[-1].choices[0].finish_reason == "length"  # stopped, as the SDK understands it
    assert chunks[-1].model_extra is not None
    notice = chunks[-1].model_extra["metergate"]
    assert (notice["stop_reason"], notice["node"], notice["limit"]["id"]) == ("budget_exceeded", "p", "p-spend")
    assert "portal_url" not in notice
    record = record_by_id(await gw.usage(), request_id)
    charged = record["charged_amount"]
    assert LIMIT - 4 * PER_TOKEN < charged <= LIMIT  # within one extension of the limit, never past it
    assert charged == record["tokens_output"] * PER_TOKEN and record["written_off_amount"] == 0
    assert record["budget_path"] == "root/p"
    with pytest.raises(openai.RateLimitError) as refused:  # what is left cannot cover a first hold
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "more"}],
                                             stream=True, extra_headers={"X-Mock-Behavior": "words:5"})
    body = refused.value.body
    assert isinstance(body, dict) and body["limit"]["id"] == "p-spend" and charged <= body["used"] <= LIMIT
    balance = await gw.balance()
    assert balance["pending"] == 0 and balance["available"] == 1_000_000 - charged
    assert await gw.store.audit() == []
