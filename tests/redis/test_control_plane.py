"""The control plane over the Redis real-time wallet: payments, spend caps and invoiced billing work as on
the SQL store, and a credit line set in SQL (an invoiced customer) reaches the Redis projection at once.

Method: one gateway with ``redis_url`` set (the shared Redis under a per-test key prefix, a SQLite ledger),
the fake Stripe for meter events, the official ``openai`` SDK as the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from metergate.proxy.app import PIPELINE
from metergate.wallet.redis.store import RedisWalletStore, WalletRef
from tests.billing.conftest import BillGate, eventually, start_billgate
from tests.conftest import Upstream
from tests.payments.fake_stripe import FakeStripe, running_fake_stripe
from tests.proxy.test_openai_sdk import MESSAGES
from tests.redis.conftest import drained


@pytest.fixture
async def redis_billgate(upstream: Upstream, tmp_path: Path, redis_url: str,
                         prefix: str) -> AsyncIterator[tuple[BillGate, FakeStripe]]:
    async with running_fake_stripe() as fake:
        bg = await start_billgate(upstream, f"sqlite:///{tmp_path / 'ledger.db'}", fake,
                                  settings={"redis_url": redis_url, "redis_key_prefix": prefix, "redis_shards": 2,
                                            "redis_wallet": True})
        yield bg, fake
        await bg.stop()


async def ask(bg: BillGate, customer: str) -> None:
    await bg.gw.openai(customer).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)


async def test_an_invoiced_customer_is_served_through_redis_and_reported_to_stripe(
        redis_billgate: tuple[BillGate, FakeStripe]) -> None:
    bg, fake = redis_billgate
    store = bg.gw.store
    assert isinstance(store, RedisWalletStore)
    await bg.gw.customer("inv", funds=10)  # too little for a request, but the projection is loaded
    await bg.gw.customer("pre", funds=10)
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(bg, "inv")
    assert refused.value.status_code == 402
    assert await store.projection(WalletRef("test", "inv", "USD")) is not None

    await bg.set_billing("inv", billing_mode="invoiced", credit_limits={"USD": 10_000_000})
    for _ in range(3):
        await ask(bg, "inv")  # served at once: the credit line reached the Redis projection
    with pytest.raises(openai.APIStatusError) as still_refused:
        await ask(bg, "pre")
    assert still_refused.value.status_code == 402

    async def reported() -> bool:
        return len(fake.meter_events) == 3

    await eventually(reported, what="three meter events")
    await drained(store)
    assert await bg.audits() == []
    [balance] = await store.balances("test", "inv")
    assert balance.overdraft_limit == 10_000_000 and balance.available < 10_000_000


async def test_credits_and_spend_caps_work_over_the_real_time_wallet(
        redis_billgate: tuple[BillGate, FakeStripe]) -> None:
    bg, _ = redis_billgate
    store = bg.gw.store
    assert isinstance(store, RedisWalletStore)
    await bg.gw.customer("capped", funds=5_000_000)  # credited through the Redis store: spendable at once
    await ask(bg, "capped")
    await drained(store)  # spend caps count what the ledger has recorded
    r = await bg.gw.admin.put("/customers/capped/spend-caps", json={"asset": "USD", "daily": 1, "monthly": None})
    assert r.status_code == 200, r.text
    guard = bg.gw.app[PIPELINE].spend_caps
    assert guard is not None
    guard._cache.clear()  # caps are cached for key_cache_ttl_s; skip that bound rather than sleep
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(bg, "capped")
    assert refused.value.status_code == 402
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "spend_cap_reached"
    await drained(store)
    assert await bg.audits() == []
