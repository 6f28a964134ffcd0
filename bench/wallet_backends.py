"""Wallet backends on one hot wallet: reserve + settle pairs per second, SQLite vs PostgreSQL vs Redis.

    uv run python bench/wallet_backends.py --seconds 5

Each "pair" is what the proxy does per request: ``reserve`` a hold, then ``settle`` it with a usage record,
all on one customer's wallet (the hottest key there is), from 32 concurrent workers in this one process.
Configurations, measured interleaved round by round, each on a fresh database / Redis prefix:

* ``sqlite``        SqlWalletStore on a SQLite file: the single-process embedded default (the ratio's base);
* ``postgres``      SqlWalletStore on PostgreSQL (127.0.0.1:5432, a throwaway database);
* ``redis+sqlite``  RedisWalletStore over the SQLite ledger; the sink drains into SQLite concurrently;
* ``redis+pg``      RedisWalletStore over the PostgreSQL ledger (the Redis wallet, ``redis_wallet: true``);
* ``windows+pg+escrow`` the default with ``redis_url``: the PostgreSQL store with its rate-limit windows in Redis
  (``SqlWalletWithRedisWindows``), behind escrow leases; its ledger is written as each pair settles, so its
  drained rate is its admission rate;
* ``<sql>+escrow``   the same store behind escrow leases (metergate/wallet/escrow.py): reserves admitted in
  memory against this process's lease, each settlement one capture from it;
* ``<any>-classic`` the same with ``batch_engine=False``: every operation its own classic operation (SQLite:
  a savepoint each in the writer's group commit; PostgreSQL: a transaction each), the store before the batch
  engine.

``--configs`` picks and orders them (default: all of them). Request and hold ids are made as the proxy makes
them (``--ids product``); ``--ids product random`` runs each configuration with both, interleaved, to see
what the ids' order costs the indexes they key. SQLite lines also report the WAL pages a batch writes.

For the Redis stores the time includes draining: a round ends when every event has reached SQL, and the
pairs/s counts only what the ledger holds (``drained pairs/s``), beside the admission rate seen by the
workers (``hot pairs/s``). ``x sqlite`` is the drained rate over SQLite's (batch engine) in the same round,
``x classic`` over the same configuration's ``-classic`` twin in the same round; medians over rounds. ``CPU
us/pair`` is this process's CPU time (all its threads: the event loop, the SQLite writer) per pair during the
load; the database servers' CPU is not in it; ``of it writer`` is the SQLite writer thread's part of it (the
rest is the event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scratch import REDIS, Scratch

from metergate.observability.logs import new_request_id
from metergate.wallet.escrow import Escrow
from metergate.wallet.execution import WRITER_THREAD
from metergate.wallet.models import UsageRecord
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.redis.windows import SqlWalletWithRedisWindows
from metergate.wallet.sql import SqlWalletStore

MODE, CUSTOMER, ASSET = "test", "bench", "USD"
CONFIGS = ("sqlite-classic", "sqlite", "sqlite+escrow", "postgres-classic", "postgres", "postgres+escrow",
           "redis+sqlite-classic", "redis+sqlite", "redis+pg-classic", "redis+pg", "windows+pg+escrow")


CPU_US: dict[int, float] = {}  # this process's CPU (every thread) per pair, by store, in microseconds
WRITER_US: dict[int, float] = {}  # of which the SQLite writer thread's


def writer_cpu_seconds() -> float:
    """CPU time of this process's SQLite writer threads (the kernel's name for them), from /proc; 0 without."""
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                if (task / "comm").read_text().strip() == WRITER_THREAD:
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def writer_bytes_written() -> int:
    """Bytes the SQLite writer threads handed to ``write`` (``wchar`` in /proc): at a COMMIT, the WAL frames of
    every page the batch dirtied (page size + a 24-byte frame header each), plus the rare checkpoint the writer
    runs itself; 0 without /proc."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                if (task / "comm").read_text().strip() == WRITER_THREAD:
                    io = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
                    total += int(io["wchar"])
    return total


def request_ids(scheme: str, tag: str, worker: int) -> Iterator[tuple[str, str]]:
    """The (request id, hold id) of each of a worker's requests: ``product`` as the proxy makes them
    (:func:`metergate.observability.logs.new_request_id`, the hold named after the request); ``random`` the
    same shape with 128 random bits; ``legacy`` the bench's former per-worker counters."""
    for n in itertools.count():
        if scheme == "legacy":
            yield f"r{tag}{worker}_{n}", f"h{tag}{worker}_{n}"
            continue
        rid = new_request_id() if scheme == "product" else "req_" + os.urandom(16).hex()
        yield rid, "hold_" + rid[4:]


def usage(i: str, hold_id: str) -> UsageRecord:
    return UsageRecord(id=i, mode=MODE, customer_id=CUSTOMER, hold_id=hold_id, route="/b", endpoint="chat",
                       model="m", feature=None, stream=False, status_code=200, usage_source="provider",
                       tokens_input=10, tokens_cached_input=0, tokens_output=5, tokens_reasoning=0, asset=ASSET,
                       price_amount=80)


async def run_one(store: Any, seconds: float, concurrency: int, *, escrow: bool = False,
                  ids: str = "product") -> tuple[float, float]:
    await store.open()
    front: Any = Escrow(store) if escrow else store
    if escrow:
        await front.start()
    try:
        await store.create_customer(MODE, CUSTOMER, "Bench")
        await store.credit(MODE, CUSTOMER, ASSET, 10**15, idempotency_key="seed")
        stop = time.monotonic() + seconds
        counts = [0] * concurrency
        tag = uuid.uuid4().hex[:6]

        async def worker(w: int) -> None:
            n = 0
            named = request_ids(ids, tag, w)
            while time.monotonic() < stop:
                rid, hid = next(named)
                await front.reserve(MODE, CUSTOMER, ASSET, 1000, hold_id=hid, ttl_ms=60_000)
                await front.settle(hid, 80, usage(rid, hid))
                n += 1
            counts[w] = n

        sql_store = store.sql if isinstance(store, RedisWalletStore) else store
        writer = getattr(sql_store, "_writer", None)
        batches0, ops0 = (writer.batches, writer.ops) if writer is not None else (0, 0)
        started, cpu0, wcpu0, wbytes0 = time.monotonic(), time.process_time(), writer_cpu_seconds(), \
            writer_bytes_written()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        hot = time.monotonic() - started
        wcpu = writer_cpu_seconds() - wcpu0
        wbytes = writer_bytes_written() - wbytes0
        if escrow:
            await front.close()
        if isinstance(store, RedisWalletStore):
            while any([await store.redis.xlen(store.keys.stream(s)) for s in range(store.keys.shards)]):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        total = time.monotonic() - started
        pairs = sum(counts)
        CPU_US[id(store)] = (time.process_time() - cpu0) / max(1, pairs) * 1e6
        WRITER_US[id(store)] = wcpu / max(1, pairs) * 1e6
        if writer is not None and writer.batches > batches0:
            batches = writer.batches - batches0
            print(f"  ({(writer.ops - ops0) / batches:.1f} operations per SQLite batch, "
                  f"{wbytes / (4096 + 24) / batches:.1f} WAL pages written per batch)")
        commit = getattr(sql_store, "_pg_commit", None)
        if commit is not None and commit.batches:
            print(f"  ({commit.ops / commit.batches:.1f} operations per PostgreSQL batch)")
        sql = store.sql if isinstance(store, RedisWalletStore) else store
        assert (await sql.balance(MODE, CUSTOMER, ASSET)).debits_posted == 80 * pairs, "ledger incomplete"
        return pairs / hot, pairs / total
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--ids", nargs="+", default=["product"], choices=("product", "random", "legacy"),
                        help="how request and hold ids are made (see request_ids); several: each config once "
                             "with each, interleaved, reported as <config>/<ids>")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, list[tuple[float, float]]] = {}
    ratios: dict[str, list[float]] = {}
    twins: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    writer_cpu: dict[str, list[float]] = {}
    async with Scratch() as scratch:
        for r in range(args.rounds):
            drained_by: dict[str, float] = {}
            for config in args.configs:
                for scheme in args.ids:
                    pg_url = await scratch.fresh_database()
                    name = config.removesuffix("-classic").removesuffix("+escrow")
                    label = config if len(args.ids) == 1 else f"{config}/{scheme}"
                    sqlite_url = f"sqlite:///{tmp / f'{config}-{scheme}-{r}.db'}"
                    prefix = scratch.prefix()
                    url = pg_url if name.endswith(("postgres", "pg")) else sqlite_url
                    engine = not config.endswith("-classic")
                    ledger = (BatchingSqlWalletStore(url, batch_engine=engine) if name.startswith("redis")
                              else SqlWalletStore(url, batch_engine=engine))
                    store: Any = (RedisWalletStore(ledger, REDIS, prefix=prefix) if name.startswith("redis")
                                  else ledger)
                    if name.startswith("windows"):
                        store = SqlWalletWithRedisWindows(url, REDIS, prefix=prefix, batch_engine=engine)
                    print(f"{label}, round {r + 1}")
                    hot, drained = await run_one(store, args.seconds, args.concurrency,
                                                 escrow=config.endswith("+escrow"), ids=scheme)
                    drained_by[label] = drained
                    results.setdefault(label, []).append((hot, drained))
                    cpu.setdefault(label, []).append(CPU_US.pop(id(store)))
                    writer_cpu.setdefault(label, []).append(WRITER_US.pop(id(store)))
            for label, drained in drained_by.items():
                config, _, scheme = label.partition("/")
                same = f"/{scheme}" if scheme else ""
                if f"sqlite{same}" in drained_by:
                    ratios.setdefault(label, []).append(drained / drained_by[f"sqlite{same}"])
                if not config.endswith("-classic") and f"{config}-classic{same}" in drained_by:
                    twins.setdefault(label, []).append(drained / drained_by[f"{config}-classic{same}"])
    print(f"{'config':<30}{'hot pairs/s':>14}{'drained pairs/s':>18}{'x sqlite':>10}{'x classic':>11}"
          f"{'CPU us/pair':>13}{'of it writer':>14}")
    for config, rows in results.items():
        x_sqlite = f"{statistics.median(ratios[config]):.2f}" if config in ratios else "-"
        x_classic = f"{statistics.median(twins[config]):.2f}" if config in twins else "-"
        print(f"{config:<30}{statistics.median(h for h, _ in rows):>14.0f}"
              f"{statistics.median(d for _, d in rows):>18.0f}{x_sqlite:>10}{x_classic:>11}"
              f"{statistics.median(cpu[config]):>13.0f}{statistics.median(writer_cpu[config]):>14.0f}")


if __name__ == "__main__":
    asyncio.run(main())
