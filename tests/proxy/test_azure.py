"""Azure OpenAI behind metergate: deployment paths, api-version, the operator's api-key, the deployment map.

Method: the official ``openai`` SDK's ``AsyncAzureOpenAI`` client (and a plain ``AsyncOpenAI`` for Azure's v1
API) against a gateway whose ``provider: azure`` route fronts the mock Azure resource
(:mod:`metergate.demo.mock_azure`), which answers only its own deployments, only with the operator's key in
``api-key``, and only with an ``api-version`` where Azure requires one. Each test checks what the resource
received (path, query, key, body) and the ledger: a served request is billed once, at the model its
deployment maps to, by exactly the usage the resource reported; a refused one reaches nothing and costs
nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from metergate.config.settings import SettingsError, load_settings
from metergate.demo.mock_azure import RECEIVED, build_mock_azure
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, serve, start_gateway
from tests.proxy.test_openai_sdk import expected_price

API_VERSION = "2024-10-21"
CLIENT_KEY = "azure-key-the-app-holds-" + "c" * 16  # what the application puts in api-key: never forwarded
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
MESSAGES: list[Any] = [{"role": "user", "content": "Say something about prepaid wallets."}]
FUNDS = 1_000_000
# The resource's deployments (what each one runs) and the route's map (what each one is priced as).
RESOURCE = {"my-gpt4o": "gpt-4o", "mini": "gpt-4o-mini", "embed": "text-embedding-3-small",
            "retired": "gpt-4o"}
DEPLOYMENTS = {"my-gpt4o": "gpt-4o", "mini": "gpt-4o-mini", "embed": "text-embedding-3-small"}


@pytest.fixture
async def resource() -> AsyncIterator[Upstream]:
    app = build_mock_azure(RESOURCE, PROVIDER_KEY)
    runner, port = await serve(app)
    yield Upstream(f"http://127.0.0.1:{port}", app)
    await runner.cleanup()


async def _gateway(resource: Upstream, tmp_path: Path, funds: int) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(resource, f"sqlite:///{tmp_path / 'azure.db'}", routes=[
        {"prefix": "/azure", "upstream": resource.url, "provider": "azure", "api_key": PROVIDER_KEY,
         "deployments": DEPLOYMENTS}])
    await gw.customer("acme", funds=funds)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def gw(resource: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(resource, tmp_path, FUNDS):
        yield gateway


@pytest.fixture
async def broke(resource: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(resource, tmp_path, 0):
        yield gateway


def azure(gw: Gateway, **kwargs: Any) -> openai.AsyncAzureOpenAI:
    """The application's Azure client, pointed at metergate instead of the resource."""
    options: dict[str, Any] = {"api_version": API_VERSION, **kwargs}
    client = openai.AsyncAzureOpenAI(azure_endpoint=f"{gw.url}/azure", api_key=CLIENT_KEY,
                                     default_headers=AS_ACME, max_retries=0, **options)
    gw.clients.append(client)  # type: ignore[arg-type]
    return client


def received(gw: Gateway) -> list[dict[str, Any]]:
    return gw.upstream.app[RECEIVED]


def assert_operator_key_only(arrived: dict[str, Any]) -> None:
    headers = {name.lower(): value for name, value in arrived["headers"].items()}
    assert headers["api-key"] == PROVIDER_KEY
    assert "authorization" not in headers
    assert CLIENT_KEY not in str(arrived["headers"])


async def billed_once(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The request's one usage record, with the wallet down by exactly its charge and no hold left open."""
    records = await gw.usage()
    [record] = [r for r in records if r["id"] == request_id]
    assert len(records) == 1
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (FUNDS - record["charged_amount"], 0)
    assert await gw.store.audit() == []
    return record


async def assert_nothing_happened(gw: Gateway, funds: int = FUNDS) -> None:
    assert received(gw) == []
    assert await gw.usage() == []
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (funds, 0)


# ---------------------------------------------------------------------------------------------- served


async def test_azure_sdk_chat_is_forwarded_to_the_deployment_and_billed_once_by_its_usage(gw: Gateway) -> None:
    raw = await azure(gw).chat.completions.with_raw_response.create(
        model="my-gpt4o", messages=MESSAGES, max_tokens=40)
    completion = raw.parse()
    assert completion.model == "gpt-4o" and completion.choices[0].message.content
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"]) == (
        "/openai/deployments/my-gpt4o/chat/completions", f"api-version={API_VERSION}")
    assert arrived["body"]["model"] == "my-gpt4o"  # the client's body, as sent
    assert_operator_key_only(arrived)
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    record = await billed_once(gw, raw.headers["X-Metergate-Request-Id"])
    assert (record["model"], record["detail"]["deployment"], record["endpoint"]) == (
        "gpt-4o", "my-gpt4o", "chat.completions")
    assert (record["usage_source"], record["tokens_input"], record["tokens_output"]) == (
        "provider", usage.prompt_tokens, usage.completion_tokens)
    assert record["charged_amount"] == expected_price("gpt-4o", usage.prompt_tokens, usage.completion_tokens)
    assert record["detail"]["cost"]["source"] == "genai-prices" and record["cost_nanos"] > 0  # Azure's gpt-4o


async def test_the_deployment_map_prices_a_request_whatever_model_its_body_names(gw: Gateway) -> None:
    # azure_deployment puts the deployment in the path; the body names a cheaper model, which Azure ignores.
    client = azure(gw, azure_deployment="my-gpt4o")
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    [arrived] = received(gw)
    assert arrived["raw_path"] == "/openai/deployments/my-gpt4o/chat/completions"
    assert arrived["body"]["model"] == "gpt-4o-mini"
    assert completion.usage is not None
    [record] = await gw.usage()
    assert (record["model"], record["detail"]["deployment"]) == ("gpt-4o", "my-gpt4o")
    assert record["charged_amount"] == expected_price(
        "gpt-4o", completion.usage.prompt_tokens, completion.usage.completion_tokens)


@pytest.mark.parametrize("client_asks_usage", [False, True])
async def test_azure_sdk_stream_is_billed_once_by_the_usage_chunk(gw: Gateway, client_asks_usage: bool) -> None:
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_asks_usage else {}
    stream = await azure(gw).chat.completions.create(model="mini", messages=MESSAGES, max_tokens=30, stream=True,
                                                     **options)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"]) == (
        "/openai/deployments/mini/chat/completions", f"api-version={API_VERSION}")
    assert arrived["body"]["stream_options"] == {"include_usage": True}  # asked of Azure either way
    assert_operator_key_only(arrived)
    reported = [c.usage for c in chunks if c.usage is not None]
    records = await gw.usage()
    [record] = records
    assert record["stream"] is True and record["usage_source"] == "provider"
    assert (record["model"], record["detail"]["deployment"]) == ("gpt-4o-mini", "mini")
    if client_asks_usage:
        [usage] = reported
        assert (record["tokens_input"], record["tokens_output"]) == (usage.prompt_tokens, usage.completion_tokens)
    else:
        assert reported == []  # the usage chunk the client did not ask for is metered, not relayed
    assert record["charged_amount"] == expected_price("gpt-4o-mini", record["tokens_input"],
                                                      record["tokens_output"])
    await billed_once(gw, record["id"])


async def test_azure_sdk_completions_and_embeddings_are_metered_on_their_deployments(gw: Gateway) -> None:
    client = azure(gw)
    completion = await client.completions.create(model="mini", prompt="Once upon a time", max_tokens=20)
    embedding = await client.embeddings.create(model="embed", input=["prepaid", "wallets"])
    assert [r["raw_path"] for r in received(gw)] == [
        "/openai/deployments/mini/completions", "/openai/deployments/embed/embeddings"]
    assert completion.usage is not None
    by_endpoint = {r["endpoint"]: r for r in await gw.usage()}
    assert by_endpoint["completions"]["charged_amount"] == expected_price(
        "gpt-4o-mini", completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert by_endpoint["embeddings"]["tokens_input"] == embedding.usage.prompt_tokens
    assert by_endpoint["embeddings"]["charged_amount"] == expected_price(
        "text-embedding-3-small", embedding.usage.prompt_tokens, 0)
    assert by_endpoint["embeddings"]["detail"]["deployment"] == "embed"


async def test_azure_sdk_responses_name_the_deployment_in_the_body(gw: Gateway) -> None:
    response = await azure(gw).responses.create(model="my-gpt4o", input="Say something.", max_output_tokens=30)
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"]) == ("/openai/responses", f"api-version={API_VERSION}")
    assert_operator_key_only(arrived)
    assert response.usage is not None
    [record] = await gw.usage()
    assert (record["endpoint"], record["model"], record["detail"]["deployment"]) == (
        "responses", "gpt-4o", "my-gpt4o")
    assert (record["tokens_input"], record["tokens_output"]) == (
        response.usage.input_tokens, response.usage.output_tokens)
    assert record["charged_amount"] == expected_price(
        "gpt-4o", response.usage.input_tokens, response.usage.output_tokens)


async def test_azure_v1_api_takes_the_deployment_from_the_body_and_needs_no_api_version(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/azure/openai/v1", api_key=CLIENT_KEY, default_headers=AS_ACME,
                                max_retries=0)
    gw.clients.append(client)
    stream = await client.chat.completions.create(model="my-gpt4o", messages=MESSAGES, max_tokens=20, stream=True,
                                                  stream_options={"include_usage": True})
    [usage] = [chunk.usage async for chunk in stream if chunk.usage is not None]
    [arrived] = received(gw)
    assert (arrived["raw_path"], arrived["query_string"], arrived["body"]["model"]) == (
        "/openai/v1/chat/completions", "", "my-gpt4o")
    assert_operator_key_only(arrived)
    [record] = await gw.usage()
    assert (record["model"], record["detail"]["deployment"]) == ("gpt-4o", "my-gpt4o")
    assert record["charged_amount"] == expected_price("gpt-4o", usage.prompt_tokens, usage.completion_tokens)


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("path_or_body", ["path", "body"])
async def test_an_unknown_deployment_is_refused_and_reaches_nothing(gw: Gateway, path_or_body: str) -> None:
    # "retired" exists at the resource but not in the route's map: the map is what the route serves.
    client: openai.AsyncOpenAI = azure(gw) if path_or_body == "path" else openai.AsyncOpenAI(
        base_url=f"{gw.url}/azure/openai/v1", api_key=CLIENT_KEY, default_headers=AS_ACME, max_retries=0)
    gw.clients.append(client)
    with pytest.raises(openai.NotFoundError) as refused:
        await client.chat.completions.create(model="retired", messages=MESSAGES, max_tokens=5)
    assert refused.value.code == "unknown_deployment"
    await assert_nothing_happened(gw)


@pytest.mark.parametrize("api_version", [
    "latest",  # only the v1 API knows "latest" and "preview"
    "2024-13-01",  # no such month
    "2024-10-21-beta",
    "2024-10-21&x=1",  # the SDK encodes the "&": one value, which is not a version
    "",
])
async def test_a_malformed_api_version_is_refused_and_reaches_nothing(gw: Gateway, api_version: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await azure(gw, api_version=api_version).chat.completions.create(model="mini", messages=MESSAGES)
    assert (refused.value.code, refused.value.param) == ("invalid_api_version", "api-version")
    await assert_nothing_happened(gw)


@pytest.mark.parametrize(("query", "code", "param"), [
    ("", "missing_api_version", "api-version"),
    ("api-version=2024-10-21&api-version=2025-01-01", "invalid_api_version", "api-version"),
    ("api-version=2024-10-21&deployment=other", "invalid_query", "deployment"),
    ("api-version=%ff", "invalid_query", None),
])
async def test_a_missing_or_ambiguous_api_version_is_refused_and_reaches_nothing(
        gw: Gateway, query: str, code: str, param: str | None) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as client:
        r = await client.post(f"/azure/openai/deployments/mini/chat/completions?{query}",
                              json={"messages": MESSAGES})
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (code, param)
    await assert_nothing_happened(gw)


async def test_a_402_surfaces_as_the_sdks_status_error_with_the_portal_url(broke: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        await azure(broke).chat.completions.create(model="my-gpt4o", messages=MESSAGES, max_tokens=5)
    error = refused.value
    assert error.status_code == 402
    body: dict[str, Any] = error.body  # type: ignore[assignment]
    assert body["code"] == "insufficient_funds"
    assert body["portal_url"].startswith(f"{broke.url}/portal/")
    assert error.message.endswith(f"Top up at {body['portal_url']}")
    await assert_nothing_happened(broke, funds=0)


# ---------------------------------------------------------------------------------------------- config


def _route(**fields: Any) -> dict[str, Any]:
    return {"prefix": "/azure", "upstream": "https://res.openai.azure.com", "provider": "azure",
            "deployments": DEPLOYMENTS, **fields}


@pytest.mark.parametrize(("route", "complaint"), [
    (_route(deployments={}), "deployments"),
    ({"prefix": "/openai", "upstream": "https://api.openai.com", "deployments": DEPLOYMENTS}, "deployments"),
    (_route(deployments={"../x": "gpt-4o"}), "deployment '../x'"),
    (_route(deployments={"x" * 65: "gpt-4o"}), "deployment"),
    (_route(deployments={"ok": "gpt 4o"}), "not a model name"),
])
def test_an_azure_route_needs_a_valid_deployment_map(route: dict[str, Any], complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        load_settings(routes=[route])


def test_an_azure_route_is_costed_as_azure_unless_told_otherwise() -> None:
    assert load_settings(routes=[_route()]).routes[0].provider_id == "azure"
    assert load_settings(routes=[_route(provider_id="openai")]).routes[0].provider_id == "openai"
