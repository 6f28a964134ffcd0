"""Rate limits refuse what exceeds a customer's or a key's requests or tokens per minute — before any hold,
so a refused request costs nothing and never reaches the upstream — and replicas on one database share them.

Method: the official ``openai`` SDK through real gateways in front of the mock upstream. The limiter's
clock is its injected ``clock`` seam, pinned to a chosen instant so that windows roll over without
sleeping; two gateway apps on one SQLite file, and on one PostgreSQL database, take turns and race, and
three hammer one limit (each process leases quota in chunks: see metergate/proxy/leases.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from metergate.proxy.app import PIPELINE, build_app
from metergate.proxy.ratelimit import WINDOW_MS
from metergate.wallet.models import Mode, RateLimitDenial
from metergate.wallet.quota import QuotaClaim, QuotaGrant
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import Gateway, Upstream, _reset_pg, serve, start_gateway
from tests.topologies import database_url, redis_for

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
T0 = 1_800_000_000_000 - 1_800_000_000_000 % WINDOW_MS + 15_000  # 15 s into a window


def pin(gw: Gateway, at_ms: int) -> None:
    gw.app[PIPELINE].ratelimiter.clock = lambda: at_ms


Opener = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def open_gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Opener]:
    """Start gateways (on one SQLite file unless ``database_url`` is given); stop them all afterwards."""
    running: list[tuple[Gateway, web.AppRunner]] = []

    async def open_(database_url: str = f"sqlite:///{tmp_path / 'limits.db'}", **overrides: Any) -> Gateway:
        gw, runner = await start_gateway(upstream, database_url, **overrides)
        running.append((gw, runner))
        pin(gw, T0)
        return gw

    yield open_
    for gw, runner in running:
        await gw.close()
        await runner.cleanup()


def limits(customer: dict[str, int | None] | None = None,
           api_key: dict[str, int | None] | None = None) -> dict[str, Any]:
    return {"rate_limits": {"customer": customer or {}, "api_key": api_key or {}}}


async def ask(client: openai.AsyncOpenAI, max_tokens: int = 10) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=max_tokens)


async def refused(client: openai.AsyncOpenAI, max_tokens: int = 10) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(client, max_tokens)
    assert caught.value.code == "rate_limited"
    return caught.value


async def ledger(gw: Gateway, customer: str = "acme") -> list[dict[str, Any]]:
    r = await gw.admin.get(f"/customers/{customer}/ledger", params={"limit": 200})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


# ---------------------------------------------------------------------------------------------- enforcement


async def test_requests_over_the_limit_get_429_rate_limited_with_retry_after(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits({"requests_per_minute": 2}))
    await gw.customer("acme")
    client = gw.openai("acme")
    await ask(client)
    await ask(client)
    before = (await gw.balance(), len(await ledger(gw)), len(gw.upstream.requests), len(await gw.usage()))
    error = await refused(client)
    assert error.status_code == 429
    assert error.response.headers["Retry-After"] == "45"  # the window ends 45 s after T0
    body = error.body
    assert isinstance(body, dict)
    assert (body["type"], body["dimension"], body["limit"], body["retry_after_s"]) == (
        "rate_limit_error", "requests", 2, 45)
    after = (await gw.balance(), len(await ledger(gw)), len(gw.upstream.requests), len(await gw.usage()))
    assert after == before  # no hold, no charge, no ledger entry, nothing forwarded, no usage record
    assert after[0]["pending"] == 0
    assert await gw.store.audit() == []


async def test_tokens_per_minute_count_the_prompt_estimate_plus_max_output(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits({"tokens_per_minute": 1100}))
    await gw.customer("acme")
    client = gw.openai("acme")
    alone = await refused(client, max_tokens=1100)  # the prompt estimate on top of 1100 can never fit
    assert "alone" in alone.message and isinstance(alone.body, dict) and alone.body["dimension"] == "tokens"
    await ask(client, max_tokens=500)
    await ask(client, max_tokens=500)  # 2 × (500 + a short prompt) fits in 1100
    error = await refused(client, max_tokens=500)
    assert isinstance(error.body, dict) and error.body["dimension"] == "tokens"
    await ask(client, max_tokens=20)  # a smaller request still fits in what is left
    assert len(await gw.usage()) == 3


async def test_the_window_rolls_over_at_the_minute(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits({"requests_per_minute": 1}))
    await gw.customer("acme")
    client = gw.openai("acme")
    window_end = T0 - T0 % WINDOW_MS + WINDOW_MS
    await ask(client)
    pin(gw, window_end - 400)
    assert (await refused(client)).response.headers["Retry-After"] == "1"  # 0.4 s rounds up to 1 s
    pin(gw, window_end)
    await ask(client)  # a new window
    await refused(client)
    assert len(await gw.usage()) == 2


async def test_a_refresh_prunes_the_windows_that_can_no_longer_refuse_anything(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits({"requests_per_minute": 5}))
    await gw.customer("acme")
    client = gw.openai("acme")
    await ask(client)  # a window row for T0's minute
    pin(gw, T0 + WINDOW_MS)
    await ask(client)  # and one for the next minute
    pin(gw, T0 + 3 * WINDOW_MS)
    await gw.app[PIPELINE].ratelimiter.refresh()  # keeps the last two minutes' windows only
    assert await gw.store.prune_rate_limit_windows(before_ms=T0 + 10 * WINDOW_MS) == 1  # the newer one was left


async def test_each_api_key_has_its_own_limit_and_the_header_path_has_none(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits(api_key={"requests_per_minute": 1}))
    await gw.customer("acme")
    keys = []
    for _ in range(2):
        r = await gw.admin.post("/customers/acme/api-keys")
        assert r.status_code == 201, r.text
        keys.append(r.json()["key"])
    first, second = (openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key=k, max_retries=0) for k in keys)
    gw.clients.extend([first, second])
    await ask(first)
    error = await refused(first)
    assert "API key" in error.message
    await ask(second)
    for _ in range(3):
        await ask(gw.openai("acme"))  # identified by the trusted header: no key, no key limit


class CountingStore(SqlWalletStore):
    """The real store, counting the quota claims it is asked for (build_app takes a store: a seam)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.claims = 0

    async def claim_rate_quota(self, mode: Mode, customer_id: str, claims: list[QuotaClaim], *,
                               window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
        self.claims += 1
        return await super().claim_rate_quota(mode, customer_id, claims, window_start_ms=window_start_ms)


# 20 requests at one instant: each claim doubles the chunk (1, 2, 4, 8, 16 requests: 31 leased in 5 claims).
@pytest.mark.parametrize(("requests_per_minute", "claims"), [(None, 0), (10**6, 5)])
async def test_a_well_funded_hot_customer_costs_a_store_call_per_chunk_not_per_request(
        upstream: Upstream, tmp_path: Path, requests_per_minute: int | None, claims: int) -> None:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'limits.db'}",
                                     **limits({"requests_per_minute": requests_per_minute}))
    await runner.cleanup()  # keep its settings and admin client; serve the same app over a counting store
    store = CountingStore(gw.settings.database_url)
    app = build_app(gw.settings, store, public_url=gw.url)
    app[PIPELINE].ratelimiter.clock = lambda: T0
    runner, _ = await serve(app, gw.settings.port)
    try:
        await gw.customer("acme")
        for _ in range(20):
            await ask(gw.openai("acme"))
        assert store.claims == claims
        assert len(await gw.usage()) == 20
    finally:
        await gw.close()
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------- overrides


async def test_a_customer_override_from_the_admin_api_replaces_the_defaults(open_gateway: Opener) -> None:
    gw = await open_gateway(**limits({"requests_per_minute": 1}))
    await gw.customer("acme")
    client = gw.openai("acme")
    r = await gw.admin.put("/customers/acme/rate-limits", json={"requests_per_minute": 3, "tokens_per_minute": None})
    assert r.status_code == 200, r.text
    assert r.json()["effective"] == {"requests_per_minute": 3, "tokens_per_minute": None}
    assert r.json()["defaults"] == {"requests_per_minute": 1, "tokens_per_minute": None}
    for _ in range(3):
        await ask(client)
    await refused(client)
    r = await gw.admin.get("/customers/acme/rate-limits")
    assert r.status_code == 200 and r.json()["override"]["requests_per_minute"] == 3
    r = await gw.admin.delete("/customers/acme/rate-limits")
    assert r.status_code == 200 and r.json()["override"] is None
    pin(gw, T0 + WINDOW_MS)
    await ask(client)
    await refused(client)  # back to the default of one a minute
    r = await gw.admin.put("/customers/acme/rate-limits",
                           json={"requests_per_minute": None, "tokens_per_minute": None})
    assert r.status_code == 200, r.text
    for _ in range(3):
        await ask(client)  # null lifts the limit for this customer


async def test_an_override_reaches_another_replica_at_its_next_refresh(open_gateway: Opener) -> None:
    control = await open_gateway(**limits({"requests_per_minute": 1}))
    proxy = await open_gateway(**limits({"requests_per_minute": 1}))
    await control.customer("acme")
    r = await control.admin.put("/customers/acme/rate-limits",
                                json={"requests_per_minute": 2, "tokens_per_minute": None})
    assert r.status_code == 200, r.text
    await proxy.app[PIPELINE].ratelimiter.refresh()  # what its refresh loop does every refresh_interval_s
    client = proxy.openai("acme")
    await ask(client)
    await ask(client)
    await refused(client)


@pytest.mark.parametrize("body", [
    {"requests_per_minute": 5},  # both keys are required
    {"requests_per_minute": 0, "tokens_per_minute": None},
    {"requests_per_minute": True, "tokens_per_minute": None},
    {"requests_per_minute": None, "tokens_per_minute": "lots"},
    {"requests_per_minute": None, "tokens_per_minute": 10**14},
])
async def test_bad_overrides_are_refused(gateway: Gateway, body: dict[str, Any]) -> None:
    await gateway.customer("acme")
    r = await gateway.admin.put("/customers/acme/rate-limits", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    r = await gateway.admin.get("/customers/acme/rate-limits")
    assert r.json()["override"] is None


async def test_overrides_need_a_known_customer_in_the_keys_mode(gateway: Gateway) -> None:
    await gateway.customer("acme", mode="live")
    r = await gateway.admin.put("/customers/acme/rate-limits",
                                json={"requests_per_minute": 1, "tokens_per_minute": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "customer_not_found"


# ---------------------------------------------------------------------------------------------- replicas


@pytest.fixture
async def shared(request: pytest.FixtureRequest, topology: str, tmp_path: Path) -> dict[str, Any]:
    """The settings every replica of a test shares, in each topology (tests/topologies.py): one SQLite file,
    one PostgreSQL database, or one PostgreSQL database and one Redis prefix for the windows."""
    url = database_url(request, topology, tmp_path)
    if url.startswith("postgresql"):
        await _reset_pg(url)
    redis = redis_for(request, topology)
    return {"database_url": url,
            **({"redis_url": redis[0], "redis_key_prefix": redis[1], "redis_shards": 4} if redis else {})}


async def test_two_replicas_share_one_limit(open_gateway: Opener, shared: dict[str, Any]) -> None:
    one = await open_gateway(**shared, **limits({"requests_per_minute": 3}))
    two = await open_gateway(**shared, **limits({"requests_per_minute": 3}))
    await one.customer("acme")
    a, b = one.openai("acme"), two.openai("acme")
    await ask(a)
    await ask(b)
    await ask(a)
    await refused(b)
    await refused(a)


async def test_racing_replicas_never_admit_more_than_the_limit(open_gateway: Opener, shared: dict[str, Any]) -> None:
    one = await open_gateway(**shared, **limits({"requests_per_minute": 4}))
    two = await open_gateway(**shared, **limits({"requests_per_minute": 4}))
    await one.customer("acme")
    clients = [one.openai("acme"), two.openai("acme")]
    outcomes = await asyncio.gather(*(ask(clients[i % 2]) for i in range(12)), return_exceptions=True)
    assert sum(o is None for o in outcomes) == 4
    assert all(o is None or (isinstance(o, openai.RateLimitError) and o.code == "rate_limited") for o in outcomes)
    assert len(await one.usage()) == 4
    assert await one.store.audit() == []


async def admission_estimate(gw: Gateway, max_tokens: int) -> int:
    """The tokens a request of ``ask`` is counted for (prompt estimate + ``max_tokens``), read from the answer
    that refuses it for a customer allowed one token a minute."""
    await gw.customer("probe")
    r = await gw.admin.put("/customers/probe/rate-limits", json={"requests_per_minute": None,
                                                                 "tokens_per_minute": 1})
    assert r.status_code == 200, r.text
    found = re.search(r"alone needs (\d+) tokens", (await refused(gw.openai("probe"), max_tokens)).message)
    assert found is not None
    return int(found.group(1))


async def storm(gateways: list[Gateway], per_gateway: int, max_tokens: int) -> int:
    """Every gateway sends ``per_gateway`` requests for acme at once; the number admitted (all others must
    be refused as rate limited)."""
    clients = [gw.openai("acme") for gw in gateways]
    outcomes = await asyncio.gather(*(ask(c, max_tokens) for c in clients for _ in range(per_gateway)),
                                    return_exceptions=True)
    assert all(o is None or (isinstance(o, openai.RateLimitError) and o.code == "rate_limited")
               for o in outcomes), [o for o in outcomes if o is not None][:3]
    return sum(o is None for o in outcomes)


async def test_three_replicas_hammering_one_limit_admit_exactly_the_limit(open_gateway: Opener,
                                                                          shared: dict[str, Any]) -> None:
    """Each replica alone sends more than the limit, so every replica ends with its lease spent or has
    admitted the whole limit itself: the total is the limit exactly. Chunks are leased (a cap of 5)."""
    gateways = [await open_gateway(**shared, **limits({"requests_per_minute": 90, "tokens_per_minute": 10**9}))
                for _ in range(3)]
    await gateways[0].customer("acme")
    assert await storm(gateways, 100, max_tokens=10) == 90
    assert len(await gateways[1].usage()) == 90
    assert await gateways[2].store.audit() == []


async def test_three_replicas_hold_the_token_limit_when_it_binds_first(open_gateway: Opener,
                                                                       shared: dict[str, Any]) -> None:
    """Tokens per minute for 25.5 requests. The total admitted never passes it; it may fall short of the
    25 an exact counter admits by the partial leases the replicas are left holding (each under one request,
    and what is left unclaimed with them under one request too: at least 23)."""
    probe = await open_gateway(**shared)
    estimate = await admission_estimate(probe, 100)
    tpm = 25 * estimate + estimate // 2
    gateways = [await open_gateway(**shared, **limits({"requests_per_minute": 10**6, "tokens_per_minute": tpm}))
                for _ in range(3)]
    await gateways[0].customer("acme")
    admitted = await storm(gateways, 40, max_tokens=100)
    assert 23 <= admitted <= 25
    assert len(await gateways[1].usage()) == admitted


async def test_a_stopping_replica_gives_its_unused_lease_back(upstream: Upstream, open_gateway: Opener,
                                                              shared: dict[str, Any]) -> None:
    """64 a minute: a cap of 4 per lease. Two requests at one instant lease 1, then 2: one left unused,
    which the first replica returns as it stops, so the second admits all of the other 62."""
    gw, runner = await start_gateway(upstream, **shared, **limits({"requests_per_minute": 64}))
    pin(gw, T0)
    await gw.customer("acme")
    await ask(gw.openai("acme"))
    await ask(gw.openai("acme"))
    await gw.close()
    await runner.cleanup()  # stops the limiter, which gives back the unused request
    other = await open_gateway(**shared, **limits({"requests_per_minute": 64}))
    assert await storm([other], 70, max_tokens=10) == 62
