"""The Realtime API over WebSocket, prepaid: every response held before it starts and billed by its
``response.done``.

Method: the official ``openai`` SDK's realtime client (``client.realtime.connect``) talks to metergate, which
relays to the mock Realtime upstream (:mod:`metergate.demo.mock_realtime`, the real event format); frames the
SDK cannot send (malformed, binary) go through aiohttp's WebSocket client. Each test adds up what the mock
reported in its ``response.done`` events, prices it by hand from the configured rates (text and audio apart),
and compares with the ledger through the admin API: charged to the unit, one usage record per response, no
hold left open. The kill -9 test runs ``metergate serve`` as a subprocess and then lets its holds expire.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import openai
import pytest
import yaml
from websockets.exceptions import ConnectionClosed

from metergate.demo.mock_realtime import CONNECTIONS, SENT_USAGE, build_mock_realtime
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, free_port, serve, start_gateway

MODEL = "gpt-realtime"
RATES = {"input_per_mtok": "4", "cached_input_per_mtok": "0.4", "output_per_mtok": "16",
         "audio_input_per_mtok": "32", "cached_audio_input_per_mtok": "0.4", "audio_output_per_mtok": "64"}
PRICING = {**DEFAULT_PRICING, "models": {**DEFAULT_PRICING["models"], MODEL: RATES}}
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
SMALL_HOLDS = {"response_hold_input_tokens": 100, "response_hold_output_tokens": 100, "done_grace_s": 2}
WAIT_S = 20  # the longest any condition below is waited for (never asserted on as a duration)


def exact_price(usage: dict[str, Any]) -> Decimal:
    """One response's exact price in dollars, from the mock's own report, by the rates above: each kind on
    its own rate."""
    ind, outd = usage["input_token_details"], usage["output_token_details"]
    cached = ind["cached_tokens_details"]
    per = {k: Decimal(v) for k, v in RATES.items()}
    exact = ((ind["text_tokens"] - cached["text_tokens"]) * per["input_per_mtok"]
             + cached["text_tokens"] * per["cached_input_per_mtok"]
             + (ind["audio_tokens"] - cached["audio_tokens"]) * per["audio_input_per_mtok"]
             + cached["audio_tokens"] * per["cached_audio_input_per_mtok"]
             + outd["text_tokens"] * per["output_per_mtok"] + outd["audio_tokens"] * per["audio_output_per_mtok"])
    return exact / 1_000_000


def price_of(usage: dict[str, Any]) -> int:
    """In micro-dollars, rounded half-up once."""
    return int((exact_price(usage) * 10**6).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def price_exact_nanos(usage: dict[str, Any]) -> int:
    return int((exact_price(usage) * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.fixture
async def mock() -> AsyncIterator[Upstream]:
    app = build_mock_realtime(PROVIDER_KEY)
    runner, port = await serve(app)
    yield Upstream(f"http://127.0.0.1:{port}", app)
    await runner.cleanup()


async def _gateway(mock: Upstream, tmp_path: Path, funds: int, **realtime: Any) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(mock, f"sqlite:///{tmp_path / 'realtime.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": mock.url, "api_key": PROVIDER_KEY, "realtime": True}],
        realtime=realtime)
    await gw.customer("acme", funds=funds)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def gw(mock: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(mock, tmp_path, 1_000_000, done_grace_s=2):
        yield gateway


def sent(mock: Upstream) -> list[dict[str, Any]]:
    return mock.app[SENT_USAGE]


async def settled(gw: Gateway, records: int) -> list[dict[str, Any]]:
    """The usage records once ``records`` of them exist and no hold is pending (settlement after a client
    left runs on in the server)."""
    for _ in range(WAIT_S * 20):
        usage = await gw.usage()
        if len(usage) >= records and (await gw.balance())["pending"] == 0:
            return usage
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled: {await gw.usage()} {await gw.balance()}")


async def charged_total(gw: Gateway) -> int:
    return sum(record["charged_amount"] for record in await gw.usage())


async def until_done(connection: Any) -> Any:
    async for event in connection:
        if event.type == "response.done":
            return event
        if event.type == "error":
            return event
    raise AssertionError("the session ended before response.done")


# ---------------------------------------------------------------------------------- billing


async def test_session_is_billed_the_sum_of_its_responses(gw: Gateway, mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        for turn, deltas in enumerate((3, 7, 2)):
            await connection.conversation.item.create(item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": f"turn {turn} " * 9}]})
            await connection.input_audio_buffer.append(audio="AAAA" * 12_000)  # 0.75 s of silence
            await connection.input_audio_buffer.commit()
            await connection.response.create(response={"metadata": {"mock_deltas": str(deltas)}})
            done = await until_done(connection)
            assert done.type == "response.done" and done.response.status == "completed"
            receipt = done.model_extra["metergate"]  # settled before it was forwarded
            assert receipt["usage_source"] == "provider"
            assert Decimal(receipt["charged"]) * 1_000_000 == price_of(sent(mock)[turn]["usage"])
    usage = await settled(gw, 3)
    expected = sum(price_of(s["usage"]) for s in sent(mock))
    assert len(sent(mock)) == 3 and expected > 0
    assert await charged_total(gw) == expected
    balance = await gw.balance()
    assert balance["available"] == 1_000_000 - expected and balance["pending"] == 0
    assert {r["endpoint"] for r in usage} == {"realtime"} and {r["usage_source"] for r in usage} == {"provider"}
    # Audio is priced on its own rates: the record keeps the split the provider reported.
    last = max(usage, key=lambda r: r["id"])["detail"]["tokens"]
    reported = sent(mock)[-1]["usage"]
    assert last["audio_output"] == reported["output_token_details"]["audio_tokens"] > 0
    # The provider's cost beside the price, at genai-prices' audio rates (the same as RATES for this model).
    assert sum(r["cost_nanos"] for r in usage) == sum(price_exact_nanos(s["usage"]) for s in sent(mock))
    assert await gw.store.audit() == []
    # The provider's key went upstream; the client's never did.
    headers = mock.app[CONNECTIONS][0]["headers"]
    assert headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not any(name.lower().startswith("x-metergate") for name in headers)


async def test_session_that_outruns_its_wallet_is_refused_at_the_next_response(mock: Upstream,
                                                                                tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 25_000, **SMALL_HOLDS):
        client = gw.openai()
        events: list[Any] = []
        async with client.realtime.connect(model=MODEL) as connection:
            await connection.recv()
            closed: ConnectionClosed | None = None
            try:
                for _ in range(10):
                    await connection.response.create(response={"metadata": {"mock_deltas": "30"}})
                    event = await until_done(connection)
                    events.append(event)
                    if event.type == "error":
                        break
                await connection.recv()  # the server closes the session after the error event
            except ConnectionClosed as exc:  # how the SDK surfaces the server's close
                closed = exc
        refusal = events[-1]
        assert refusal.type == "error", events
        assert refusal.error.code == "insufficient_funds" and refusal.error.type == "invalid_request_error"
        assert "/portal/" in refusal.error.message and refusal.error.model_extra["portal_url"] in refusal.error.message
        assert closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008
        responses = [e for e in events if e.type == "response.done"]
        assert len(responses) == len(sent(mock)) >= 1  # the refused response.create never went upstream
        await settled(gw, len(responses))
        expected = sum(price_of(s["usage"]) for s in sent(mock))
        assert await charged_total(gw) == expected
        balance = await gw.balance()
        assert balance["available"] == 25_000 - expected and balance["pending"] == 0
        assert all(r["written_off_amount"] == 0 for r in await gw.usage())


async def test_concurrent_sessions_never_overspend_one_wallet(mock: Upstream, tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 60_000, **SMALL_HOLDS):

        async def talk(gw: Gateway) -> list[str]:
            kinds: list[str] = []
            async with gw.openai().realtime.connect(model=MODEL) as connection:
                await connection.recv()
                try:
                    for _ in range(10):
                        await connection.response.create(response={"metadata": {"mock_deltas": "30"}})
                        event = await until_done(connection)
                        kinds.append(event.type)
                        if event.type == "error":
                            assert event.error.code == "insufficient_funds"
                            break
                except ConnectionClosed:
                    kinds.append("closed")
            return kinds

        outcomes = await asyncio.gather(talk(gw), talk(gw), talk(gw))
        assert all("error" in kinds for kinds in outcomes), outcomes  # every session ran dry, none ran on
        done = sum(kinds.count("response.done") for kinds in outcomes)
        usage = await settled(gw, done)
        assert len(usage) == done == len(sent(mock))
        prices = sum(price_of(s["usage"]) for s in sent(mock))
        assert sum(r["price_amount"] for r in usage) == prices
        charged = sum(r["charged_amount"] for r in usage)
        assert charged + sum(r["written_off_amount"] for r in usage) == prices  # nothing lost
        balance = await gw.balance()
        assert balance["available"] == 60_000 - charged >= 0 and balance["pending"] == 0
        assert await gw.store.audit() == []


async def test_session_ends_at_its_longest_duration(mock: Upstream, tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 1_000_000, max_session_s=1):
        async with gw.openai().realtime.connect(model=MODEL) as connection:
            events = [event async for event in connection]  # ends with the server's close (1000)
            assert connection._connection.close_code == 1000
        assert [e.type for e in events] == ["session.created", "error"]
        assert events[1].error.code == "session_expired"
        await settled(gw, 0)
        assert (await gw.balance())["available"] == 1_000_000


async def test_client_that_leaves_mid_response_pays_what_response_done_reported(gw: Gateway,
                                                                                 mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "200", "mock_delay_s": "0.02"}})
        async for event in connection:
            if event.type == "response.output_audio.delta":
                break
    usage = await settled(gw, 1)
    assert len(sent(mock)) == 1 and sent(mock)[0]["status"] == "cancelled"  # metergate cancelled it upstream
    assert usage[0]["usage_source"] == "provider"
    assert usage[0]["charged_amount"] == price_of(sent(mock)[0]["usage"]) > 0


async def test_client_that_leaves_right_after_asking_pays_the_cancelled_response(gw: Gateway,
                                                                                  mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "200", "mock_delay_s": "0.02"}})
    usage = await settled(gw, 1)  # the response started after the client had gone: cancelled, and billed
    assert len(sent(mock)) == 1 and sent(mock)[0]["status"] == "cancelled"
    assert usage[0]["usage_source"] == "provider" and usage[0]["charged_amount"] == price_of(sent(mock)[0]["usage"])


async def test_client_that_leaves_before_any_usage_pays_an_estimate_marked_estimated(gw: Gateway,
                                                                                      mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "2", "mock_no_done": "1"}})
        deltas = 0
        async for event in connection:
            deltas += event.type == "response.output_audio.delta"
            if deltas == 2:
                break
    usage = await settled(gw, 1)
    assert sent(mock) == []  # the upstream never reported usage
    record = usage[0]
    assert record["usage_source"] == "estimated"
    tokens = record["detail"]["tokens"]
    assert tokens["audio_output"] == 4  # 0.2 s of audio delivered, at 20 output tokens a second
    assert record["charged_amount"] == record["price_amount"] > 0
    assert (await gw.balance())["available"] == 1_000_000 - record["charged_amount"]


async def test_response_that_outgrows_the_wallet_is_stopped_where_the_funds_end(mock: Upstream,
                                                                                 tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 30_000, **SMALL_HOLDS):
        client = gw.openai()
        delivered = 0
        async with client.realtime.connect(model=MODEL) as connection:
            await connection.recv()
            await connection.response.create(response={"metadata": {"mock_deltas": "400", "mock_delay_s": "0.005"}})
            async for event in connection:
                delivered += event.type == "response.output_audio.delta"
                if event.type == "response.done":
                    done = event
                    break
            assert done.response.status == "cancelled"  # metergate cancelled it upstream
            receipt = done.model_extra["metergate"]
            assert receipt["stop_reason"] == "insufficient_funds" and "/portal/" in receipt["portal_url"]
            await connection.response.create()
            refused = await until_done(connection)
            assert refused.type == "error" and refused.error.code == "insufficient_funds"
        # The hold grew with the output (the first, of 9,600, covers about 66 deltas); it stopped where the
        # wallet did, a little past it only by what the upstream produced before the cancel reached it.
        assert 100 < delivered < 400
        [record] = await settled(gw, 1)
        price = price_of(sent(mock)[0]["usage"])
        assert record["usage_source"] == "provider" and record["price_amount"] == price
        assert record["charged_amount"] + record["written_off_amount"] == price  # nothing lost
        assert record["written_off_amount"] < price // 10
        balance = await gw.balance()
        assert balance["available"] == 30_000 - record["charged_amount"] >= 0 and balance["pending"] == 0
        assert len(sent(mock)) == 1


async def test_server_started_response_without_funds_is_cancelled_and_billed(mock: Upstream,
                                                                            tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 12_000, **SMALL_HOLDS):
        client = gw.openai()
        kinds: list[str] = []
        async with client.realtime.connect(model=MODEL) as connection:
            await connection.recv()
            await connection.session.update(session={"type": "realtime", "audio": {"input": {
                "turn_detection": {"type": "server_vad"}}}})
            await connection.response.create(response={"metadata": {"mock_deltas": "30"}})  # drains the wallet
            assert (await until_done(connection)).type == "response.done"
            await connection.input_audio_buffer.append(audio="AAAA" * 4000)
            await connection.input_audio_buffer.commit()  # server VAD starts a response by itself
            try:
                async for event in connection:
                    kinds.append(event.type)
            except ConnectionClosed as closed:  # the close that ends the session
                assert closed.rcvd is not None and closed.rcvd.code == 1008
        assert "error" in kinds and "response.done" in kinds, kinds
        assert sent(mock)[-1]["status"] == "cancelled"
        await settled(gw, 2)
        usage = await gw.usage()
        assert sum(r["price_amount"] for r in usage) == sum(price_of(s["usage"]) for s in sent(mock))
        assert sum(r["charged_amount"] + r["written_off_amount"] for r in usage) == sum(
            r["price_amount"] for r in usage)  # nothing lost: what the wallet could not cover is written off
        assert (await gw.balance())["pending"] == 0


async def test_upstream_that_breaks_off_ends_the_session_and_bills_what_was_delivered(gw: Gateway,
                                                                                        mock: Upstream) -> None:
    client = gw.openai()
    kinds: list[str] = []
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "5", "mock_die": "1"}})
        with pytest.raises(ConnectionClosed) as closed:
            async for event in connection:
                kinds.append(event.type)
                if event.type == "error":
                    assert event.error.code == "upstream_stream_broken"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "error" in kinds and "response.done" not in kinds
    usage = await settled(gw, 1)
    assert usage[0]["usage_source"] == "estimated"
    assert usage[0]["detail"]["tokens"]["audio_output"] == 2  # the one 0.1 s delta delivered
    assert usage[0]["charged_amount"] == usage[0]["price_amount"] > 0


async def test_a_repeated_response_done_is_billed_once(gw: Gateway, mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_repeat_done": "1"}})
        first, second = await until_done(connection), await until_done(connection)
        assert first.response.id == second.response.id
        assert "charged" in first.model_extra["metergate"] and "charged" not in second.model_extra["metergate"]
    usage = await settled(gw, 1)
    assert len(usage) == 1 and usage[0]["charged_amount"] == price_of(sent(mock)[0]["usage"])


async def test_failed_response_is_not_charged(gw: Gateway, mock: Upstream) -> None:
    client = gw.openai()
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_status": "failed"}})
        done = await until_done(connection)
        assert done.response.status == "failed" and done.model_extra["metergate"]["charged"] == "0.000000"
    usage = await settled(gw, 1)
    assert usage[0]["charged_amount"] == 0 and usage[0]["status_code"] == 502
    assert (await gw.balance())["available"] == 1_000_000


async def test_each_response_counts_against_the_rate_limit(mock: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(mock, f"sqlite:///{tmp_path / 'limited.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": mock.url, "api_key": PROVIDER_KEY, "realtime": True}],
        rate_limits={"customer": {"requests_per_minute": 3}})
    try:
        await gw.customer("acme", funds=1_000_000)
        async with gw.openai().realtime.connect(model=MODEL) as connection:  # the upgrade counts once
            await connection.recv()
            for _ in range(2):
                await connection.response.create()
                assert (await until_done(connection)).type == "response.done"
            await connection.response.create()  # the fourth request this minute
            refused = await until_done(connection)
            assert refused.type == "error" and refused.error.code == "rate_limited"
            assert refused.error.model_extra["retry_after_s"] >= 1
            await connection.session.update(session={"type": "realtime", "instructions": "Be brief."})
            assert (await connection.recv()).type == "session.updated"  # the session goes on
        assert len(sent(mock)) == 2
        usage = await settled(gw, 2)
        assert sum(r["charged_amount"] for r in usage) == sum(price_of(s["usage"]) for s in sent(mock))
    finally:
        await gw.close()
        await runner.cleanup()


# ---------------------------------------------------------------------------------- bad input


async def test_upgrade_without_identification_is_401_json_before_upgrade(gw: Gateway, mock: Upstream) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{gw.url}/openai/v1/realtime", params={"model": MODEL}, headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_customer"
    assert mock.app[CONNECTIONS] == []


async def test_upgrade_refused_for_funds_is_402_json(mock: Upstream, tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 10):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{gw.url}/openai/v1/realtime?model={MODEL}", headers=AS_ACME)
        assert refused.value.status == 402
        assert mock.app[CONNECTIONS] == [] and await gw.usage() == []


@pytest.mark.parametrize(("query", "code"), [
    ("", "missing_model"),
    ("model=bad%20model", "invalid_model"),
    (f"model={MODEL}&call_id=rtc_1", "invalid_query"),
])
async def test_bad_upgrade_queries_are_refused(gw: Gateway, query: str, code: str) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{gw.url}/openai/v1/realtime?{query}", headers={**AS_ACME, "Upgrade": "websocket"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code


async def test_upstream_refusing_the_upgrade_is_502_and_costs_nothing(mock: Upstream, tmp_path: Path) -> None:
    gw, runner = await start_gateway(mock, f"sqlite:///{tmp_path / 'wrong-key.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": mock.url, "api_key": "sk-wrong-" + "w" * 20, "realtime": True}])
    try:
        await gw.customer("acme", funds=1_000_000)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{gw.url}/openai/v1/realtime?model={MODEL}", headers=AS_ACME)
        assert refused.value.status == 502
        balance = await gw.balance()
        assert balance["pending"] == 0 and balance["available"] == 1_000_000 and await gw.usage() == []
    finally:
        await gw.close()
        await runner.cleanup()


async def test_plain_get_without_upgrade_is_refused(gw: Gateway) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{gw.url}/openai/v1/realtime?model={MODEL}", headers=AS_ACME)
    assert r.status_code == 400 and r.json()["error"]["code"] == "websocket_required"
    assert (await gw.balance())["pending"] == 0


async def test_malformed_client_frames_get_error_events_and_cost_nothing(gw: Gateway, mock: Upstream) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{gw.url}/openai/v1/realtime?model={MODEL}", headers=AS_ACME, protocols=("realtime",)) as ws:
        assert ws.protocol == "realtime"
        assert json.loads((await ws.receive()).data)["type"] == "session.created"
        for bad in ("not json", "[1, 2]", '{"no": "type"}', '{"type": 7}'):
            await ws.send_str(bad)
            event = json.loads((await ws.receive()).data)
            assert event["type"] == "error" and event["error"]["code"] == "invalid_event", event
        await ws.send_bytes(b"\x00\x01")
        assert json.loads((await ws.receive()).data)["error"]["code"] == "invalid_event"
        await ws.send_str(json.dumps({"type": "response.create", "response": {"metadata": {"mock_deltas": "1"}}}))
        while json.loads((await ws.receive()).data)["type"] != "response.done":
            pass
    usage = await settled(gw, 1)
    assert len(usage) == 1 and usage[0]["charged_amount"] == price_of(sent(mock)[0]["usage"])


async def test_oversized_frame_closes_the_session_with_1009(mock: Upstream, tmp_path: Path) -> None:
    async for gw in _gateway(mock, tmp_path, 1_000_000, max_frame_bytes=4096):
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{gw.url}/openai/v1/realtime?model={MODEL}", headers=AS_ACME) as ws:
            await ws.receive()
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 8192}))
            while (message := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                pass
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1009
        await settled(gw, 0)
        assert await gw.usage() == [] and (await gw.balance())["available"] == 1_000_000


async def test_browser_subprotocol_key_identifies_and_never_reaches_upstream(mock: Upstream,
                                                                             tmp_path: Path) -> None:
    app_origin = "https://app.example.com"
    gw, runner = await start_gateway(mock, f"sqlite:///{tmp_path / 'browser.db'}", pricing=PRICING, routes=[
        {"prefix": "/openai", "upstream": mock.url, "api_key": PROVIDER_KEY, "realtime": True}],
        cors_allow_origins=[app_origin])
    try:
        await gw.customer("acme", funds=1_000_000)
        issued = await gw.admin.post("/customers/acme/api-keys", json={})
        key = issued.json()["key"]
        protocols = ("realtime", f"openai-insecure-api-key.{key}", "openai-beta.realtime-v1")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{gw.url}/openai/v1/realtime?model={MODEL}", protocols=protocols,
                                          origin=app_origin) as ws:
                assert ws.protocol == "realtime"  # the key is never echoed back
                assert json.loads((await ws.receive()).data)["type"] == "session.created"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # a page elsewhere holding the key
                await session.ws_connect(f"{gw.url}/openai/v1/realtime?model={MODEL}", protocols=protocols,
                                         origin="https://elsewhere.example")
            assert refused.value.status == 403
        received = json.dumps(mock.app[CONNECTIONS])
        assert len(mock.app[CONNECTIONS]) == 1 and key not in received and PROVIDER_KEY in received
        assert mock.app[CONNECTIONS][0]["headers"]["Sec-WebSocket-Protocol"] == "realtime,openai-beta.realtime-v1"
    finally:
        await gw.close()
        await runner.cleanup()


async def test_implausible_usage_is_billed_by_estimate(gw: Gateway, mock: Upstream) -> None:
    client = gw.openai()
    bad = {"input_tokens": 10, "output_tokens": -5}
    async with client.realtime.connect(model=MODEL) as connection:
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_usage": json.dumps(bad)}})
        done = await until_done(connection)
        assert done.model_extra["metergate"]["usage_source"] == "estimated"
    usage = await settled(gw, 1)
    assert usage[0]["usage_source"] == "estimated" and "usage_anomalies" in usage[0]["detail"]
    assert usage[0]["charged_amount"] > 0


# ---------------------------------------------------------------------------------- a real process


@pytest.fixture
async def process(mock: Upstream, tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """``metergate serve`` in a subprocess (SQLite file) in front of the mock, with acme funded."""
    port, database_url = free_port(), f"sqlite:///{tmp_path / 'served.db'}"
    config = tmp_path / "metergate.yaml"
    config.write_text(yaml.safe_dump({
        "port": port, "database_url": database_url, "hold_ttl_s": 30, "upstream_timeout_s": 20,
        "drain_timeout_s": 1, "drain_deadline_s": 10,
        "routes": [{"prefix": "/openai", "upstream": mock.url, "api_key": PROVIDER_KEY, "realtime": True}],
        "pricing": PRICING, "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": "s" * 40}}))
    log = tmp_path / "metergate.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "metergate", "serve", "--config",
                                                    str(config), stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(300):
                assert proc.returncode is None, log.read_text()
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert (await http.post("/admin/v1/customers", json={"id": "acme", "name": "A"}, headers=admin)).is_success
            assert (await http.post("/admin/v1/customers/acme/credits", headers=admin,
                                    json={"amount": 1_000_000, "idempotency_key": "seed"})).is_success
        yield proc, url, database_url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _wallet(database_url: str) -> AsyncIterator[SqlWalletStore]:
    store = SqlWalletStore(database_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_kill_9_mid_session_leaves_only_holds_that_expire(
        process: tuple[asyncio.subprocess.Process, str, str]) -> None:
    proc, url, database_url = process
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", default_headers=AS_ACME)
    async with client:
        connection = await client.realtime.connect(model=MODEL).enter()
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "500", "mock_delay_s": "0.05"}})
        async for event in connection:
            if event.type == "response.output_audio.delta":
                proc.send_signal(signal.SIGKILL)
                break
        await proc.wait()
        with pytest.raises(ConnectionClosed):  # the session died with the process
            async for _ in connection:
                pass
    async for store in _wallet(database_url):
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending > 0 and balance.debits_posted == 0  # the response's hold, left open
        rows = await store.read(lambda conn: conn.exec_driver_sql(
            "SELECT id, expires_at_ms, created_at_ms FROM holds WHERE state = 'pending'").all())
        assert rows and all(expires <= created + 30_000 + 5_000 for _, expires, created in rows)
        expired = await store.expire_holds(now_ms=max(expires for _, expires, _ in rows) + 1)  # TTL passed, sweep
        assert expired == len(rows)
        after = await store.balance("test", "acme", "USD")
        assert after.debits_pending == 0 and after.available == 1_000_000
        assert await store.audit() == []


async def test_sigterm_lets_the_response_finish_then_closes_with_1001(
        process: tuple[asyncio.subprocess.Process, str, str], mock: Upstream) -> None:
    proc, url, database_url = process
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", default_headers=AS_ACME)
    kinds: list[str] = []
    async with client:
        connection = await client.realtime.connect(model=MODEL).enter()
        await connection.recv()
        await connection.response.create(response={"metadata": {"mock_deltas": "20", "mock_delay_s": "0.05"}})
        async for event in connection:  # a close with 1001 (going away) ends the iteration
            kinds.append(event.type)
            if kinds.count("response.output_audio.delta") == 1:
                proc.send_signal(signal.SIGTERM)
            if event.type == "error":
                assert event.error.code == "shutting_down"
        assert connection._connection.close_code == 1001, kinds
    assert kinds.count("response.output_audio.delta") == 20 and "response.done" in kinds  # it finished
    assert kinds.index("response.done") < kinds.index("error")
    assert await proc.wait() == 0
    async for store in _wallet(database_url):
        balance = await store.balance("test", "acme", "USD")
        assert balance.debits_pending == 0
        assert balance.debits_posted == price_of(sent(mock)[0]["usage"]) > 0
        assert await store.audit() == []
