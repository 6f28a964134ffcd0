"""Drive metergate through the official ``openai`` SDK against the mock upstream, and check what each
request costs, what reaches the upstream, and what the ledger shows afterwards for success and failure.

Every expected price is recomputed here from ``DEFAULT_PRICING`` with ``Decimal`` and half-up rounding,
independently of metergate's price book.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx2 as httpx
import openai
import pytest

from metergate.demo.mock_upstream import build_mock_upstream
from tests.conftest import DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, free_port, start_gateway

MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Say something about prepaid wallets."}]


def expected_price(model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> int:
    """The price in micro-dollars (USD scale 6) of one request under DEFAULT_PRICING, rounded half-up."""
    rate: dict[str, str] = DEFAULT_PRICING["models"][model]  # type: ignore[index]
    per_in = Decimal(rate.get("input_per_mtok", "0"))
    per_cached = Decimal(rate.get("cached_input_per_mtok", rate.get("input_per_mtok", "0")))
    per_out = Decimal(rate.get("output_per_mtok", "0"))
    fee = Decimal(rate.get("request_fee", "0"))
    # $/Mtok is exactly micro-dollars per token; the request fee is in dollars.
    micros = ((input_tokens - cached_tokens) * per_in + cached_tokens * per_cached + output_tokens * per_out
              + fee * 1_000_000)
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def record_by_id(records: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    found = [r for r in records if r["id"] == request_id]
    assert len(found) == 1, f"expected one usage record {request_id}, got {found}"
    return found[0]


async def ledger(gateway: Gateway, customer: str = "acme") -> list[dict[str, Any]]:
    r = await gateway.admin.get(f"/customers/{customer}/ledger", params={"limit": 200})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def assert_nothing_charged(gateway: Gateway, funds: int, status: int) -> None:
    """No money moved, no hold is open, and the one request is recorded, free, with the status answered."""
    balance = await gateway.balance()
    assert balance["available"] == funds
    assert balance["pending"] == 0
    [record] = await gateway.usage()
    assert (record["charged_amount"], record["usage_source"], record["status_code"]) == (0, "none", status)
    assert await gateway.store.audit() == []


# ---------------------------------------------------------------------------------------------- success


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o"])
async def test_chat_completion_charged_exactly_from_provider_usage(gateway: Gateway, model: str) -> None:
    await gateway.customer("acme", funds=1_000_000)
    client = gateway.openai()
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=40)
    completion = raw.parse()
    assert completion.choices[0].message.content
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    price = expected_price(model, usage.prompt_tokens, usage.completion_tokens)

    record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
    assert record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_output"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert record["endpoint"] == "chat.completions" and record["model"] == model and record["stream"] is False
    assert record["price_amount"] == price and record["charged_amount"] == price
    assert raw.headers["X-Metergate-Charged"] == f"{Decimal(price) / 1_000_000:.6f}"
    balance = await gateway.balance()
    assert balance == {**balance, "available": 1_000_000 - price, "pending": 0}
    assert await gateway.store.audit() == []


async def test_gpt_4o_request_fee_is_added_once(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    completion = await gateway.openai().chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=20)
    assert completion.usage is not None
    [record] = await gateway.usage()
    without_fee = (Decimal(completion.usage.prompt_tokens) * 5 + Decimal(completion.usage.completion_tokens) * 20)
    assert record["charged_amount"] == int(without_fee.quantize(Decimal(1), rounding=ROUND_HALF_UP)) + 100


async def test_legacy_completion_charged_exactly(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    raw = await gateway.openai().completions.with_raw_response.create(
        model="gpt-4o-mini", prompt=["Once upon a time", "In a galaxy far away"], max_tokens=30)
    completion = raw.parse()
    assert completion.choices[0].text
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    price = expected_price("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)

    record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
    assert record["endpoint"] == "completions" and record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_output"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert record["charged_amount"] == price
    assert (await gateway.balance())["available"] == 1_000_000 - price


async def test_legacy_completion_with_a_token_array_prompt(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    completion = await gateway.openai().completions.create(model="gpt-4o-mini", prompt=[9906, 1917, 0],
                                                           max_tokens=5)
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    [record] = await gateway.usage()
    assert (record["tokens_input"], record["usage_source"]) == (3, "provider")
    assert record["charged_amount"] == expected_price("gpt-4o-mini", 3, completion.usage.completion_tokens)


async def test_embeddings_charged_exactly(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    # A long input, so that the price is more than a rounding artefact (0.04 $/Mtok).
    text = "metered embeddings are priced per input token only. " * 40
    raw = await gateway.openai().embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=[text, "a second, shorter input"], encoding_format="float")
    result = raw.parse()
    assert len(result.data) == 2
    assert result.usage.prompt_tokens > 300
    price = expected_price("text-embedding-3-small", result.usage.prompt_tokens, 0)
    assert price > 0

    record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
    assert record["endpoint"] == "embeddings" and record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_output"]) == (result.usage.prompt_tokens, 0)
    assert record["charged_amount"] == price
    balance = await gateway.balance()
    assert (balance["available"], balance["pending"]) == (1_000_000 - price, 0)


async def test_cached_tokens_are_priced_at_the_cached_rate(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    long_prompt: list[Any] = [{"role": "user", "content": "cache me if you can. " * 50}]
    completion = await gateway.openai().chat.completions.create(
        model="gpt-4o", messages=long_prompt, max_tokens=20, extra_headers={"X-Mock-Behavior": "cached:128"})
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 128
    price = expected_price("gpt-4o", usage.prompt_tokens, usage.completion_tokens, cached_tokens=128)
    assert price < expected_price("gpt-4o", usage.prompt_tokens, usage.completion_tokens)

    [record] = await gateway.usage()
    assert record["tokens_cached_input"] == 128
    assert record["tokens_input"] == usage.prompt_tokens
    assert record["charged_amount"] == price


# ---------------------------------------------------------------------------------------------- headers


async def test_provider_key_injected_and_client_headers_stripped(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    sent: list[httpx.Headers] = []

    async def capture(request: httpx.Request) -> None:
        sent.append(request.headers)

    http_client = httpx.AsyncClient(event_hooks={"request": [capture]})
    client = gateway.openai(http_client=http_client, headers={
        "Connection": "keep-alive, X-Hop-Secret",
        "X-Hop-Secret": "named-in-connection",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "TE": "trailers",
        "X-Metergate-Feature": "search",
        "X-Metergate-Anything": "ours",
        "Api-Key": "sk-client-azure-style-key",
        "X-Api-Key": "sk-client-other-style-key",
        "X-End-To-End": "kept",
    })
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    assert raw.status_code == 200
    # The client really sent what must be stripped.
    assert sent[-1]["authorization"] == "Bearer sk-app-does-not-hold-the-key"
    assert sent[-1]["x-hop-secret"] == "named-in-connection"
    assert "x-hop-secret" in sent[-1]["connection"].lower()

    [forwarded] = gateway.upstream.requests
    names = {name.lower() for name, _ in forwarded["header_list"]}
    authorizations = [v for n, v in forwarded["header_list"] if n.lower() == "authorization"]
    assert authorizations == [f"Bearer {PROVIDER_KEY}"]
    assert not {n for n in names if n.startswith("x-metergate-")}
    assert not names & {"connection", "keep-alive", "proxy-authorization", "te", "x-hop-secret", "upgrade",
                        "trailer", "proxy-connection", "api-key", "x-api-key"}
    assert dict((n.lower(), v) for n, v in forwarded["header_list"])["x-end-to-end"] == "kept"
    # The feature label reached metergate (it is recorded) even though it never reached the upstream.
    [record] = await gateway.usage()
    assert record["feature"] == "search"
    assert PROVIDER_KEY not in str(dict(raw.headers))


@pytest.mark.parametrize(("stream", "spoofed"), [(False, "X-Metergate-Held"), (True, "X-Metergate-Charged")])
async def test_upstream_cannot_forge_the_receipt(gateway: Gateway, stream: bool, spoofed: str) -> None:
    """The receipt headers are metergate's; one the upstream sends is not relayed as if it were."""
    await gateway.customer("acme", funds=1_000_000)
    raw = await gateway.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream,
        extra_headers={"X-Mock-Behavior": f"header:{spoofed}=999.000000"})
    parsed = raw.parse()
    if isinstance(parsed, openai.AsyncStream):
        await parsed.close()
    assert raw.status_code == 200
    assert raw.headers["X-Metergate-Request-Id"].startswith("req_")
    assert spoofed not in raw.headers


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [500, 429])
async def test_upstream_error_relayed_and_hold_released(gateway: Gateway, status: int, stream: bool) -> None:
    await gateway.customer("acme", funds=1_000_000)
    client = gateway.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream,
                                             extra_headers={"X-Mock-Behavior": f"error:{status}"})
    assert caught.value.status_code == status
    assert caught.value.response.json() == {"error": {"message": f"mock upstream error {status}",
                                                      "type": "server_error", "param": None, "code": None}}
    assert len(gateway.upstream.requests) == 1
    await assert_nothing_charged(gateway, 1_000_000, status)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_redirect_is_a_502_and_free(gateway: Gateway, stream: bool) -> None:
    await gateway.customer("acme", funds=1_000_000)
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream,
            extra_headers={"X-Mock-Behavior": "redirect"})
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_redirect"
    await assert_nothing_charged(gateway, 1_000_000, 502)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_dying_mid_body_is_a_502_and_free(gateway: Gateway, stream: bool) -> None:
    # With stream=True the mock answers with JSON (not-stream), so both paths read a whole body.
    await gateway.customer("acme", funds=1_000_000)
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream,
            extra_headers={"X-Mock-Behavior": "not-stream,die-after:0"})
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    await assert_nothing_charged(gateway, 1_000_000, 502)


async def test_unreachable_upstream_is_a_502_and_free(tmp_path: Any) -> None:
    nowhere = Upstream(f"http://127.0.0.1:{free_port()}", build_mock_upstream())
    gateway, runner = await start_gateway(nowhere, f"sqlite+aiosqlite:///{tmp_path / 'nowhere.db'}")
    try:
        await gateway.customer("acme", funds=1_000_000)
        with pytest.raises(openai.InternalServerError) as caught:
            await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_unreachable"
        await assert_nothing_charged(gateway, 1_000_000, 502)
    finally:
        await gateway.close()
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_slow_upstream_is_a_504_and_free(upstream: Upstream, tmp_path: Any, stream: bool) -> None:
    gateway, runner = await start_gateway(upstream, f"sqlite+aiosqlite:///{tmp_path / 'slow.db'}",
                                          upstream_read_timeout_s=0.5)
    try:
        await gateway.customer("acme", funds=1_000_000)
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.openai().chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=stream,
                extra_headers={"X-Mock-Behavior": "slow:1"})
        assert caught.value.status_code == 504
        assert caught.value.code == "upstream_timeout"
        await assert_nothing_charged(gateway, 1_000_000, 504)
    finally:
        await gateway.close()
        await runner.cleanup()


async def test_unknown_model_is_a_bad_request_and_never_forwarded(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    before = await ledger(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.openai().chat.completions.create(model="gpt-unpriced", messages=MESSAGES)
    assert caught.value.code == "unknown_model"
    assert caught.value.param == "model"
    assert gateway.upstream.requests == []
    assert await ledger(gateway) == before
    assert await gateway.usage() == []


@pytest.mark.parametrize("stream", [False, True])
async def test_insufficient_funds_is_a_402_with_a_working_portal_link(gateway: Gateway, stream: bool) -> None:
    await gateway.customer("acme", funds=5)
    before_ledger, before_balance = await ledger(gateway), await gateway.balance()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50,
                                                       stream=stream)
    error = caught.value
    assert error.status_code == 402
    assert error.code == "insufficient_funds"
    body = error.body
    assert isinstance(body, dict)
    assert body["balance"] == "0.000005"
    assert Decimal(body["required"]) > Decimal(body["balance"])
    assert body["portal_url"].startswith(gateway.url + "/portal/")
    async with httpx.AsyncClient() as browser:
        page = await browser.get(body["portal_url"])
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]

    assert gateway.upstream.requests == []
    assert await ledger(gateway) == before_ledger
    assert await gateway.balance() == before_balance
    assert await gateway.usage() == []
    assert await gateway.store.audit() == []
