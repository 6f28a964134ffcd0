"""Check that streamed (SSE) chat completions are billed from the provider's usage when it exists and from
the delivered text otherwise, while the client sees exactly the stream it asked for; driven through the
official ``openai`` SDK (and a raw HTTP client where the exact moment ``[DONE]`` arrives matters).

Expected output-token counts are computed here with tiktoken's own ``encoding_for_model``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken
from openai.types.chat import ChatCompletionChunk

from metergate.metering.tokenizer import seed_cache
from metergate.proxy.adapters import openai as oa
from metergate.proxy.adapters.base import Prepared
from tests.conftest import Gateway
from tests.proxy.test_openai_sdk import MESSAGES, expected_price, record_by_id

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def encoding() -> Iterator[tiktoken.Encoding]:
    """tiktoken for MODEL, read from the bundled encodings (tests never download)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(seed_cache()))
        yield tiktoken.encoding_for_model(MODEL)


async def collect(stream: openai.AsyncStream[ChatCompletionChunk]) -> tuple[list[ChatCompletionChunk], str]:
    chunks: list[ChatCompletionChunk] = []
    async for chunk in stream:
        chunks.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


async def stream_chat(gateway: Gateway, behavior: str = "",
                      **kwargs: Any) -> tuple[str, list[ChatCompletionChunk], str]:
    """Stream one chat completion; return metergate's request id, the chunks the client saw, their text."""
    extra = {"X-Mock-Behavior": behavior} if behavior else {}
    raw = await gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, stream=True, extra_headers=extra, **kwargs)
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    chunks, text = await collect(raw.parse())
    return raw.headers["X-Metergate-Request-Id"], chunks, text


async def assert_settled(gateway: Gateway, funds: int, charged: int) -> None:
    balance = await gateway.balance()
    assert (balance["available"], balance["pending"]) == (funds - charged, 0)
    assert await gateway.store.audit() == []


async def test_usage_chunk_hidden_from_client_that_did_not_ask_but_billed(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    hidden_id, hidden_chunks, hidden_text = await stream_chat(gateway)
    shown_id, shown_chunks, shown_text = await stream_chat(gateway, stream_options={"include_usage": True})

    # The client that did not ask sees content only; the one that asked sees the usage-only chunk last.
    assert hidden_text and hidden_text == shown_text
    assert all(c.choices for c in hidden_chunks)
    assert all(c.usage is None for c in hidden_chunks)
    usage_chunks = [c for c in shown_chunks if not c.choices]
    assert len(usage_chunks) == 1 and usage_chunks[0] is shown_chunks[-1]
    usage = usage_chunks[0].usage
    assert usage is not None and usage.completion_tokens > 0

    # Both asked the upstream for usage, and both were billed from it (the mock is deterministic).
    assert [r["body"]["stream_options"] for r in gateway.upstream.requests] == [{"include_usage": True}] * 2
    price = expected_price(MODEL, usage.prompt_tokens, usage.completion_tokens)
    records = await gateway.usage()
    for request_id in (hidden_id, shown_id):
        record = record_by_id(records, request_id)
        assert record["usage_source"] == "provider" and record["stream"] is True
        assert (record["tokens_input"], record["tokens_output"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert record["charged_amount"] == price
    await assert_settled(gateway, 1_000_000, 2 * price)


async def test_include_usage_false_is_treated_as_not_asking(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    _, chunks, _ = await stream_chat(gateway, stream_options={"include_usage": False})
    assert all(c.choices for c in chunks)
    assert gateway.upstream.requests[0]["body"]["stream_options"] == {"include_usage": True}
    [record] = await gateway.usage()
    assert record["usage_source"] == "provider"


async def test_no_usage_from_upstream_is_estimated_from_delivered_text(
        gateway: Gateway, encoding: tiktoken.Encoding) -> None:
    await gateway.customer("acme", funds=1_000_000)
    request_id, chunks, text = await stream_chat(gateway, "no-usage,words:20")
    assert len(text.split()) == 20
    assert all(c.choices for c in chunks)
    record = record_by_id(await gateway.usage(), request_id)
    assert record["usage_source"] == "estimated"
    assert record["tokens_output"] == len(encoding.encode_ordinary(text))
    assert record["tokens_input"] > 0
    price = expected_price(MODEL, record["tokens_input"], record["tokens_output"])
    assert record["charged_amount"] == price > 0
    await assert_settled(gateway, 1_000_000, price)


async def test_provider_explicit_zero_usage_is_kept(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    request_id, _, text = await stream_chat(gateway, "usage-zero")
    assert text
    record = record_by_id(await gateway.usage(), request_id)
    assert record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_output"]) == (0, 0)
    assert record["charged_amount"] == 0
    await assert_settled(gateway, 1_000_000, 0)


async def test_upstream_dying_mid_stream_bills_delivered_tokens(
        gateway: Gateway, encoding: tiktoken.Encoding) -> None:
    await gateway.customer("acme", funds=1_000_000)
    raw = await gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, stream=True, extra_headers={"X-Mock-Behavior": "die-after:3"})
    request_id, chunks = raw.headers["X-Metergate-Request-Id"], []
    with pytest.raises(openai.APIError) as broken:  # the stream ends with an error event: the SDK raises it
        async for chunk in raw.parse():
            chunks.append(chunk)
    assert "broke off" in broken.value.message
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The role chunk and three content chunks got through; no finish chunk, no usage.
    assert len(text.split()) == 3
    assert all(c.choices[0].finish_reason is None for c in chunks)
    record = record_by_id(await gateway.usage(), request_id)
    assert record["usage_source"] == "estimated"
    assert record["tokens_output"] == len(encoding.encode_ordinary(text)) > 0
    price = expected_price(MODEL, record["tokens_input"], record["tokens_output"])
    assert record["charged_amount"] == price
    await assert_settled(gateway, 1_000_000, price)


async def test_usage_in_an_unterminated_last_event_is_delivered_and_billed(gateway: Gateway) -> None:
    """An upstream that ends without [DONE] and without the blank line after its usage chunk."""
    await gateway.customer("acme", funds=1_000_000)
    request_id, chunks, _ = await stream_chat(gateway, "no-done,unterminated",
                                              stream_options={"include_usage": True})
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    record = record_by_id(await gateway.usage(), request_id)
    assert record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_output"]) == (usage.prompt_tokens, usage.completion_tokens)


async def test_stream_request_answered_with_json_is_relayed_and_billed(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway.url}/openai/v1/chat/completions", json=body,
            headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test",
                     "X-Mock-Behavior": "not-stream"}) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        payload = await response.json()
        request_id = response.headers["X-Metergate-Request-Id"]
    record = record_by_id(await gateway.usage(), request_id)
    assert record["usage_source"] == "provider"
    assert record["tokens_output"] == payload["usage"]["completion_tokens"]
    assert record["charged_amount"] == expected_price(MODEL, payload["usage"]["prompt_tokens"],
                                                      payload["usage"]["completion_tokens"])


@pytest.mark.parametrize("ending", ["", "unterminated"], ids=["done", "done-without-blank-line"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_ledger_settled_when_client_sees_done(gateway: Gateway, include_usage: bool, ending: str) -> None:
    await gateway.customer("acme", funds=1_000_000)
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    events: list[bytes] = []
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway.url}/openai/v1/chat/completions", json=body,
            headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test",
                     "X-Mock-Behavior": f"chunk-delay:0.01,{ending}"}) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if events[-1] == b"[DONE]":
                    # Ask the ledger before reading another byte of the response.
                    balance = await gateway.balance()
                    records = await gateway.usage()
                    break
        else:
            pytest.fail("the stream ended without [DONE]")
    assert balance["pending"] == 0
    [record] = records
    assert record["usage_source"] == "provider" and record["charged_amount"] > 0
    assert balance["available"] == 1_000_000 - record["charged_amount"]
    chunks = [json.loads(e) for e in events[:-1]]
    assert any(c["choices"] == [] for c in chunks) is include_usage


def test_pathologically_nested_upstream_json_is_opaque_not_an_error() -> None:
    """Upstream JSON nested deeper than the parser's stack is relayed untouched and read as carrying no usage."""
    deep = b"[" * 100_000
    prepared = Prepared(oa.CHAT, MODEL, False, 0, 0, True, b"")
    assert oa.usage_from_body(prepared, deep) == (None, "")
    assert prepared.anomalies == []
    meter = oa.OpenAIStreamMeter(max_text_chars=1000, injected_usage=True)
    assert meter.on_event(deep) == "forward"
    assert meter.usage is None and meter.content_events == 0
