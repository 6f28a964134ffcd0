"""SIGTERM drains: streams in flight finish (or are cut cleanly at the drain deadline), every hold settles, exit 0.

Method: run ``metergate serve`` as a real subprocess on a SQLite file, in front of the mock upstream served by
this test; stream a slowed chat completion through the official SDK, send the process SIGTERM mid-stream, and
read the stream to its end (or leave a request waiting on a slow upstream). Then reopen the database with
``SqlWalletStore`` and check that no hold is pending, the request's usage record is there, and the ledger
audits clean.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from metergate.metering.tokenizer import counter_for
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, Upstream, free_port
from tests.proxy.test_openai_sdk import MESSAGES

MODEL = "gpt-4o-mini"


@dataclass
class Server:
    process: asyncio.subprocess.Process
    url: str
    database_url: str
    log: Path


Start = Callable[[float], Awaitable[Server]]


@pytest.fixture(params=["uvloop", "asyncio"])
async def serve(request: pytest.FixtureRequest, upstream: Upstream, tmp_path: Path) -> AsyncIterator[Start]:
    """``metergate serve`` on each event loop it offers (``event_loop``): the drain must not depend on it."""
    started: list[Server] = []

    async def start(drain_deadline_s: float) -> Server:
        port = free_port()
        database_url = f"sqlite:///{tmp_path / 'metergate.db'}"
        config = tmp_path / "metergate.yaml"
        config.write_text(yaml.safe_dump({
            "port": port, "database_url": database_url, "drain_deadline_s": drain_deadline_s,
            "event_loop": request.param,
            "routes": [{"prefix": "/openai", "upstream": upstream.url, "api_key": "sk-upstream-" + "k" * 20}],
            "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": "s" * 40}}))
        log = tmp_path / "metergate.log"
        with log.open("w") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "metergate", "serve", "--config", str(config), stdout=out, stderr=out)
        server = Server(process, f"http://127.0.0.1:{port}", database_url, log)
        started.append(server)
        async with httpx.AsyncClient(base_url=server.url) as client:
            for _ in range(300):
                assert process.returncode is None, log.read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert ("event loop: uvloop" in log.read_text()) == (request.param == "uvloop"), log.read_text()
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            created = await client.post("/admin/v1/customers", json={"id": "acme", "name": "Acme"}, headers=admin)
            assert created.status_code == 201, created.text
            credited = await client.post("/admin/v1/customers/acme/credits", headers=admin,
                                         json={"amount": 1_000_000, "idempotency_key": "seed"})
            assert credited.status_code == 201, credited.text
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


async def stream_and_terminate(server: Server, words: int) -> tuple[str, str, BaseException | None]:
    """Stream a slowed completion, SIGTERM the server after three content chunks; the text, id and error."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0,
                                default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    text: list[str] = []
    error: BaseException | None = None
    async with client:
        response = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=500, stream=True,
            extra_headers={"X-Mock-Behavior": f"chunk-delay:0.2,words:{words}"})
        request_id = response.headers["X-Metergate-Request-Id"]
        try:
            async for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                    if len(text) == 3:
                        server.process.send_signal(signal.SIGTERM)
        except openai.APIError as exc:
            error = exc
    return "".join(text), request_id, error


async def settled_state(server: Server, request_id: str) -> tuple[str, dict[str, Any], int]:
    """The hold's state, the usage record and the pending amount, read from the database after the exit."""
    store = SqlWalletStore(server.database_url)
    await store.open()
    try:
        hold = await store.get_hold("hold_" + request_id.removeprefix("req_"))
        [(_, record)] = await store.usage("test", "acme", limit=10)
        balance = await store.balance("test", "acme", "USD")
        assert await store.audit() == []
    finally:
        await store.close()
    assert hold is not None and record.id == request_id
    return hold.state, {"source": record.usage_source, "output": record.tokens_output,
                        "charged": record.charged_amount, "status": record.status_code}, balance.debits_pending


async def test_sigterm_lets_a_stream_finish_within_the_drain_deadline(serve: Start) -> None:
    server = await serve(30)
    text, request_id, error = await stream_and_terminate(server, words=10)
    assert error is None
    assert len(text.split()) == 10  # the whole answer, [DONE] included (the SDK stops there)
    assert await asyncio.wait_for(server.process.wait(), 60) == 0, server.log.read_text()
    state, record, pending = await settled_state(server, request_id)
    assert (state, pending) == ("captured", 0)
    assert record["source"] == "provider" and record["charged"] > 0 and record["status"] == 200
    assert "shutting down" in server.log.read_text()


async def test_sigterm_cuts_a_stream_at_the_drain_deadline_and_bills_what_was_delivered(serve: Start) -> None:
    server = await serve(1)
    text, request_id, error = await stream_and_terminate(server, words=200)  # 40 s of stream
    # A clean cut: the client is told why, in the stream's own error format, and the stream ends.
    assert isinstance(error, openai.APIError)
    assert error.code == "shutting_down"
    assert 3 <= len(text.split()) < 200
    assert await asyncio.wait_for(server.process.wait(), 60) == 0, server.log.read_text()
    state, record, pending = await settled_state(server, request_id)
    assert (state, pending) == ("captured", 0)
    assert record["source"] == "estimated"
    assert record["output"] == counter_for(MODEL).count(text)  # exactly what the client received
    assert "drain deadline reached" in server.log.read_text()


async def test_sigterm_cancels_a_request_still_waiting_for_its_upstream_and_voids_its_hold(
        serve: Start, upstream: Upstream) -> None:
    server = await serve(1)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0,
                                default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    async with client:
        call = asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Mock-Behavior": "slow:30"}))
        for _ in range(300):  # until the request has its hold and waits on the upstream
            if upstream.requests:
                break
            await asyncio.sleep(0.05)
        assert upstream.requests
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIConnectionError):  # the connection closes: no answer was coming
            await call
    assert await asyncio.wait_for(server.process.wait(), 60) == 0, server.log.read_text()
    store = SqlWalletStore(server.database_url)
    await store.open()
    try:
        [(_, record)] = await store.usage("test", "acme", limit=10)
        hold = await store.get_hold(record.hold_id or "")
        balance = await store.balance("test", "acme", "USD")
        assert await store.audit() == []
    finally:
        await store.close()
    assert hold is not None and hold.state == "voided"
    assert (record.charged_amount, record.usage_source, balance.debits_pending) == (0, "none", 0)
    assert balance.available == 1_000_000
