"""Realtime sessions on the Redis real-time wallet: the per-response holds and settlements are the Redis
store's own operations (no partial captures), so a session is billed there exactly as on SQL.

Method: the gateway in front of the mock Realtime upstream with ``redis_url`` set (a key prefix of this test's
own on the shared Redis), the official SDK's realtime client, and the ledger read back through the admin API
once the Redis events have drained into SQL.
"""

from __future__ import annotations

from pathlib import Path

from metergate.demo.mock_realtime import SENT_USAGE
from tests.conftest import PROVIDER_KEY, Upstream, start_gateway
from tests.proxy.test_realtime import MODEL, PRICING, SMALL_HOLDS, mock, price_of, settled, until_done

__all__ = ["mock"]  # the mock Realtime upstream fixture


async def test_session_on_the_redis_wallet_is_billed_exactly_and_cut_off(mock: Upstream, tmp_path: Path,
                                                                         redis_url: str, prefix: str) -> None:
    gw, runner = await start_gateway(
        mock, f"sqlite:///{tmp_path / 'redis-realtime.db'}", pricing=PRICING, redis_url=redis_url,
        redis_wallet=True, redis_key_prefix=prefix, realtime=SMALL_HOLDS,
        routes=[{"prefix": "/openai", "upstream": mock.url, "api_key": PROVIDER_KEY, "realtime": True}])
    try:
        await gw.customer("acme", funds=25_000)
        events = []
        async with gw.openai().realtime.connect(model=MODEL) as connection:
            await connection.recv()
            for _ in range(10):
                await connection.response.create(response={"metadata": {"mock_deltas": "30"}})
                event = await until_done(connection)
                events.append(event.type)
                if event.type == "error":
                    assert event.error.code == "insufficient_funds"
                    break
        assert events[-1] == "error" and events.count("response.done") == len(mock.app[SENT_USAGE]) >= 1
        usage = await settled(gw, events.count("response.done"))
        expected = sum(price_of(s["usage"]) for s in mock.app[SENT_USAGE])
        assert sum(r["charged_amount"] for r in usage) == expected
        assert (await gw.balance())["available"] == 25_000 - expected
    finally:
        await gw.close()
        await runner.cleanup()
