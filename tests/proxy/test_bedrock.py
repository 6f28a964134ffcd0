"""AWS Bedrock's Converse and ConverseStream behind metergate: SigV4 upstream, the model map, the event stream.

Method: boto3's own ``bedrock-runtime`` client, pointed at metergate with ``endpoint_url`` and dummy
credentials of its own, against a gateway whose ``provider: bedrock`` route fronts the fake bedrock-runtime
(:mod:`metergate.demo.mock_bedrock`), which recomputes every SigV4 signature with the operator's secret and
speaks Converse JSON and the binary event stream (frames with real CRCs, each written in two pieces). boto3
is synchronous, so each call runs in a thread while the gateway serves on the test's loop; the customer
header (or a proxy key) is added by a botocore event hook, as an application would. Each test checks what
the fake received and the ledger: a served request is billed once, by exactly the usage Bedrock reported; a
refused one reaches nothing and costs nothing; a stream whose frames go bad ends with an error the SDK
raises, is billed by the stream rules, and its usage record names the anomaly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx2 as httpx
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from metergate.config.settings import SettingsError, load_settings
from metergate.demo.mock_bedrock import RECEIVED, TEXT, build_mock_bedrock
from metergate.metering.tokenizer import counter_for
from metergate.observability.logs import secrets_of
from metergate.proxy.eventstream import FrameBuffer, encode_frame, event_frame
from tests.conftest import DEFAULT_PRICING, Gateway, Upstream, serve, start_gateway

REGION = "us-east-1"
KEY_ID = "AKIAMETERGATEOPERATOR"
SECRET = "operator-secret-" + "s" * 24
CLIENT_KEY_ID, CLIENT_SECRET = "AKIACLIENTDUMMYKEYID", "client-secret-the-app-holds-" + "c" * 12
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PROFILE = "us.anthropic.claude-3-haiku-20240307-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"
RETIRED = "retired.model-v1:0"  # served by Bedrock, not by the route
MODELS = {HAIKU: HAIKU, PROFILE: HAIKU, ARN: HAIKU}
PRICE = {"input_per_mtok": "0.25", "cached_input_per_mtok": "0.03", "cache_write_per_mtok": "0.30",
         "output_per_mtok": "1.25"}
PRICING = {**DEFAULT_PRICING, "models": {**DEFAULT_PRICING["models"], HAIKU: PRICE}}  # type: ignore[dict-item]
FUNDS = 1_000_000
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": [{"text": "Say something about prepaid wallets."}]}]


@pytest.fixture
async def fake() -> AsyncIterator[Upstream]:
    app = build_mock_bedrock(key_id=KEY_ID, secret=SECRET, region=REGION, models=[*MODELS, RETIRED])
    runner, port = await serve(app)
    yield Upstream(f"http://127.0.0.1:{port}", app)
    await runner.cleanup()


def route(fake: Upstream, **bedrock: Any) -> dict[str, Any]:
    return {"prefix": "/bedrock", "upstream": fake.url, "provider": "bedrock",
            "bedrock": {"region": REGION, "access_key_id": KEY_ID, "secret_access_key": SECRET,
                        "models": MODELS, **bedrock}}


async def _gateway(fake: Upstream, tmp_path: Path, funds: int) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(fake, f"sqlite:///{tmp_path / 'bedrock.db'}", routes=[route(fake)],
                                     pricing=PRICING)
    await gw.customer("acme", funds=funds)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def gw(fake: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(fake, tmp_path, FUNDS):
        yield gateway


@pytest.fixture
async def broke(fake: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(fake, tmp_path, 0):
        yield gateway


def bedrock(gw: Gateway, headers: dict[str, str] | None = None, **config: Any) -> Any:
    """The application's boto3 client, pointed at metergate; ``headers`` go on every request (event hook)."""
    client = boto3.client(
        "bedrock-runtime", region_name=REGION, endpoint_url=f"{gw.url}/bedrock", aws_access_key_id=CLIENT_KEY_ID,
        aws_secret_access_key=CLIENT_SECRET, aws_session_token="client-session-token",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config))
    extra = AS_ACME if headers is None else headers

    def add_headers(request: Any, **_: Any) -> None:
        for name, value in extra.items():
            request.headers[name] = value

    client.meta.events.register("before-sign.bedrock-runtime.*", add_headers)
    gw.clients.append(_Closing(client))  # type: ignore[arg-type]
    return client


class _Closing:
    """A boto3 client closed (its connection pool) with the gateway's other clients."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def close(self) -> None:
        self._client.close()


async def call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, **kwargs)


async def stream(client: Any, **kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ConverseStream's response and every event boto3 parsed from it."""
    def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        response = client.converse_stream(**kwargs)
        return response, list(response["stream"])
    return await asyncio.to_thread(run)


async def stream_until_error(client: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], EventStreamError]:
    """The events boto3 parsed before the stream's error, and the error."""
    events: list[dict[str, Any]] = []

    def run() -> EventStreamError:
        response = client.converse_stream(**kwargs)
        try:
            for event in response["stream"]:
                events.append(event)
        except EventStreamError as error:
            return error
        finally:
            response["stream"].close()  # returns the connection, which an error leaves open
        raise AssertionError("the stream ended without an error")
    error = await asyncio.to_thread(run)
    return events, error


def received(gw: Gateway) -> list[dict[str, Any]]:
    return gw.upstream.app[RECEIVED]


def expected_price(usage: dict[str, int]) -> int:
    """Micro-dollars for a Bedrock usage object under PRICE ($/Mtok is micro-dollars per token), half-up."""
    micros = (usage["inputTokens"] * Decimal(PRICE["input_per_mtok"])
              + usage.get("cacheReadInputTokens", 0) * Decimal(PRICE["cached_input_per_mtok"])
              + usage.get("cacheWriteInputTokens", 0) * Decimal(PRICE["cache_write_per_mtok"])
              + usage["outputTokens"] * Decimal(PRICE["output_per_mtok"]))
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def billed_once(gw: Gateway) -> dict[str, Any]:
    """The one usage record, with the wallet down by exactly its charge and no hold left open. A stream that
    ends in an error frame is settled just after the client read that frame: the record may be a moment behind."""
    records = await gw.usage()
    for _ in range(100):
        if records:
            break
        await asyncio.sleep(0.05)
        records = await gw.usage()
    [record] = records
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (FUNDS - record["charged_amount"], 0)
    assert await gw.store.audit() == []
    return record


async def assert_nothing_happened(gw: Gateway, funds: int = FUNDS) -> None:
    assert received(gw) == []
    assert await gw.usage() == []
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (funds, 0)


def assert_signed_by_operator(arrived: dict[str, Any]) -> None:
    headers = {name.lower(): value for name, value in arrived["headers"].items()}
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert CLIENT_KEY_ID not in str(arrived["headers"]) and "client-session-token" not in str(arrived["headers"])
    assert "x-amz-security-token" not in headers  # the operator's credentials are long-term ones
    assert not any(name.startswith("x-metergate-") for name in headers)


def aws_error(error: ClientError) -> tuple[int, str, str, str]:
    """Status, AWS error code, message and metergate's code of an error boto3 raised."""
    meta = error.response["ResponseMetadata"]
    return (meta["HTTPStatusCode"], error.response["Error"]["Code"], error.response["Error"]["Message"],
            meta["HTTPHeaders"].get("x-metergate-error-code", ""))


# ---------------------------------------------------------------------------------------------- served


async def test_converse_is_signed_for_the_operator_and_billed_once_by_bedrocks_usage(gw: Gateway) -> None:
    answer = await call(bedrock(gw).converse, modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 12})
    assert answer["output"]["message"]["content"][0]["text"] == " ".join(TEXT[:12])
    [arrived] = received(gw)
    assert arrived["raw_path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert arrived["body"] == {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 12}}  # as the client sent it
    assert_signed_by_operator(arrived)  # and the fake verified the signature itself
    usage = answer["usage"]
    record = await billed_once(gw)
    assert (record["model"], record["endpoint"], record["stream"], record["detail"]["deployment"]) == (
        HAIKU, "converse", False, HAIKU)
    assert (record["usage_source"], record["tokens_input"], record["tokens_output"]) == (
        "provider", usage["inputTokens"], usage["outputTokens"])
    assert record["charged_amount"] == expected_price(usage)
    assert record["detail"]["tokens_exact"] is False  # a tiktoken approximation of Claude's tokenizer
    assert record["detail"]["cost"]["source"] == "genai-prices" and record["cost_nanos"] > 0  # genai-prices' aws
    headers = answer["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-metergate-charged"] == f"{Decimal(record['charged_amount']) / 10**6:.6f}"


async def test_converse_stream_relays_every_frame_and_is_billed_once_by_the_metadata_event(gw: Gateway) -> None:
    response, events = await stream(bedrock(gw), modelId=PROFILE, messages=MESSAGES,
                                    system=[{"text": "Be brief."}], inferenceConfig={"maxTokens": 9})
    kinds = [next(iter(event)) for event in events]
    assert kinds == ["messageStart", *["contentBlockDelta"] * 9, "contentBlockStop", "messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == " ".join(TEXT[:9])
    usage = events[-1]["metadata"]["usage"]
    [arrived] = received(gw)
    assert arrived["raw_path"] == "/model/us.anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
    assert_signed_by_operator(arrived)
    record = await billed_once(gw)
    assert (record["endpoint"], record["stream"], record["model"], record["detail"]["deployment"]) == (
        "converse-stream", True, HAIKU, PROFILE)
    assert (record["usage_source"], record["tokens_input"], record["tokens_output"]) == (
        "provider", usage["inputTokens"], usage["outputTokens"])
    assert record["charged_amount"] == expected_price(usage)
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"


@pytest.mark.parametrize("streamed", [False, True])
async def test_cache_reads_and_writes_are_priced_on_their_own(gw: Gateway, streamed: bool) -> None:
    client = bedrock(gw, {**AS_ACME, "X-Mock-Behavior": "cache"})
    kwargs: dict[str, Any] = {"modelId": HAIKU, "messages": MESSAGES, "inferenceConfig": {"maxTokens": 5}}
    if streamed:
        _, events = await stream(client, **kwargs)
        usage = events[-1]["metadata"]["usage"]
    else:
        usage = (await call(client.converse, **kwargs))["usage"]
    assert (usage["cacheReadInputTokens"], usage["cacheWriteInputTokens"]) == (7, 3)
    record = await billed_once(gw)
    assert record["tokens_input"] == usage["inputTokens"] + 7 + 3  # inputTokens excludes the cache tokens
    assert (record["tokens_cached_input"], record["tokens_cache_write"]) == (7, 3)
    assert record["charged_amount"] == expected_price(usage)


async def test_an_inference_profile_arn_travels_encoded_and_is_priced_by_the_map(gw: Gateway) -> None:
    answer = await call(bedrock(gw).converse, modelId=ARN, messages=MESSAGES, inferenceConfig={"maxTokens": 4})
    [arrived] = received(gw)
    assert arrived["raw_path"] == ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3A"
                                   "application-inference-profile%2Fa1b2c3d4e5f6/converse")
    record = await billed_once(gw)
    assert (record["model"], record["detail"]["deployment"]) == (HAIKU, ARN)
    assert record["charged_amount"] == expected_price(answer["usage"])


async def test_a_request_without_max_tokens_gets_the_bound_its_hold_covers_upstream(gw: Gateway) -> None:
    answer = await call(bedrock(gw).converse, modelId=HAIKU, messages=MESSAGES)
    [arrived] = received(gw)
    limit = gw.settings.default_max_output_tokens
    assert arrived["body"]["inferenceConfig"] == {"maxTokens": limit}
    assert answer["ResponseMetadata"]["HTTPHeaders"]["x-metergate-output-limit"] == str(limit)
    record = await billed_once(gw)
    assert record["charged_amount"] == expected_price(answer["usage"])


async def test_a_small_wallet_is_served_with_max_tokens_capped_to_what_it_covers(fake: Upstream,
                                                                                 tmp_path: Path) -> None:
    async for gw in _gateway(fake, tmp_path, 400):  # micro-dollars: the prompt and a few hundred tokens
        _, events = await stream(bedrock(gw), modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 5000})
        [arrived] = received(gw)
        capped = arrived["body"]["inferenceConfig"]["maxTokens"]
        assert 0 < capped < 5000
        [record] = await gw.usage()
        usage = events[-1]["metadata"]["usage"]
        assert record["charged_amount"] == expected_price(usage) <= 400
        assert record["detail"]["hold"] <= 400
        assert (await gw.balance())["available"] == 400 - record["charged_amount"]


async def test_a_quote_for_a_converse_payload_is_what_the_proxy_holds(gw: Gateway) -> None:
    payload = {"modelId": PROFILE, "messages": MESSAGES, "inferenceConfig": {"maxTokens": 40}}
    on_route = {"customer_id": "acme", "attributes": {"route": "/bedrock"}, "endpoint": "converse"}
    r = await gw.admin.post("/quote", json={**on_route, "payload": payload})
    assert r.status_code == 200, r.text
    answer = await call(bedrock(gw).converse, modelId=PROFILE, messages=MESSAGES, inferenceConfig={"maxTokens": 40})
    record = await billed_once(gw)
    assert record["detail"]["hold"] == r.json()["amount"] > 0
    assert record["charged_amount"] == expected_price(answer["usage"])
    r = await gw.admin.post("/quote", json={**on_route, "payload": {**payload, "modelId": RETIRED}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"


async def test_a_client_that_hangs_up_mid_stream_is_billed_the_usage_bedrock_reported(gw: Gateway) -> None:
    def read_one_event_and_leave() -> dict[str, Any]:
        response = bedrock(gw).converse_stream(modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 30})
        first: dict[str, Any] = next(iter(response["stream"]))
        response["stream"].close()
        return first

    assert "messageStart" in await asyncio.to_thread(read_one_event_and_leave)
    for _ in range(200):  # the drain and settlement finish after the client has gone
        if await gw.usage():
            break
        await asyncio.sleep(0.05)
    record = await billed_once(gw)
    assert (record["usage_source"], record["tokens_output"]) == ("provider", 30)


# ---------------------------------------------------------------------------------------------- who pays


async def test_a_proxy_key_in_x_api_key_identifies_the_customer(gw: Gateway) -> None:
    key = (await gw.admin.post("/customers/acme/api-keys", json={})).json()["key"]
    answer = await call(bedrock(gw, {"x-api-key": key}).converse, modelId=HAIKU, messages=MESSAGES,
                        inferenceConfig={"maxTokens": 3})
    assert key not in str(received(gw)[0]["headers"])
    assert (await billed_once(gw))["charged_amount"] == expected_price(answer["usage"])


async def test_a_client_that_names_no_customer_is_refused_in_aws_shape(gw: Gateway) -> None:
    with pytest.raises(ClientError) as refused:
        await call(bedrock(gw, {}).converse, modelId=HAIKU, messages=MESSAGES)
    assert aws_error(refused.value)[:2] == (401, "AccessDeniedException")
    assert aws_error(refused.value)[3] == "missing_customer"
    await assert_nothing_happened(gw)


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("operation", ["converse", "converse_stream"])
async def test_an_empty_wallet_raises_a_client_error_with_the_portal_link(broke: Gateway, operation: str) -> None:
    with pytest.raises(ClientError) as refused:
        await call(getattr(bedrock(broke), operation), modelId=HAIKU, messages=MESSAGES,
                   inferenceConfig={"maxTokens": 10})
    status, code, message, metergate_code = aws_error(refused.value)
    assert (status, code, metergate_code) == (402, "InsufficientFundsException", "insufficient_funds")
    assert "Insufficient funds" in message and f"{broke.url}/portal/?c=acme&m=test" in message
    assert f"{broke.url}/portal/" in str(refused.value)  # what a log line of the exception shows
    await assert_nothing_happened(broke, funds=0)


async def test_an_unknown_model_id_is_refused_before_anything_is_held(gw: Gateway) -> None:
    with pytest.raises(ClientError) as refused:
        await call(bedrock(gw).converse, modelId=RETIRED, messages=MESSAGES)
    status, code, message, metergate_code = aws_error(refused.value)
    assert (status, code, metergate_code) == (404, "ResourceNotFoundException", "unknown_model")
    assert RETIRED in message
    await assert_nothing_happened(gw)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"messages": [{"role": "user", "content": [{"text": 42}]}]}, "messages[0].content[0].text"),
    ({"messages": MESSAGES, "inferenceConfig": {"maxTokens": "20"}}, "inferenceConfig.maxTokens"),
    ({"messages": MESSAGES, "inferenceConfig": {"maxTokens": 0}}, "inferenceConfig.maxTokens"),
    ({"messages": MESSAGES, "system": [{"text": ["not", "a", "string"]}]}, "system[0].text"),
    ({"messages": [{"role": 7, "content": [{"text": "hi"}]}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
])
async def test_wrong_types_sent_through_the_sdk_are_refused_and_charge_nothing(
        gw: Gateway, kwargs: dict[str, Any], param: str) -> None:
    client = bedrock(gw, parameter_validation=False)  # as a client that skips boto3's own checks
    with pytest.raises(ClientError) as refused:
        await call(client.converse, modelId=HAIKU, **kwargs)
    status, code, message, metergate_code = aws_error(refused.value)
    assert (status, code, metergate_code) == (400, "ValidationException", "invalid_request")
    assert param in message
    await assert_nothing_happened(gw)


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", b"{not json", 400, "invalid_json"),
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", b"[1, 2]", 400, "invalid_json"),
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", b"{}", 400, "invalid_request"),
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
     b'{"messages": [{"role": "user", "content": "a string, not blocks"}]}', 400, "invalid_request"),
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream",
     b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}], "system": "not blocks"}', 400,
     "invalid_request"),
    ("/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", b"{}", 404, "unknown_route"),
    ("/model/..%2F..%2Fadmin/converse", b"{}", 400, "invalid_path"),
    ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F..%2Fx/converse", b"{}", 400,
     "invalid_path"),
    ("/model/anthropic.claude%3Fx/converse", b"{}", 400, "invalid_path"),
    ("/model/us.other-model-v1%3A0/converse", b"{}", 404, "unknown_model"),
])
async def test_bad_requests_get_a_clear_json_error_in_aws_shape(gw: Gateway, path: str, body: bytes, status: int,
                                                               code: str) -> None:
    async with httpx.AsyncClient(base_url=f"{gw.url}/bedrock") as client:
        answer = await client.post(path, content=body, headers={**AS_ACME, "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["error"]["code"] == code and error["message"] == error["error"]["message"]
    assert answer.headers["x-amzn-ErrorType"] == error["__type"] and answer.headers["X-Metergate-Error-Code"] == code
    await assert_nothing_happened(gw)


async def test_bedrocks_own_errors_reach_the_client_and_charge_nothing(fake: Upstream, tmp_path: Path) -> None:
    # A route whose secret is wrong: Bedrock (the fake) refuses the signature.
    gw, runner = await start_gateway(fake, f"sqlite:///{tmp_path / 'bad.db'}",
                                     routes=[route(fake, secret_access_key="not-the-secret-" + "x" * 20)],
                                     pricing=PRICING)
    try:
        await gw.customer("acme", funds=FUNDS)
        with pytest.raises(ClientError) as refused:
            await call(bedrock(gw).converse, modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 3})
        assert aws_error(refused.value)[:2] == (403, "InvalidSignatureException")
        [record] = await gw.usage()
        assert (record["status_code"], record["charged_amount"]) == (403, 0)
        assert (await gw.balance())["available"] == FUNDS
    finally:
        await gw.close()
        await runner.cleanup()


async def test_temporary_credentials_send_their_session_token_signed(tmp_path: Path) -> None:
    token = "operator-session-token-" + "t" * 20
    app = build_mock_bedrock(key_id=KEY_ID, secret=SECRET, region=REGION, models=[HAIKU], session_token=token)
    runner, port = await serve(app)
    fake = Upstream(f"http://127.0.0.1:{port}", app)
    gw, gateway_runner = await start_gateway(fake, f"sqlite:///{tmp_path / 'sts.db'}",
                                             routes=[route(fake, session_token=token)], pricing=PRICING)
    try:
        await gw.customer("acme", funds=FUNDS)
        answer = await call(bedrock(gw).converse, modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 3})
        [arrived] = received(gw)
        assert arrived["headers"]["X-Amz-Security-Token"] == token
        assert "x-amz-security-token" in arrived["headers"]["Authorization"]  # among the signed headers
        assert (await billed_once(gw))["charged_amount"] == expected_price(answer["usage"])
    finally:
        await gw.close()
        await gateway_runner.cleanup()
        await runner.cleanup()


async def test_the_operators_aws_secrets_are_redacted_and_never_logged(gw: Gateway,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET in secrets_of(gw.settings)  # the redaction filter scrubs it from every log line
    caplog.set_level(logging.DEBUG)
    await call(bedrock(gw).converse, modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 3})
    await stream_until_error(bedrock(gw, {**AS_ACME, "X-Mock-Behavior": "bad-crc"}), modelId=HAIKU,
                             messages=MESSAGES)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "bad frame from the upstream" in logged  # the log is real
    assert SECRET not in logged and CLIENT_SECRET not in logged


# ---------------------------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(("behavior", "reason"), [
    ("bad-crc", "message CRC mismatch"),
    ("bad-prelude", "prelude CRC mismatch"),
    ("oversized", "frame length 67108864 outside"),
])
async def test_a_bad_frame_ends_the_stream_with_an_error_and_bills_what_was_delivered(
        gw: Gateway, behavior: str, reason: str) -> None:
    events, error = await stream_until_error(bedrock(gw, {**AS_ACME, "X-Mock-Behavior": behavior}),
                                             modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 20})
    # The frames before the bad one reached the client unchanged; then metergate's error frame.
    assert [next(iter(event)) for event in events] == ["messageStart", "contentBlockDelta", "contentBlockDelta"]
    assert error.response["Error"]["Code"] == "internalServerException"
    delivered = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    record = await billed_once(gw)
    assert record["usage_source"] == "estimated"
    assert record["tokens_output"] == counter_for(HAIKU).count(delivered) == counter_for(HAIKU).count(
        " ".join(TEXT[:2]))
    [anomaly] = record["detail"]["usage_anomalies"]
    assert reason in anomaly


async def test_a_stream_cut_inside_its_last_frame_is_billed_from_the_delivered_text(gw: Gateway) -> None:
    events, error = await stream_until_error(bedrock(gw, {**AS_ACME, "X-Mock-Behavior": "truncated"}),
                                             modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 6})
    assert [next(iter(event)) for event in events][-1] == "messageStop"  # everything but the metadata frame
    assert error.response["Error"]["Code"] == "internalServerException"
    record = await billed_once(gw)
    assert (record["usage_source"], record["tokens_output"]) == ("estimated", counter_for(HAIKU).count(
        " ".join(TEXT[:6])))
    assert "ended" in record["detail"]["usage_anomalies"][0]


async def test_implausible_stream_usage_is_an_anomaly_billed_from_the_estimate(gw: Gateway) -> None:
    _, events = await stream(bedrock(gw, {**AS_ACME, "X-Mock-Behavior": "bad-usage"}), modelId=HAIKU,
                             messages=MESSAGES, inferenceConfig={"maxTokens": 6})
    assert isinstance(events[-1]["metadata"]["usage"]["outputTokens"], str)  # relayed unchanged
    record = await billed_once(gw)
    assert (record["usage_source"], record["tokens_output"]) == ("estimated", counter_for(HAIKU).count(
        " ".join(TEXT[:6])))
    assert "outputTokens" in record["detail"]["usage_anomalies"][0]


async def test_an_upstream_exception_frame_reaches_the_client_and_bills_what_was_delivered(gw: Gateway) -> None:
    events, error = await stream_until_error(bedrock(gw, {**AS_ACME, "X-Mock-Behavior": "exception"}),
                                             modelId=HAIKU, messages=MESSAGES, inferenceConfig={"maxTokens": 20})
    assert error.response["Error"]["Code"] == "modelStreamErrorException"  # Bedrock's own, relayed
    assert len(events) == 3
    record = await billed_once(gw)
    assert (record["usage_source"], record["tokens_output"]) == ("estimated", counter_for(HAIKU).count(
        " ".join(TEXT[:2])))


# ---------------------------------------------------------------------------------------------- framing


def test_frames_parse_incrementally_and_match_botocores_reader() -> None:
    frames = [event_frame("contentBlockDelta", json.dumps({"delta": {"text": "x" * n}}).encode()) for n in range(50)]
    frames.append(encode_frame({":message-type": "exception", ":exception-type": "throttlingException"}, b"{}"))
    data = b"".join(frames)
    ours, theirs = FrameBuffer(1 << 20), EventStreamBuffer()
    parsed, reference = [], []
    rng = random.Random(7)
    at = 0
    while at < len(data):
        step = rng.randint(1, 40)
        piece = data[at:at + step]
        at += step
        parsed.extend(ours.feed(piece))
        theirs.add_data(piece)
        reference.extend(theirs)
    assert ours.error is None and ours.pending == 0
    assert [f.raw for f in parsed] == frames
    assert [(f.headers, f.payload) for f in parsed] == [(m.headers, m.payload) for m in reference]


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "message CRC"),
    (lambda f: f[:9] + bytes([f[9] ^ 1]) + f[10:], "prelude CRC"),
    (lambda f: (1 << 30).to_bytes(4, "big") + f[4:], "prelude CRC"),
])
def test_a_bad_frame_stops_the_reader_after_the_good_ones(damage: Callable[[bytes], bytes], reason: str) -> None:
    good = event_frame("messageStart", b'{"role": "assistant"}')
    buffer = FrameBuffer(1 << 20)
    frames = buffer.feed(good + damage(good) + good)
    assert [f.raw for f in frames] == [good]
    assert buffer.error is not None and reason in str(buffer.error)
    assert buffer.feed(good) == []  # nothing after a bad frame is believed


def test_garbage_never_raises_and_yields_only_verified_frames() -> None:
    rng = random.Random(11)
    good = event_frame("messageStop", b'{"stopReason": "end_turn"}')
    for _ in range(300):
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        buffer = FrameBuffer(4096)
        frames = buffer.feed(good + noise) + buffer.feed(noise)
        assert [f.raw for f in frames][:1] == [good]
        assert all(f.raw == good for f in frames)
        assert buffer.error is not None or buffer.pending < 12 + len(good)


# ---------------------------------------------------------------------------------------------- settings


def test_a_bedrock_route_takes_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENVIRONMENT1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-environment-" + "e" * 20)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    settings = load_settings(routes=[{"prefix": "/bedrock", "upstream": "https://bedrock-runtime.us-east-1.amazonaws.com",
                                      "provider": "bedrock", "bedrock": {"region": REGION, "models": MODELS}}])
    [configured] = settings.routes
    assert configured.provider_id == "aws"
    assert configured.bedrock is not None and configured.bedrock.access_key_id.get_secret_value() == (
        "AKIAFROMENVIRONMENT1")


@pytest.mark.parametrize(("bedrock_settings", "named"), [
    ({"region": REGION, "models": MODELS}, "access_key_id"),
    ({"region": "mars", "access_key_id": KEY_ID, "secret_access_key": SECRET, "models": MODELS}, "region"),
    ({"region": REGION, "access_key_id": KEY_ID, "secret_access_key": SECRET, "models": {"a/b/../c": HAIKU}},
     "models"),
    ({"region": REGION, "access_key_id": KEY_ID, "secret_access_key": SECRET, "models": {}}, "models"),
])
def test_bad_bedrock_settings_stop_start_up_naming_the_key(monkeypatch: pytest.MonkeyPatch,
                                                           bedrock_settings: dict[str, Any], named: str) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(SettingsError, match=named):
        load_settings(routes=[{"prefix": "/bedrock", "upstream": "https://bedrock-runtime.us-east-1.amazonaws.com",
                               "provider": "bedrock", "bedrock": bedrock_settings}])
