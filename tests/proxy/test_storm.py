"""No overspend under a storm: 500 concurrent requests through the proxy against a wallet funded for K.

Method: a real gateway (SQLite, then PostgreSQL) in front of the mock upstream; every request has the
same estimate, so the wallet is funded for exactly K holds. Whatever the interleaving, at most K requests
may be served, the balance never goes below zero, no hold stays open and the ledger audits clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from metergate.metering.usage import Usage
from tests.conftest import DEFAULT_PRICING, Gateway, Upstream, _reset_pg, start_gateway

REQUESTS = 500
K = 60
MESSAGES = [{"role": "user", "content": "storm"}]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storm_gateway(request: pytest.FixtureRequest, upstream: Upstream,
                        tmp_path: Path) -> AsyncIterator[Gateway]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'storm.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        await _reset_pg(url)
    gw, runner = await start_gateway(upstream, url)
    yield gw
    await gw.close()
    await runner.cleanup()


def hold_estimate() -> int:
    """The hold one storm request places: its prompt estimate plus max_tokens, at gpt-4o-mini rates."""
    from metergate.config.settings import PricingSettings
    from metergate.metering.pricing import PriceBook
    from metergate.proxy.adapters.openai import CHAT, prepare

    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 20}
    prepared = prepare(CHAT, b"", body, 4096)
    book = PriceBook(PricingSettings.model_validate(DEFAULT_PRICING), 6)
    rate = book.rate_for("gpt-4o-mini")
    assert rate is not None
    return book.price(rate, Usage(prepared.input_tokens, prepared.max_output_tokens))


async def test_storm_accepts_at_most_k_and_never_overspends(storm_gateway: Gateway) -> None:
    gw = storm_gateway
    hold = hold_estimate()
    assert hold > 0
    await gw.customer("acme", funds=hold * K)
    client = gw.openai(http_client=None)

    async def one(i: int) -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=20, extra_headers={"X-Mock-Behavior": "words:3"})
            return 200
        except openai.APIStatusError as error:
            return error.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    served = statuses.count(200)
    assert set(statuses) <= {200, 402}, set(statuses)
    # Each served request costs less than its hold, so more than K may fit as holds are released,
    # but never more than the funds allow, and never fewer than K.
    assert served >= K
    balance = await gw.balance()
    assert balance["available"] >= 0
    assert balance["pending"] == 0
    records = await gw.usage()
    assert len(records) == served
    assert sum(r["charged_amount"] for r in records) == hold * K - balance["available"]
    assert all(r["written_off_amount"] == 0 for r in records)
    assert await gw.store.audit() == []
