"""Free endpoints (models, token counting, moderations) pass through unmetered, for identified customers only.

Method: a gateway with an OpenAI and an Anthropic route in front of the mock upstream, driven with the
providers' own SDKs (``models.list()``, ``messages.count_tokens()``, ``moderations.create()``) and with raw
HTTP for what SDKs never send. For each we check the answer, what reached the upstream (the provider key,
no customer header, only the catalogue's path and query) and that the wallet did not move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest

from metergate.config.settings import SettingsError, load_settings
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, start_gateway

AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}


def routes(upstream: Upstream, **openai_route: Any) -> list[dict[str, Any]]:
    return [{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY, **openai_route},
            {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
             "provider_id": "anthropic"}]


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'free.db'}", routes=routes(upstream))
    await gateway.customer("acme", funds=1_000_000)
    yield gateway
    await gateway.close()
    await runner.cleanup()


def claude(gw: Gateway, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key="sk-ant-app-never-holds-it",
                                    default_headers={**AS_ACME, **headers}, max_retries=0)


async def assert_unmetered(gw: Gateway) -> None:
    """Nothing was held, charged or recorded."""
    assert await gw.usage() == []
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (1_000_000, 0)
    assert await gw.store.audit() == []


def assert_relayed_cleanly(request: dict[str, Any], auth: tuple[str, str]) -> None:
    """The upstream saw the operator's key and none of metergate's or the client's identity headers."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers[auth[0]] == auth[1]
    assert not any(name.startswith("x-metergate-") for name in headers)
    assert "sk-app-does-not-hold-the-key" not in str(headers) and "sk-ant-app-never-holds-it" not in str(headers)


# --- the SDKs' own calls


async def test_openai_models_list_and_retrieve_pass_through_unmetered(gw: Gateway) -> None:
    client = gw.openai("acme")
    page = await client.models.list()
    assert [m.id for m in page.data] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5"]
    model = await client.models.retrieve("gpt-4o")
    assert (model.id, model.object) == ("gpt-4o", "model")
    raw = await client.models.with_raw_response.list()
    assert raw.headers["X-Metergate-Request-Id"].startswith("req_")
    assert [(r["method"], r["path"]) for r in gw.upstream.requests] == [
        ("GET", "/v1/models"), ("GET", "/v1/models/gpt-4o"), ("GET", "/v1/models")]
    for request in gw.upstream.requests:
        assert_relayed_cleanly(request, ("authorization", f"Bearer {PROVIDER_KEY}"))
    await assert_unmetered(gw)


async def test_openai_model_the_upstream_does_not_know_is_its_404(gw: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await gw.openai("acme").models.retrieve("gpt-unknown-9")
    assert missing.value.code == "model_not_found"  # the upstream's answer, relayed
    await assert_unmetered(gw)


async def test_openai_moderations_pass_through_unmetered(gw: Gateway) -> None:
    result = await gw.openai("acme").moderations.create(input=["hello", "world"], model="omni-moderation-latest")
    assert [r.flagged for r in result.results] == [False, False]
    [request] = gw.upstream.requests
    assert (request["method"], request["path"]) == ("POST", "/v1/moderations")
    assert request["body"] == {"input": ["hello", "world"], "model": "omni-moderation-latest"}
    await assert_unmetered(gw)


async def test_anthropic_models_list_retrieve_and_count_tokens_pass_through_unmetered(gw: Gateway) -> None:
    async with claude(gw) as client:
        page = await client.models.list(limit=2)
        assert [m.id for m in page.data][:2] == ["gpt-4o-mini", "gpt-4o"]
        model = await client.models.retrieve("claude-sonnet-4-5")
        assert model.display_name == "Claude Sonnet 4 5"
        counted = await client.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "How many tokens is this?"}])
    assert counted.input_tokens > 4
    assert [(r["method"], r["path"]) for r in gw.upstream.requests] == [
        ("GET", "/v1/models"), ("GET", "/v1/models/claude-sonnet-4-5"), ("POST", "/v1/messages/count_tokens")]
    assert gw.upstream.requests[0]["query"] == {"limit": "2"}
    for request in gw.upstream.requests:
        assert_relayed_cleanly(request, ("x-api-key", PROVIDER_KEY))
        assert "anthropic-version" in {k.lower() for k in request["headers"]}  # the client's own headers go on
    await assert_unmetered(gw)


async def test_free_endpoints_work_with_a_proxy_key(gw: Gateway) -> None:
    issued = await gw.admin.post("/customers/acme/api-keys")
    assert issued.status_code == 201, issued.text
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key=issued.json()["key"],
                                  max_retries=0) as client:
        page = await client.models.list()
    assert len(page.data) == 4
    assert_relayed_cleanly(gw.upstream.requests[0], ("authorization", f"Bearer {PROVIDER_KEY}"))


async def test_route_whose_upstream_ends_in_v1_serves_free_endpoints_without_it(upstream: Upstream,
                                                                              tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'v1.db'}", routes=[
        {"prefix": "/openai", "upstream": f"{upstream.url}/v1", "api_key": PROVIDER_KEY}])
    try:
        await gw.customer("acme", funds=1_000_000)
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/openai", api_key="sk-x", default_headers=AS_ACME,
                                      max_retries=0) as client:
            page = await client.models.list()
        assert len(page.data) == 4
        assert [r["path"] for r in upstream.requests] == ["/v1/models"]
    finally:
        await gw.close()
        await runner.cleanup()


async def test_an_empty_wallet_still_lists_models(gw: Gateway) -> None:
    await gw.customer("broke", funds=0)
    assert len((await gw.openai("broke").models.list()).data) == 4


async def test_free_requests_count_against_the_request_rate_limit(upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'rl.db'}", routes=routes(upstream),
                                     rate_limits={"customer": {"requests_per_minute": 1}})
    try:
        await gw.customer("acme", funds=1_000_000)
        client = gw.openai("acme")
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            await client.models.list()
        assert limited.value.response.headers["x-should-retry"] == "true"
        assert len(upstream.requests) == 1
    finally:
        await gw.close()
        await runner.cleanup()


# --- still identified, still fenced in


async def test_free_endpoint_requires_identification(gw: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key="sk-not-a-proxy-key",
                                  max_retries=0) as anonymous:
        with pytest.raises(openai.AuthenticationError) as refused:
            await anonymous.models.list()
    assert refused.value.code == "invalid_api_key"
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get("/openai/v1/models")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "missing_customer")
    assert gw.upstream.requests == []


PATHS_REFUSED = {
    # --- cost provider money metergate does not meter: refused by name
    "openai-files": ("GET", "/openai/v1/files", 404, "endpoint_not_metered"),
    "openai-file-upload": ("POST", "/openai/v1/files", 404, "endpoint_not_metered"),
    "openai-batches": ("POST", "/openai/v1/batches", 404, "endpoint_not_metered"),
    "openai-batch": ("GET", "/openai/v1/batches/batch_abc", 404, "endpoint_not_metered"),
    "anthropic-message-batches": ("POST", "/anthropic/v1/messages/batches", 404, "endpoint_not_metered"),
    "anthropic-files": ("GET", "/anthropic/v1/files", 404, "endpoint_not_metered"),
    # --- not in the catalogue: never passed through
    "model-id-with-slash": ("GET", "/openai/v1/models/gpt-4o/../../admin", 404, "unknown_route"),
    "model-id-encoded-slash": ("GET", "/openai/v1/models/a%2Fb", 400, "invalid_path"),  # before any route
    "model-id-dot-dot": ("GET", "/openai/v1/models/..", 404, "unknown_route"),
    "models-sub-path": ("GET", "/openai/v1/models/gpt-4o/permissions", 404, "unknown_route"),
    "anthropic-moderations": ("POST", "/anthropic/v1/moderations", 404, "unknown_route"),
    "openai-count-tokens": ("POST", "/openai/v1/messages/count_tokens", 404, "unknown_route"),
    "models-without-version": ("GET", "/openai/models", 404, "unknown_route"),
    "fine-tuning": ("GET", "/openai/v1/fine_tuning/jobs", 404, "unknown_route"),
    # --- the wrong method on a free endpoint
    "post-models": ("POST", "/openai/v1/models", 405, "method_not_allowed"),
    "get-moderations": ("GET", "/openai/v1/moderations", 405, "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(PATHS_REFUSED.values()), ids=list(PATHS_REFUSED))
async def test_paths_outside_the_catalogue_are_refused_and_never_forwarded(
        gw: Gateway, case: tuple[str, str, int, str]) -> None:
    method, path, status, code = case
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.request(method, httpx.URL(gw.url + path), headers={**AS_ACME, "Content-Type":
                                                                            "application/json"}, content=b"{}")
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.headers["X-Metergate-Request-Id"].startswith("req_")
    assert gw.upstream.requests == []
    await assert_unmetered(gw)


async def test_refusal_of_files_names_the_endpoint(gw: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        await gw.openai("acme").files.list()
    assert refused.value.code == "endpoint_not_metered"
    assert "/v1/files" in refused.value.message and "not metered" in refused.value.message


async def test_only_the_catalogues_query_parameters_reach_the_upstream(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as client:
        r = await client.get("/anthropic/v1/models", params={"limit": "5", "after_id": "m1", "api_key": "x",
                                                             "url": "http://evil.example"},
                             headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 200, r.text
        r = await client.get("/openai/v1/models", params={"limit": "5"})
        assert r.status_code == 200, r.text
    assert [req["query"] for req in gw.upstream.requests] == [{"limit": "5", "after_id": "m1"}, {}]


async def test_an_overlong_query_value_is_refused_not_cut(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=AS_ACME) as client:
        r = await client.get("/anthropic/v1/models", params={"after_id": "m" * 513})
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "invalid_request",
                                                                                       "after_id")
    assert gw.upstream.requests == []


# --- HTTP methods


async def test_options_lists_the_methods_and_head_answers_like_get(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        metered = await client.options("/openai/v1/chat/completions")  # no identification needed
        free_get = await client.options("/openai/v1/models")
        free_post = await client.options("/anthropic/v1/messages/count_tokens")
        head = await client.head("/openai/v1/models", headers=AS_ACME)
        head_metered = await client.head("/openai/v1/chat/completions", headers=AS_ACME)
        get_metered = await client.get("/openai/v1/chat/completions", headers=AS_ACME)
    assert (metered.status_code, metered.headers["Allow"]) == (204, "POST, OPTIONS")
    assert (free_get.status_code, free_get.headers["Allow"]) == (204, "GET, HEAD, OPTIONS")
    assert (free_post.status_code, free_post.headers["Allow"]) == (204, "POST, OPTIONS")
    assert (head.status_code, head.content) == (200, b"")
    assert (head_metered.status_code, head_metered.headers["Allow"]) == (405, "POST, OPTIONS")
    assert (get_metered.status_code, get_metered.headers["Allow"]) == (405, "POST, OPTIONS")
    assert get_metered.json()["error"]["code"] == "method_not_allowed"
    assert [(r["method"], r["path"]) for r in gw.upstream.requests] == [("GET", "/v1/models")]  # the HEAD


# --- configuration


async def test_free_endpoints_setting_narrows_a_route(upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'narrow.db'}",
                                     routes=routes(upstream, free_endpoints=["models.list"]))
    try:
        await gw.customer("acme", funds=1_000_000)
        client = gw.openai("acme")
        assert len((await client.models.list()).data) == 4
        with pytest.raises(openai.NotFoundError) as refused:
            await client.models.retrieve("gpt-4o")
        assert refused.value.code == "endpoint_not_metered"
        assert "models.retrieve" in refused.value.message and "free_endpoints" in refused.value.message
        with pytest.raises(openai.NotFoundError):
            await client.moderations.create(input="hello")
        assert [r["path"] for r in upstream.requests] == ["/v1/models"]
    finally:
        await gw.close()
        await runner.cleanup()


@pytest.mark.parametrize(("route", "named"), [
    ({"free_endpoints": ["models.lsit"]}, "'models.lsit'"),
    ({"free_endpoints": ["messages.count_tokens"]}, "'messages.count_tokens'"),  # Anthropic's, not OpenAI's
    ({"free_endpoints": ["models.list", "models.list"]}, "twice"),
    ({"free_endpoints": ["files.list"]}, "'files.list'"),
], ids=["typo", "other-providers-endpoint", "duplicate", "not-free"])
def test_invalid_free_endpoints_fail_at_start_up_naming_the_key(route: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError) as invalid:
        load_settings(routes=[{"prefix": "/openai", "upstream": "http://127.0.0.1:9", **route}])
    assert "routes.0" in str(invalid.value) and "free_endpoints" in str(invalid.value)
    assert named in str(invalid.value)


def test_free_endpoints_can_be_turned_off() -> None:
    settings = load_settings(routes=[{"prefix": "/openai", "upstream": "http://127.0.0.1:9", "free_endpoints": []}])
    assert settings.routes[0].free_endpoints == ()
