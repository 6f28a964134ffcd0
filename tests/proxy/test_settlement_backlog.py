"""A settlement the store cannot take is kept and retried, never dropped: the answer was delivered and the
upstream paid for it.

Method: a real gateway on a real SQLite store whose ``settle`` can be switched to raise the driver's
``OperationalError`` (what an unreachable PostgreSQL raises), escrow leases off so that every settlement goes
to the store; requests through the official ``openai`` SDK, the gateway's own admin API for the evidence.
While the store refuses settlements the answers still arrive (with the amount held, not charged) and their
settlements wait in the backlog; with the backlog full (``settlement_backlog_max: 2``) a new request is refused
with 503 ``settlement_backlog`` before anything is sent upstream. Once the store is back every backlogged
settlement lands exactly once. A settlement still refused at shutdown is written off loudly: an ERROR line
with the request id and its usage record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy.exc import OperationalError

from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Gateway, Upstream, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


class SettleRefusingStore(SqlWalletStore):
    down = False
    refused = 0

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            self.refused += 1
            raise OperationalError("COMMIT", {}, Exception("connection refused"))
        return await super().settle(*args, **kwargs)


@pytest.fixture
async def flaky(upstream: Upstream, tmp_path: Path) -> AsyncIterator[tuple[Gateway, SettleRefusingStore]]:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    store = SettleRefusingStore(url)
    gw, runner = await start_gateway(upstream, url, store=store, settlement_backlog_max=2, escrow={"enabled": False},
                                     drain_deadline_s=0.5)
    yield gw, store
    await gw.close()
    await runner.cleanup()


async def ask(gw: Gateway) -> Any:
    return await gw.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                       max_tokens=5)


async def test_settlements_wait_in_the_backlog_and_land_once_the_store_is_back(
        flaky: tuple[Gateway, SettleRefusingStore]) -> None:
    gw, store = flaky
    await gw.customer("acme", funds=1_000_000)
    store.down = True
    for _ in range(2):
        raw = await ask(gw)
        assert raw.http_response.status_code == 200  # delivered: the bill is kept, not dropped
        assert "X-Metergate-Charged" not in raw.headers and int(raw.headers["X-Metergate-Held"].replace(".", "")) > 0
    sent = len(gw.upstream.requests)
    with pytest.raises(openai.InternalServerError) as refused:
        await ask(gw)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "settlement_backlog"  # type: ignore[index]
    assert len(gw.upstream.requests) == sent  # refused before anything was held or sent upstream
    assert await gw.usage() == [] and (await gw.balance())["pending"] > 0

    store.down = False
    for _ in range(100):  # the backlog retries with backoff (0.5 s, then doubling): bounded wait
        if len(await gw.usage()) == 2:
            break
        await asyncio.sleep(0.1)
    records = await gw.usage()
    assert len(records) == 2 and all(r["charged_amount"] > 0 for r in records)
    balance = await gw.balance()
    assert balance["pending"] == 0 and balance["available"] == 1_000_000 - sum(r["charged_amount"] for r in records)
    metrics = (await gw.admin.get(gw.url + "/metrics")).text
    assert "metergate_settlement_backlog 0.0" in metrics
    raw = await ask(gw)  # and the proxy serves again, with a receipt
    assert raw.http_response.status_code == 200 and "X-Metergate-Charged" in raw.headers
    assert len(await gw.usage()) == 3


async def test_a_settlement_the_store_never_takes_is_written_off_loudly_at_shutdown(
        upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    store = SettleRefusingStore(url)
    gw, runner = await start_gateway(upstream, url, store=store, escrow={"enabled": False}, drain_deadline_s=0.5)
    try:
        await gw.customer("acme", funds=1_000_000)
        store.down = True
        raw = await ask(gw)
        request_id = raw.headers["X-Metergate-Request-Id"]
        tried = store.refused
        caplog.set_level(logging.ERROR, logger="metergate.proxy.settlement")
    finally:
        await gw.close()
        await runner.cleanup()  # the pipeline stops: the backlog is flushed for drain_deadline_s, then written off
    assert store.refused > tried  # the backlog kept trying until shutdown
    [line] = [r.getMessage() for r in caplog.records if "UNBILLED" in r.getMessage()]
    assert line.startswith(f"{request_id}: UNBILLED, the store was still down at shutdown")
    assert '"customer_id": "acme"' in line and '"tokens_output": ' in line  # the usage record, to bill by hand
