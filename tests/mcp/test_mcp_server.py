"""``metergate mcp`` driven by the official MCP SDK's own client against a real ``metergate serve``: the tools
are listed and each answers from the control plane; the other mode's customers, unknown customers and bad
amounts are clear tool errors; credits and grants happen once per idempotency key.

Method: one ``metergate serve`` subprocess per module (SQLite, tests/cli/server.py) with a test-mode customer
that has funds and a usage record, and a live-mode customer. ``metergate mcp`` runs as a subprocess with a
test-mode admin key in ``METERGATE_ADMIN_KEY``: on stdio through ``stdio_client`` + ``ClientSession``, and with
``--http`` through ``streamable_http_client``. What the tools report is checked against the admin API.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import pytest_asyncio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from metergate_client import Client
from tests.cli.conftest import publish_rules
from tests.cli.server import ROOT, MeterServer
from tests.conftest import ADMIN_KEY, LIVE_ADMIN_KEY, free_port

shared_loop = pytest.mark.asyncio(loop_scope="module")  # the loop the module's sessions live on
READS = {"balance", "recent_usage", "quote", "preflight", "portal_link"}
START_TIMEOUT_S = 60.0  # a bound on waiting for start-up on a loaded machine, not an assertion on speed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterServer]:
    s = MeterServer(tmp_path_factory.mktemp("metergate"))
    s.start()
    with Client(s.url, ADMIN_KEY) as test, Client(s.url, LIVE_ADMIN_KEY) as live:
        publish_rules(test)
        test.create_customer("acme", "Acme")
        test.credit("acme", "5.00", idempotency_key="seed-acme")
        test.create_grant("acme", "10", asset="CALLS", idempotency_key="seed-calls")
        [sent] = test.send_events([{"id": "ev-1", "customer_id": "acme", "type": "api.call", "quantity": "3"}])
        assert sent.status == "accepted"
        live.create_customer("live-only", "Only in live mode")
        live.credit("live-only", "1.00", idempotency_key="seed-live")
    yield s
    s.stop()


def env(server: MeterServer) -> dict[str, str]:
    return {**os.environ, "METERGATE_URL": server.url, "METERGATE_ADMIN_KEY": ADMIN_KEY}


@asynccontextmanager
async def stdio_session(server: MeterServer, *flags: str) -> AsyncIterator[ClientSession]:
    """A session with ``metergate mcp`` on stdio, opened and closed in a task of its own: the SDK's task groups
    must be left by the task that entered them, and the tests of this module share the session."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "metergate", "mcp", *flags],
                                   env=env(server), cwd=str(ROOT))
    opened: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def hold_open() -> None:
        with open(os.devnull, "w") as errlog:  # noqa: ASYNC230 - /dev/null: the server's stderr is not asserted on
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                opened.set_result(session)
                await done.wait()

    runner = asyncio.create_task(hold_open())
    try:
        yield await asyncio.wait_for(asyncio.shield(opened), START_TIMEOUT_S)
    finally:
        done.set()
        await runner


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reader(server: MeterServer) -> AsyncIterator[ClientSession]:
    async with stdio_session(server) as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def operator(server: MeterServer) -> AsyncIterator[ClientSession]:
    async with stdio_session(server, "--operator") as session:
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    answer: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
    return answer


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text


# ---------------------------------------------------------------------- stdio


@shared_loop
async def test_stdio_read_tools_answer_from_the_control_plane(server: MeterServer, reader: ClientSession) -> None:
    session = reader
    assert {t.name for t in (await session.list_tools()).tools} == READS  # no writes without --operator
    balance = await call(session, "balance", customer_id="acme")
    usage = await call(session, "recent_usage", customer_id="acme", limit=5)
    quote = await call(session, "quote", customer_id="acme", model="gpt-4o-mini", input_tokens=1_000_000,
                       output_tokens=1_000_000)
    fits = await call(session, "preflight", customer_id="acme", event_type="api.call", quantities={"quantity": "4"})
    too_much = await call(session, "preflight", customer_id="acme", model="gpt-4o-mini",
                          input_tokens=10_000_000, output_tokens=10_000_000)
    link = await call(session, "portal_link", customer_id="acme")
    with Client(server.url, ADMIN_KEY) as admin:
        truth = {b.asset: b for b in admin.balances("acme")}
        records = admin.usage("acme").data
    assert balance["mode"] == "test"
    assert {b["asset"]: Decimal(b["available"]) for b in balance["balances"]} == {
        a: b.available for a, b in truth.items()}
    assert [r["id"] for r in usage["records"]] == [r.id for r in records]
    assert usage["records"][0]["asset"] == "CALLS" and Decimal(usage["records"][0]["charged"]) == 3
    # 0.30 + 1.20 per million tokens (EVENT_RULES in tests/cli/conftest.py), exact.
    assert (quote["asset"], Decimal(quote["amount"])) == ("USD", Decimal("1.5"))
    assert fits["allowed"] is True and Decimal(fits["available"]) == 7 and fits["held"] is False
    assert too_much["allowed"] is False and Decimal(too_much["shortfall"]) == Decimal(15) - Decimal(5)
    assert link["url"].startswith(server.url) and link["access"] == "view_topup" and link["expires_in_s"] > 0
    with Client(server.url, ADMIN_KEY) as admin:  # nothing was held by the quotes
        assert all(b.pending_minor == 0 for b in admin.balances("acme"))


@shared_loop
async def test_stdio_with_operator_lists_the_writes_and_refuses_the_other_modes_customer(
        server: MeterServer, operator: ClientSession) -> None:
    session = operator
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == READS | {"credit", "grant"}
    assert "idempotency_key" in tools["credit"].input_schema["required"]
    assert tools["balance"].annotations is not None and tools["balance"].annotations.read_only_hint
    for tool, extra in (("balance", {}), ("recent_usage", {}), ("portal_link", {}),
                        ("quote", {"model": "gpt-4o-mini", "input_tokens": 10}),
                        ("preflight", {"model": "gpt-4o-mini", "input_tokens": 10}),
                        ("credit", {"amount": "1", "idempotency_key": "x-live"}),
                        ("grant", {"amount": "1", "idempotency_key": "x-live-g"})):
        text = await refused(session, tool, customer_id="live-only", **extra)
        assert "customer_not_found: no customer 'live-only' in test mode" in text, (tool, text)
    assert "'nobody'" in await refused(session, "balance", customer_id="nobody")
    with Client(server.url, LIVE_ADMIN_KEY) as live:  # the live customer was not touched
        [usd] = [b for b in live.balances("live-only") if b.asset == "USD"]
        assert usd.available == Decimal("1.000000")


BAD_AMOUNTS = ["0", "-5", "1e3", "abc", "", "0.0000001"]  # the last: finer than USD's 6 places


@shared_loop
async def test_stdio_refuses_bad_amounts_and_a_missing_idempotency_key_and_credits_nothing(
        server: MeterServer, operator: ClientSession) -> None:
    with Client(server.url, ADMIN_KEY) as admin:
        before = admin.balances("acme")
    session = operator
    for amount in BAD_AMOUNTS:
        text = await refused(session, "credit", customer_id="acme", amount=amount, idempotency_key=f"bad{amount}")
        assert "invalid_amount:" in text, (amount, text)
    grant = await refused(session, "grant", customer_id="acme", amount="-1", idempotency_key="bad-grant")
    assert "invalid_amount:" in grant
    # A float is not exact: the tool takes a decimal string only. Without a key, nothing to deduplicate by.
    assert "amount" in await refused(session, "credit", customer_id="acme", amount=1.5, idempotency_key="f")
    assert "idempotency_key" in await refused(session, "credit", customer_id="acme", amount="1")
    with Client(server.url, ADMIN_KEY) as admin:
        assert admin.balances("acme") == before


@shared_loop
async def test_stdio_credit_and_grant_happen_once_per_idempotency_key(server: MeterServer,
                                                                     operator: ClientSession) -> None:
    with Client(server.url, ADMIN_KEY) as admin:
        admin.create_customer("bolt")
    session = operator
    first = await call(session, "credit", customer_id="bolt", amount="2.50", idempotency_key="inv-7", memo="x")
    again = await call(session, "credit", customer_id="bolt", amount="2.50", idempotency_key="inv-7", memo="x")
    grant = await call(session, "grant", customer_id="bolt", amount="1", purpose="trial",
                       idempotency_key="trial-bolt")
    regrant = await call(session, "grant", customer_id="bolt", amount="1", purpose="trial",
                         idempotency_key="trial-bolt")
    conflict = await refused(session, "credit", customer_id="bolt", amount="9", idempotency_key="inv-7")
    assert first["entry_seq"] == again["entry_seq"] and Decimal(first["credited"]) == Decimal("2.5")
    assert grant["grant_id"] == regrant["grant_id"] and grant["purpose"] == "trial"
    assert "idempotency_conflict:" in conflict
    with Client(server.url, ADMIN_KEY) as admin:
        [usd] = [b for b in admin.balances("bolt") if b.asset == "USD"]
    assert usd.available == Decimal("3.5")


def test_http_beyond_loopback_needs_a_token(server: MeterServer) -> None:
    done = subprocess.run([sys.executable, "-m", "metergate", "mcp", "--http", "--host", "0.0.0.0"],
                          env=env(server), capture_output=True, text=True, timeout=60, cwd=ROOT,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2 and "METERGATE_MCP_TOKEN" in done.stderr


def test_without_an_admin_key_mcp_exits_2_with_one_line(server: MeterServer) -> None:
    bare = {k: v for k, v in env(server).items() if k != "METERGATE_ADMIN_KEY"}
    done = subprocess.run([sys.executable, "-m", "metergate", "mcp"], env={**bare, "HOME": str(ROOT / "nowhere")},
                          capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2 and "no admin key" in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------- streamable HTTP


MCP_TOKEN = "mcp-token-" + "t" * 24


@pytest.fixture
def http_mcp(server: MeterServer, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with (tmp_path / "mcp.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "metergate", "mcp", "--http", "--port", str(port)],
                                   env={**env(server), "METERGATE_MCP_TOKEN": MCP_TOKEN}, cwd=ROOT, stdout=log,
                                   stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, (tmp_path / "mcp.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "metergate mcp --http did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


@shared_loop
async def test_streamable_http_lists_tools_answers_and_refuses_the_other_mode(http_mcp: str) -> None:
    hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx.AsyncClient(timeout=30) as anonymous:  # without the token: nothing reaches the tools
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": MCP_TOKEN}):
            r = await anonymous.post(http_mcp, json=hello, headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_token")
    authorized = httpx.AsyncClient(headers={"Authorization": f"Bearer {MCP_TOKEN}"},
                                   timeout=httpx.Timeout(30, read=300))  # the SDK's own client's timeouts
    async with authorized, streamable_http_client(http_mcp, http_client=authorized) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        assert {t.name for t in (await session.list_tools()).tools} == READS
        balance = await call(session, "balance", customer_id="acme")
        text = await refused(session, "balance", customer_id="live-only")
    assert balance["mode"] == "test" and any(b["asset"] == "USD" for b in balance["balances"])
    assert "customer_not_found: no customer 'live-only' in test mode" in text


def test_serve_never_imports_the_mcp_sdk() -> None:
    """The SDK is an optional extra: the command line and the app ``serve`` builds load without it."""
    probe = ("import sys, metergate.cli, metergate.proxy.app, metergate.admin.api\n"
             "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith(('mcp.', 'mcp_types'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=True)
    assert done.stdout.strip() == "[]"
