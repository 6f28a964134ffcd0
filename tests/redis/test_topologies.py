"""RedisWalletStore on Redis Cluster and Redis Sentinel, not only on one Redis.

Why: the store builds a cluster or sentinel client from ``redis+cluster://`` / ``redis+sentinel://`` URLs and
relies on every script's keys sharing one hash slot (the ``{shard}`` tag), on cluster-aware pipelines and on
streams + consumer groups per shard. None of that is exercised by a single server, so each test here starts
its own throwaway topology (never the shared Redis at 6379): a 3-master cluster, or a master watched by one
sentinel, both on free ports in a temp dir, killed and removed afterwards. The ledger is a SQLite file.

Method: the same public calls the proxy makes (customers, credits, reserve/extend/settle with usage records,
replays and conflicts, a concurrent storm on one wallet, expiry), then the ledger sink is drained and the SQL
ledger must be audit-clean and agree with the projection wallet by wallet (``reconcile``). On the cluster, the
wallets' keys must really be spread over several masters (else the slot discipline would be untested).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from metergate.wallet.errors import HoldNotFound, IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import Mode, UsageRecord, now_ms
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.reconcile import reconcile
from metergate.wallet.redis.store import RedisWalletStore, WalletRef, WalletUnavailable
from tests.conftest import IN_CI, free_port
from tests.redis.conftest import drained, racing_reserves

MODE: Mode = "test"
ASSET = "USD"
T = TypeVar("T")
SHARDS = 4


def _binaries(*names: str) -> list[str]:
    """The paths of the Redis binaries; skip (fail under CI) when one is missing."""
    paths = [shutil.which(n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if p is None]
    if missing:
        if IN_CI:
            pytest.fail(f"{', '.join(missing)} required in CI for the Redis Cluster/Sentinel tests")
        pytest.skip(f"{', '.join(missing)} not installed; Redis Cluster/Sentinel tests skipped")
    return [p for p in paths if p is not None]


def _wait(topo: Topology, check: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``check()`` until it is truthy (Redis errors count as "not yet"); the servers' logs on timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout_s} s (last error: {last!r})\n{_logs(topo)}")


def _logs(topo: Topology) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:]
                     for p in sorted(topo.workdir.glob("redis-*.log")))


@dataclass
class Topology:
    """Throwaway redis-server processes in a temp dir; ``stop`` kills them and removes the dir."""

    workdir: Path
    url: str = ""
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sentinel_port: int = 0

    def spawn(self, *args: str) -> None:
        log = (self.workdir / f"redis-{len(self.processes)}.log").open("wb")
        try:
            self.processes.append(subprocess.Popen(list(args), cwd=self.workdir, stdout=log,
                                                   stderr=subprocess.STDOUT))
        finally:
            log.close()

    def ask(self, port: int, *command: object) -> Any:
        """One command to one of the servers, on a connection of its own (closed after)."""
        with redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2, decode_responses=True) as r:
            return r.execute_command(*command)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too; both must stay below 65536."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 45_000)
        if port not in taken and port + 10_000 not in taken and _port_free(port) and _port_free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _server_args(binary: str, port: int, *extra: str) -> list[str]:
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--repl-diskless-sync-delay", "0", *extra]  # a replica syncs at once, not after 5 s


def _cluster_ok(topo: Topology, port: int) -> bool:
    info = topo.ask(port, "CLUSTER INFO")  # redis-py parses it into a dict
    return isinstance(info, dict) and info.get("cluster_state") == "ok"


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Topology]:
    """Three masters, no replicas, all 16384 slots covered."""
    server, cli = _binaries("redis-server", "redis-cli")
    topo = Topology(Path(tempfile.mkdtemp(prefix="mg-cluster-")))
    try:
        for _ in range(3):
            topo.ports.append(_cluster_port(topo.ports))
        for port in topo.ports:
            topo.spawn(*_server_args(server, port, "--cluster-enabled", "yes", "--cluster-config-file",
                                     str(topo.workdir / f"nodes-{port}.conf"), "--dir", str(topo.workdir)))
        for port in topo.ports:
            _wait(topo, partial(topo.ask, port, "PING"), f"redis-server on {port} did not start")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in topo.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        for port in topo.ports:
            _wait(topo, partial(_cluster_ok, topo, port),
                  f"cluster node {port} did not reach cluster_state:ok")
        topo.url = f"redis+cluster://127.0.0.1:{topo.ports[0]}"
        yield topo
    finally:
        topo.stop()


@contextmanager
def _sentinel_topology(replica: bool) -> Iterator[Topology]:
    """A master (plus, with ``replica``, one replica of it, in sync) and one sentinel monitoring the master as
    ``mymaster`` with quorum 1. The sentinel starts last, so that its first look at the master finds the
    replica (it would otherwise only see it at its next 10 s INFO poll)."""
    [server] = _binaries("redis-server")
    topo = Topology(Path(tempfile.mkdtemp(prefix="mg-sentinel-")))
    try:
        master, sentinel = free_port(), free_port()
        topo.ports, topo.sentinel_port = [master], sentinel
        topo.spawn(*_server_args(server, master, "--dir", str(topo.workdir)))
        _wait(topo, lambda: topo.ask(master, "PING"), "the sentinel's master did not start")
        if replica:
            port = free_port()
            topo.ports.append(port)
            topo.spawn(*_server_args(server, port, "--dir", str(topo.workdir), "--replicaof", "127.0.0.1",
                                     str(master)))
            _wait(topo, lambda: _info(topo, port, "replication").get("master_link_status") == "up",
                  "the replica did not sync")
        conf = topo.workdir / "sentinel.conf"
        conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {topo.workdir}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 5000\n")
        topo.spawn(server, str(conf), "--sentinel")
        _wait(topo, lambda: topo.ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
              == ["127.0.0.1", str(master)], "the sentinel did not report its master")
        if replica:
            _wait(topo, lambda: len(_sentinel_replicas(topo)) == 1, "the sentinel did not find the replica")
        topo.url = f"redis+sentinel://127.0.0.1:{sentinel}/mymaster"
        yield topo
    finally:
        topo.stop()


def _info(topo: Topology, port: int, section: str) -> dict[str, object]:
    info = topo.ask(port, "INFO", section)
    assert isinstance(info, dict)
    return info


def _sentinel_replicas(topo: Topology) -> list[object]:
    """The replicas the sentinel knows of ``mymaster`` and considers up."""
    replicas = topo.ask(topo.sentinel_port, "SENTINEL", "REPLICAS", "mymaster")
    assert isinstance(replicas, list)
    rows = [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2], strict=True)) for r in replicas]
    return [r for r in rows if not {"s_down", "o_down", "disconnected"} & set(str(r.get("flags", "")).split(","))]


@pytest.fixture(scope="module")
def redis_sentinel() -> Iterator[Topology]:
    with _sentinel_topology(replica=False) as topo:
        yield topo


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Topology:
    topo: Topology = request.getfixturevalue(f"redis_{request.param}")
    return topo


@pytest.fixture
async def tstore(topology: Topology, tmp_path: Path) -> AsyncIterator[RedisWalletStore]:
    """A store on the topology under a prefix of its own (the topology is shared by the module's tests)."""
    store = RedisWalletStore(BatchingSqlWalletStore(f"sqlite:///{tmp_path / 'ledger.db'}"), topology.url,
                             prefix=f"mgtopo-{uuid.uuid4().hex[:8]}", shards=SHARDS)
    await store.open()
    yield store
    await store.close()


def usage(rid: str, hold_id: str, price: int, customer: str) -> UsageRecord:
    return UsageRecord(id=rid, mode=MODE, customer_id=customer, hold_id=hold_id, route="/openai",
                       endpoint="chat", model="gpt-4o-mini", feature=None, stream=False, status_code=200,
                       usage_source="provider", tokens_input=10, tokens_cached_input=0, tokens_output=5,
                       tokens_reasoning=0, asset=ASSET, price_amount=price)


async def funded(store: RedisWalletStore, customer: str, amount: int) -> None:
    await store.create_customer(MODE, customer, customer.title())
    await store.credit(MODE, customer, ASSET, amount, idempotency_key=f"seed-{customer}")


async def ledger_agrees(store: RedisWalletStore, customers: int) -> None:
    """Drained, audit-clean, and every wallet's projection equal to its ledger."""
    await drained(store)
    assert await store.audit() == []
    rows = await reconcile(store)
    assert len(rows) == customers and all(r.status == "ok" for r in rows), rows


async def test_lifecycle_replays_and_conflicts(tstore: RedisWalletStore) -> None:
    await funded(tstore, "acme", 1000)
    hold, bal = await tstore.reserve(MODE, "acme", ASSET, 300, hold_id="h1", ttl_ms=60_000)
    assert (hold.amount, hold.state, bal.available, bal.debits_pending) == (300, "pending", 700, 300)
    again, bal = await tstore.reserve(MODE, "acme", ASSET, 300, hold_id="h1", ttl_ms=60_000)
    assert again == hold and bal.debits_pending == 300  # held once
    with pytest.raises(IdempotencyConflict):
        await tstore.reserve(MODE, "acme", ASSET, 301, hold_id="h1", ttl_ms=60_000)
    assert (await tstore.extend_hold("h1", 50, step=1, ttl_ms=60_000)).amount == 350
    assert (await tstore.extend_hold("h1", 50, step=1, ttl_ms=60_000)).amount == 350  # step applied once
    s = await tstore.settle("h1", 120, usage("req_1", "h1", 120, "acme"))
    assert (s.charged, s.written_off, s.balance.available, s.balance.debits_pending) == (120, 0, 880, 0)
    replay = await tstore.settle("h1", 120, usage("req_1", "h1", 120, "acme"))
    assert (replay.charged, replay.replayed) == (120, True)
    with pytest.raises(IdempotencyConflict):
        await tstore.settle("h1", 121)
    with pytest.raises(HoldNotFound):
        await tstore.settle("nope", 1)
    entry = await tstore.credit(MODE, "acme", ASSET, 500, idempotency_key="top-1")
    assert (await tstore.credit(MODE, "acme", ASSET, 500, idempotency_key="top-1")).seq == entry.seq
    with pytest.raises(InsufficientFunds):
        await tstore.reserve(MODE, "acme", ASSET, 1381, hold_id="big", ttl_ms=60_000)
    await tstore.reserve(MODE, "acme", ASSET, 200, hold_id="h-exp", ttl_ms=1)
    await asyncio.sleep(0.01)
    assert await tstore.expire_holds(now_ms=now_ms()) == 1
    live = await tstore.balance(MODE, "acme", ASSET)
    assert (live.credits_posted, live.debits_posted, live.debits_pending) == (1500, 120, 0)

    await ledger_agrees(tstore, 1)
    assert await tstore.sql.balance(MODE, "acme", ASSET) == live
    h1 = await tstore.sql.get_hold("h1")
    assert h1 is not None and (h1.state, h1.captured_amount) == ("captured", 120)
    expired = await tstore.sql.get_hold("h-exp")
    assert expired is not None and expired.state == "expired"
    [(_, record)] = await tstore.usage(MODE, "acme", limit=5)
    assert (record.id, record.charged_amount, record.written_off_amount) == ("req_1", 120, 0)


async def test_concurrent_reserves_never_overspend(tstore: RedisWalletStore) -> None:
    k, n, amount = 23, 200, 25
    await funded(tstore, "acme", k * amount)
    outcomes = await racing_reserves(tstore, n, amount)
    assert outcomes.count(True) == k
    bal = await tstore.balance(MODE, "acme", ASSET)
    assert (bal.available, bal.debits_pending) == (0, k * amount)
    await asyncio.gather(*(tstore.settle(f"c{i}", 10, usage(f"r{i}", f"c{i}", 10, "acme"))
                           for i in range(n) if outcomes[i]))
    await ledger_agrees(tstore, 1)
    sql = await tstore.sql.balance(MODE, "acme", ASSET)
    assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (k * amount, k * 10, 0)


def _node_of_slot(topology: Topology) -> dict[int, int]:
    """slot -> the port of the master serving it."""
    out: dict[int, int] = {}
    for start, end, master, *_ in topology.ask(topology.ports[0], "CLUSTER SLOTS"):
        for slot in range(int(start), int(end) + 1):
            out[slot] = int(master[1])
    return out


async def test_customers_on_every_shard(tstore: RedisWalletStore, topology: Topology) -> None:
    """Wallets on all shards (so, on the cluster, on several masters) are admitted, settled and drained."""
    customers = [f"cust-{i}" for i in range(12)]
    shards = {tstore.keys.shard(MODE, c) for c in customers}
    assert shards == set(range(SHARDS))
    for c in customers:
        await funded(tstore, c, 100)
    results = await asyncio.gather(*(tstore.reserve(MODE, c, ASSET, 40, hold_id=f"h-{c}", ttl_ms=60_000)
                                     for c in customers))
    assert all(b.available == 60 for _, b in results)
    await asyncio.gather(*(tstore.settle(f"h-{c}", 30, usage(f"r-{c}", f"h-{c}", 30, c)) for c in customers))

    if topology.url.startswith("redis+cluster://"):
        # Every key of a shard shares one slot; the shards' slots live on different masters.
        node = _node_of_slot(topology)
        slot_of_shard = {}
        for c in customers:
            w = WalletRef(MODE, c, ASSET)
            shard = tstore.keys.shard(MODE, c)
            keys = (*tstore.keys.wallet(w), tstore.keys.hold(w, f"h-{c}"), tstore.keys.stream(shard),
                    tstore.keys.expiry(shard), tstore.keys.lease(shard))
            slots = {await tstore.redis.cluster_keyslot(k) for k in keys}
            assert len(slots) == 1, (c, slots)
            slot_of_shard[shard] = slots.pop()
        masters = {node[s] for s in slot_of_shard.values()}
        assert len(masters) >= 2, (slot_of_shard, masters)
        for shard, slot in slot_of_shard.items():  # the keys really are on that master
            assert topology.ask(node[slot], "CLUSTER COUNTKEYSINSLOT", slot) > 0, shard

    await ledger_agrees(tstore, len(customers))
    for c in customers:
        sql = await tstore.sql.balance(MODE, c, ASSET)
        assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (100, 30, 0)


def _count_master_lookups(store: RedisWalletStore) -> list[tuple[str, int]]:
    """Record every master address the store's sentinel pool asks the sentinel for (observes, changes nothing):
    redis-py asks on each new connection, so a reconnect shows as a fresh lookup."""
    pool = store.redis.connection_pool
    asked: list[tuple[str, int]] = []
    original = pool.get_master_address

    async def spy() -> tuple[str, int]:
        address: tuple[str, int] = await original()
        asked.append(address)
        return address

    pool.get_master_address = spy
    return asked


async def test_sentinel_store_reconnects_through_the_sentinel(redis_sentinel: Topology, tmp_path: Path) -> None:
    """Every connection to the master is killed under a working store: its next calls reconnect, asking the
    sentinel for the master again, and the wallet carries on with nothing lost or doubled (no failover)."""
    topo = redis_sentinel
    store = RedisWalletStore(BatchingSqlWalletStore(f"sqlite:///{tmp_path / 'ledger.db'}"), topo.url,
                             prefix=f"mgtopo-{uuid.uuid4().hex[:8]}", shards=SHARDS)
    await store.open()
    try:
        await funded(store, "acme", 1000)
        await store.reserve(MODE, "acme", ASSET, 100, hold_id="before", ttl_ms=60_000)
        lookups = _count_master_lookups(store)
        killed = topo.ask(topo.ports[0], "CLIENT", "KILL", "TYPE", "normal")
        assert isinstance(killed, int) and killed > 0
        for attempt in range(20):  # a call in flight on a killed connection may fail once: the caller retries
            try:
                await store.ping()
                break
            except Exception:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.05)
        await store.reserve(MODE, "acme", ASSET, 200, hold_id="after", ttl_ms=60_000)
        await store.settle("before", 60, usage("r-before", "before", 60, "acme"))
        s = await store.settle("after", 70, usage("r-after", "after", 70, "acme"))
        assert (s.balance.debits_posted, s.balance.debits_pending, s.balance.available) == (130, 0, 870)
        assert lookups and set(lookups) == {("127.0.0.1", topo.ports[0])}  # reconnected through the sentinel
        await ledger_agrees(store, 1)
        sql = await store.sql.balance(MODE, "acme", ASSET)
        assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (1000, 130, 0)
    finally:
        await store.close()


@pytest.fixture
def sentinel_with_replica() -> Iterator[Topology]:
    with _sentinel_topology(replica=True) as topo:
        yield topo


async def _retrying(call: Callable[[], Awaitable[T]], what: str, timeout_s: float = 15.0) -> T:
    """What a client does with a 503 ``wallet_unavailable`` while the master changes: retry shortly."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except WalletUnavailable:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still unavailable after {timeout_s} s") from None
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("how", ["planned", "crash"])
async def test_sentinel_failover_keeps_the_wallet(sentinel_with_replica: Topology, tmp_path: Path, how: str) -> None:
    """A real failover under an open store, planned (``SENTINEL FAILOVER``, the old master demoted) or after
    the master is killed: the store follows the sentinel to the promoted replica (503s meanwhile, retried as
    a client would), holds placed before are settled after, and the ledger ends audit-clean and equal to the
    projection."""
    topo = sentinel_with_replica
    old_master, replica = topo.ports
    store = RedisWalletStore(BatchingSqlWalletStore(f"sqlite:///{tmp_path / 'ledger.db'}"), topo.url,
                             prefix=f"mgtopo-{uuid.uuid4().hex[:8]}", shards=SHARDS)
    await store.open()
    try:
        await funded(store, "acme", 1000)
        await store.reserve(MODE, "acme", ASSET, 300, hold_id="before", ttl_ms=60_000)
        lookups = _count_master_lookups(store)
        # Replication is asynchronous: make sure the replica has every write so far (a failover may lose the
        # last writes otherwise, which is the settlement watch's business, not this test's).
        assert topo.ask(old_master, "WAIT", 1, 5000) == 1
        if how == "crash":
            topo.processes[0].kill()  # the sentinel sees it down after 1 s and promotes the replica
        else:
            assert topo.ask(topo.sentinel_port, "SENTINEL", "FAILOVER", "mymaster") in (True, "OK")
        _wait(topo, lambda: topo.ask(topo.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
              == ["127.0.0.1", str(replica)], "the sentinel did not promote the replica")
        _wait(topo, lambda: _info(topo, replica, "replication").get("role") == "master",
              "the replica did not become master")
        if how == "planned":
            # The old master accepts writes on the store's open connections until it is demoted (Sentinel has
            # no fencing; redis-py asks the sentinel again for new connections or after a READONLY reply). The
            # sentinel demotes it at its next 10 s poll; do what it will do now, to keep the test short.
            topo.ask(old_master, "REPLICAOF", "127.0.0.1", replica)
            _wait(topo, lambda: _info(topo, old_master, "replication").get("master_link_status") == "up",
                  "the old master did not sync from the new one")

        hold, bal = await _retrying(lambda: store.reserve(MODE, "acme", ASSET, 200, hold_id="after", ttl_ms=60_000),
                                    "reserve after the failover")
        assert (hold.amount, bal.debits_pending, bal.available) == (200, 500, 500)  # "before" survived
        await _retrying(lambda: store.settle("before", 120, usage("r-before", "before", 120, "acme")), "settle")
        s = await _retrying(lambda: store.settle("after", 80, usage("r-after", "after", 80, "acme")), "settle")
        assert (s.balance.debits_posted, s.balance.debits_pending, s.balance.available) == (200, 0, 800)
        assert ("127.0.0.1", replica) in lookups  # reconnected to the new master through the sentinel
        assert await store.redis.hget(store.keys.wallet(WalletRef(MODE, "acme", ASSET))[0], "p") == "200"
        await ledger_agrees(store, 1)
        sql = await store.sql.balance(MODE, "acme", ASSET)
        assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (1000, 200, 0)
    finally:
        await store.close()


@asynccontextmanager
async def _after_split_brain(topo: Topology, tmp_path: Path) -> AsyncIterator[RedisWalletStore]:
    """A store that wrote to the old master between the promotion and the old master's demotion (through its
    open connections), writes the demotion then discarded, as a flush would: hold ``before`` placed before the
    failover and settled (120) in the window, hold ``window`` placed in the window and settled (50) after,
    hold ``after`` placed and settled (80) after. Yields once the ledger and the projection agree."""
    old_master, replica = topo.ports
    store = RedisWalletStore(BatchingSqlWalletStore(f"sqlite:///{tmp_path / 'ledger.db'}"), topo.url,
                             prefix=f"mgtopo-{uuid.uuid4().hex[:8]}", shards=SHARDS, reconcile_interval_s=0.3)
    await store.open()
    try:
        await funded(store, "acme", 1000)
        await store.reserve(MODE, "acme", ASSET, 300, hold_id="before", ttl_ms=600_000)
        await drained(store)
        # Open a few pooled connections now, so that the window's calls reuse connections to the old master
        # (a new connection would ask the sentinel and go to the new master).
        await asyncio.gather(*(store.ping() for _ in range(8)))
        assert topo.ask(old_master, "WAIT", 1, 5000) == 1
        assert topo.ask(topo.sentinel_port, "SENTINEL", "FAILOVER", "mymaster") in (True, "OK")
        _wait(topo, lambda: _info(topo, replica, "replication").get("role") == "master",
              "the replica did not become master")
        await _retrying(lambda: store.reserve(MODE, "acme", ASSET, 100, hold_id="window", ttl_ms=600_000), "reserve")
        await _retrying(lambda: store.settle("before", 120, usage("r-before", "before", 120, "acme")), "settle")
        window_key = store.keys.index("window")
        assert (topo.ask(old_master, "EXISTS", window_key), topo.ask(replica, "EXISTS", window_key)) == (1, 0)
        topo.ask(old_master, "REPLICAOF", "127.0.0.1", replica)  # the demotion discards the window's writes
        _wait(topo, lambda: _info(topo, old_master, "replication").get("master_link_status") == "up",
              "the old master did not sync from the new one")

        await _retrying(lambda: store.settle("window", 50, usage("r-window", "window", 50, "acme")), "settle")
        await _retrying(lambda: store.reserve(MODE, "acme", ASSET, 200, hold_id="after", ttl_ms=600_000), "reserve")
        await _retrying(lambda: store.settle("after", 80, usage("r-after", "after", 80, "acme")), "settle")

        deadline = time.monotonic() + 15
        while True:  # the settlement watch and the reconciliation repair what the demotion discarded
            await drained(store)
            rows = await reconcile(store)
            sql = await store.sql.balance(MODE, "acme", ASSET)
            if [r.status for r in rows] == ["ok"] and (sql.debits_posted, sql.debits_pending) == (250, 0):
                break
            assert time.monotonic() < deadline, (rows, sql)
            await asyncio.sleep(0.2)
        yield store
    finally:
        await store.close()


async def test_sentinel_split_brain_window_loses_nothing(sentinel_with_replica: Topology, tmp_path: Path) -> None:
    """Holds placed and settled in the split-brain window reach the ledger exactly once (settlement watch, hold
    re-adoption, reconciliation), with their usage records."""
    async with _after_split_brain(sentinel_with_replica, tmp_path) as store:
        assert await store.audit() == []
        sql = await store.sql.balance(MODE, "acme", ASSET)
        assert (sql.credits_posted, sql.debits_posted, sql.debits_pending) == (1000, 250, 0)
        assert await store.balance(MODE, "acme", ASSET) == sql
        records = {r.id: (r.charged_amount, r.written_off_amount) for _, r in await store.usage(MODE, "acme", limit=10)}
        assert records == {"r-before": (120, 0), "r-window": (50, 0), "r-after": (80, 0)}
        for hold_id, captured in (("before", 120), ("window", 50), ("after", 80)):
            h = await store.sql.get_hold(hold_id)
            assert h is not None and (h.state, h.captured_amount) == ("captured", captured), h


async def test_sentinel_split_brain_leaves_no_stale_pending_hold(sentinel_with_replica: Topology,
                                                                 tmp_path: Path) -> None:
    async with _after_split_brain(sentinel_with_replica, tmp_path) as store:
        before = await store.get_hold("before")
        assert before is not None and before.state == "captured"  # the ledger's state, not the reverted one
        # The sweep must not release the reverted hold a second time (available would grow by its 300).
        await store.expire_holds(now_ms=now_ms() + 3_600_000)
        live = await store.balance(MODE, "acme", ASSET)
        assert live == await store.sql.balance(MODE, "acme", ASSET)
