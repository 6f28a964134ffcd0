"""Google Gemini's native API behind metergate: generateContent and its SSE stream, billed from usageMetadata.

Method: the official ``google-genai`` SDK (``genai.Client`` with ``HttpOptions(base_url=...)``), and raw HTTP where
the SDK cannot send what a hostile client would, against a gateway whose ``provider: gemini`` route fronts the
mock Gemini API (:mod:`metergate.demo.mock_gemini`), which speaks Google's wire format and accepts only the
operator's key. Each test checks what the upstream received (path, query, key, body) and the ledger through the
admin API: a served request is billed once, by exactly the usage the upstream reported, cached and thinking
tokens on their own rates; a refused one is answered in Google's error envelope, reaches nothing and costs nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from google import genai
from google.genai import errors, types

from metergate.config.settings import SettingsError, load_settings
from metergate.demo.mock_gemini import RECEIVED, build_mock_gemini
from metergate.metering.usage import UsageAnomaly, from_gemini
from metergate.proxy.adapters import gemini as gemini_adapter
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, serve, start_gateway

MODEL = "gemini-2.5-flash"
CLIENT_KEY = "google-key-the-app-holds-" + "g" * 16  # what the application gives the SDK: never forwarded
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
FUNDS = 1_000_000
RATES = {"input_per_mtok": "0.30", "cached_input_per_mtok": "0.03", "output_per_mtok": "2.50"}
PRICING = {"asset": "USD", "models": {MODEL: RATES, "gemini-2.0-flash": {"input_per_mtok": "0.10",
                                                                         "output_per_mtok": "0.40"}}}
PROMPT = "Say something about prepaid wallets."
GENERATE = f"/gemini/v1beta/models/{MODEL}:generateContent"
STREAM = f"/gemini/v1beta/models/{MODEL}:streamGenerateContent"
BODY: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
                        "generationConfig": {"maxOutputTokens": 40}}


@pytest.fixture
async def upstream_gemini() -> AsyncIterator[Upstream]:
    app = build_mock_gemini(PROVIDER_KEY)
    runner, port = await serve(app)
    yield Upstream(f"http://127.0.0.1:{port}", app)
    await runner.cleanup()


async def _gateway(upstream: Upstream, tmp_path: Path, funds: int, **overrides: Any) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'gemini.db'}", pricing=PRICING, routes=[
        {"prefix": "/gemini", "upstream": upstream.url, "provider": "gemini", "api_key": PROVIDER_KEY}], **overrides)
    await gw.customer("acme", funds=funds)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def gw(upstream_gemini: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(upstream_gemini, tmp_path, FUNDS):
        yield gateway


@pytest.fixture
async def broke(upstream_gemini: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(upstream_gemini, tmp_path, 0):
        yield gateway


def gemini(gw: Gateway, *, api_key: str = CLIENT_KEY, behavior: str | None = None,
           headers: dict[str, str] | None = None) -> genai.Client:
    """The application's google-genai client, pointed at metergate instead of Google."""
    sent = dict(AS_ACME if headers is None else headers)
    if behavior:
        sent["X-Mock-Behavior"] = behavior
    return _closed_with(gw, genai.Client(api_key=api_key, http_options=types.HttpOptions(
        base_url=f"{gw.url}/gemini", headers=sent)))


class _SdkClosing:
    """Closes a genai client's HTTP clients with the gateway (this SDK version has no close of its own)."""

    def __init__(self, client: genai.Client) -> None:
        self._api = client._api_client

    async def close(self) -> None:
        await self._api._async_httpx_client.aclose()
        self._api._httpx_client.close()


def _closed_with(gw: Gateway, client: genai.Client) -> genai.Client:
    gw.clients.append(_SdkClosing(client))  # type: ignore[arg-type]
    return client


def received(gw: Gateway) -> list[dict[str, Any]]:
    return gw.upstream.app[RECEIVED]


def assert_operator_key_only(arrived: dict[str, Any], *secrets: str) -> None:
    headers = {name.lower(): value for name, value in arrived["headers"].items()}
    assert headers["x-goog-api-key"] == PROVIDER_KEY
    assert "authorization" not in headers and "key=" not in arrived["query_string"]
    for secret in (CLIENT_KEY, *secrets):
        assert secret not in str(arrived)


def price(usage: types.GenerateContentResponseUsageMetadata) -> int:
    """The price in micro-dollars (USD scale 6) of ``usage`` at RATES, rounded half-up: uncached prompt and tool
    prompt at the input rate, cached prompt at the cached rate, answer and thinking at the output rate."""
    cached = usage.cached_content_token_count or 0
    uncached = (usage.prompt_token_count or 0) - cached + (usage.tool_use_prompt_token_count or 0)
    output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    micros = (uncached * Decimal(RATES["input_per_mtok"]) + cached * Decimal(RATES["cached_input_per_mtok"])
              + output * Decimal(RATES["output_per_mtok"]))
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def billed_once(gw: Gateway) -> dict[str, Any]:
    """The one usage record, with the wallet down by exactly its charge and no hold left open."""
    [record] = await gw.usage()
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (FUNDS - record["charged_amount"], 0)
    assert await gw.store.audit() == []
    return record


def assert_billed_as_reported(record: dict[str, Any], usage: types.GenerateContentResponseUsageMetadata) -> None:
    thoughts = usage.thoughts_token_count or 0
    assert record["usage_source"] == "provider"
    assert (record["tokens_input"], record["tokens_cached_input"], record["tokens_output"],
            record["tokens_reasoning"]) == (
        (usage.prompt_token_count or 0) + (usage.tool_use_prompt_token_count or 0),
        usage.cached_content_token_count or 0, (usage.candidates_token_count or 0) + thoughts, thoughts)
    assert record["charged_amount"] == price(usage) > 0


async def assert_nothing_happened(gw: Gateway, funds: int = FUNDS) -> None:
    assert received(gw) == []
    assert await gw.usage() == []
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (funds, 0)


# ---------------------------------------------------------------------------------------------- served


async def test_sdk_generate_content_is_forwarded_and_billed_once_by_its_usage_metadata(gw: Gateway) -> None:
    response = await gemini(gw).aio.models.generate_content(
        model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=40))
    assert response.text and response.usage_metadata is not None
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"]) == (f"/v1beta/models/{MODEL}:generateContent", "")
    assert arrived["body"]["generationConfig"]["maxOutputTokens"] == 40  # covered by the hold: sent unchanged
    assert_operator_key_only(arrived)
    record = await billed_once(gw)
    assert (record["model"], record["endpoint"], record["stream"]) == (MODEL, "generate_content", False)
    assert_billed_as_reported(record, response.usage_metadata)
    assert record["detail"]["tokens_exact"] is False  # Gemini's tokenizer is approximated
    assert record["detail"]["cost"]["source"] == "genai-prices" and record["cost_nanos"] > 0


async def test_sdk_stream_is_billed_once_by_the_last_cumulative_usage_metadata(gw: Gateway) -> None:
    stream = await gemini(gw, behavior="words:30").aio.models.generate_content_stream(
        model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=200))
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 2 and "".join(c.text or "" for c in chunks).count(" ") >= 29
    usages = [c.usage_metadata for c in chunks if c.usage_metadata is not None]
    # Cumulative counts, never summed: each chunk reports everything so far.
    assert (usages[0].candidates_token_count or 0) < (usages[-1].candidates_token_count or 0)
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"]) == (f"/v1beta/models/{MODEL}:streamGenerateContent",
                                                              "alt=sse")
    assert_operator_key_only(arrived)
    record = await billed_once(gw)
    assert record["stream"] is True
    assert_billed_as_reported(record, usages[-1])


@pytest.mark.parametrize("stream", [False, True])
async def test_cached_and_thinking_tokens_are_priced_on_their_own_rates(gw: Gateway, stream: bool) -> None:
    client = gemini(gw, behavior="cached:6,thoughts:25,tool-prompt:3")
    config = types.GenerateContentConfig(max_output_tokens=100)
    if stream:
        chunks = [c async for c in await client.aio.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config)]
        usage = chunks[-1].usage_metadata
    else:
        usage = (await client.aio.models.generate_content(model=MODEL, contents=PROMPT, config=config)).usage_metadata
    assert usage is not None and (usage.cached_content_token_count, usage.thoughts_token_count,
                                  usage.tool_use_prompt_token_count) == (6, 25, 3)
    record = await billed_once(gw)
    assert_billed_as_reported(record, usage)
    # The same tokens all at the input and output rates would cost more: the cache discount was applied.
    prompt, answer = usage.prompt_token_count or 0, usage.candidates_token_count or 0
    flat = (prompt + 3) * Decimal("0.30") + (answer + 25) * Decimal("2.50")
    assert record["charged_amount"] < flat
    # The provider's cost, from genai-prices' Gemini 2.5 Flash rates (0.30 / 0.03 cache read / 2.50), in nanos.
    cost = record["detail"]["cost"]
    assert (cost["source"], cost["cached_input_per_mtok"], cost["output_per_mtok"]) == ("genai-prices", "0.03", "2.5")
    nanos = (((usage.prompt_token_count or 0) + 3 - 6) * Decimal("0.30") + 6 * Decimal("0.03")
             + ((usage.candidates_token_count or 0) + 25) * Decimal("2.5")) * 1000
    assert record["cost_nanos"] == int(nanos.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def test_cost_overrides_price_a_gemini_model(upstream_gemini: Upstream, tmp_path: Path) -> None:
    overrides = {MODEL: {"input_per_mtok": "1", "cached_input_per_mtok": "0.5", "output_per_mtok": "4"}}
    async for gw in _gateway(upstream_gemini, tmp_path, FUNDS, cost_overrides=overrides):
        response = await gemini(gw, behavior="cached:4,thoughts:10").aio.models.generate_content(
            model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=60))
        usage = response.usage_metadata
        assert usage is not None
        record = await billed_once(gw)
        assert record["detail"]["cost"]["source"] == "override"
        expected = (((usage.prompt_token_count or 0) - 4) * 1 + 4 * Decimal("0.5")
                    + ((usage.candidates_token_count or 0) + 10) * 4) * 1000
        assert record["cost_nanos"] == int(expected)


async def test_a_proxy_key_in_x_goog_api_key_identifies_the_customer_and_never_goes_upstream(gw: Gateway) -> None:
    issued = await gw.admin.post("/customers/acme/api-keys")
    assert issued.status_code == 201, issued.text
    key = issued.json()["key"]
    response = await gemini(gw, api_key=key, headers={}).aio.models.generate_content(
        model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=20))
    assert response.usage_metadata is not None
    [arrived] = received(gw)
    assert_operator_key_only(arrived, key)
    assert_billed_as_reported(await billed_once(gw), response.usage_metadata)


async def test_a_proxy_key_in_the_key_query_parameter_is_accepted_stripped_and_never_logged(
        gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    issued = await gw.admin.post("/customers/acme/api-keys")
    key = issued.json()["key"]
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post(STREAM, params={"alt": "sse", "key": key}, json=BODY)
    assert r.status_code == 200, r.text
    assert r.text.startswith("data: {") and "usageMetadata" in r.text
    [arrived] = received(gw)
    assert arrived["query_string"] == "alt=sse"
    assert_operator_key_only(arrived, key)
    record = await billed_once(gw)
    assert record["usage_source"] == "provider" and record["charged_amount"] > 0
    # What metergate and its server log (the test's own HTTP client logs the URL it sent, key included).
    ours = "\n".join(record.getMessage() for record in caplog.records
                     if not record.name.startswith(("httpx", "httpcore")))
    assert "aiohttp.access" in {record.name for record in caplog.records}
    assert key not in ours and PROVIDER_KEY not in ours and "key=" not in ours


async def test_the_v1_api_version_is_served_too(gw: Gateway) -> None:
    client = _closed_with(gw, genai.Client(api_key=CLIENT_KEY, http_options=types.HttpOptions(
        base_url=f"{gw.url}/gemini", api_version="v1", headers=AS_ACME)))
    response = await client.aio.models.generate_content(
        model="gemini-2.0-flash", contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=20))
    [arrived] = received(gw)
    assert arrived["raw_path"] == "/v1/models/gemini-2.0-flash:generateContent"
    record = await billed_once(gw)
    assert response.usage_metadata is not None and record["model"] == "gemini-2.0-flash"
    assert record["tokens_output"] == response.usage_metadata.candidates_token_count


async def test_free_endpoints_count_tokens_and_models_pass_unbilled(gw: Gateway) -> None:
    client = gemini(gw)
    counted = await client.aio.models.count_tokens(model=MODEL, contents=PROMPT)
    assert counted.total_tokens and counted.total_tokens > 0
    model = await client.aio.models.get(model=MODEL)
    assert model.name == f"models/{MODEL}"
    listed = [m.name async for m in await client.aio.models.list()]
    assert f"models/{MODEL}" in listed
    assert [r["raw_path"] for r in received(gw)] == [
        f"/v1beta/models/{MODEL}:countTokens", f"/v1beta/models/{MODEL}", "/v1beta/models"]
    for arrived in received(gw):
        assert_operator_key_only(arrived)
    assert await gw.usage() == []
    assert (await gw.balance())["available"] == FUNDS


async def test_a_route_whose_upstream_names_the_version_takes_paths_without_it(
        upstream_gemini: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream_gemini, f"sqlite:///{tmp_path / 'v.db'}", pricing=PRICING, routes=[
        {"prefix": "/gemini", "upstream": upstream_gemini.url + "/v1beta", "provider": "gemini",
         "api_key": PROVIDER_KEY, "free_endpoints": []}])
    try:
        await gw.customer("acme", funds=FUNDS)
        async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as http:
            served = await http.post(f"/gemini/models/{MODEL}:generateContent", json=BODY)
            doubled = await http.post(GENERATE, json=BODY)
            counted = await http.post(f"/gemini/models/{MODEL}:countTokens", json=BODY)
        assert served.status_code == 200, served.text
        assert [r["raw_path"] for r in received(gw)] == [f"/v1beta/models/{MODEL}:generateContent"]
        assert (doubled.status_code, doubled.json()["error"]["details"][0]["reason"]) == (404, "unknown_route")
        # free_endpoints: [] turns the free endpoints off, by name
        assert (counted.status_code, counted.json()["error"]["details"][0]["reason"]) == (404, "endpoint_not_metered")
        [record] = await gw.usage()
        assert record["usage_source"] == "provider"
    finally:
        await gw.close()
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------- holds


async def test_without_a_max_the_output_limit_is_set_upstream_to_the_default(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as http:
        r = await http.post(GENERATE, json={"contents": BODY["contents"]})
    assert r.status_code == 200, r.text
    [arrived] = received(gw)
    limit = gw.settings.default_max_output_tokens
    assert arrived["body"]["generationConfig"] == {"maxOutputTokens": limit}
    assert r.headers["X-Metergate-Output-Limit"] == str(limit)
    await billed_once(gw)


@pytest.mark.parametrize("path", [GENERATE, STREAM + "?alt=sse"])
async def test_a_wallet_short_of_the_max_caps_max_output_tokens_upstream(
        upstream_gemini: Upstream, tmp_path: Path, path: str) -> None:
    funds = 300  # micro-dollars: the prompt and about a hundred output tokens at 2.50 per million
    async for gw in _gateway(upstream_gemini, tmp_path, funds):
        async with httpx.AsyncClient(base_url=gw.url, headers={**AS_ACME, "X-Mock-Behavior": "words:400"}) as http:
            r = await http.post(path, json={**BODY, "generationConfig": {"maxOutputTokens": 8000}})
        assert r.status_code == 200, r.text
        [arrived] = received(gw)
        capped = arrived["body"]["generationConfig"]["maxOutputTokens"]
        assert 1 <= capped < 8000
        assert r.headers["X-Metergate-Output-Limit"] == str(capped)
        [record] = await gw.usage()
        assert record["usage_source"] == "provider" and record["tokens_output"] <= capped
        balance = await gw.balance()
        assert balance["pending"] == 0 and 0 <= balance["available"] == funds - record["charged_amount"]


async def test_a_402_surfaces_as_the_sdks_client_error_with_a_reachable_portal_url(broke: Gateway) -> None:
    with pytest.raises(errors.ClientError) as refused:
        await gemini(broke).aio.models.generate_content(
            model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=5))
    error = refused.value
    assert (error.code, error.status) == (402, "FAILED_PRECONDITION")
    [info] = error.details["error"]["details"]
    assert (info["reason"], info["domain"]) == ("insufficient_funds", "metergate")
    portal_url = info["metadata"]["portal_url"]
    assert portal_url.startswith(f"{broke.url}/portal/") and (error.message or "").endswith(f"Top up at {portal_url}")
    async with httpx.AsyncClient() as http:
        page = await http.get(portal_url)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    with pytest.raises(errors.ClientError) as streamed:
        [c async for c in await gemini(broke).aio.models.generate_content_stream(model=MODEL, contents=PROMPT)]
    assert streamed.value.code == 402
    await assert_nothing_happened(broke, funds=0)


# ---------------------------------------------------------------------------------------------- refusals


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(("path", "content", "status", "code", "param"), [
    # the body
    (GENERATE, b'{"contents": [', 400, "invalid_json", None),
    (GENERATE, b"[1, 2]", 400, "invalid_json", None),
    (GENERATE, _raw({"contents": []}), 400, "invalid_request", "contents"),
    (GENERATE, _raw({"contents": [{"parts": "hi"}]}), 400, "invalid_request", "contents[0].parts"),
    (GENERATE, _raw({"contents": [{"parts": [{"text": 7}]}]}), 400, "invalid_request", "contents[0].parts[0].text"),
    # generationConfig, by type and bound
    (GENERATE, _raw({**BODY, "generationConfig": {"maxOutputTokens": "40"}}), 400, "invalid_request",
     "generationConfig.maxOutputTokens"),
    (GENERATE, _raw({**BODY, "generationConfig": {"maxOutputTokens": 0}}), 400, "invalid_request",
     "generationConfig.maxOutputTokens"),
    (GENERATE, _raw({**BODY, "generationConfig": {"maxOutputTokens": 40.5}}), 400, "invalid_request",
     "generationConfig.maxOutputTokens"),
    (GENERATE, _raw({**BODY, "generationConfig": {"maxOutputTokens": 10**9}}), 400, "invalid_request",
     "generationConfig.maxOutputTokens"),
    (GENERATE, _raw({**BODY, "generationConfig": {"candidateCount": True}}), 400, "invalid_request",
     "generationConfig.candidateCount"),
    (GENERATE, _raw({**BODY, "generationConfig": {"thinkingConfig": {"thinkingBudget": "lots"}}}), 400,
     "invalid_request", "generationConfig.thinkingConfig.thinkingBudget"),
    (GENERATE, _raw({**BODY, "generationConfig": []}), 400, "invalid_request", "generationConfig"),
    # a limit under another spelling the API also parses would slip past the hold
    (GENERATE, _raw({**BODY, "generationConfig": {"max_output_tokens": 99999}}), 400, "invalid_request",
     "generationConfig.max_output_tokens"),
    (GENERATE, _raw({**BODY, "generation_config": {"maxOutputTokens": 99999}}), 400, "invalid_request",
     "generation_config"),
    # the path and query
    (f"/gemini/v1beta/models/{MODEL}:fooBar", _raw(BODY), 404, "unknown_method", None),
    (f"/gemini/v1beta/models/{MODEL}:embedContent", _raw(BODY), 404, "endpoint_not_metered", None),
    ("/gemini/v1beta/models/-bad~model:generateContent", _raw(BODY), 400, "invalid_model", "model"),
    (STREAM, _raw(BODY), 400, "invalid_query", "alt"),
    (STREAM + "?alt=json", _raw(BODY), 400, "invalid_query", "alt"),
    (GENERATE + "?alt=sse", _raw(BODY), 400, "invalid_query", "alt"),
    (GENERATE + "?prettyPrint=false", _raw(BODY), 400, "invalid_query", "prettyPrint"),
    ("/gemini/v1beta/cachedContents", _raw({}), 404, "endpoint_not_metered", None),
    ("/gemini/v2/models/gemini-2.5-flash:generateContent", _raw(BODY), 404, "unknown_route", None),
])
async def test_bad_input_is_refused_in_googles_envelope_and_charges_nothing(
        gw: Gateway, path: str, content: bytes, status: int, code: str, param: str | None) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers={**AS_ACME, "Content-Type": "application/json"}) as http:
        r = await http.post(path, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["status"]) == (status, {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[status])
    assert error["message"]
    [info] = error["details"]
    assert info["reason"] == code and info["metadata"].get("param") == param
    await assert_nothing_happened(gw)


@pytest.mark.parametrize(("headers", "query", "code"), [
    ({}, {}, "missing_customer"),
    ({"x-goog-api-key": "mgk_test_" + "n" * 30}, {}, "invalid_api_key"),
    ({}, {"key": "mgk_test_" + "n" * 30}, "invalid_api_key"),
    ({"x-goog-api-key": "mgk_test_" + "a" * 30}, {"key": "mgk_test_" + "b" * 30}, "invalid_api_key"),  # two keys
])
async def test_an_unidentified_client_gets_googles_401(gw: Gateway, headers: dict[str, str], query: dict[str, str],
                                                       code: str) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post(GENERATE, params=query, json=BODY, headers=headers)
    assert r.status_code == 401
    error = r.json()["error"]
    assert (error["code"], error["status"], error["details"][0]["reason"]) == (401, "UNAUTHENTICATED", code)
    await assert_nothing_happened(gw)


async def test_an_oversize_body_is_refused_with_413_before_it_is_read(gw: Gateway) -> None:
    limit = gw.settings.max_body_bytes_for(GENERATE)
    huge = _raw({"contents": [{"parts": [{"text": "x" * (limit + 10)}]}]})
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as http:
        r = await http.post(GENERATE, content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    error = r.json()["error"]
    assert (error["code"], error["details"][0]["reason"]) == (413, "body_too_large")
    await assert_nothing_happened(gw)


async def test_the_sdk_raises_its_own_error_for_a_refused_generation_config(gw: Gateway) -> None:
    with pytest.raises(errors.ClientError) as refused:
        await gemini(gw).aio.models.generate_content(
            model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(candidate_count=500))
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    assert "candidateCount" in (refused.value.message or "")
    await assert_nothing_happened(gw)


# ---------------------------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize("behavior", [
    'usage-field:candidatesTokenCount="12"',  # a string
    "usage-field:promptTokenCount=-5",  # negative
    "usage-field:thoughtsTokenCount=100000001",  # absurd
    "usage-field:cachedContentTokenCount=999999",  # more cached than the prompt
    "usage-field:promptTokenCount=null",  # the prompt count missing
])
@pytest.mark.parametrize("stream", [False, True])
async def test_implausible_usage_is_an_anomaly_billed_from_the_estimate(gw: Gateway, behavior: str,
                                                                        stream: bool) -> None:
    client = gemini(gw, behavior=behavior)
    config = types.GenerateContentConfig(max_output_tokens=40)
    if stream:
        [c async for c in await client.aio.models.generate_content_stream(model=MODEL, contents=PROMPT,
                                                                          config=config)]
    else:
        await client.aio.models.generate_content(model=MODEL, contents=PROMPT, config=config)
    record = await billed_once(gw)
    assert record["usage_source"] == "estimated"
    assert len(record["detail"]["usage_anomalies"]) >= 1
    assert 0 < record["charged_amount"] <= record["detail"]["hold"]


async def test_a_bad_frame_on_an_early_chunk_makes_the_whole_stream_billed_from_the_estimate(gw: Gateway) -> None:
    client = gemini(gw, behavior="words:20,chunk-usage-field:candidatesTokenCount=-7")
    [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=80))]
    record = await billed_once(gw)
    assert record["usage_source"] == "estimated" and record["detail"]["usage_anomalies"]


async def test_a_stream_that_ends_without_its_finishing_chunk_bills_the_last_usage_seen(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers={**AS_ACME, "X-Mock-Behavior": "words:20,no-finish"}) as h:
        r = await h.post(STREAM + "?alt=sse", json=BODY)
    assert r.status_code == 200 and r.text.count("data: ") == 4  # five chunks of four words, the last one missing
    last = json.loads(r.text.strip().split("\r\n\r\n")[-1].removeprefix("data: "))["usageMetadata"]
    record = await billed_once(gw)
    # The last cumulative counts seen were delivered; without a finish they are billed as an estimate from them.
    assert record["usage_source"] == "estimated"
    assert record["tokens_input"] == last["promptTokenCount"]
    assert record["tokens_output"] >= last["candidatesTokenCount"] > 0


async def test_a_stream_cut_by_the_upstream_is_billed_once_and_says_so_in_googles_envelope(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers={**AS_ACME, "X-Mock-Behavior": "words:20,die-after:2"}) as h:
        r = await h.post(STREAM + "?alt=sse", json=BODY)
    events = [line for line in r.text.split("\r\n\r\n") if line.strip()]
    assert len(events) == 3 and '"error"' in events[-1] and "upstream_stream_broken" in events[-1]
    record = await billed_once(gw)
    assert record["usage_source"] == "estimated" and record["tokens_output"] > 0 and record["charged_amount"] > 0


# ---------------------------------------------------------------------------------------------- config


def test_a_gemini_route_is_priced_as_google_by_default() -> None:
    settings = load_settings(routes=[{"prefix": "/gemini", "upstream": "https://generativelanguage.googleapis.com",
                                      "provider": "gemini"}])
    assert settings.routes[0].provider_id == "google"


def test_free_endpoints_of_a_gemini_route_are_named_after_the_sdk() -> None:
    load_settings(routes=[{"prefix": "/g", "upstream": "https://x.example", "provider": "gemini",
                           "free_endpoints": ["models.count_tokens"]}])
    with pytest.raises(SettingsError, match=r"moderations\.create"):
        load_settings(routes=[{"prefix": "/g", "upstream": "https://x.example", "provider": "gemini",
                               "free_endpoints": ["moderations.create"]}])


# ---------------------------------------------------------------------------------------------- estimates


def _png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    return base64.b64encode(header + b"\x00" * 32).decode()


@pytest.mark.parametrize(("width", "height", "tokens"), [
    (384, 384, 258),  # small: one flat charge
    (385, 100, 258),  # one tile
    (1000, 500, 516),  # two 768 px tiles across, one down
    (2000, 2000, 258 * 9),
])
def test_inline_images_are_held_by_geminis_tile_rule(width: int, height: int, tokens: int) -> None:
    text_only = {"contents": [{"parts": [{"text": PROMPT}]}]}
    with_image = {"contents": [{"parts": [{"text": PROMPT},
                                          {"inlineData": {"mimeType": "image/png", "data": _png(width, height)}}]}]}
    plain = gemini_adapter.prepare(b"", text_only, 100, model=MODEL)
    pictured = gemini_adapter.prepare(b"", with_image, 100, model=MODEL)
    assert pictured.input_tokens - plain.input_tokens == tokens
    assert (pictured.tokens_exact, pictured.max_output_tokens) == (False, 100)


async def test_an_unreadable_inline_image_is_refused_before_anything_is_held(gw: Gateway) -> None:
    body = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "bm90IGFuIGltYWdl"}}]}]}
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as http:
        r = await http.post(GENERATE, json=body)
    assert r.status_code == 400
    assert r.json()["error"]["details"][0]["reason"] == "invalid_image"
    await assert_nothing_happened(gw)


# ---------------------------------------------------------------------------------------------- usageMetadata


@pytest.mark.parametrize(("reported", "expected"), [
    # (input, cached, output, reasoning): tool prompt tokens are input, thinking tokens are output and reasoning
    ({"promptTokenCount": 10, "candidatesTokenCount": 5}, (10, 0, 5, 0)),
    ({"promptTokenCount": 10, "candidatesTokenCount": 5, "cachedContentTokenCount": 4, "thoughtsTokenCount": 7,
      "toolUsePromptTokenCount": 2, "totalTokenCount": 24}, (12, 4, 12, 7)),
    ({"promptTokenCount": 0, "candidatesTokenCount": 0}, (0, 0, 0, 0)),  # an explicit zero stays zero
    ({"promptTokenCount": 8}, (8, 0, 0, 0)),  # a blocked prompt: no candidates
])
def test_usage_metadata_is_read_by_the_providers_billing_rules(reported: dict[str, Any],
                                                                 expected: tuple[int, int, int, int]) -> None:
    usage = from_gemini(reported)
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens, usage.reasoning_tokens) == expected


@pytest.mark.parametrize("reported", [
    {"candidatesTokenCount": 5},  # no prompt count
    {"promptTokenCount": True, "candidatesTokenCount": 5},
    {"promptTokenCount": 10.0, "candidatesTokenCount": 5},
    {"promptTokenCount": 10, "candidatesTokenCount": 10**8 + 1},
    {"promptTokenCount": 10, "thoughtsTokenCount": -1},
    {"promptTokenCount": 10, "cachedContentTokenCount": 11},
    {"promptTokenCount": 10, "totalTokenCount": "15"},
    [1, 2],
])
def test_implausible_usage_metadata_is_an_anomaly(reported: Any) -> None:
    with pytest.raises(UsageAnomaly):
        from_gemini(reported)


def test_an_empty_usage_metadata_is_no_report() -> None:
    assert from_gemini({}) is None and from_gemini({"promptTokensDetails": []}) is None
