"""Soak: mixed traffic against ``metergate serve`` for an hour, watching for anything that grows without bound.

    uv run python bench/soak.py --minutes 60                 # both topologies side by side
    uv run python bench/soak.py --minutes 5 --topology embedded

Topologies, run at the same time, each with its own load generator:

* ``embedded``  one ``serve`` on a SQLite ledger (the embedded default);
* ``redis``     two ``serve`` processes over one Redis prefix and a throwaway PostgreSQL ledger.

Traffic, at ``--rps`` requests per second per topology (a steady load, not saturation), in a fixed rotation:
a unary chat completion, a stream read to its end, a stream the client hangs up on after its first chunk, and
a request from a customer with an empty wallet (a 402). The upstream is
the fixed-response bench upstream (bench/upstream.py).

Every ``--sample-s`` seconds it records, per topology: the serve processes' RSS and open file descriptors (from
/proc), the holds they report open (``metergate_open_holds``), the SQLite WAL size, the ledger lag (events in
the Redis streams not yet in SQL; 0 for the embedded ledger, which commits before answering), and the p99 of the
requests completed in that interval. At the end the load stops and, after the ledger drained, the check is the
ledger's own: ``audit()`` clean, no hold pending, and the customer's posted debits equal the sum of its usage
records' prices.

The verdict per series is a slope test over the samples after the warm-up (the first fifth): the least-squares
growth over that span must stay under ``max(fraction x median, floor)``; a leak grows steadily, noise does not.
The exit status is 0 only when every series passes and every ledger check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from redis_proxy import free_port, wait_ready
from scratch import REDIS, Scratch

from metergate.wallet.redis.store import RedisWalletStore
from metergate.wallet.sql import SqlWalletStore

ADMIN = "mg_test_" + "s" * 24
PRICING = {"asset": "USD", "models": {"gpt-4o-mini": {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}}}
SHARDS = 4
MESSAGES = [{"role": "user", "content": "Say something short about prepaid wallets."}]
UNARY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64, "messages": MESSAGES}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64, "messages": MESSAGES, "stream": True,
                     "stream_options": {"include_usage": True}}).encode()
KINDS = ("unary", "stream", "disconnect", "broke")
# Series -> (fraction of the median, absolute floor) that the growth over the measured span may reach.
BOUNDS: dict[str, tuple[float, float]] = {
    "rss_mib": (0.10, 8.0), "fds": (0.20, 16.0), "open_holds": (0.50, 64.0), "wal_mib": (1.0, 96.0),
    "ledger_lag": (0.50, 2000.0), "p99_ms": (0.50, 50.0)}


@dataclass
class Topology:
    name: str
    database_url: str
    prefix: str | None
    workdir: Path
    procs: list[tuple[subprocess.Popen[bytes], str]] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*KINDS, "errors"), 0))

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.procs]


async def start(top: Topology, n: int, upstream: str) -> None:
    for i in range(n):
        port = free_port()
        cfg: dict[str, Any] = {"port": port, "database_url": top.database_url, "admin_keys": [ADMIN],
                               "routes": [{"prefix": "/openai", "upstream": upstream, "api_key": "sk-" + "u" * 24}],
                               "pricing": PRICING, "portal_secrets": {"k1": "s" * 40}}
        if top.prefix is not None:
            cfg |= {"redis_url": REDIS, "redis_key_prefix": top.prefix, "redis_shards": SHARDS, "redis_wallet": True}
        config = top.workdir / f"{top.name}-{i}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        log = (top.workdir / f"{top.name}-{i}.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config),  # noqa: ASYNC220
                              "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, p)
        top.procs.append((p, url))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s:
        base = top.urls[0] + "/admin/v1"
        for customer in ("soak", "broke"):
            async with s.post(base + "/customers", json={"id": customer, "name": customer.title()}) as r:
                assert r.status == 201, await r.text()
        async with s.post(base + "/customers/soak/credits", json={"amount": 10**15, "idempotency_key": "seed"}) as r:
            assert r.status == 201, await r.text()


async def one(session: aiohttp.ClientSession, url: str, kind: str) -> bool:
    customer = "broke" if kind == "broke" else "soak"
    headers = {"Content-Type": "application/json", "X-Metergate-Customer": customer, "X-Metergate-Mode": "test"}
    body = UNARY if kind in ("unary", "broke") else STREAM
    async with session.post(url + "/openai/v1/chat/completions", data=body, headers=headers) as r:
        if kind == "broke":
            await r.read()
            return r.status == 402
        if kind == "disconnect":
            await r.content.readany()
            r.close()  # hang up mid-stream: metergate drains the upstream and bills what was delivered
            return r.status == 200
        data = await r.read()
        return r.status == 200 and (kind == "unary" or data.rstrip().endswith(b"data: [DONE]"))


async def drive(top: Topology, stop_at: float, concurrency: int, rps: float) -> None:
    """``concurrency`` workers sharing a schedule of ``rps`` requests per second (0: as fast as they can)."""
    timeout = aiohttp.ClientTimeout(total=60)
    next_at = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async def worker(w: int) -> None:
            nonlocal next_at
            i = w
            while time.monotonic() < stop_at:
                if rps > 0:
                    slot, next_at = next_at, max(next_at, time.monotonic() - 1.0) + 1 / rps
                    await asyncio.sleep(max(0.0, slot - time.monotonic()))
                kind = KINDS[i % len(KINDS)]
                url = top.urls[i % len(top.urls)]
                i += 1
                started = time.perf_counter()
                try:
                    ok = await one(session, url, kind)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                top.latencies.append(time.perf_counter() - started)
                top.counts[kind if ok else "errors"] += 1
                if not ok:
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def proc_stats(pid: int) -> tuple[float, int]:
    rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def open_holds(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("metergate_open_holds"))


async def ledger_lag(top: Topology, redis_store: RedisWalletStore | None) -> float:
    if redis_store is None:
        return 0.0
    return float(sum([await redis_store.redis.xlen(redis_store.keys.stream(s)) for s in range(SHARDS)]))


async def sample_forever(top: Topology, interval_s: float, started: float, redis_store: RedisWalletStore | None,
                         stop_at: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < stop_at:
            await asyncio.sleep(interval_s)
            window, top.latencies = top.latencies, []
            rss = fds = 0.0
            for p, _ in top.procs:
                r, f = proc_stats(p.pid)
                rss, fds = rss + r, fds + f
            holds = sum([await open_holds(session, url) for url in top.urls])
            wal = top.workdir / f"{top.name}.db-wal"
            p99 = statistics.quantiles(window, n=100)[98] * 1000 if len(window) >= 100 else float("nan")
            top.samples.append({"t_s": time.monotonic() - started, "rss_mib": rss, "fds": fds, "open_holds": holds,
                                "wal_mib": wal.stat().st_size / 2**20 if wal.exists() else 0.0,
                                "ledger_lag": await ledger_lag(top, redis_store), "p99_ms": p99,
                                "requests": float(len(window))})
            s = top.samples[-1]
            print(f"[{top.name:<8}] t={s['t_s']:6.0f}s rss={s['rss_mib']:6.1f}MiB fds={s['fds']:4.0f} "
                  f"holds={s['open_holds']:4.0f} wal={s['wal_mib']:6.1f}MiB lag={s['ledger_lag']:6.0f} "
                  f"p99={s['p99_ms']:7.1f}ms req={s['requests']:6.0f}", flush=True)


def slope_verdicts(samples: list[dict[str, float]]) -> dict[str, tuple[float, float, bool]]:
    """Per series: (growth over the measured span by least squares, allowed growth, passes)."""
    measured = samples[len(samples) // 5:]
    out: dict[str, tuple[float, float, bool]] = {}
    if len(measured) < 3:
        return out
    ts = [s["t_s"] for s in measured]
    for series, (fraction, floor) in BOUNDS.items():
        ys = [s[series] for s in measured]
        pairs = [(t, y) for t, y in zip(ts, ys, strict=True) if y == y]  # drop NaN (too few requests to rank)
        if len(pairs) < 3:
            continue
        slope = statistics.linear_regression([t for t, _ in pairs], [y for _, y in pairs]).slope
        growth = slope * (pairs[-1][0] - pairs[0][0])
        allowed = max(fraction * statistics.median(y for _, y in pairs), floor)
        out[series] = (growth, allowed, growth <= allowed)
    return out


async def ledger_check(top: Topology) -> list[str]:
    """Problems found in the ledger after the load stopped and drained (none: [])."""
    sql = SqlWalletStore(top.database_url)  # the system of record, read after the Redis streams drained
    await sql.open()
    try:
        problems = list(await sql.audit())
        records = await sql.usage("test", "soak", limit=10**8)
        balance = await sql.balance("test", "soak", "USD")
        priced = sum(record.price_amount for _, record in records)
        if balance.debits_posted != priced:
            problems.append(f"posted debits {balance.debits_posted} != sum of usage prices {priced}")
        if balance.debits_pending:
            problems.append(f"{balance.debits_pending} still held after the load stopped")
        return problems
    finally:
        await sql.close()


async def drained(top: Topology, redis_store: RedisWalletStore | None, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    # Polling another process's progress: there is no event to wait on.
    while time.monotonic() < end and await ledger_lag(top, redis_store):  # noqa: ASYNC110
        await asyncio.sleep(0.5)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8, help="workers per topology")
    parser.add_argument("--rps", type=float, default=50, help="requests per second per topology (0: saturate)")
    parser.add_argument("--topology", choices=("embedded", "redis", "both"), default="both")
    parser.add_argument("--json", type=Path, help="write every sample and the verdicts here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mg-soak-"))
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "bench/upstream.py", "--port", str(up_port)])  # noqa: ASYNC220
    tops: list[Topology] = []
    redis_stores: dict[str, RedisWalletStore | None] = {}
    failed = False
    try:
        async with Scratch() as scratch:
            await asyncio.sleep(1)
            if args.topology in ("embedded", "both"):
                tops.append(Topology("embedded", f"sqlite:///{workdir / 'embedded.db'}", None, workdir))
            if args.topology in ("redis", "both"):
                tops.append(Topology("redis", await scratch.fresh_database(), scratch.prefix(), workdir))
            for top in tops:
                await start(top, 1 if top.prefix is None else 2, f"http://127.0.0.1:{up_port}")
                if top.prefix is None:
                    redis_stores[top.name] = None
                else:
                    rs = RedisWalletStore(SqlWalletStore(top.database_url), REDIS, prefix=top.prefix,
                                          shards=SHARDS, run_sink=False)
                    await rs.open()
                    redis_stores[top.name] = rs
            started = time.monotonic()
            stop_at = started + args.minutes * 60
            print(f"soak: {args.minutes:g} min, {args.concurrency} workers and {args.rps:g} req/s per topology, "
                  f"samples every {args.sample_s:g} s; {', '.join(t.name for t in tops)}", flush=True)
            await asyncio.gather(*(drive(t, stop_at, args.concurrency, args.rps) for t in tops),
                                 *(sample_forever(t, args.sample_s, started, redis_stores[t.name], stop_at)
                                   for t in tops))
            report: dict[str, Any] = {}
            for top in tops:
                await drained(top, redis_stores[top.name], 120)
                rs = redis_stores[top.name]
                if rs is not None:
                    await rs.close()
                verdicts = slope_verdicts(top.samples)
                problems = await ledger_check(top)
                failed |= bool(problems) or not all(ok for *_, ok in verdicts.values())
                report[top.name] = {"counts": top.counts, "verdicts": verdicts, "ledger": problems,
                                    "samples": top.samples}
                print(f"\n{top.name}: requests {top.counts}")
                print(f"  {'series':<11}{'first':>9}{'last':>9}{'growth':>10}{'allowed':>10}  verdict")
                for series, (growth, allowed, ok) in verdicts.items():
                    first, last = top.samples[len(top.samples) // 5][series], top.samples[-1][series]
                    print(f"  {series:<11}{first:>9.1f}{last:>9.1f}{growth:>10.2f}{allowed:>10.2f}  "
                          f"{'flat' if ok else 'GROWS'}")
                print(f"  ledger: {problems or 'balanced, nothing held, debits = usage'}")
            if args.json:
                args.json.write_text(json.dumps(report, indent=1, default=str))
            for top in tops:
                for p, _ in top.procs:
                    p.terminate()
                for p, _ in top.procs:
                    p.wait(30)
    finally:
        for top in tops:
            for p, _ in top.procs:
                if p.poll() is None:
                    p.kill()
        upstream.terminate()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
