"""Failure policy when Redis is unreachable: fail closed by default (503 ``wallet_unavailable``, nothing
charged); with ``fail_open_requests`` a bounded number of holds per customer is admitted by the SQL ledger
instead, settled there or (once Redis is back) adopted by the projection, reconciled, and reported.

Method: a throwaway ``redis-server`` killed and restarted (empty) around the calls; checks through the
store's public methods, the ledger's ``audit()`` and the reconciliation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metergate.wallet.redis.reconcile import reconcile
from metergate.wallet.redis.store import RedisWalletStore, WalletUnavailable
from metergate.wallet.sql import SqlWalletStore
from tests.redis.conftest import RedisServer, drained

MODE, ASSET = "test", "USD"


async def open_store(server: RedisServer, tmp_path: Path, fail_open: int) -> RedisWalletStore:
    store = RedisWalletStore(SqlWalletStore(f"sqlite:///{tmp_path / 'ledger.db'}"), server.url, prefix="fp",
                             shards=2, fail_open_requests=fail_open, reconcile_interval_s=3600)
    await store.open()
    await store.create_customer(MODE, "acme", "Acme")
    await store.credit(MODE, "acme", ASSET, 1000, idempotency_key="seed")
    return store


async def test_fail_closed_by_default(redis_server: RedisServer, tmp_path: Path) -> None:
    store = await open_store(redis_server, tmp_path, 0)
    try:
        redis_server.kill()
        with pytest.raises(WalletUnavailable) as down:
            await store.reserve(MODE, "acme", ASSET, 100, hold_id="h1", ttl_ms=60_000)
        assert (down.value.status, down.value.code) == (503, "wallet_unavailable")
        with pytest.raises(WalletUnavailable):
            await store.ping()
        assert (await store.sql.balance(MODE, "acme", ASSET)).debits_pending == 0  # nothing changed
        assert await store.sql.get_hold("h1") is None
    finally:
        await store.close()


async def test_bounded_fail_open_is_reconciled_and_reported(redis_server: RedisServer, tmp_path: Path) -> None:
    store = await open_store(redis_server, tmp_path, 2)
    try:
        redis_server.kill()
        await store.reserve(MODE, "acme", ASSET, 300, hold_id="h1", ttl_ms=60_000)
        await store.reserve(MODE, "acme", ASSET, 300, hold_id="h2", ttl_ms=60_000)
        with pytest.raises(WalletUnavailable):  # the allowance is spent
            await store.reserve(MODE, "acme", ASSET, 10, hold_id="h3", ttl_ms=60_000)
        s1 = await store.settle("h1", 120)  # still down: the ledger settles it
        assert s1.charged == 120
        redis_server.start()  # back, empty
        s2 = await store.settle("h2", 80)  # adopted from the ledger, settled in Redis
        assert s2.charged == 80
        await drained(store)
        await reconcile(store, repair=True)
        assert [r.status for r in await reconcile(store)] == ["ok"]
        ledger = await store.sql.balance(MODE, "acme", ASSET)
        assert (ledger.credits_posted, ledger.debits_posted, ledger.debits_pending) == (1000, 200, 0)
        assert await store.balance(MODE, "acme", ASSET) == ledger
        assert await store.audit() == []
        assert store.fail_open == {(MODE, "acme"): 2}
    finally:
        await store.close()
