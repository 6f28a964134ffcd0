"""Customer-set spend caps are enforced by the proxy: a request whose hold would pass the daily or monthly
cap is refused with 402 ``spend_cap_reached`` before anything is held or forwarded.

Method: the operator sets caps through the admin API; requests go through the gateway with the official
``openai`` SDK; the ledger and the mock upstream's request log show what was charged and forwarded.
"""

from __future__ import annotations

import datetime as dt

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metergate.errors import PaymentRequired
from metergate.payments.spendcaps import SpendCapGuard, period_starts
from metergate.payments.store import PaymentsStore, SpendCaps
from metergate.proxy.app import PIPELINE
from metergate.wallet.models import Mode
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Gateway


async def test_daily_cap_refuses_the_request_that_would_pass_it(topology_gateway: Gateway) -> None:
    """In each topology; with two replicas, requests alternate between them and each guards on its own."""
    gateway = topology_gateway

    def forget_caps() -> None:  # caps are cached for key_cache_ttl_s (2 s); skip that bound rather than sleep
        for app in gateway.apps:
            guard = app[PIPELINE].spend_caps
            assert guard is not None
            guard._cache.clear()

    await gateway.customer("acme", funds=10_000_000)
    client = gateway.openai("acme")
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=50)
    [first] = await gateway.usage()
    # A cap just above what was spent: the next request's hold (~the same estimate) would pass it.
    r = await gateway.admin.put("/customers/acme/spend-caps",
                                json={"asset": "USD", "daily": first["charged_amount"] + 10, "monthly": None})
    assert r.status_code == 200, r.text
    forget_caps()
    forwarded = len(gateway.upstream.requests)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=50)
    assert refused.value.status_code == 402
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "spend_cap_reached" and body["period"] == "daily"
    assert len(gateway.upstream.requests) == forwarded  # nothing forwarded
    assert len(await gateway.usage()) == 1 and (await gateway.balance())["pending"] == 0
    # Lifting the cap lets requests through again (within the cap cache's bound).
    r = await gateway.admin.put("/customers/acme/spend-caps", json={"asset": "USD", "daily": None, "monthly": None})
    assert r.status_code == 200, r.text
    forget_caps()
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=50)
    assert len(await gateway.usage()) == 2
    assert await gateway.store.audit() == []


class CountingPaymentsStore(PaymentsStore):
    """The real payments store, counting the ledger reads the guard makes (the pipeline's guard is a seam)."""

    def __init__(self, wallet: SqlWalletStore) -> None:
        super().__init__(wallet)
        self.spend_reads = 0

    async def spent_since(self, mode: Mode, customer_id: str, asset: str, since_ms: int) -> int:
        self.spend_reads += 1
        return await super().spent_since(mode, customer_id, asset, since_ms)


async def test_a_hot_wallet_far_below_its_cap_reads_the_ledger_once_per_cache_period(gateway: Gateway) -> None:
    """Far below the cap, requests are admitted on the spend read with the caps (the cache period is an hour
    here, so no cached value expires during the test)."""
    await gateway.customer("acme", funds=10_000_000)
    store = gateway.store
    assert isinstance(store, SqlWalletStore)
    counting = CountingPaymentsStore(store)
    gateway.app[PIPELINE].spend_caps = SpendCapGuard(counting, cache_ttl_s=3600)
    r = await gateway.admin.put("/customers/acme/spend-caps", json={"asset": "USD", "daily": 9_000_000,
                                                                    "monthly": None})
    assert r.status_code == 200, r.text
    client = gateway.openai("acme")
    for _ in range(10):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=50)
    assert counting.spend_reads == 1
    assert len(await gateway.usage()) == 10


async def test_two_replicas_guards_spend_up_to_the_cap_exactly_reading_less_often_far_from_it(
        gateway: Gateway) -> None:
    """Two guards (two replicas' worth) admit holds alternately until one refuses. Each admits at most 1/16
    of the headroom it read before reading again, so near the cap every admission reads the ledger and the
    holds end exactly at the cap; far from it they read less often than they admit."""
    await gateway.customer("acme", funds=10_000_000)
    store = gateway.store
    assert isinstance(store, SqlWalletStore)
    counting = CountingPaymentsStore(store)
    await counting.set_spend_caps(SpendCaps("test", "acme", "USD", daily=1_600_000, monthly=None))
    guards = [SpendCapGuard(counting, cache_ttl_s=3600) for _ in range(2)]
    held = 0
    for i in range(1000):
        try:
            await guards[i % 2].admit("test", "acme", "USD", 10_000)
        except PaymentRequired as exc:
            assert exc.code == "spend_cap_reached"
            break
        await store.reserve("test", "acme", "USD", 10_000, hold_id=f"h{i}", ttl_ms=60_000)  # as the pipeline does
        held += 10_000
    assert held == 1_600_000
    assert counting.spend_reads < 160, counting.spend_reads


@given(st.integers(min_value=0, max_value=4_102_444_800_000 - 1), st.integers(min_value=-3 * 86_400_000,
                                                                             max_value=3 * 86_400_000))
def test_period_starts_are_the_utc_day_and_month_in_exact_integers(at_ms: int, step_ms: int) -> None:
    """Against the calendar, for any instant until 2100, asked in any order (the last day's answer is kept)."""
    for ms in (at_ms, max(0, at_ms + step_ms), at_ms):
        day, month = period_starts(ms)
        when = dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
        assert dt.datetime.fromtimestamp(day // 1000, dt.UTC) == when.replace(hour=0, minute=0, second=0)
        assert dt.datetime.fromtimestamp(month // 1000, dt.UTC) == when.replace(day=1, hour=0, minute=0, second=0)
        assert day % 1000 == 0 and month % 1000 == 0 and month <= day <= ms
