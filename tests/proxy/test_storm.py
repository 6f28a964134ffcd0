"""No overspend under a storm: 500 concurrent requests through the proxy against a wallet funded for K.

Method: a real gateway (SQLite, then PostgreSQL) in front of the mock upstream; every request has the
same estimate, so the wallet is funded for exactly K holds. Whatever the interleaving, the balance never goes
below zero, no hold stays open and the ledger audits clean. When each request costs exactly its hold (a flat
fee), at most K are served — exactly K, the wallet ending empty; when it costs less than its hold, released
holds let more than K through, each paid for.
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


# A flat price per request: the hold is exactly the price, so a wallet funded for K requests serves K.
FLAT_FEE = 1_000  # micro-dollars
FLAT_PRICING = {"asset": "USD", "models": {"gpt-4o-mini": {"request_fee": "0.001"}}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storm_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'storm.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def storm_gateway(storm_url: str, upstream: Upstream) -> AsyncIterator[Gateway]:
    if storm_url.startswith("postgresql"):
        await _reset_pg(storm_url)
    gw, runner = await start_gateway(upstream, storm_url)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def flat_gateway(storm_url: str, upstream: Upstream) -> AsyncIterator[Gateway]:
    if storm_url.startswith("postgresql"):
        await _reset_pg(storm_url)
    gw, runner = await start_gateway(upstream, storm_url, pricing=FLAT_PRICING)
    yield gw
    await gw.close()
    await runner.cleanup()


async def storm(gw: Gateway) -> list[int]:
    """REQUESTS concurrent chat completions through the official SDK; their HTTP statuses."""
    client = gw.openai(http_client=None)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=20, extra_headers={"X-Mock-Behavior": "words:3"})
            return 200
        except openai.APIStatusError as error:
            return error.status_code

    return list(await asyncio.gather(*(one() for _ in range(REQUESTS))))


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
    statuses = await storm(gw)
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


async def test_storm_at_a_price_equal_to_the_hold_serves_exactly_k(flat_gateway: Gateway) -> None:
    """Here every request costs exactly its hold, so the funds cover K requests and no more: at most K
    succeed (and, the wallet ending empty, exactly K), whatever the interleaving of 500 concurrent ones."""
    gw = flat_gateway
    await gw.customer("acme", funds=FLAT_FEE * K)
    statuses = await storm(gw)
    assert set(statuses) <= {200, 402}, set(statuses)
    assert statuses.count(200) == K
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (0, 0)
    records = await gw.usage()
    assert len(records) == K and all(r["charged_amount"] == FLAT_FEE for r in records)
    assert await gw.store.audit() == []
