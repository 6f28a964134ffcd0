"""Mid-stream enforcement: a stream that outruns its wallet is stopped at the right token count, ends in a
way the official SDKs accept, and is billed exactly what was delivered.

The mock upstream streams one word per event and caps nothing unless the request sets ``max_tokens``;
the gateway assumes 8 output tokens for a request without a maximum and grows holds 4 tokens at a time.
Output costs 10 micro-dollars a token and prompts are free, so a wallet of 300 micro-dollars pays for
exactly 30 output tokens. Expected token counts come from tiktoken's own ``encoding_for_model``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from metergate.demo.mock_upstream import _WORDS
from metergate.metering.tokenizer import seed_cache
from tests.conftest import Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import ledger, record_by_id

MODEL = "gpt-4o-mini"
PER_TOKEN = 10  # micro-dollars per output token
PRICING = {"asset": "USD", "models": {MODEL: {"input_per_mtok": "0", "output_per_mtok": str(PER_TOKEN)}}}
FUNDS = 300


@pytest.fixture(scope="module")
def encoding() -> Iterator[tiktoken.Encoding]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(seed_cache()))
        yield tiktoken.encoding_for_model(MODEL)


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'mid.db'}", pricing=PRICING,
                                          initial_output_tokens=8, stream_extend_tokens=4)
    yield gateway
    await gateway.close()
    await runner.cleanup()


def words(n: int) -> list[str]:
    """The mock upstream's reply of ``n`` words, one per event."""
    return [_WORDS[i % len(_WORDS)] + " " for i in range(n)]


def affordable_prefix(encoding: tiktoken.Encoding, reply: list[str], budget_tokens: int) -> str:
    """The longest run of whole events whose text costs at most ``budget_tokens`` output tokens."""
    text = ""
    for word in reply:
        if len(encoding.encode(text + word)) > budget_tokens:
            break
        text += word
    return text


async def assert_settled_exactly(gw: Gateway, request_id: str, delivered_tokens: int) -> None:
    record = record_by_id(await gw.usage(), request_id)
    assert record["usage_source"] == "estimated"  # the provider's usage never came: the stream was stopped
    assert record["tokens_output"] == delivered_tokens
    assert record["charged_amount"] == delivered_tokens * PER_TOKEN
    assert record["written_off_amount"] == 0
    balance = await gw.balance()
    assert balance["pending"] == 0
    assert balance["available"] == FUNDS - delivered_tokens * PER_TOKEN
    assert balance["available"] < PER_TOKEN * 3  # stopped because the wallet was (all but) dry
    kinds = [entry["kind"] for entry in await ledger(gw) if entry.get("hold_id") == "hold_" + request_id[4:]]
    assert kinds.count("extend") >= 2 and kinds.count("capture") == 1
    assert await gw.store.audit() == []


async def test_chat_stream_outrunning_the_wallet_stops_at_the_right_token_and_is_billed_exactly(
        gw: Gateway, encoding: tiktoken.Encoding) -> None:
    await gw.customer(funds=FUNDS)
    reply = words(200)
    stream = await gw.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True,
        extra_headers={"X-Mock-Behavior": "words:200"})
    request_id = stream.headers["X-Metergate-Request-Id"]
    chunks = [chunk async for chunk in stream.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    expected = affordable_prefix(encoding, reply, FUNDS // PER_TOKEN)
    assert text == expected and 0 < len(expected) < len("".join(reply))
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra is not None
    notice: dict[str, Any] = last.model_extra["metergate"]
    assert notice["stop_reason"] == "insufficient_funds"
    assert notice["portal_url"].startswith(gw.url)
    tokens = len(encoding.encode(text))
    assert notice["charged"] == f"{tokens * PER_TOKEN / 1e6:.6f}"
    await assert_settled_exactly(gw, request_id, tokens)


async def test_a_client_that_asked_for_usage_gets_the_billed_usage_in_the_last_chunk(
        gw: Gateway, encoding: tiktoken.Encoding) -> None:
    await gw.customer(funds=FUNDS)
    stream = await gw.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Mock-Behavior": "words:120"})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == len(encoding.encode(text))
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_responses_stream_outrunning_the_wallet_ends_incomplete(
        gw: Gateway, encoding: tiktoken.Encoding) -> None:
    await gw.customer(funds=FUNDS)
    stream = await gw.openai().responses.with_raw_response.create(
        model=MODEL, input="talk", stream=True, extra_headers={"X-Mock-Behavior": "words:200"})
    request_id = stream.headers["X-Metergate-Request-Id"]
    events = [event async for event in stream.parse()]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == affordable_prefix(encoding, words(200), FUNDS // PER_TOKEN)
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.incomplete_details is not None
    assert final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.usage is not None and final.response.usage.output_tokens == len(encoding.encode(text))
    await assert_settled_exactly(gw, request_id, len(encoding.encode(text)))


async def test_a_funded_stream_past_its_first_hold_grows_the_hold_and_is_billed_from_the_provider(
        gw: Gateway, encoding: tiktoken.Encoding) -> None:
    await gw.customer(funds=1_000_000)
    stream = await gw.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True,
        extra_headers={"X-Mock-Behavior": "words:60"})
    request_id = stream.headers["X-Metergate-Request-Id"]
    chunks = [chunk async for chunk in stream.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(words(60))
    assert chunks[-1].choices[0].finish_reason == "stop"
    record = record_by_id(await gw.usage(), request_id)
    assert record["usage_source"] == "provider"
    assert record["charged_amount"] == record["tokens_output"] * PER_TOKEN == len(encoding.encode(text)) * PER_TOKEN
    assert record["written_off_amount"] == 0
    extends = [e for e in await ledger(gw) if e["kind"] == "extend" and e.get("hold_id") == "hold_" + request_id[4:]]
    assert extends, "the hold assumed 8 output tokens; 60 words need more"
    assert (await gw.balance())["pending"] == 0
    assert await gw.store.audit() == []


async def test_a_stream_with_its_own_limit_is_relayed_without_growing_its_hold(gw: Gateway) -> None:
    await gw.customer(funds=1_000_000)
    stream = await gw.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True, max_tokens=20,
        extra_headers={"X-Mock-Behavior": "words:200"})
    request_id = stream.headers["X-Metergate-Request-Id"]
    chunks = [chunk async for chunk in stream.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(words(20))
    hold_entries = [e["kind"] for e in await ledger(gw) if e.get("hold_id") == "hold_" + request_id[4:]]
    assert hold_entries == ["capture", "hold"]  # newest first: no extension; the upstream kept to max_tokens


async def test_with_enforcement_off_the_overrun_is_captured_as_far_as_the_wallet_covers(
        upstream: Upstream, tmp_path: Path, encoding: tiktoken.Encoding) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'off.db'}", pricing=PRICING,
                                     default_max_output_tokens=8, stream_extend_tokens=0)
    try:
        await gw.customer(funds=FUNDS)
        stream = await gw.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "talk"}], stream=True,
            extra_headers={"X-Mock-Behavior": "words:200"})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "".join(words(200))  # nothing stopped it
        [record] = await gw.usage()
        owed = len(encoding.encode(text)) * PER_TOKEN
        assert record["charged_amount"] == FUNDS and record["written_off_amount"] == owed - FUNDS
        assert (await gw.balance())["available"] == 0
    finally:
        await gw.close()
        await runner.cleanup()
