"""The Redis wallet's ledger sink alone: how fast one sink drains a backlog into PostgreSQL, against how fast
the same process admits pairs into Redis, on one hot wallet.

    uv run python bench/redis_drain.py --seconds 3 --rounds 2

Each round, on a fresh database and Redis prefix: 32 workers reserve + settle pairs (with a usage record, as
the proxy does) for ``--seconds`` with no sink running (``admit pairs/s``: Redis admission alone); then a
store with its sink opens and the time until every stream is empty gives ``drain pairs/s`` (the sink alone,
nothing else on the event loop). ``drain x admit`` is their ratio in the same round: above 1, one sink outruns
the admission of one process, so a stream does not grow while both run. ``CPU us/pair`` is this process's
CPU per pair in each phase. Medians over rounds. The end-to-end view (admission and drain in one process,
competing for the CPU) is ``bench/wallet_backends.py --configs redis+pg``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from scratch import REDIS, Scratch
from wallet_backends import ASSET, CUSTOMER, MODE, usage

from metergate.wallet.redis.batching import BatchingSqlWalletStore
from metergate.wallet.redis.store import RedisWalletStore


async def admit(url: str, prefix: str, seconds: float, concurrency: int) -> tuple[int, float, float]:
    """Pairs admitted with no sink; (pairs, pairs/s, CPU us/pair)."""
    store = RedisWalletStore(BatchingSqlWalletStore(url), REDIS, prefix=prefix, run_sink=False)
    await store.open()
    try:
        await store.create_customer(MODE, CUSTOMER, "Bench")
        await store.credit(MODE, CUSTOMER, ASSET, 10**15, idempotency_key="seed")
        stop, tag, counts = time.monotonic() + seconds, uuid.uuid4().hex[:6], [0] * concurrency

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < stop:
                hid = f"h{tag}{w}_{n}"
                await store.reserve(MODE, CUSTOMER, ASSET, 1000, hold_id=hid, ttl_ms=600_000)
                await store.settle(hid, 80, usage(f"r{tag}{w}_{n}", hid))
                n += 1
            counts[w] = n

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        pairs = sum(counts)
        return pairs, pairs / (time.monotonic() - started), (time.process_time() - cpu) / max(1, pairs) * 1e6
    finally:
        await store.close()


async def drain(url: str, prefix: str, pairs: int) -> tuple[float, float]:
    """Open a store with its sink over the backlog; (pairs/s until the streams are empty, CPU us/pair)."""
    store = RedisWalletStore(BatchingSqlWalletStore(url), REDIS, prefix=prefix)
    started, cpu = time.monotonic(), time.process_time()
    await store.open()
    try:
        streams = [store.keys.stream(s) for s in range(store.keys.shards)]
        while any([await store.redis.xlen(s) for s in streams]):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        elapsed, used = time.monotonic() - started, time.process_time() - cpu
        assert (await store.sql.balance(MODE, CUSTOMER, ASSET)).debits_posted == 80 * pairs, "ledger incomplete"
        assert await store.audit() == [], "the ledger does not audit clean"
        return pairs / elapsed, used / max(1, pairs) * 1e6
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    rows: list[tuple[float, float, float, float, float]] = []
    async with Scratch() as scratch:
        for _ in range(args.rounds):
            url, prefix = await scratch.fresh_database(), scratch.prefix()
            pairs, admit_rate, admit_cpu = await admit(url, prefix, args.seconds, args.concurrency)
            drain_rate, drain_cpu = await drain(url, prefix, pairs)
            rows.append((admit_rate, admit_cpu, drain_rate, drain_cpu, drain_rate / admit_rate))
            print(f"  round: {pairs} pairs admitted at {admit_rate:.0f}/s, drained at {drain_rate:.0f}/s")
    print(f"{'admit pairs/s':>14}{'CPU us/pair':>13}{'drain pairs/s':>15}{'CPU us/pair':>13}{'drain x admit':>15}")
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    print(f"{med[0]:>14.0f}{med[1]:>13.0f}{med[2]:>15.0f}{med[3]:>13.0f}{med[4]:>15.2f}")


if __name__ == "__main__":
    asyncio.run(main())
