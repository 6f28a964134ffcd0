"""Slow and malformed clients are refused at the HTTP layer, with a JSON error and nothing changed.

Method: raw sockets against a real gateway (small configured timeouts, generous bounds on when the
connection must be closed: no timed assertions), and plain HTTP for framing the relay cannot pass on
faithfully. Every refusal is checked for its status, its error code, that the upstream saw nothing, and
that the wallet's ledger and balance are what they were.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Upstream, start_gateway
from tests.payments.fake_stripe import TEST_WHSEC

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
DEADLINE_S = 30  # generous: the server must have closed the connection well before this


@pytest.fixture
async def slowgate(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'slow.db'}", header_read_timeout_s=0.5,
                                     body_read_timeout_s=0.5, stripe_test_webhook_secret=TEST_WHSEC,
                                     webhook_max_body_bytes=4096)
    await gw.customer("acme", funds=1_000_000)
    yield gw
    await gw.close()
    await runner.cleanup()


async def _ledger(gw: Gateway) -> tuple[list[Any], dict[str, Any]]:
    r = await gw.admin.get("/customers/acme/ledger")
    assert r.status_code == 200, r.text
    return r.json()["data"], await gw.balance()


def _port(gw: Gateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def _trickle(port: int, head: bytes, trickle: bytes, *, every_s: float = 0.2) -> bytes:
    """Send ``head`` at once, then ``trickle`` a byte at a time; everything the server answered before it
    closed the connection (the server must close it before DEADLINE_S)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        stop = time.monotonic() + DEADLINE_S
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            time.sleep(every_s)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                return received
            received += chunk
            assert time.monotonic() < stop
        sock.setblocking(True)
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received


def _answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# ---------------------------------------------------------------------------------- slow clients


async def test_slow_headers_get_408_and_a_closed_connection(slowgate: Gateway) -> None:
    before = await _ledger(slowgate)
    head = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    raw = await asyncio.to_thread(_trickle, _port(slowgate), head, b"X-Slow: " + b"a" * 400)
    status, body = _answer(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert slowgate.upstream.requests == []
    assert await _ledger(slowgate) == before


async def test_slow_body_gets_408_and_a_closed_connection(slowgate: Gateway) -> None:
    before = await _ledger(slowgate)
    payload = json.dumps(CHAT).encode()
    head = (b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Metergate-Customer: acme\r\nX-Metergate-Mode: test\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload))
    raw = await asyncio.to_thread(_trickle, _port(slowgate), head, payload)
    status, body = _answer(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert slowgate.upstream.requests == []
    assert await _ledger(slowgate) == before


async def test_slow_unauthenticated_webhook_body_gets_408(slowgate: Gateway) -> None:
    before = await _ledger(slowgate)
    head = (b"POST /webhooks/stripe/test HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n")
    raw = await asyncio.to_thread(_trickle, _port(slowgate), head, b"{" * 2000)
    status, body = _answer(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert await _ledger(slowgate) == before


async def test_large_unauthenticated_webhook_body_is_refused_before_it_is_read(slowgate: Gateway) -> None:
    before = await _ledger(slowgate)
    r = await slowgate.admin.post(f"{slowgate.url}/webhooks/stripe/test", content=b"{" * 5000,
                                  headers={"Stripe-Signature": "t=1,v1=00", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert await _ledger(slowgate) == before


# ---------------------------------------------------------------------------------- framing


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _chat_request(version: bytes, extra: bytes, body: bytes) -> bytes:
    return (b"POST /openai/v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nX-Metergate-Customer: acme\r\nX-Metergate-Mode: test\r\n"
            b"Connection: close\r\n" + extra + b"\r\n" + body)


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


@pytest.mark.parametrize(("version", "extra", "status", "code"), [
    # Transfer-Encoding means nothing in HTTP/1.0 (RFC 9112 6.1): the body's end is ambiguous.
    (b"1.0", b"Transfer-Encoding: chunked\r\n", 400, "malformed_request"),
    # A transfer coding aiohttp would silently ignore.
    (b"1.1", b"Transfer-Encoding: gzip, chunked\r\n", 400, "unsupported_transfer_encoding"),
    # Two Transfer-Encoding headers: aiohttp's parser refuses them itself.
    (b"1.1", b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 400, "malformed_request"),
])
async def test_transfer_codings_a_relay_cannot_honour_are_refused(gateway: Gateway, version: bytes, extra: bytes,
                                                                  status: int, code: str) -> None:
    await gateway.customer("acme")
    before = await _ledger(gateway)
    raw = await asyncio.to_thread(_exchange, _port(gateway),
                                  _chat_request(version, extra, _chunked(json.dumps(CHAT).encode())))
    got, body = _answer(raw)
    assert (got, body["error"]["code"]) == (status, code)
    assert gateway.upstream.requests == []
    assert await _ledger(gateway) == before


async def test_compressed_request_body_is_refused_not_forwarded_mislabelled(gateway: Gateway) -> None:
    import gzip

    await gateway.customer("acme")
    before = await _ledger(gateway)
    body = gzip.compress(json.dumps(CHAT).encode())
    raw = await asyncio.to_thread(_exchange, _port(gateway), _chat_request(
        b"1.1", b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(body), body))
    got, answer = _answer(raw)
    assert (got, answer["error"]["code"]) == (415, "unsupported_content_encoding")
    assert gateway.upstream.requests == []
    assert await _ledger(gateway) == before
