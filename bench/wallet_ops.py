"""Wallet micro benchmark: reserve + settle pairs per second on one hot SQLite wallet.

    uv run python bench/wallet_ops.py            # about 1 minute
    uv run python bench/wallet_ops.py --quick    # about 15 seconds

Each "request" is what the proxy does to the ledger: ``reserve`` a hold, then ``settle`` it with a
usage record, all on one customer's wallet (the hottest row there is). Workers (concurrency 1 and 32)
run requests back to back in this process, whose threads (event loop, SQLite writer) are pinned to one
CPU as the server is in bench/run.py. Store configurations, measured interleaved round by round on
fresh databases:

* ``baseline``  a transaction per operation, every statement through SQLAlchemy Core, checkpoints
                inside COMMIT: the store as it was before these three changes (``write_batch_max=1,
                sqlite_fast=False, sqlite_checkpoint_s=None``);
* ``batched``   group commit only;
* ``direct``    prepared statements on the driver connection only;
* ``ckpt``      checkpoints off the commit path only;
* ``no-ckpt``   group commit and the direct path, checkpoints left inside COMMIT;
* ``default``   all three: the production setting.

Reported per configuration and concurrency: pairs/s, process CPU per pair and the writer thread's share
of it (medians over rounds), the mean number of operations per committed batch, the largest WAL file
seen, and ``x base``, the pairs/s ratio to ``baseline`` computed within each round, then the median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metergate.wallet.execution import CHECKPOINT_INTERVAL_S, WRITE_BATCH_MAX
from metergate.wallet.models import UsageRecord
from metergate.wallet.sql import SqlWalletStore

_OFF: dict[str, Any] = {"write_batch_max": 1, "sqlite_fast": False, "sqlite_checkpoint_s": None}
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": _OFF,
    "batched": {**_OFF, "write_batch_max": WRITE_BATCH_MAX},
    "direct": {**_OFF, "sqlite_fast": True},
    "ckpt": {**_OFF, "sqlite_checkpoint_s": CHECKPOINT_INTERVAL_S},
    "no-ckpt": {"sqlite_checkpoint_s": None},
    "default": {},
}
MODE, CUSTOMER, ASSET = "test", "bench", "USD"
HOLD, PRICE = 1000, 80
MAX_PAIRS_PER_WORKER = 1_000_000


@dataclass
class Result:
    config: str
    concurrency: int
    pairs: int
    seconds: float
    cpu_s: float
    writer_cpu_s: float
    batch_mean: float
    wal_max_bytes: int

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / max(self.pairs, 1)

    @property
    def writer_us(self) -> float:
        return 1e6 * self.writer_cpu_s / max(self.pairs, 1)


def record(i: int, hold_id: str) -> UsageRecord:
    """A usage record shaped like the proxy's (bench/run.py's request: 40 prompt + 20 completion tokens)."""
    return UsageRecord(
        id=f"req_{i}", mode=MODE, customer_id=CUSTOMER, hold_id=hold_id, route="/openai",
        endpoint="chat.completions", model="gpt-4o-mini", feature=None, stream=False, status_code=200,
        usage_source="provider", tokens_input=40, tokens_cached_input=0, tokens_output=20, tokens_reasoning=0,
        asset=ASSET, price_amount=PRICE, cost_nanos=18_000,
        detail={"price": {"input_per_mtok": "1", "output_per_mtok": "2"}, "cost": None, "hold": HOLD,
                "tokens_exact": True, "duration_ms": 3})


async def measure(config: str, concurrency: int, warmup_s: float, duration_s: float, workdir: Path) -> Result:
    path = workdir / f"{config}-{concurrency}-{time.monotonic_ns()}.db"
    store = SqlWalletStore(f"sqlite:///{path}", **CONFIGS[config])
    await store.open()
    try:
        await store.create_customer(MODE, CUSTOMER, "Bench")
        await store.credit(MODE, CUSTOMER, ASSET, 10**15, idempotency_key="seed")
        counter = iter(range(10**9))
        start = time.perf_counter()
        t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
        done = 0
        snap: dict[str, float] = {}
        wal = Path(f"{path}-wal")
        wal_max = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(MAX_PAIRS_PER_WORKER):
                if time.perf_counter() >= t_end:
                    return
                i = next(counter)
                hold, _ = await store.reserve(MODE, CUSTOMER, ASSET, HOLD, hold_id=f"hold_{i}", ttl_ms=900_000)
                await store.settle(hold.id, PRICE, record(i, hold.id))
                if t_measure <= time.perf_counter() <= t_end:
                    done += 1

        async def wal_watch() -> None:
            nonlocal wal_max
            while time.perf_counter() < t_end:
                wal_max = max(wal_max, wal_size(wal))
                await asyncio.sleep(0.05)

        async def sampler() -> None:
            await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
            writer = store._writer
            assert writer is not None and writer._thread.ident is not None
            clock = time.pthread_getcpuclockid(writer._thread.ident)
            snap.update(cpu=time.process_time(), t=time.perf_counter(), batches=writer.batches, ops=writer.ops,
                        writer=time.clock_gettime(clock))
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            snap.update(cpu=time.process_time() - snap["cpu"], t=time.perf_counter() - snap["t"],
                        batches=writer.batches - snap["batches"], ops=writer.ops - snap["ops"],
                        writer=time.clock_gettime(clock) - snap["writer"])

        await asyncio.gather(sampler(), wal_watch(), *(worker() for _ in range(concurrency)))
        assert await store.audit() == [], "ledger audit failed"
        return Result(config, concurrency, done, snap["t"], snap["cpu"], snap["writer"],
                      snap["ops"] / max(snap["batches"], 1), wal_max)
    finally:
        await store.close()
        remove_database(path)


def wal_size(wal: Path) -> int:
    try:
        return wal.stat().st_size
    except OSError:
        return 0


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.5 s windows")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument("--duration", type=float, help="measurement window per cell, s (default 1.5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up per cell, s (default 0.3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="default: 1 32")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin this process to (-1: no pinning)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (0.5 if args.quick else 1.5)
    if not (1 <= rounds <= 50 and 0.1 <= duration <= 60 and 0 <= args.warmup <= 10
            and all(1 <= c <= 1024 for c in args.concurrency)):
        parser.error("--rounds 1-50, --duration 0.1-60 s, --warmup 0-10 s, --concurrency 1-1024")
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    print(f"wallet_ops: reserve+settle pairs on one hot SQLite wallet, {rounds} rounds x {duration:g}s, "
          f"pinned to {'CPU ' + str(args.cpu) if args.cpu >= 0 else 'nothing'}")
    results: list[tuple[int, Result]] = []
    with tempfile.TemporaryDirectory(prefix="metergate-wallet-ops-") as tmp:
        for rnd in range(rounds):
            for concurrency in args.concurrency:
                order = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
                for config in order:
                    r = asyncio.run(measure(config, concurrency, args.warmup, duration, Path(tmp)))
                    results.append((rnd, r))
            print(f"  round {rnd + 1}/{rounds} done", flush=True)

    base = "baseline" if "baseline" in args.configs else args.configs[0]
    head = (f"{'config':<10}{'conc':>5}{'pairs/s':>10}{'CPU us/pair':>13}{'writer us':>11}{'batch':>7}"
            f"{'WAL MB':>8}{'x ' + base[:4]:>8}")
    print(f"\n{head}\n{'-' * len(head)}")
    for concurrency in args.concurrency:
        for config in args.configs:
            mine = {rnd: r for rnd, r in results if r.config == config and r.concurrency == concurrency}
            ref = {rnd: r for rnd, r in results if r.config == base and r.concurrency == concurrency}
            rate = statistics.median(r.rate for r in mine.values())
            cpu = statistics.median(r.cpu_us for r in mine.values())
            writer = statistics.median(r.writer_us for r in mine.values())
            batch = statistics.median(r.batch_mean for r in mine.values())
            wal_mb = max(r.wal_max_bytes for r in mine.values()) / 2**20
            ratio = statistics.median(mine[k].rate / ref[k].rate for k in mine)
            print(f"{config:<10}{concurrency:>5}{rate:>10.0f}{cpu:>13.0f}{writer:>11.0f}{batch:>7.1f}{wal_mb:>8.1f}"
                  f"{ratio:>8.2f}")


if __name__ == "__main__":
    main()
