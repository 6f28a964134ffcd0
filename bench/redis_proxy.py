"""End-to-end proxy throughput: two ``metergate serve`` processes over Redis vs the embedded default.

    uv run python bench/redis_proxy.py --seconds 5 --rounds 2

Targets, measured interleaved round by round against the fixed-response upstream (bench/upstream.py):

* ``embedded``        one process, the SQLite ledger (the single-process embedded default: the ratio's base);
* ``redis x1``        one process, the Redis wallet over a PostgreSQL ledger (a throwaway database);
* ``redis x2``        two processes sharing the Redis prefix and the PostgreSQL ledger, the load split evenly;
* ``pg x2``           two processes over PostgreSQL alone, with escrow leases (``pg x2 noescrow``: without);
* ``embedded-noescrow`` the embedded default with escrow leases turned off;
* ``windows x2``      two processes over PostgreSQL with escrow leases and their rate-limit windows in Redis
  (``redis_wallet: false``), with rate limits set far above the load so that the windows are claimed.

The first config named (``--configs``) is the ratio's base.

The load generator is one aiohttp session with 32 workers sending non-streaming chat completions with the
trusted customer header, all on one customer's wallet. ``req/s`` is what the clients were served; ``ledger
req/s`` counts only the usage records in the ledger once the streams drained or ``--drain-seconds`` passed,
over the whole time (load + drain): for one hot wallet the PostgreSQL ledger, one transaction per event,
is far slower than Redis admission.
``x embedded`` (x the first config) is the ratio of req/s to that config's in the same round, median over
rounds. On this
machine every process shares two CPU cores with the load generator and the databases: the ratios say how the
configurations compare here, not how they scale on separate hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from scratch import REDIS, Scratch

from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.sql import SqlWalletStore

ADMIN = "mg_test_" + "b" * 24
PRICING = {"asset": "USD", "models": {"gpt-4o-mini": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}}}
BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Say something short about prepaid wallets."}]}).encode()
HEADERS = {"Content-Type": "application/json", "X-Metergate-Customer": "bench", "X-Metergate-Mode": "test"}
SHARDS = 16


# label: (processes, backend, escrow leases)
CONFIGS: dict[str, tuple[int, str, bool]] = {
    "embedded": (1, "sqlite", True), "embedded-noescrow": (1, "sqlite", False),
    "pg x2": (2, "pg", True), "pg x2 noescrow": (2, "pg", False),
    "redis x1": (1, "redis", True), "redis x2": (2, "redis", True), "windows x2": (2, "windows", True),
}
LIMITS = {"customer": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited")
            try:
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


async def start(n: int, workdir: Path, upstream: str, database_url: str, prefix: str | None,
                escrow: bool = True, windows: bool = False) -> list[Any]:
    procs = []
    for i in range(n):
        port = free_port()
        config = workdir / f"{prefix}-{i}-{port}.yaml"
        cfg: dict[str, Any] = {"port": port, "database_url": database_url, "admin_keys": [ADMIN],
                               "routes": [{"prefix": "/openai", "upstream": upstream, "api_key": "sk-" + "u" * 24}],
                               "pricing": PRICING, "portal_secrets": {"k1": "s" * 40}}
        if prefix is not None:
            cfg |= {"redis_url": REDIS, "redis_key_prefix": prefix, "redis_shards": SHARDS, "redis_wallet": True}
        if windows:
            cfg |= {"redis_wallet": False, "rate_limits": LIMITS}
        if not escrow:
            cfg["escrow"] = {"enabled": False}
        config.write_text(yaml.safe_dump(cfg))
        p = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config)],  # noqa: ASYNC220
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, p)
        procs.append((p, url))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s:
        base = procs[0][1] + "/admin/v1"
        async with s.post(base + "/customers", json={"id": "bench", "name": "Bench"}) as r:
            assert r.status == 201, await r.text()
        async with s.post(base + "/customers/bench/credits", json={"amount": 10**15, "idempotency_key": "seed"}) as r:
            assert r.status == 201, await r.text()
    return procs


async def load(urls: list[str], seconds: float, concurrency: int, refused: list[int] | None = None) -> int:
    stop = time.monotonic() + seconds
    served = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(i: int) -> None:
            nonlocal served
            url = urls[i % len(urls)] + "/openai/v1/chat/completions"
            while time.monotonic() < stop:
                async with session.post(url, data=BODY, headers=HEADERS) as r:
                    await r.read()
                    if r.status == 200:
                        served += 1
                    elif refused is not None:
                        refused.append(r.status)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return served


async def measure(n: int, workdir: Path, upstream: str, database_url: str, prefix: str | None, seconds: float,
                  concurrency: int, drain_s: float, escrow: bool = True, windows: bool = False) -> tuple[float, float]:
    procs = await start(n, workdir, upstream, database_url, prefix, escrow, windows)
    try:
        started = time.monotonic()
        refused: list[int] = []
        served = await load([u for _, u in procs], seconds, concurrency, refused)
        if refused:
            print(f"  refused: {({s: refused.count(s) for s in set(refused)})}")
        elapsed = time.monotonic() - started
        rate, in_ledger = served / elapsed, served
        if prefix is not None and not windows:
            # The ledger lags behind Redis: count what reached it within ``drain_s`` after the load.
            store = RedisWalletStore(SqlWalletStore(database_url), REDIS, prefix=prefix, shards=SHARDS,
                                     run_sink=False)
            await store.open()
            try:
                deadline = time.monotonic() + drain_s
                while time.monotonic() < deadline and any(  # noqa: ASYNC110
                        [await store.redis.xlen(store.keys.stream(s)) for s in range(SHARDS)]):
                    await asyncio.sleep(0.05)
                in_ledger = len(await store.usage("test", "bench", limit=10**7))
            finally:
                await store.close()
        else:  # the SQL ledger is written before each answer: count what it holds
            sql = SqlWalletStore(database_url)
            await sql.open()
            try:
                in_ledger = len(await sql.usage("test", "bench", limit=10**7))
            finally:
                await sql.close()
        return rate, in_ledger / (time.monotonic() - started)
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--drain-seconds", type=float, default=10)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "bench/upstream.py", "--port", str(up_port)])  # noqa: ASYNC220
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        async with Scratch() as scratch:
            await asyncio.sleep(1)
            for r in range(args.rounds):
                base = 0.0
                for label in args.configs:
                    n, backend, escrow = CONFIGS[label]
                    pg_url = await scratch.fresh_database()
                    prefix = scratch.prefix() if backend in ("redis", "windows") else None
                    db = f"sqlite:///{workdir / f'{label}-{r}.db'}" if backend == "sqlite" else pg_url
                    rate, drained = await measure(n, workdir, f"http://127.0.0.1:{up_port}", db, prefix, args.seconds,
                                                  args.concurrency, args.drain_seconds, escrow, backend == "windows")
                    if label == args.configs[0]:
                        base = rate
                    results.setdefault(label, []).append((rate, drained, rate / base))
    finally:
        upstream.terminate()
    print(f"{'target':<12}{'req/s':>10}{'ledger req/s':>15}{'x embedded':>12}")
    for label, rows in results.items():
        print(f"{label:<12}{statistics.median(a for a, _, _ in rows):>10.0f}"
              f"{statistics.median(b for _, b, _ in rows):>15.0f}{statistics.median(c for *_, c in rows):>12.2f}")


if __name__ == "__main__":
    asyncio.run(main())
