"""Check that a client hanging up mid-stream still yields exactly one settlement billed from the provider's
usage (metergate keeps draining the upstream), no open hold and a consistent ledger; a raw aiohttp client
reads N events of a slowed stream and then closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from metergate.metering.tokenizer import counter_for
from metergate.proxy.app import STORE, build_app
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import MESSAGES, expected_price

MODEL = "gpt-4o-mini"
WORDS = 12
# What the client sees: the role chunk, one chunk per word, the finish chunk (the injected usage chunk is
# dropped), then [DONE].
CLIENT_EVENTS = 1 + WORDS + 1


async def read_then_hang_up(gateway: Gateway, events: int, *, behavior: str = "chunk-delay:0.05") -> str:
    """Stream a chat completion, read ``events`` SSE events, close the connection; return the request id."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True}
    headers = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test",
               "X-Mock-Behavior": f"{behavior},words:{WORDS}"}
    seen: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{gateway.url}/openai/v1/chat/completions", json=body, headers=headers)
        assert response.status == 200
        request_id = response.headers["X-Metergate-Request-Id"]
        async for line in response.content:
            if line.startswith(b"data: "):
                seen.append(line)
                if len(seen) == events:
                    break
        assert len(seen) == events
        assert b"[DONE]" not in seen[-1]
        response.close()  # drops the connection, not just the response
    return request_id


async def settled_records(gateway: Gateway, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Poll until a usage record exists and no hold is pending; bounded, never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        records = await gateway.usage()
        if records and (await gateway.balance())["pending"] == 0:
            return records
        if loop.time() > deadline:
            pytest.fail(f"not settled within {timeout_s}s: records={records}")
        await asyncio.sleep(0.02)


async def upstream_usage(gateway: Gateway) -> tuple[int, int]:
    """The usage the mock reports for the same request, asked for directly (the mock is deterministic)."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway.upstream.url}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 60},
            headers={"X-Mock-Behavior": f"words:{WORDS}"}) as response:
        usage = (await response.json())["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


@pytest.mark.parametrize("ending", ["", "no-done,unterminated"], ids=["done", "usage-ends-the-stream-unterminated"])
@pytest.mark.parametrize("events", [1, CLIENT_EVENTS // 2, CLIENT_EVENTS],
                         ids=["first-chunk", "middle-chunk", "last-chunk"])
async def test_disconnect_bills_provider_usage_once(gateway: Gateway, events: int, ending: str) -> None:
    await gateway.customer("acme", funds=1_000_000)
    request_id = await read_then_hang_up(gateway, events, behavior=f"chunk-delay:0.05,{ending}")

    [record] = await settled_records(gateway)
    assert record["id"] == request_id
    assert record["usage_source"] == "provider"
    prompt, completion = await upstream_usage(gateway)
    assert (record["tokens_input"], record["tokens_output"]) == (prompt, completion)
    price = expected_price(MODEL, prompt, completion)
    assert record["charged_amount"] == price
    balance = await gateway.balance()
    assert (balance["available"], balance["pending"]) == (1_000_000 - price, 0)
    assert await gateway.store.audit() == []
    # Only the one metered request went upstream; the gateway did not retry or duplicate it.
    assert len([r for r in gateway.upstream.requests if r["body"].get("stream")]) == 1


async def test_disconnect_then_upstream_dies_bills_estimate_once(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    request_id = await read_then_hang_up(gateway, 2, behavior="chunk-delay:0.05,die-after:5")
    [record] = await settled_records(gateway)
    assert record["id"] == request_id
    assert record["usage_source"] == "estimated"
    assert record["tokens_output"] > 0
    assert record["charged_amount"] == expected_price(MODEL, record["tokens_input"], record["tokens_output"])
    assert (await gateway.balance())["pending"] == 0
    assert await gateway.store.audit() == []


async def test_a_quiet_upstream_is_drained_no_longer_than_drain_timeout(upstream: Upstream, tmp_path: Path) -> None:
    """After the client hangs up, the upstream pauses 30 s between events: metergate stops draining after
    drain_timeout_s (0.3 s here) and bills the estimate, instead of waiting out the whole stream."""
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'quiet.db'}", drain_timeout_s=0.3)
    try:
        await gateway.customer("acme", funds=1_000_000)
        request_id = await read_then_hang_up(gateway, 1, behavior="chunk-delay:30")
        [record] = await settled_records(gateway, timeout_s=10)  # the stream itself would take 30 s x 28
        assert record["id"] == request_id and record["usage_source"] == "estimated"
        assert record["charged_amount"] == expected_price(MODEL, record["tokens_input"], record["tokens_output"])
        assert await gateway.store.audit() == []
    finally:
        await gateway.close()
        await runner.cleanup()


async def test_shutdown_mid_stream_bills_the_delivered_text(upstream: Upstream, tmp_path: Path) -> None:
    """A graceful shutdown cuts a stream that outlives the drain deadline; what was delivered is billed."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'shutdown.db'}"
    # conftest's runner waits 2 s for handlers at shutdown; borrow its settings (and port), and serve the
    # same gateway again on a runner whose grace period is short, as `metergate` does with drain_timeout_s.
    gateway, runner = await start_gateway(upstream, database_url, drain_deadline_s=0.2)
    await gateway.close()
    await runner.cleanup()
    app = build_app(gateway.settings, public_url=gateway.url)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gateway.settings.port).start()
    store = app[STORE]
    await store.create_customer("test", "acme", "Acme")
    await store.credit("test", "acme", "USD", 1_000_000, idempotency_key="seed")

    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True}
    headers = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test",
               "X-Mock-Behavior": "chunk-delay:0.1,words:40"}
    text: list[str] = []
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{gateway.url}/openai/v1/chat/completions", json=body, headers=headers)
        request_id = response.headers["X-Metergate-Request-Id"]
        shutdown: asyncio.Task[None] | None = None
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for line in response.content:
                if line.startswith(b"data: {") and b'"choices"' in line:  # not the shutting_down error event
                    choices = json.loads(line[6:])["choices"]
                    text.append(choices[0]["delta"].get("content") or "")
                    if len(text) == 4 and shutdown is None:
                        shutdown = asyncio.create_task(runner.cleanup())
        assert shutdown is not None
        await shutdown
    delivered = "".join(text)
    assert 3 <= len(delivered.split()) < 40  # cut short by the shutdown

    reopened = SqlWalletStore(database_url)
    await reopened.open()
    try:
        [(_, record)] = await reopened.usage("test", "acme", limit=10)
        balance = await reopened.balance("test", "acme", "USD")
        assert await reopened.audit() == []
    finally:
        await reopened.close()
    assert record.id == request_id
    assert record.usage_source == "estimated"
    assert record.tokens_output == counter_for(MODEL).count(delivered) > 0
    assert record.charged_amount == expected_price(MODEL, record.tokens_input, record.tokens_output)
    assert (balance.available, balance.debits_pending) == (1_000_000 - record.charged_amount, 0)
