"""Usage an upstream reports is believed only within bounds: an absurd or malformed count (2^63, 10^30,
negative, a string, a float, missing, a subset larger than its total) is an anomaly. The request is billed
from metergate's estimate, exactly; the usage record says why; a metric counts it and a warning names it.
A response that does not match its request (a whole answer that is an event stream) is metered as what it is.

Method: the mock upstreams misreport one usage field on request (``usage-field:PATH=JSON``) or stream an
answer the request did not ask to stream (``force-stream``). Each misreported request is paired with a control
request the upstream answers without any usage (``no-usage``), which metergate bills from the same estimate:
the two must be billed the same, token for token and to the smallest unit, priced here by hand. The ledger
must show exactly the charges and no open hold.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import tiktoken

from metergate.metering.tokenizer import seed_cache
from tests.conftest import DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, start_gateway
from tests.observability.test_metrics import scrape, value

CLAUDE = {"input_per_mtok": "3.00", "cached_input_per_mtok": "0.30", "output_per_mtok": "15.00"}
RATES: dict[str, dict[str, str]] = {**DEFAULT_PRICING["models"], "claude-sonnet-4-6": CLAUDE}  # type: ignore[dict-item]
PRICING = {"asset": "USD", "models": RATES}
FUNDS = 10_000_000
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
USER = [{"role": "user", "content": "Tell me about prepaid metering."}]
CHAT = ("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER, "max_tokens": 40})
COMPLETIONS = ("/openai/v1/completions", {"model": "gpt-4o-mini", "prompt": "Once upon", "max_tokens": 40})
EMBEDDINGS = ("/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello " * 50})
RESPONSES = ("/openai/v1/responses", {"model": "gpt-4o-mini", "input": "Tell me", "max_output_tokens": 40})
MESSAGES = ("/anthropic/v1/messages", {"model": "claude-sonnet-4-6", "messages": USER, "max_tokens": 40})


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'u.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
        {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
         "provider_id": "anthropic"}])
    await gateway.customer("acme", funds=FUNDS)
    yield gateway
    await gateway.close()
    await runner.cleanup()


def price(model: str, record: dict[str, Any]) -> int:
    """The record's tokens priced by hand in micro-dollars (USD scale 6), half-up."""
    rate = RATES[model]
    cached = record["tokens_cached_input"]
    micros = ((record["tokens_input"] - cached) * Decimal(rate.get("input_per_mtok", "0"))
              + cached * Decimal(rate.get("cached_input_per_mtok", rate.get("input_per_mtok", "0")))
              + record["tokens_output"] * Decimal(rate.get("output_per_mtok", "0"))
              + Decimal(rate.get("request_fee", "0")) * 1_000_000)
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def send(gw: Gateway, endpoint: tuple[str, dict[str, Any]], behavior: str,
               **changes: Any) -> tuple[httpx.Response, dict[str, Any]]:
    """One request through the gateway; the answer and its usage record."""
    path, body = endpoint
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.post(path, json={**body, **changes}, headers={**AS_ACME, "X-Mock-Behavior": behavior})
    assert r.status_code == 200, r.text
    [record] = [u for u in await gw.usage() if u["id"] == r.headers["X-Metergate-Request-Id"]]
    return r, record


async def assert_ledger_is_exactly(gw: Gateway, *records: dict[str, Any]) -> None:
    balance = await gw.balance()
    assert balance["pending"] == 0
    assert balance["available"] == FUNDS - sum(r["charged_amount"] for r in records)
    assert await gw.store.audit() == []


def billed(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record["usage_source"], record["tokens_input"], record["tokens_cached_input"],
            record["tokens_output"], record["tokens_reasoning"], record["charged_amount"])


def text_of(r: httpx.Response) -> str:
    """The generated text of a whole answer (chat, completions, Responses or Anthropic)."""
    payload = r.json()
    if "choices" in payload:
        return "".join(c.get("message", {}).get("content") or c.get("text", "") for c in payload["choices"])
    if payload.get("object") == "response":
        return "".join(p["text"] for item in payload["output"] for p in item["content"])
    return "".join(block["text"] for block in payload["content"])


def o200k() -> tiktoken.Encoding:
    seed_cache()
    return tiktoken.get_encoding("o200k_base")


ABSURD = {
    # --- counts no model produces, or that overflow int64 downstream
    "chat-completion-2-pow-63": (CHAT, "completion_tokens=9223372036854775808", "completion_tokens"),
    "chat-completion-10-pow-30": (CHAT, "completion_tokens=1000000000000000000000000000000", "completion_tokens"),
    "chat-prompt-2-pow-63": (CHAT, "prompt_tokens=9223372036854775808", "prompt_tokens"),
    "messages-output-10-pow-30": (MESSAGES, "output_tokens=1000000000000000000000000000000", "output_tokens"),
    "responses-output-2-pow-63": (RESPONSES, "output_tokens=9223372036854775808", "output_tokens"),
    "embeddings-prompt-2-pow-64": (EMBEDDINGS, "prompt_tokens=18446744073709551616", "prompt_tokens"),
    # --- negative counts
    "chat-prompt-negative": (CHAT, "prompt_tokens=-5", "prompt_tokens"),
    "messages-cache-read-negative": (MESSAGES, "cache_read_input_tokens=-1", "cache_read_input_tokens"),
    # --- not integers: strings, floats, booleans, null where a count is required
    "chat-completion-string": (CHAT, 'completion_tokens="12"', "completion_tokens"),
    "chat-completion-float": (CHAT, "completion_tokens=1e30", "completion_tokens"),
    "completions-completion-boolean": (COMPLETIONS, "completion_tokens=true", "completion_tokens"),
    "chat-completion-null": (CHAT, "completion_tokens=null", "completion_tokens"),
    "responses-input-string": (RESPONSES, 'input_tokens="7"', "input_tokens"),
    "messages-output-null": (MESSAGES, "output_tokens=null", "output_tokens"),
    # --- structure: a subset larger than its total, details that are not objects
    "chat-cached-exceeds-prompt": (CHAT, "prompt_tokens_details.cached_tokens=100000", "cached_tokens"),
    "responses-reasoning-exceeds-output": (RESPONSES, "output_tokens_details.reasoning_tokens=100000",
                                           "reasoning_tokens"),
    "chat-details-a-list": (CHAT, "completion_tokens_details=[1]", "completion_tokens_details"),
}


@pytest.mark.parametrize(("endpoint", "misreport", "field"), list(ABSURD.values()), ids=list(ABSURD))
async def test_absurd_usage_in_a_whole_answer_is_an_anomaly_billed_from_the_estimate(
        gw: Gateway, caplog: pytest.LogCaptureFixture, endpoint: tuple[str, dict[str, Any]], misreport: str,
        field: str) -> None:
    caplog.set_level(logging.WARNING, logger="metergate")
    control_answer, control = await send(gw, endpoint, "no-usage")
    answer, record = await send(gw, endpoint, f"usage-field:{misreport}")

    assert answer.headers["X-Metergate-Usage-Source"] == "estimated"
    if endpoint is not EMBEDDINGS:
        assert text_of(answer) == text_of(control_answer)  # the same answer, only its usage misreported
    assert billed(record) == billed(control)
    assert record["usage_source"] == "estimated" and record["status_code"] == 200
    model = endpoint[1]["model"]
    assert record["charged_amount"] == price(model, record)
    if endpoint is not EMBEDDINGS:
        assert record["charged_amount"] > 0
        if model.startswith("gpt"):  # the estimate counts the text delivered (o200k for gpt-4o models)
            assert record["tokens_output"] == len(o200k().encode(text_of(answer)))
    [anomaly] = record["detail"]["usage_anomalies"]
    assert field in anomaly and len(anomaly) <= 200
    assert "usage_anomalies" not in control["detail"]
    await assert_ledger_is_exactly(gw, control, record)
    samples = await scrape(gw)
    assert value(samples, "metergate_usage_anomalies_total", route=record["route"], endpoint=record["endpoint"]) == 1
    assert record["route"] == "/" + endpoint[0].split("/")[1]
    warnings = [r.getMessage() for r in caplog.records if "implausible usage" in r.getMessage()]
    assert len(warnings) == 1 and field in warnings[0] and record["id"] in warnings[0]


STREAMS = {
    "chat-final-chunk-10-pow-30": (CHAT, "completion_tokens=1000000000000000000000000000000", "completion_tokens",
                                   {"stream_options": {"include_usage": True}}),
    "chat-injected-usage-negative": (CHAT, "prompt_tokens=-1", "prompt_tokens", {}),
    "completions-final-chunk-string": (COMPLETIONS, 'completion_tokens="40"', "completion_tokens",
                                       {"stream_options": {"include_usage": True}}),
    "responses-completed-2-pow-63": (RESPONSES, "output_tokens=9223372036854775808", "output_tokens", {}),
    "messages-final-delta-2-pow-63": (MESSAGES, "output_tokens=9223372036854775808", "output_tokens", {}),
    "messages-final-delta-float": (MESSAGES, "output_tokens=12.0", "output_tokens", {}),
}


@pytest.mark.parametrize(("endpoint", "misreport", "field", "extra"), list(STREAMS.values()), ids=list(STREAMS))
async def test_absurd_usage_in_a_stream_is_an_anomaly_billed_from_the_estimate(
        gw: Gateway, endpoint: tuple[str, dict[str, Any]], misreport: str, field: str, extra: dict[str, Any]) -> None:
    _, control = await send(gw, endpoint, "no-usage", stream=True, **extra)
    answer, record = await send(gw, endpoint, f"usage-field:{misreport}", stream=True, **extra)

    assert answer.headers["content-type"].startswith("text/event-stream")
    assert billed(record) == billed(control)
    assert record["usage_source"] == "estimated" and record["tokens_output"] > 0
    assert record["charged_amount"] == price(endpoint[1]["model"], record) > 0
    [anomaly] = record["detail"]["usage_anomalies"]
    assert field in anomaly
    await assert_ledger_is_exactly(gw, control, record)
    if endpoint is CHAT and not extra:
        # The client did not ask for usage chunks: the one metergate asked for is dropped, believed or not.
        assert '"usage": {' not in answer.text and answer.text.rstrip().endswith("data: [DONE]")


MISMATCHED = {"chat": CHAT, "completions": COMPLETIONS, "responses": RESPONSES, "messages": MESSAGES}


@pytest.mark.parametrize("endpoint", list(MISMATCHED.values()), ids=list(MISMATCHED))
async def test_a_whole_answer_that_is_an_event_stream_is_metered_as_the_stream_it_is(
        gw: Gateway, endpoint: tuple[str, dict[str, Any]]) -> None:
    """The request did not ask to stream; the upstream streamed anyway (2,000 events once went for 0 output
    tokens). The stream's own usage is billed when it reports one, else the estimate of the text it carried."""
    whole_answer, whole = await send(gw, endpoint, "")  # the same request answered as asked: JSON with usage
    answer, record = await send(gw, endpoint, "force-stream")
    assert "data: " in answer.text  # relayed as the upstream sent it
    assert "usage_anomalies" not in record["detail"]
    if endpoint in (CHAT, COMPLETIONS):
        # An OpenAI stream reports usage only when asked for it, and this request did not ask.
        _, estimate = await send(gw, endpoint, "no-usage")
        assert billed(record) == billed(estimate)
        assert record["tokens_output"] == whole["tokens_output"] > 0  # the same words, counted
        await assert_ledger_is_exactly(gw, whole, record, estimate)
    else:
        # Responses and Anthropic streams carry their usage: billed exactly as the JSON answer was.
        assert billed(record) == billed(whole) and record["usage_source"] == "provider"
        await assert_ledger_is_exactly(gw, whole, record)
    assert record["charged_amount"] == price(endpoint[1]["model"], record) > 0
    assert whole_answer.headers["content-type"].startswith("application/json")


async def test_usage_record_strings_are_bounded_and_free_of_control_characters(gw: Gateway) -> None:
    feature = "team\tsearch" + "x" * 1000
    path, body = CHAT
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.post(path, json=body, headers={**AS_ACME, "X-Metergate-Feature": feature})
    assert r.status_code == 200, r.text
    [record] = await gw.usage()
    assert record["feature"] == ("teamsearch" + "x" * 1000)[:128]
    assert record["model"] == "gpt-4o-mini" and record["usage_source"] == "provider"
