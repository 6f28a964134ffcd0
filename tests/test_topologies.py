"""The contract tests' topologies really are what they say (tests/topologies.py): two stores that share one
database and nothing else, clients that reach both replicas in turn, and the Redis topology's windows in Redis.

Why: a contract test that claims "two replicas" while every call lands on one of them would pass for the wrong
reason; these checks are what makes the claim true.
"""

from __future__ import annotations

import httpx2 as httpx

from metergate.wallet.quota import QuotaClaim
from metergate.wallet.store import WalletStore
from tests.conftest import Gateway
from tests.topologies import Replicas


async def test_replicas_share_the_database_and_nothing_else(store: WalletStore, topology: str) -> None:
    await store.create_customer("test", "acme", "Acme")
    await store.credit("test", "acme", "USD", 1_000, idempotency_key="seed")
    if topology == "sqlite":
        assert not isinstance(store, Replicas)
        return
    assert isinstance(store, Replicas) and len(store.replicas) == 2
    one, two = store.replicas
    assert one is not two and one.system_of_record is not two.system_of_record
    for replica in (one, two):  # each reads what the other wrote, through its own pool
        assert (await replica.balance("test", "acme", "USD")).available == 1_000
    await one.reserve("test", "acme", "USD", 400, hold_id="h-1", ttl_ms=60_000)
    settled = await two.settle("h-1", 300)  # a hold placed by one replica is settled by the other
    assert settled.charged == 300 and settled.balance.available == 700
    assert (await one.balance("test", "acme", "USD")).available == 700
    grants = await one.claim_rate_quota("test", "acme", [QuotaClaim("customer:acme", 100, None, 1, 5, 0, 0)],
                                        window_start_ms=0)
    assert isinstance(grants, list)
    in_sql = await one.read(lambda conn: conn.exec_driver_sql("SELECT count(*) FROM rate_limit_windows").scalar())
    assert in_sql == (0 if topology == "redis-postgres-x2" else 1)  # Redis keeps the windows in its topology


async def test_the_clients_reach_every_replica_in_turn(topology_gateway: Gateway, topology: str) -> None:
    gw = topology_gateway
    await gw.customer("acme", 1_000)
    hosts = set()
    for _ in range(4):  # each replica signs portal links with its own address
        r = await gw.admin.post("/customers/acme/portal-link", json={})
        assert r.status_code == 200, r.text
        hosts.add(httpx.URL(r.json()["url"]).port)
    assert hosts == set(gw.ports or [httpx.URL(gw.url).port])
    assert len(hosts) == (1 if topology == "sqlite" else 2)
