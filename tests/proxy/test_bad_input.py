"""Every malformed or unauthorised proxy request is refused with a stable JSON error and changes nothing.

Method: a table of bad requests, grouped by what is wrong with them, each sent to a gateway served the way
``metergate serve`` serves it (``JsonErrorAppRunner``). Requests aiohttp's HTTP parser rejects are written
to a raw socket. For every case we check the status, the OpenAI error envelope and its code, that the body
names no Python internals, and that neither the customer's ledger nor the upstream's request log moved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web

from metergate.http import JsonErrorAppRunner
from tests import conftest
from tests.conftest import Gateway, Upstream, start_gateway

CHAT = "/openai/v1/chat/completions"
MAX_BODY = 2048  # the gateway's max_body_bytes in these tests, so that "too large" stays small
GOOD_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test", "Content-Type": "application/json"}
UNKNOWN_KEY = "mgk_test_" + "u" * 40
# Python internals that must never reach a client: tracebacks, module paths, exception class names.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|aiohttp|metergate\.|\b[A-Za-z_]+(?:Error|Exception)\b|"
                   r"\b(?:BadRequest|Unauthorized|Forbidden|NotFound|MethodNotAllowed|PayloadTooLarge|"
                   r"UnsupportedMediaType|CustomerNotFound|InsufficientFunds)\b")


@dataclass(frozen=True)
class Case:
    status: int
    code: str
    method: str = "POST"
    path: str = CHAT
    headers: dict[str, str] = field(default_factory=lambda: dict(AS_ACME))
    body: bytes | None = json.dumps(GOOD_BODY).encode()
    chunked: bool = False  # send the body with Transfer-Encoding: chunked and no Content-Length
    raw: bytes | None = None  # bytes written to a socket as they are, instead of an HTTP client request
    untrusted: bool = False  # the gateway trusts only 10.255.0.0/16, so loopback is not the app
    param: str | None = None  # the field the error must name, for a body that breaks the request schema


def _body(**changes: Any) -> bytes:
    payload = {**GOOD_BODY, **changes}
    return json.dumps({k: v for k, v in payload.items() if v is not None}).encode()


def _without(*names: str) -> dict[str, str]:
    return {k: v for k, v in AS_ACME.items() if k not in names}


def _raw(header_lines: bytes, body: bytes = json.dumps(GOOD_BODY).encode(), *,
         framing: bytes | None = None) -> bytes:
    head = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in AS_ACME.items()) + header_lines)
    framing = framing if framing is not None else b"Content-Length: %d\r\n" % len(body)
    return head + framing + b"\r\n" + body


CASES: dict[str, Case] = {
    # --- the body is not a JSON object
    "malformed-json": Case(400, "invalid_json", body=b'{"model": "gpt-4o-mini", "messages": ['),
    "json-array": Case(400, "invalid_json", body=b'[{"model": "gpt-4o-mini"}]'),
    "json-string": Case(400, "invalid_json", body=b'"gpt-4o-mini"'),
    "empty-body": Case(400, "invalid_json", body=b""),
    "invalid-utf8": Case(400, "invalid_json", body=b'{"model": "\xff\xfe"}'),
    "deeply-nested-json": Case(400, "invalid_json", body=b"[" * (MAX_BODY - 1)),
    # --- the body is too large, declared or not
    "too-large-content-length": Case(413, "body_too_large", body=b" " * (MAX_BODY + 1)),
    "too-large-chunked": Case(413, "body_too_large", body=b" " * (MAX_BODY * 3), chunked=True),
    # --- the body is not JSON at all
    "text-plain": Case(415, "unsupported_media_type", headers={**AS_ACME, "Content-Type": "text/plain"}),
    "form-encoded": Case(415, "unsupported_media_type",
                         headers={**AS_ACME, "Content-Type": "application/x-www-form-urlencoded"}),
    "no-content-type": Case(415, "unsupported_media_type", headers=_without("Content-Type")),
    # --- where the request goes
    "path-outside-any-route": Case(404, "unknown_route", path="/anthropic/v1/messages"),
    "root-path": Case(404, "unknown_route", path="/"),
    "unknown-endpoint-under-route": Case(404, "unknown_route", path="/openai/v1/assistants"),
    "unmetered-endpoint-under-route": Case(404, "endpoint_not_metered", path="/openai/v1/batches"),
    "post-on-free-endpoint": Case(405, "method_not_allowed", path="/openai/v1/models"),
    "get-on-metered-endpoint": Case(405, "method_not_allowed", method="GET", body=None),
    "put-on-metered-endpoint": Case(405, "method_not_allowed", method="PUT"),
    # --- what the body asks for
    "unknown-model": Case(400, "unknown_model", body=_body(model="gpt-unknown-9")),
    "missing-model": Case(400, "missing_model", body=_body(model=None)),
    "model-not-a-string": Case(400, "missing_model", body=_body(model=42)),
    "max-tokens-zero": Case(400, "invalid_request", body=_body(max_tokens=0)),
    "max-tokens-negative": Case(400, "invalid_request", body=_body(max_tokens=-10)),
    "max-tokens-boolean": Case(400, "invalid_request", body=_body(max_tokens=True)),
    "max-completion-tokens-zero": Case(400, "invalid_request", body=_body(max_completion_tokens=0)),
    "messages-empty": Case(400, "invalid_request", body=_body(messages=[])),
    # --- a field metergate relies on has the wrong type or is out of bounds (the request schema)
    "stream-integer": Case(400, "invalid_request", body=_body(stream=1), param="stream"),
    "stream-string": Case(400, "invalid_request", body=_body(stream="true"), param="stream"),
    "stream-options-string": Case(400, "invalid_request", body=_body(stream=True, stream_options="usage"),
                                  param="stream_options"),
    "include-usage-integer": Case(400, "invalid_request", body=_body(stream=True, stream_options={"include_usage": 1}),
                                  param="stream_options.include_usage"),
    "max-tokens-2-pow-63": Case(400, "invalid_request", body=_body(max_tokens=2**63), param="max_tokens"),
    "max-tokens-10-pow-30": Case(400, "invalid_request", body=_body(max_tokens=10**30), param="max_tokens"),
    "max-tokens-float": Case(400, "invalid_request", body=_body(max_tokens=5.0), param="max_tokens"),
    "max-tokens-string": Case(400, "invalid_request", body=_body(max_tokens="5"), param="max_tokens"),
    "max-completion-tokens-huge": Case(400, "invalid_request", body=_body(max_completion_tokens=10**9),
                                       param="max_completion_tokens"),
    "n-zero": Case(400, "invalid_request", body=_body(n=0), param="n"),
    "n-huge": Case(400, "invalid_request", body=_body(n=2**40), param="n"),
    "model-too-long": Case(400, "invalid_model", body=_body(model="gpt-4o-mini" + "x" * 200), param="model"),
    "model-with-newline": Case(400, "invalid_model", body=_body(model="gpt-4o-mini\n"), param="model"),
    "model-with-space": Case(400, "invalid_model", body=_body(model="gpt 4o"), param="model"),
    "messages-a-string": Case(400, "invalid_request", body=_body(messages="hello"), param="messages"),
    "message-a-string": Case(400, "invalid_request", body=_body(messages=["hello"]), param="messages[0]"),
    "message-without-role": Case(400, "invalid_request", body=_body(messages=[{"content": "hi"}]),
                                 param="messages[0].role"),
    "message-content-a-number": Case(400, "invalid_request",
                                     body=_body(messages=[{"role": "user", "content": 5}]),
                                     param="messages[0].content"),
    # --- who pays: the customer header
    "missing-customer": Case(401, "missing_customer", headers=_without("X-Metergate-Customer")),
    "unknown-customer": Case(403, "unknown_customer", headers={**AS_ACME, "X-Metergate-Customer": "globex"}),
    "customer-in-other-mode": Case(403, "unknown_customer", headers={**AS_ACME, "X-Metergate-Mode": "live"}),
    "customer-id-with-space": Case(400, "invalid_customer", headers={**AS_ACME, "X-Metergate-Customer": "ac me"}),
    "customer-id-path-traversal": Case(400, "invalid_customer",
                                       headers={**AS_ACME, "X-Metergate-Customer": "../acme"}),
    "customer-id-empty": Case(400, "invalid_customer", headers={**AS_ACME, "X-Metergate-Customer": ""}),
    "invalid-mode": Case(400, "invalid_request", headers={**AS_ACME, "X-Metergate-Mode": "prod"}),
    "spoofed-customer-header": Case(403, "untrusted_customer_header", untrusted=True),
    # --- who pays: the proxy API key
    "malformed-proxy-key": Case(401, "invalid_api_key",
                                headers={**_without("X-Metergate-Customer"), "Authorization": "Bearer sk-abc"}),
    "unknown-proxy-key": Case(401, "invalid_api_key",
                              headers={**_without("X-Metergate-Customer"), "Authorization": f"Bearer {UNKNOWN_KEY}"}),
    "revoked-proxy-key": Case(401, "invalid_api_key",
                              headers={**_without("X-Metergate-Customer"), "Authorization": "Bearer {revoked}"}),
    "basic-auth-instead-of-key": Case(401, "missing_customer",
                                      headers={**_without("X-Metergate-Customer"), "Authorization": "Basic YTpi"}),
    # --- HTTP framing aiohttp's parser refuses before any handler runs (raw socket)
    "crlf-in-header-value": Case(400, "malformed_request", raw=_raw(b"X-Metergate-Feature: a\r\nb\r\n")),
    "obs-fold-header-value": Case(400, "malformed_request", raw=_raw(b"X-Metergate-Feature: a\r\n b\r\n")),
    "bare-cr-in-header-value": Case(400, "malformed_request", raw=_raw(b"X-Metergate-Feature: a\rb\r\n")),
    "bare-lf-in-header-value": Case(400, "malformed_request", raw=_raw(b"X-Metergate-Feature: a\nb\r\n")),
    "nul-in-header-value": Case(400, "malformed_request", raw=_raw(b"X-Metergate-Feature: a\x00b\r\n")),
    "content-length-and-chunked": Case(400, "malformed_request", raw=_raw(
        b"", b"0\r\n\r\n", framing=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")),
    "bad-chunk-size": Case(400, "malformed_request", raw=_raw(
        b"", b"zz\r\n{}\r\n0\r\n\r\n", framing=b"Transfer-Encoding: chunked\r\n")),
    "garbage-request-line": Case(400, "malformed_request", raw=b"HELLO THERE\r\n\r\n"),
}


async def _serve_like_metergate(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    # conftest.serve with metergate's runner, as `metergate serve` runs the app (see metergate.http).
    runner = JsonErrorAppRunner(app, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def open_gateway(upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                       ) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start conftest's gateway (with ``overrides``), served by metergate's runner; stop it afterwards."""
    monkeypatch.setattr(conftest, "serve", _serve_like_metergate)
    running: list[tuple[Gateway, web.AppRunner]] = []

    async def open_(**overrides: Any) -> Gateway:
        gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'gateway.db'}",
                                         max_body_bytes=MAX_BODY, max_body_bytes_multimodal=MAX_BODY,
                                         key_cache_ttl_s=0, **overrides)
        running.append((gw, runner))
        return gw

    yield open_
    for gw, runner in running:
        await gw.close()
        await runner.cleanup()


async def _send_raw(gw: Gateway, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Write bytes to the gateway's socket; return the status, headers (lower-case names) and body of the answer."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


async def _send(gw: Gateway, case: Case, revoked_key: str) -> tuple[int, dict[str, str], bytes]:
    if case.raw is not None:
        return await _send_raw(gw, case.raw)
    headers = {k: v.replace("{revoked}", revoked_key) for k, v in case.headers.items()}
    content: Any = case.body
    if case.chunked and case.body is not None:
        whole = case.body

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(whole), 1000):
                yield whole[i:i + 1000]

        content = chunks()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.request(case.method, case.path, headers=headers, content=content)
    if case.chunked:
        assert "content-length" not in {k.lower() for k in r.request.headers}
    return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content


async def _ledger(gw: Gateway) -> list[dict[str, Any]]:
    r = await gw.admin.get("/customers/acme/ledger", params={"limit": 200})
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["data"]
    return entries


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_bad_request_is_refused_in_the_envelope_and_changes_nothing(
        open_gateway: Callable[..., Awaitable[Gateway]], case: Case) -> None:
    overrides = {"trusted_networks": ["10.255.0.0/16"]} if case.untrusted else {}
    gw = await open_gateway(**overrides)
    await gw.customer("acme", funds=1_000_000)
    issued = await gw.admin.post("/customers/acme/api-keys")
    assert issued.status_code == 201, issued.text
    revoked = await gw.admin.delete(f"/api-keys/{issued.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at_ms"] is not None
    ledger_before, forwarded_before = await _ledger(gw), len(gw.upstream.requests)

    status, headers, raw_body = await _send(gw, case, issued.json()["key"])

    assert (status, headers.get("content-type", "").split(";")[0]) == (case.status, "application/json"), raw_body
    # Every refusal can be quoted to support by its id, and none is worth retrying unchanged.
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers.get("x-metergate-request-id", "")), headers
    assert headers.get("x-should-retry") == "false"
    if status == 405:
        assert headers["allow"] in ("POST, OPTIONS", "GET, HEAD, OPTIONS")
    body = json.loads(raw_body)
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error)
    assert error["code"] == case.code
    if case.param is not None:
        assert error["param"] == case.param
    assert isinstance(error["message"], str) and error["message"]
    assert not LEAKS.search(raw_body.decode()), raw_body
    assert await _ledger(gw) == ledger_before
    assert len(gw.upstream.requests) == forwarded_before == 0
    assert await gw.store.audit() == []


async def test_a_good_request_on_the_same_gateway_is_forwarded_and_charged(
        open_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    """The control for the table: the same base request, unspoilt, goes through and moves the ledger."""
    gw = await open_gateway()
    await gw.customer("acme", funds=1_000_000)
    before = await _ledger(gw)
    status, _, raw_body = await _send(gw, Case(200, ""), revoked_key="")
    assert status == 200, raw_body
    assert len(gw.upstream.requests) == 1
    assert len(await _ledger(gw)) == len(before) + 2  # the hold, then its capture


@pytest.mark.parametrize("framing", [b"Content-Length: 500\r\n\r\n{\"model\":",
                                     b"Transfer-Encoding: chunked\r\n\r\n9\r\n{\"model\":\r\n"],
                         ids=["content-length", "chunked"])
async def test_client_leaving_mid_body_is_no_error_and_changes_nothing(
        open_gateway: Callable[..., Awaitable[Gateway]], caplog: pytest.LogCaptureFixture, framing: bytes) -> None:
    caplog.set_level(logging.INFO, logger="metergate")
    gw = await open_gateway()
    await gw.customer("acme", funds=1_000_000)
    ledger_before = await _ledger(gw)
    port = int(gw.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_raw(b"", b"", framing=b"").removesuffix(b"\r\n") + framing)  # headers, then part of a body
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(500):  # wait (bounded) for the gateway to notice the disconnect
        if any("client disconnected" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the gateway never noticed the client leaving")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await _ledger(gw) == ledger_before
    assert gw.upstream.requests == []
