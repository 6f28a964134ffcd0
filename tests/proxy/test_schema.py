"""Every endpoint's request schema: a field metergate relies on with the wrong type or out of bounds is refused
before the hold and before the upstream, and the fields metergate does not rely on reach the upstream untouched.

Method: a gateway with an OpenAI and an Anthropic route in front of the mock upstream, which here coerces any
truthy ``stream`` into a stream (``coerce-stream``, as some OpenAI-compatible servers do): the attack of a
request metered as a non-stream while its upstream streams. Each bad body is sent over HTTP; we check the
status, the error code and the field it names, that the upstream received nothing and that the ledger did not
move. Good bodies with unknown fields are checked against what the upstream received.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, start_gateway

CLAUDE = {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}
PRICING = {"asset": "USD", "models": {**DEFAULT_PRICING["models"], "claude-sonnet-4-6": CLAUDE,  # type: ignore[dict-item]
                                      "*": {"input_per_mtok": "1.00", "output_per_mtok": "1.00"}}}
HEADERS = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test", "X-Mock-Behavior": "coerce-stream"}
USER = [{"role": "user", "content": "hello"}]
CHAT = ("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER, "max_tokens": 5})
COMPLETIONS = ("/openai/v1/completions", {"model": "gpt-4o-mini", "prompt": "Once", "max_tokens": 5})
EMBEDDINGS = ("/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"})
RESPONSES = ("/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hello", "max_output_tokens": 5})
MESSAGES = ("/anthropic/v1/messages", {"model": "claude-sonnet-4-6", "messages": USER, "max_tokens": 5})
FUNDS = 10_000_000


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 's.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
        {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
         "provider_id": "anthropic"}])
    await gateway.customer("acme", funds=FUNDS)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def ledger(gw: Gateway) -> list[dict[str, Any]]:
    r = await gw.admin.get("/customers/acme/ledger", params={"limit": 200})
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["data"]
    return entries


async def post(gw: Gateway, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        return await client.post(path, content=json.dumps(body).encode(),
                                 headers={**HEADERS, "Content-Type": "application/json"})


def case(endpoint: tuple[str, dict[str, Any]], param: str, code: str = "invalid_request",
         **changes: Any) -> tuple[str, dict[str, Any], str, str]:
    path, body = endpoint
    return path, {**body, **changes}, param, code


BAD = {
    # --- type confusion on stream: each would be metered as a non-stream while this upstream streams
    "chat-stream-1": case(CHAT, "stream", stream=1),
    "chat-stream-true-string": case(CHAT, "stream", stream="true"),
    "completions-stream-1": case(COMPLETIONS, "stream", stream=1),
    "responses-stream-string": case(RESPONSES, "stream", stream="yes"),
    "messages-stream-1": case(MESSAGES, "stream", stream=1),
    "messages-stream-object": case(MESSAGES, "stream", stream={"on": True}),
    # --- output limits: bounded positive integers on every endpoint (overflows used to answer 500)
    "completions-max-tokens-2-pow-63": case(COMPLETIONS, "max_tokens", max_tokens=2**63),
    "completions-best-of-huge": case(COMPLETIONS, "best_of", best_of=10**6),
    "responses-max-output-10-pow-30": case(RESPONSES, "max_output_tokens", max_output_tokens=10**30),
    "responses-max-output-negative": case(RESPONSES, "max_output_tokens", max_output_tokens=-1),
    "messages-max-tokens-2-pow-63": case(MESSAGES, "max_tokens", max_tokens=2**63),
    "messages-max-tokens-string": case(MESSAGES, "max_tokens", max_tokens="100"),
    # --- the prompt, as each API defines it
    "completions-prompt-missing": case(COMPLETIONS, "prompt", prompt=None),
    "completions-prompt-object": case(COMPLETIONS, "prompt", prompt={"text": "x"}),
    "completions-token-id-negative": case(COMPLETIONS, "prompt[0]", prompt=[[1, -2]]),
    "embeddings-input-empty": case(EMBEDDINGS, "input", input=[]),
    "embeddings-input-number": case(EMBEDDINGS, "input", input=5),
    "embeddings-input-token-id-huge": case(EMBEDDINGS, "input[0]", input=[[2**63]]),
    "responses-input-number": case(RESPONSES, "input", input=7),
    "responses-input-item-string": case(RESPONSES, "input[0]", input=["hello"]),
    "responses-instructions-number": case(RESPONSES, "instructions", instructions=1),
    "messages-content-missing": case(MESSAGES, "messages[0].content", messages=[{"role": "user"}]),
    "messages-role-number": case(MESSAGES, "messages[0].role", messages=[{"role": 1, "content": "x"}]),
    "messages-system-number": case(MESSAGES, "system", system=3),
    # --- the model: a bounded name, even where a '*' price would accept any
    "model-with-quote": case(CHAT, "model", "invalid_model", model='gpt"4o'),
    "model-129-chars": case(CHAT, "model", "invalid_model", model="m" * 129),
    "messages-model-number": case(MESSAGES, "model", "missing_model", model=4),
}


@pytest.mark.parametrize(("path", "body", "param", "code"), list(BAD.values()), ids=list(BAD))
async def test_a_field_of_the_wrong_type_or_out_of_bounds_is_refused_and_changes_nothing(
        gw: Gateway, path: str, body: dict[str, Any], param: str, code: str) -> None:
    before = await ledger(gw)
    r = await post(gw, path, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert param.split("[")[0].split(".")[0] in error["message"]
    assert gw.upstream.requests == []
    assert await ledger(gw) == before
    assert await gw.usage() == []
    assert (await gw.balance())["available"] == FUNDS


async def test_the_largest_max_tokens_a_request_may_ask_is_served_within_the_wallet_not_a_500(gw: Gateway) -> None:
    """``request_max_output_tokens`` (10^7 by default) output tokens pass the schema and the bound. The wallet
    cannot hold them, so the request is held for its prompt plus the initial output allowance and streamed from
    the upstream internally: a bounded answer, billed exactly."""
    path, body = CHAT
    r = await post(gw, path, {**body, "max_tokens": gw.settings.request_max_output_tokens})
    assert r.status_code == 200, r.text
    [record] = await gw.usage()
    assert record["charged_amount"] == Decimal(r.headers["X-Metergate-Charged"]) * 10**6 > 0  # micro-USD
    assert (await gw.balance())["available"] == FUNDS - record["charged_amount"]
    assert (await gw.balance())["pending"] == 0
    [sent] = gw.upstream.requests
    assert sent["body"]["stream"] is True  # metered as it flows, extended or stopped at the wallet


async def test_a_model_at_the_length_bound_is_accepted_and_recorded_whole(gw: Gateway) -> None:
    path, body = CHAT
    model = "m" * 128  # priced by the '*' rule
    r = await post(gw, path, {**body, "model": model})
    assert r.status_code == 200, r.text
    [record] = await gw.usage()
    assert record["model"] == model and record["charged_amount"] > 0


ENDPOINTS = {"chat": CHAT, "completions": COMPLETIONS, "embeddings": EMBEDDINGS, "responses": RESPONSES,
             "messages": MESSAGES}
UNKNOWN = {"temperature": 0.2, "metadata": {"trace": "t-1"}, "future_field": [1, {"deep": None}, "x"],
           "seed": 2**70, "user": "u-1"}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=list(ENDPOINTS))
async def test_fields_metergate_does_not_rely_on_reach_the_upstream_untouched(
        gw: Gateway, endpoint: tuple[str, dict[str, Any]]) -> None:
    path, body = endpoint
    sent = {**body, **UNKNOWN}
    r = await post(gw, path, sent)
    assert r.status_code == 200, r.text
    [received] = gw.upstream.requests
    assert received["body"] == sent
    [record] = await gw.usage()
    assert record["usage_source"] == "provider" and record["tokens_input"] > 0


@pytest.mark.parametrize("stream", [False, None], ids=["false", "null"])
async def test_stream_false_or_null_is_a_whole_answer(gw: Gateway, stream: bool | None) -> None:
    path, body = CHAT
    r = await post(gw, path, {**body, "stream": stream})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    [record] = await gw.usage()
    assert (record["stream"], record["usage_source"]) == (False, "provider")


async def test_a_stream_keeps_the_clients_stream_options_and_gets_usage_added(gw: Gateway) -> None:
    path, body = CHAT
    options = {"include_usage": False, "future_option": 1}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.post(path, json={**body, "stream": True, "stream_options": options}, headers=HEADERS)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    [received] = gw.upstream.requests
    assert received["body"]["stream_options"] == {"include_usage": True, "future_option": 1}
    assert '"usage": {' not in r.text  # the usage chunk it did not ask for is not relayed
    [record] = await gw.usage()
    assert (record["stream"], record["usage_source"]) == (True, "provider")
