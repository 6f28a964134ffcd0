"""Refusals reach clients whole: the portal link in the message itself, the retry verdict, the request id.

Method: real clients against the real gateway — the OpenAI SDK with retries on (it obeys ``x-should-retry``
over its own status rules), litellm's Router with ``num_retries=3`` and litellm's ``acompletion`` (which
keep only the error's message) — counting the attempts that arrived in the gateway's access log (metergate's
JSON logging on a string stream) or at the mock upstream, and reading the ids the log lines carry.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from metergate.observability.logs import configure_logging
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, free_port, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """metergate's JSON handler on the root logger, writing to a string; the root logger restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def access_lines(stream: io.StringIO, path: str) -> list[dict[str, Any]]:
    """The gateway's access-log lines for ``path``: one per request that reached it."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "aiohttp.access" and f" {path} " in line["msg"]]


def retrying(gw: Gateway, max_retries: int, **headers: str) -> openai.AsyncOpenAI:
    """The OpenAI SDK with its own retries on, as acme (the conftest's clients never retry)."""
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key="sk-app-does-not-hold-the-key",
                                default_headers={**AS_ACME, **headers}, max_retries=max_retries)
    gw.clients.append(client)
    return client


@pytest.fixture
async def broke(gateway: Gateway) -> Gateway:
    """The conftest gateway with customer acme, whose wallet is empty."""
    await gateway.customer("acme", funds=0)
    return gateway


# --- 402: the link in the message, and sent once


async def test_openai_sdk_with_retries_sends_a_402_once_and_its_message_holds_the_portal_url(
        broke: Gateway, log_stream: io.StringIO) -> None:
    client = retrying(broke, 3)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    error = refused.value
    assert error.status_code == 402
    body: dict[str, Any] = error.body  # type: ignore[assignment]
    portal_url = body["portal_url"]
    assert portal_url.startswith(f"{broke.url}/portal/")
    assert error.message.endswith(f"Top up at {portal_url}")
    assert f"needs {body['required']} USD and the wallet has {body['balance']} USD" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    [attempt] = access_lines(log_stream, "/openai/v1/chat/completions")
    assert attempt["request_id"] == error.response.headers["X-Metergate-Request-Id"]
    assert broke.upstream.requests == []


async def test_anthropic_sdk_with_retries_sends_a_402_once_and_its_message_holds_the_portal_url(
        upstream: Upstream, tmp_path: Path, log_stream: io.StringIO) -> None:
    import anthropic

    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'claude.db'}", routes=[
        {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
         "provider_id": "anthropic"}], pricing={"asset": "USD", "models": {"*": {"input_per_mtok": "3"}}})
    try:
        await gw.customer("acme", funds=0)
        async with anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key="sk-ant-app-holds-no-key",
                                            default_headers=AS_ACME, max_retries=3) as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES)
        assert refused.value.status_code == 402
        assert f"Top up at {gw.url}/portal/" in refused.value.message
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert len(access_lines(log_stream, "/anthropic/v1/messages")) == 1
    finally:
        await gw.close()
        await runner.cleanup()


@pytest.fixture
def litellm_offline(monkeypatch: pytest.MonkeyPatch) -> Any:
    """litellm, reading its bundled model table instead of fetching one from the internet."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    monkeypatch.setattr(litellm, "suppress_debug_info", True)
    return litellm


async def test_litellm_router_with_retries_sends_a_402_once_and_shows_the_portal_url(
        broke: Gateway, log_stream: io.StringIO, litellm_offline: Any) -> None:
    router = litellm_offline.Router(model_list=[{"model_name": "mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": f"{broke.url}/openai/v1", "api_key": "sk-app-holds-no-key",
        "extra_headers": AS_ACME}}], num_retries=3, retry_after=0)
    with pytest.raises(Exception) as refused:  # litellm maps the 402 to a class of its own choosing
        await router.acompletion(model="mini", messages=MESSAGES, max_tokens=5)
    assert f"Top up at {broke.url}/portal/" in str(refused.value)
    assert len(access_lines(log_stream, "/openai/v1/chat/completions")) == 1


async def test_litellm_completion_error_message_holds_the_portal_url(broke: Gateway, log_stream: io.StringIO,
                                                                    litellm_offline: Any) -> None:
    with pytest.raises(Exception) as refused:
        await litellm_offline.acompletion(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                          api_base=f"{broke.url}/openai/v1", api_key="sk-app-holds-no-key",
                                          extra_headers=AS_ACME)
    message = str(refused.value)
    assert "Insufficient funds" in message
    assert f"Top up at {broke.url}/portal/?" in message
    assert len(access_lines(log_stream, "/openai/v1/chat/completions")) == 1


# --- the retry verdict of other answers


async def test_an_upstream_redirect_is_final_so_the_sdk_sends_it_once(gateway: Gateway) -> None:
    """The SDK retries every 5xx unless told otherwise; a redirect comes back however often it is asked."""
    await gateway.customer("acme", funds=1_000_000)
    client = retrying(gateway, 3, **{"X-Mock-Behavior": "redirect"})
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert (refused.value.status_code, refused.value.code) == (502, "upstream_redirect")
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(gateway.upstream.requests) == 1


async def test_an_unreachable_upstream_is_worth_retrying_and_the_sdk_does(
        upstream: Upstream, tmp_path: Path, log_stream: io.StringIO) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'down.db'}", routes=[
        {"prefix": "/openai", "upstream": f"http://127.0.0.1:{free_port()}", "api_key": PROVIDER_KEY}])
    try:
        await gw.customer("acme", funds=1_000_000)
        with pytest.raises(openai.APIStatusError) as failed:
            await retrying(gw, 1).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        assert (failed.value.status_code, failed.value.code) == (502, "upstream_unreachable")
        assert failed.value.response.headers["x-should-retry"] == "true"
        attempts = access_lines(log_stream, "/openai/v1/chat/completions")
        assert len(attempts) == 2
        assert len({line["request_id"] for line in attempts}) == 2  # each attempt has an id of its own
        assert (await gw.balance())["available"] == 1_000_000  # nothing charged, holds released
    finally:
        await gw.close()
        await runner.cleanup()


async def test_a_429_says_retry_after_and_should_retry(upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'rl.db'}",
                                     rate_limits={"customer": {"requests_per_minute": 1}})
    try:
        await gw.customer("acme", funds=1_000_000)
        client = gw.openai("acme")
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        headers = limited.value.response.headers
        assert headers["x-should-retry"] == "true"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert headers["X-Metergate-Request-Id"].startswith("req_")
    finally:
        await gw.close()
        await runner.cleanup()


async def test_an_aiohttp_405_keeps_its_allow_header(upstream: Upstream, tmp_path: Path) -> None:
    """On the control plane no proxy route catches every method, so aiohttp's router answers the 405."""
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'control.db'}", role="control")
    try:
        r = await gw.admin.delete("/customers")
        assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
        assert "GET" in r.headers["Allow"] and "POST" in r.headers["Allow"]
        assert r.headers["x-should-retry"] == "false" and r.headers["X-Metergate-Request-Id"].startswith("req_")
    finally:
        await gw.close()
        await runner.cleanup()
