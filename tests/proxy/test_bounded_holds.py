"""Holds sized to what is delivered: a request the wallet cannot hold in full starts on a small hold that
grows as output flows, streamed or not, so that a small wallet is served (no false 402) and no answer can
outgrow what the wallet pays for (nothing written off).

Method: the official ``openai`` and ``anthropic`` SDKs against a gateway with default hold settings
(``initial_output_tokens`` 256, ``stream_extend_tokens`` 256, ``default_max_output_tokens`` 4096) in front of
the mock upstream, which streams one word per event and caps nothing unless told. Prices are recomputed
here with ``Decimal`` and half-up rounding; token counts with the project's tokenizer, as the mock counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from metergate.demo.mock_upstream import _WORDS
from metergate.metering.tokenizer import counter_for
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, start_gateway
from tests.proxy.test_disconnect import settled_records
from tests.proxy.test_openai_sdk import ledger, record_by_id

GPT, CLAUDE = "gpt-4o", "claude-sonnet-4-6"
RATES = {GPT: {"input_per_mtok": "5.00", "output_per_mtok": "20.00", "request_fee": "0.0001"},
         CLAUDE: {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}}
TWO_CENTS = 20_000  # micro-dollars
# For the long answers: output only, 10 micro-dollars a token, so two cents buy exactly 2000 tokens.
PER_TOKEN = 10
FLAT = {"input_per_mtok": "0", "output_per_mtok": str(PER_TOKEN)}
LONG_MODELS = {"gpt-4o-long": FLAT, "claude-long": FLAT}
ASK = [{"role": "user", "content": "Say hi"}]


def routes(upstream: Upstream, *, unary_streaming: bool = True) -> list[dict[str, Any]]:
    return [{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY,
             "unary_streaming": unary_streaming},
            {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
             "provider_id": "anthropic"}]


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'b.db'}", routes=routes(upstream),
                                          pricing={"asset": "USD", "models": {**RATES, **LONG_MODELS}})
    yield gateway
    await gateway.close()
    await runner.cleanup()


def claude(gw: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key="sk-ant-app-never-holds-it",
                                    default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"},
                                    max_retries=0)


def price(model: str, input_tokens: int, output_tokens: int) -> int:
    rate = {**RATES, **LONG_MODELS}[model]
    micros = (input_tokens * Decimal(rate["input_per_mtok"]) + output_tokens * Decimal(rate["output_per_mtok"])
              + Decimal(rate.get("request_fee", "0")) * 1_000_000)
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def words(n: int) -> str:
    return "".join(_WORDS[i % len(_WORDS)] + " " for i in range(n))


def affordable_prefix(model: str, reply: str, budget_tokens: int) -> str:
    """The longest run of whole words (one per event) whose text costs at most ``budget_tokens``."""
    count, text = counter_for(model).count, ""
    for word in reply.split(" ")[:-1]:
        if count(text + word + " ") > budget_tokens:
            break
        text += word + " "
    return text


async def ask(gw: Gateway, model: str, *, stream: bool, behavior: str,
              max_tokens: int | None = None) -> tuple[str, str, Any]:
    """One request through the provider's SDK: (request id, text received, how it ended: the finish or stop
    reason, the notice if any, the usage the client was shown)."""
    headers = {"X-Mock-Behavior": behavior}
    if model.startswith("claude"):
        client = claude(gw)
        try:
            raw = await client.messages.with_raw_response.create(
                model=model, max_tokens=max_tokens or 4096, messages=ASK, stream=stream,  # type: ignore[call-overload]
                extra_headers=headers)
            if stream:
                events = [event async for event in await raw.parse()]
                text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
                final = [e for e in events if e.type == "message_delta"][-1]
                notice = final.model_extra.get("metergate") if final.model_extra else None
                return raw.headers["X-Metergate-Request-Id"], text, (final.delta.stop_reason, notice,
                                                                     final.usage.output_tokens)
            message = await raw.parse()
            text = "".join(block.text for block in message.content if block.type == "text")
            notice = message.model_extra.get("metergate") if message.model_extra else None
            return raw.headers["X-Metergate-Request-Id"], text, (message.stop_reason, notice,
                                                                 message.usage.output_tokens)
        finally:
            await client.close()
    openai_client = gw.openai()
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    chat = await openai_client.chat.completions.with_raw_response.create(
        model=model, messages=ASK, stream=stream, extra_headers=headers, **extra)  # type: ignore[call-overload]
    if stream:
        chunks = [chunk async for chunk in chat.parse()]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        last = [c for c in chunks if c.choices][-1]
        notice = last.model_extra.get("metergate") if last.model_extra else None
        return chat.headers["X-Metergate-Request-Id"], text, (last.choices[0].finish_reason, notice, None)
    completion = chat.parse()
    notice = completion.model_extra.get("metergate") if completion.model_extra else None
    assert completion.usage is not None
    return (chat.headers["X-Metergate-Request-Id"], completion.choices[0].message.content or "",
            (completion.choices[0].finish_reason, notice, completion.usage.completion_tokens))


async def settled(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The request's usage record, with no hold left open and a ledger that audits clean."""
    record = record_by_id(await gw.usage(), request_id)
    balance = await gw.balance()
    assert balance["pending"] == 0
    assert balance["available"] == TWO_CENTS - record["charged_amount"]
    assert record["written_off_amount"] == 0
    assert await gw.store.audit() == []
    return record


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll until ``condition`` holds; bounded, never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"still waiting after {timeout_s}s")
        await asyncio.sleep(0.01)


CASES = [pytest.param(GPT, False, id="openai-chat"), pytest.param(GPT, True, id="openai-chat-stream"),
         pytest.param(CLAUDE, False, id="anthropic"), pytest.param(CLAUDE, True, id="anthropic-stream")]


@pytest.mark.parametrize(("model", "stream"), CASES)
async def test_a_two_cent_wallet_gets_a_short_answer_to_a_request_it_cannot_hold_in_full(
        gw: Gateway, model: str, stream: bool) -> None:
    # Held for the whole possible output (4096 tokens: OpenAI's default here, or the max_tokens the
    # anthropic SDK must send), this request would need more than the wallet has.
    output_rate = Decimal(RATES[model]["output_per_mtok"])
    assert 4096 * output_rate > TWO_CENTS
    await gw.customer(funds=TWO_CENTS)
    request_id, text, (finish, notice, _) = await ask(gw, model, stream=stream, behavior="words:12")
    assert text == words(12)
    assert finish in ("stop", "end_turn") and notice is None
    record = await settled(gw, request_id)
    assert record["usage_source"] == "provider" and record["stream"] is stream
    output = counter_for(model).count(words(12))
    assert record["tokens_output"] == output
    assert record["charged_amount"] == price(model, record["tokens_input"], output)
    sent = gw.upstream.requests[-1]["body"]
    assert sent["stream"] is True  # a non-streaming request is streamed from the upstream internally
    if not model.startswith("claude"):
        assert sent["stream_options"] == {"include_usage": True} and "max_tokens" not in sent
    hold = [e for e in await ledger(gw) if e["kind"] == "hold" and e.get("hold_id") == "hold_" + request_id[4:]]
    assert len(hold) == 1 and 0 < hold[0]["pending_delta"] < TWO_CENTS


@pytest.mark.parametrize(("model", "stream"), [
    pytest.param("gpt-4o-long", False, id="openai-chat"), pytest.param("gpt-4o-long", True, id="openai-chat-stream"),
    pytest.param("claude-long", False, id="anthropic"), pytest.param("claude-long", True, id="anthropic-stream")])
async def test_a_long_answer_is_stopped_at_the_wallet_and_billed_exactly(gw: Gateway, model: str,
                                                                         stream: bool) -> None:
    await gw.customer(funds=TWO_CENTS)
    request_id, text, (finish, notice, shown_output) = await ask(gw, model, stream=stream, behavior="words:3000")
    expected = affordable_prefix(model, words(3000), TWO_CENTS // PER_TOKEN)
    assert text == expected and 0 < len(expected) < len(words(3000))
    tokens = counter_for(model).count(text)
    assert finish == ("max_tokens" if model.startswith("claude") else "length")
    assert notice is not None and notice["stop_reason"] == "insufficient_funds"
    assert notice["charged"] == f"{Decimal(tokens * PER_TOKEN) / 1_000_000:.6f}"
    assert notice["portal_url"].startswith(gw.url)
    if shown_output is not None:
        assert shown_output == tokens  # the usage the client reads is the usage billed
    record = await settled(gw, request_id)
    assert record["usage_source"] == "estimated"
    assert (record["tokens_output"], record["charged_amount"]) == (tokens, tokens * PER_TOKEN)
    assert (await gw.balance())["available"] < PER_TOKEN * 3  # stopped because the wallet was (all but) dry


async def test_responses_api_without_a_limit_is_streamed_internally_and_stopped_at_the_wallet(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    raw = await gw.openai().responses.with_raw_response.create(model="gpt-4o-long", input="talk",
                                                               extra_headers={"X-Mock-Behavior": "words:3000"})
    response = raw.parse()
    text = response.output_text
    assert text == affordable_prefix("gpt-4o-long", words(3000), TWO_CENTS // PER_TOKEN)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    tokens = counter_for("gpt-4o-long").count(text)
    assert response.usage is not None and response.usage.output_tokens == tokens
    assert response.model_extra is not None and response.model_extra["metergate"]["stop_reason"] == "insufficient_funds"
    record = await settled(gw, raw.headers["X-Metergate-Request-Id"])
    assert record["charged_amount"] == tokens * PER_TOKEN


async def test_a_short_responses_answer_is_the_providers_own_response_object(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    raw = await gw.openai().responses.with_raw_response.create(model=GPT, input="hi",
                                                               extra_headers={"X-Mock-Behavior": "words:5"})
    response = raw.parse()
    assert response.status == "completed" and response.output_text == words(5)
    assert response.usage is not None
    record = await settled(gw, raw.headers["X-Metergate-Request-Id"])
    assert record["usage_source"] == "provider"
    assert record["charged_amount"] == price(GPT, response.usage.input_tokens, response.usage.output_tokens)


async def test_a_limit_the_wallet_covers_is_held_in_full_and_forwarded_unchanged(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    request_id, text, (finish, _, _) = await ask(gw, GPT, stream=False, behavior="words:12", max_tokens=300)
    assert text == words(12) and finish == "stop"
    assert gw.upstream.requests[-1]["body"] == {"model": GPT, "messages": ASK, "stream": False,
                                                 "max_tokens": 300}
    kinds = [e["kind"] for e in await ledger(gw) if e.get("hold_id") == "hold_" + request_id[4:]]
    assert kinds == ["capture", "hold"]  # held in full, never extended: the upstream keeps to max_tokens
    await settled(gw, request_id)


async def unlimited_storm(gw: Gateway, funds: int, n: int) -> list[tuple[int, str, str, str | None]]:
    """``n`` concurrent non-streaming chat completions without max_tokens, each asking for 400 words (~450
    tokens), on a wallet funded with ``funds``: (status, request id, text, finish reason) of each."""
    await gw.customer(funds=funds)
    client = gw.openai()

    async def one() -> tuple[int, str, str, str | None]:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-long", messages=ASK, extra_headers={"X-Mock-Behavior": "words:400"})  # type: ignore[arg-type]
        except openai.APIStatusError as error:
            return error.status_code, "", "", None
        completion = raw.parse()
        return (200, raw.headers["X-Metergate-Request-Id"], completion.choices[0].message.content or "",
                completion.choices[0].finish_reason)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_concurrent_non_streaming_requests_without_a_limit_write_nothing_off(upstream: Upstream,
                                                                                   tmp_path: Path) -> None:
    """The attack of the report: many concurrent non-streaming requests without max_tokens on a small
    wallet, each answer far longer than the default_max_output_tokens its hold used to assume (64 here;
    with enforcement off, as before this change, these 40 requests were all admitted and wrote off 150,800
    micro-dollars, three times the wallet). Each answer is now bounded by its own growing hold, so together
    they spend the wallet but never more: nothing is written off, and each answer is exactly what was billed."""
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'storm.db'}", routes=routes(upstream),
                                     pricing={"asset": "USD", "models": LONG_MODELS}, default_max_output_tokens=64)
    try:
        funds, n = 50_000, 40  # 40 answers of ~4500 micro-dollars each want ~3.6x the wallet
        results = await unlimited_storm(gw, funds, n)
        assert {status for status, *_ in results} <= {200, 402}
        served = [r for r in results if r[0] == 200]
        records = await gw.usage()
        assert len(records) == len(served) > 0  # a request refused with 402 placed no hold and has no record
        assert sum(r["written_off_amount"] for r in records) == 0
        for _, request_id, text, finish in served:
            record = record_by_id(records, request_id)
            assert record["charged_amount"] == counter_for("gpt-4o-long").count(text) * PER_TOKEN
            assert text == words(400) if finish == "stop" else finish == "length"
        balance = await gw.balance()
        assert balance["pending"] == 0 and balance["available"] >= 0
        assert sum(r["charged_amount"] for r in records) == funds - balance["available"]
        assert any(finish == "length" for *_, finish in served)  # the wallet ran out: some answers were stopped
        assert await gw.store.audit() == []
    finally:
        await gw.close()
        await runner.cleanup()


async def test_an_upstream_that_cannot_stream_gets_the_output_limit_the_hold_covers(upstream: Upstream,
                                                                                    tmp_path: Path) -> None:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'cap.db'}",
                                          routes=routes(upstream, unary_streaming=False),
                                          pricing={"asset": "USD", "models": LONG_MODELS})
    try:
        await gateway.customer(funds=TWO_CENTS)
        raw = await gateway.openai().chat.completions.with_raw_response.create(
            model="gpt-4o-long", messages=ASK, extra_headers={"X-Mock-Behavior": "words:3000,token-limit"})
        completion = raw.parse()
        # The hold is all the wallet has (4096 tokens would be more): 2000 tokens, set upstream and reported.
        sent = upstream.requests[-1]["body"]
        assert "stream" not in sent and sent["max_completion_tokens"] == TWO_CENTS // PER_TOKEN
        assert raw.headers["X-Metergate-Output-Limit"] == str(TWO_CENTS // PER_TOKEN)
        assert completion.usage is not None and completion.usage.completion_tokens <= TWO_CENTS // PER_TOKEN
        record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
        assert record["usage_source"] == "provider" and record["written_off_amount"] == 0
        assert record["charged_amount"] == completion.usage.completion_tokens * PER_TOKEN
        assert (await gateway.balance())["pending"] == 0
        assert await gateway.store.audit() == []
    finally:
        await gateway.close()
        await runner.cleanup()


async def test_a_client_that_leaves_an_internal_stream_stops_the_upstream_and_pays_what_it_produced(
        gw: Gateway) -> None:
    """The answer was never delivered, but the upstream produced it on the customer's request and the
    provider charges for it: what it produced before metergate saw the client leave is billed, within the
    hold (nothing written off), and the upstream is stopped rather than left to produce the rest."""
    await gw.customer(funds=TWO_CENTS)
    body = {"model": "gpt-4o-long", "messages": ASK}
    headers = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test",
               "X-Mock-Behavior": "words:1000,chunk-delay:0.02"}  # 20 s if left to run
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(f"{gw.url}/openai/v1/chat/completions", json=body,
                                                     headers=headers))
        await until(lambda: bool(gw.upstream.requests))  # the request reached the upstream: hang up
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    [record] = await settled_records(gw)
    assert record["usage_source"] == "estimated" and record["written_off_amount"] == 0
    assert 0 < record["tokens_output"] < counter_for("gpt-4o-long").count(words(1000))
    assert record["charged_amount"] == record["tokens_output"] * PER_TOKEN
    assert (await gw.balance())["available"] == TWO_CENTS - record["charged_amount"]
    assert await gw.store.audit() == []


async def direct(gw: Gateway, path: str, body: dict[str, Any], behavior: str) -> dict[str, Any]:
    """The mock's own non-stream answer to the same request, asked for without metergate."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{gw.upstream.url}{path}", json=body, headers={"X-Mock-Behavior": behavior}) as response:
        answer: dict[str, Any] = await response.json()
    return answer


async def test_a_tool_call_is_assembled_from_its_streamed_deltas(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    tools: Any = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    raw = await gw.openai().chat.completions.with_raw_response.create(
        model=GPT, messages=ASK, tools=tools, extra_headers={"X-Mock-Behavior": "words:30,tool-call:search"})
    completion = raw.parse()
    own = await direct(gw, "/v1/chat/completions", {"model": GPT, "messages": ASK}, "words:30,tool-call:search")
    [choice], [expected] = completion.choices, own["choices"]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("search", expected["message"]["tool_calls"][0]
                                                             ["function"]["arguments"])
    assert completion.usage is not None and completion.usage.model_dump(exclude_none=True) == own["usage"]
    record = await settled(gw, raw.headers["X-Metergate-Request-Id"])
    assert record["charged_amount"] == price(GPT, own["usage"]["prompt_tokens"], own["usage"]["completion_tokens"])


async def test_a_tool_use_block_is_assembled_from_its_streamed_json(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    client = claude(gw)
    try:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE, max_tokens=4096, messages=ASK,  # type: ignore[arg-type]
            extra_headers={"X-Mock-Behavior": "words:30,tool-use:search"})
        message = await raw.parse()
    finally:
        await client.close()
    own = await direct(gw, "/v1/messages", {"model": CLAUDE, "max_tokens": 4096, "messages": ASK},
                       "words:30,tool-use:search")
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.name == "search" and block.input == own["content"][0]["input"]
    assert message.usage.output_tokens == own["usage"]["output_tokens"]
    await settled(gw, raw.headers["X-Metergate-Request-Id"])


async def test_a_tool_call_stopped_at_the_wallet_keeps_the_arguments_billed(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    raw = await gw.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-long", messages=ASK, extra_headers={"X-Mock-Behavior": "words:3000,tool-call:search"})
    [choice] = raw.parse().choices
    assert choice.finish_reason == "length" and choice.message.tool_calls is not None
    arguments = choice.message.tool_calls[0].function.arguments
    own = await direct(gw, "/v1/chat/completions", {"model": "gpt-4o-long", "messages": ASK},
                       "words:3000,tool-call:search")
    assert own["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].startswith(arguments)
    tokens = counter_for("gpt-4o-long").count("search" + arguments)
    assert 0 < tokens <= TWO_CENTS // PER_TOKEN
    record = await settled(gw, raw.headers["X-Metergate-Request-Id"])
    assert (record["tokens_output"], record["charged_amount"]) == (tokens, tokens * PER_TOKEN)


async def test_a_growing_hold_stops_at_the_customers_spend_cap(gw: Gateway) -> None:
    """A hold that grows spends as a whole one does: each step is checked against the customer's cap, and
    the answer stops where the next step would pass it, though the wallet holds far more."""
    await gw.customer(funds=1_000_000)
    cap = 3_000  # covers the first hold (256 tokens, 2560) but not the first extension (512 tokens, 5120)
    r = await gw.admin.put("/customers/acme/spend-caps", json={"asset": "USD", "daily": cap, "monthly": None})
    assert r.status_code == 200, r.text
    raw = await gw.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-long", messages=ASK, extra_headers={"X-Mock-Behavior": "words:3000"})  # type: ignore[arg-type]
    completion = raw.parse()
    [choice] = completion.choices
    text = choice.message.content or ""
    assert choice.finish_reason == "length"
    assert text == affordable_prefix("gpt-4o-long", words(3000), 256)
    record = record_by_id(await gw.usage(), raw.headers["X-Metergate-Request-Id"])
    tokens = counter_for("gpt-4o-long").count(text)
    assert record["charged_amount"] == tokens * PER_TOKEN <= cap and record["written_off_amount"] == 0
    # The answer says why it stopped: the customer's cap (set in the portal), not an empty wallet.
    assert completion.model_extra is not None
    notice = completion.model_extra["metergate"]
    assert (notice["stop_reason"], notice["period"], notice["cap"]) == ("spend_cap_reached", "daily", "0.003000")
    assert notice["charged"] == f"{Decimal(tokens * PER_TOKEN) / 1_000_000:.6f}"
    assert notice["portal_url"].startswith(gw.url) and "top up" not in notice["message"].lower()
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (1_000_000 - tokens * PER_TOKEN, 0)


async def test_a_legacy_completion_without_a_limit_is_served_whole_or_stopped_at_the_wallet(gw: Gateway) -> None:
    await gw.customer(funds=TWO_CENTS)
    client = gw.openai()
    short = await client.completions.with_raw_response.create(model="gpt-4o-long", prompt="hi",
                                                              extra_headers={"X-Mock-Behavior": "words:7"})
    [choice] = short.parse().choices
    assert (choice.text, choice.finish_reason) == (words(7), "stop")
    first = record_by_id(await gw.usage(), short.headers["X-Metergate-Request-Id"])
    assert first["usage_source"] == "provider"
    assert first["charged_amount"] == counter_for("gpt-4o-long").count(words(7)) * PER_TOKEN
    left = TWO_CENTS - first["charged_amount"]
    long = await client.completions.with_raw_response.create(model="gpt-4o-long", prompt="hi",
                                                             extra_headers={"X-Mock-Behavior": "words:3000"})
    [choice] = long.parse().choices
    assert choice.finish_reason == "length"
    assert choice.text == affordable_prefix("gpt-4o-long", words(3000), left // PER_TOKEN)
    second = record_by_id(await gw.usage(), long.headers["X-Metergate-Request-Id"])
    assert second["charged_amount"] == counter_for("gpt-4o-long").count(choice.text) * PER_TOKEN
    assert second["written_off_amount"] == 0 and (await gw.balance())["pending"] == 0


async def test_an_internal_stream_the_upstream_breaks_off_is_a_502_and_free(gw: Gateway) -> None:
    """The client asked for one whole body and gets none: as for any non-streaming request whose upstream
    failed mid-answer, it pays nothing and no hold stays open."""
    await gw.customer(funds=TWO_CENTS)
    with pytest.raises(openai.APIStatusError) as failed:
        await gw.openai().chat.completions.create(model=GPT, messages=ASK,  # type: ignore[arg-type]
                                                  extra_headers={"X-Mock-Behavior": "words:50,die-after:5"})
    assert failed.value.status_code == 502
    body = failed.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_stream_broken"
    [record] = await gw.usage()
    assert (record["charged_amount"], record["status_code"]) == (0, 502)
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (TWO_CENTS, 0)
    assert await gw.store.audit() == []


async def test_an_anthropic_stream_cut_after_an_intermediate_count_bills_all_it_delivered(gw: Gateway) -> None:
    """message_delta counts are cumulative; one sent before the stop reason counts only what was produced by
    then. A stream cut after it (here the upstream dies 15 words in, its count said 10) bills the 15."""
    await gw.customer(funds=TWO_CENTS)
    client = claude(gw)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(model=CLAUDE, max_tokens=100, messages=ASK,  # type: ignore[arg-type]
                                          extra_headers={"X-Mock-Behavior": "words:20,die-after:18"}) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    await client.close()
    assert "".join(received) == words(15)
    [record] = await gw.usage()
    assert record["usage_source"] == "estimated"
    assert record["tokens_output"] == counter_for(CLAUDE).count(words(15)) > counter_for(CLAUDE).count(words(10))
    assert record["charged_amount"] == price(CLAUDE, record["tokens_input"], record["tokens_output"])
    assert record["written_off_amount"] == 0 and (await gw.balance())["pending"] == 0
