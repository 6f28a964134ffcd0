"""Wallet backends on one hot wallet: reserve + settle pairs per second, SQLite vs PostgreSQL vs Redis.

    uv run python bench/wallet_backends.py --seconds 5

Each "pair" is what the proxy does per request: ``reserve`` a hold, then ``settle`` it with a usage record,
all on one customer's wallet (the hottest key there is), from 32 concurrent workers in this one process.
Configurations, measured interleaved round by round, each on a fresh database / Redis prefix:

* ``sqlite``        SqlWalletStore on a SQLite file: the single-process embedded default (the ratio's base);
* ``postgres``      SqlWalletStore on PostgreSQL (127.0.0.1:5432, a throwaway database);
* ``redis+sqlite``  RedisWalletStore over the SQLite ledger; the sink drains into SQLite concurrently;
* ``redis+pg``      RedisWalletStore over the PostgreSQL ledger.

For the Redis stores the time includes draining: a round ends when every event has reached SQL, and the
pairs/s counts only what the ledger holds (``drained pairs/s``), beside the admission rate seen by the
workers (``hot pairs/s``). ``x sqlite`` is the drained rate over SQLite's in the same round, median over
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from scratch import REDIS, Scratch

from metergate.wallet.models import UsageRecord
from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.sql import SqlWalletStore

MODE, CUSTOMER, ASSET = "test", "bench", "USD"


def usage(i: str, hold_id: str) -> UsageRecord:
    return UsageRecord(id=i, mode=MODE, customer_id=CUSTOMER, hold_id=hold_id, route="/b", endpoint="chat",
                       model="m", feature=None, stream=False, status_code=200, usage_source="provider",
                       tokens_input=10, tokens_cached_input=0, tokens_output=5, tokens_reasoning=0, asset=ASSET,
                       price_amount=80)


async def run_one(store: Any, seconds: float, concurrency: int) -> tuple[float, float]:
    await store.open()
    try:
        await store.create_customer(MODE, CUSTOMER, "Bench")
        await store.credit(MODE, CUSTOMER, ASSET, 10**15, idempotency_key="seed")
        stop = time.monotonic() + seconds
        counts = [0] * concurrency
        tag = uuid.uuid4().hex[:6]

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < stop:
                hid = f"h{tag}{w}_{n}"
                await store.reserve(MODE, CUSTOMER, ASSET, 1000, hold_id=hid, ttl_ms=60_000)
                await store.settle(hid, 80, usage(f"r{tag}{w}_{n}", hid))
                n += 1
            counts[w] = n

        started = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        hot = time.monotonic() - started
        if isinstance(store, RedisWalletStore):
            while any([await store.redis.xlen(store.keys.stream(s)) for s in range(store.keys.shards)]):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        total = time.monotonic() - started
        pairs = sum(counts)
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
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, list[tuple[float, float, float]]] = {}
    async with Scratch() as scratch:
        for r in range(args.rounds):
            base = 0.0
            for config in ("sqlite", "postgres", "redis+sqlite", "redis+pg"):
                pg_url = await scratch.fresh_database()
                sqlite_url = f"sqlite:///{tmp / f'{config}-{r}.db'}"
                prefix = scratch.prefix()
                url = pg_url if config.endswith(("postgres", "pg")) else sqlite_url
                ledger = BatchingSqlWalletStore(url) if config.startswith("redis") else SqlWalletStore(url)
                store: Any = RedisWalletStore(ledger, REDIS, prefix=prefix) if config.startswith("redis") else ledger
                hot, drained = await run_one(store, args.seconds, args.concurrency)
                if config == "sqlite":
                    base = drained
                results.setdefault(config, []).append((hot, drained, drained / base))
    print(f"{'config':<14}{'hot pairs/s':>14}{'drained pairs/s':>18}{'x sqlite':>10}")
    for config, rows in results.items():
        print(f"{config:<14}{statistics.median(h for h, _, _ in rows):>14.0f}"
              f"{statistics.median(d for _, d, _ in rows):>18.0f}{statistics.median(x for *_, x in rows):>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
