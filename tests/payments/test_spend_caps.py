"""Customer-set spend caps are enforced by the proxy: a request whose hold would pass the daily or monthly
cap is refused with 402 ``spend_cap_reached`` before anything is held or forwarded.

Method: the operator sets caps through the admin API; requests go through the gateway with the official
``openai`` SDK; the ledger and the mock upstream's request log show what was charged and forwarded.
"""

from __future__ import annotations

import openai
import pytest

from metergate.proxy.app import PIPELINE
from tests.conftest import Gateway


async def test_daily_cap_refuses_the_request_that_would_pass_it(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=10_000_000)
    client = gateway.openai("acme")
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=50)
    [first] = await gateway.usage()
    # A cap just above what was spent: the next request's hold (~the same estimate) would pass it.
    r = await gateway.admin.put("/customers/acme/spend-caps",
                                json={"asset": "USD", "daily": first["charged_amount"] + 10, "monthly": None})
    assert r.status_code == 200, r.text
    guard = gateway.app[PIPELINE].spend_caps
    assert guard is not None
    guard._cache.clear()  # caps are cached for key_cache_ttl_s (2 s); skip that bound rather than sleep
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
    guard._cache.clear()
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=50)
    assert len(await gateway.usage()) == 2
    assert await gateway.store.audit() == []
