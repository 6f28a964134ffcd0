"""Anthropic Messages and the OpenAI Responses API through metergate, with the providers' own SDKs.

Method: a gateway with an Anthropic route and an OpenAI route in front of the mock upstream (which speaks
both wire formats); each request is checked against the provider's reported usage, priced by hand from
the rates below in Decimal with half-up rounding, cache tokens included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.conftest import DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, start_gateway

CLAUDE = {"input_per_mtok": "3.00", "cached_input_per_mtok": "0.30", "cache_write_per_mtok": "3.75",
          "output_per_mtok": "15.00"}
PRICING = {"asset": "USD", "models": {**DEFAULT_PRICING["models"], "claude-sonnet-4-6": CLAUDE}}  # type: ignore[dict-item]


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'p.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
        {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
         "provider_id": "anthropic"}])
    await gateway.customer("acme", funds=10_000_000)
    yield gateway
    await gateway.close()
    await runner.cleanup()


def claude(gw: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key="sk-ant-app-never-holds-it",
                                    default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"},
                                    max_retries=0)


def price(rates: dict[str, str], *, uncached: int, read: int = 0, write: int = 0, output: int) -> int:
    exact = (uncached * Decimal(rates["input_per_mtok"]) + read * Decimal(rates.get("cached_input_per_mtok", "0"))
             + write * Decimal(rates.get("cache_write_per_mtok", "0"))
             + output * Decimal(rates["output_per_mtok"]))
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))  # per Mtok in micro-dollars = per token


async def only_record(gw: Gateway) -> dict[str, Any]:
    [record] = await gw.usage()
    balance = await gw.balance()
    assert balance["pending"] == 0
    assert balance["available"] == 10_000_000 - record["charged_amount"]
    assert await gw.store.audit() == []
    return record


# --- Anthropic

async def test_anthropic_message_is_billed_with_cache_tokens_priced_on_their_own(gw: Gateway) -> None:
    client = claude(gw)
    message = await client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "Hello there, Claude"}],
        extra_headers={"X-Mock-Behavior": "cached:4,cache-write:3"})
    await client.close()
    u = message.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (4, 3)
    record = await only_record(gw)
    assert record["tokens_input"] == u.input_tokens + 4 + 3
    assert (record["tokens_cached_input"], record["tokens_cache_write"]) == (4, 3)
    assert record["tokens_output"] == u.output_tokens
    assert record["charged_amount"] == price(CLAUDE, uncached=u.input_tokens, read=4, write=3,
                                             output=u.output_tokens)
    assert record["detail"]["tokens_exact"] is False  # tiktoken only approximates Claude's tokenizer
    sent = gw.upstream.requests[-1]["headers"]
    assert sent["x-api-key"] == PROVIDER_KEY if "x-api-key" in sent else sent["X-Api-Key"] == PROVIDER_KEY


async def test_anthropic_stream_takes_the_last_cumulative_message_delta(gw: Gateway) -> None:
    client = claude(gw)
    text = []
    async with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                      messages=[{"role": "user", "content": "Stream, please"}],
                                      extra_headers={"X-Mock-Behavior": "words:10,cached:2"}) as stream:
        async for chunk in stream.text_stream:
            text.append(chunk)
        final = await stream.get_final_message()
    await client.close()
    assert "".join(text)
    record = await only_record(gw)
    # The mock sends an intermediate message_delta; summing instead of taking the last would overcount.
    assert record["tokens_output"] == final.usage.output_tokens
    assert record["usage_source"] == "provider"
    assert record["charged_amount"] == price(CLAUDE, uncached=final.usage.input_tokens, read=2,
                                             output=final.usage.output_tokens)


async def test_anthropic_stream_cut_before_message_delta_bills_message_start_input_and_delivered_text(
        gw: Gateway) -> None:
    client = claude(gw)
    received: list[str] = []
    # metergate ends a stream whose upstream died with an error event, which the SDK raises: the client
    # knows its answer is incomplete.
    with pytest.raises(anthropic.APIStatusError) as broken:
        async with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                          messages=[{"role": "user", "content": "hi"}],
                                          extra_headers={"X-Mock-Behavior": "words:8,die-after:6,cached:1"}
                                          ) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    await client.close()
    assert broken.value.body["error"]["code"] == "upstream_stream_broken"  # type: ignore[index]
    assert received  # some text was delivered before the upstream died
    record = await only_record(gw)
    assert record["usage_source"] == "estimated"
    assert record["tokens_cached_input"] == 1  # message_start's input counts are kept
    assert record["tokens_output"] >= len(received)


async def test_anthropic_upstream_error_is_relayed_and_free(gw: Gateway) -> None:
    client = claude(gw)
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                     messages=[{"role": "user", "content": "x"}],
                                     extra_headers={"X-Mock-Behavior": "error:500"})
    await client.close()
    record = await only_record(gw)
    assert record["charged_amount"] == 0


# --- OpenAI Responses

async def test_responses_api_is_billed_from_the_response_usage(gw: Gateway) -> None:
    client = gw.openai()
    response = await client.responses.create(model="gpt-4o-mini", input="Say something nice",
                                             extra_headers={"X-Mock-Behavior": "cached:2,reasoning:1"})
    u = response.usage
    assert u is not None
    record = await only_record(gw)
    assert (record["tokens_input"], record["tokens_output"]) == (u.input_tokens, u.output_tokens)
    assert (record["tokens_cached_input"], record["tokens_reasoning"]) == (2, 1)
    rates = DEFAULT_PRICING["models"]["gpt-4o-mini"]  # type: ignore[index]
    assert record["charged_amount"] == price(rates, uncached=u.input_tokens - 2, read=2, output=u.output_tokens)


async def test_responses_stream_is_billed_and_settled_before_the_terminal_event(gw: Gateway) -> None:
    client = gw.openai()
    stream = await client.responses.create(model="gpt-4o-mini", input="stream it", stream=True,
                                           extra_headers={"X-Mock-Behavior": "words:8"})
    completed = None
    async for event in stream:
        if event.type == "response.completed":
            completed = event.response
            balance = await gw.balance()
            assert balance["pending"] == 0  # settled before the client saw the terminal event
    assert completed is not None and completed.usage is not None
    record = await only_record(gw)
    assert record["usage_source"] == "provider"
    assert record["tokens_output"] == completed.usage.output_tokens


async def test_failed_response_is_not_charged(gw: Gateway) -> None:
    client = gw.openai()
    response = await client.responses.create(model="gpt-4o", input="fail please",
                                             extra_headers={"X-Mock-Behavior": "failed"})
    assert response.status == "failed"
    record = await only_record(gw)
    assert record["charged_amount"] == 0  # not even gpt-4o's request fee


async def test_client_cannot_choose_the_operators_openai_organization_or_project(upstream: Upstream,
                                                                                 tmp_path: Path) -> None:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'org.db'}", routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY,
         "upstream_headers": {"OpenAI-Organization": "org-operator"}}])
    try:
        await gateway.customer("acme")
        client = gateway.openai(organization="org-attacker", project="proj-attacker")
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        sent = {k.lower(): v for k, v in upstream.requests[-1]["headers"].items()}
        assert sent["openai-organization"] == "org-operator"
        assert "openai-project" not in sent
    finally:
        await gateway.close()
        await runner.cleanup()
