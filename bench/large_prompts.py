"""Load test: do small requests stall while another client sends 4 MB prompts? (security issue item 7)

One client sends a ~4 MB chat prompt in a loop while small-request workers measure latency; the same small
load is measured in the same run without the large client, in interleaved rounds, and the p99 of each
is reported side by side with their ratio. ``--old`` adds a second server whose tokenizer thresholds are
raised to the maximum, which counts every prompt on the event loop as before the fix, for comparison.

The servers (metergate, the fast upstream of bench/upstream.py) run pinned to ``--server-cpus``, this
load generator to ``--client-cpus``; on a shared machine, read ratios, not absolute times.

    uv run python bench/large_prompts.py            # 3 rounds x 2 phases x 5 s, plus --old: about 1.5 min
    uv run python bench/large_prompts.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import CUSTOMER, HEADERS, Servers, fund_customer, payload, percentile  # noqa: E402
from upstream import MODEL  # noqa: E402

LARGE_BYTES = 4_000_000  # just under the default max_body_bytes (4 MiB)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "metergate",
         "meters", "every", "token", "it", "sees"]


def large_payload() -> bytes:
    text, size, i = [], 0, 0
    while size < LARGE_BYTES - 200:
        word = WORDS[i % len(WORDS)] + str(i % 97)
        text.append(word)
        size += len(word) + 1
        i += 1
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": " ".join(text)}],
                       "max_tokens": 16}).encode()


async def small_worker(session: aiohttp.ClientSession, url: str, stop: float, out: list[float],
                       errors: list[int]) -> None:
    body = payload(False)
    while time.monotonic() < stop:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=HEADERS) as r:
            await r.read()
            if r.status != 200:
                errors.append(r.status)
        out.append(time.perf_counter() - started)


async def large_worker(session: aiohttp.ClientSession, url: str, stop: float, sent: list[int]) -> None:
    body = large_payload()
    while time.monotonic() < stop:
        async with session.post(url, data=body, headers=HEADERS) as r:
            await r.read()
            sent.append(r.status)


async def phase(url: str, seconds: float, workers: int, large: bool) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[int] = []
    sent: list[int] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = time.monotonic() + seconds
        tasks = [small_worker(session, url, stop, latencies, errors) for _ in range(workers)]
        if large:
            tasks.append(large_worker(session, url, stop, sent))
        await asyncio.gather(*tasks)
    return {"latencies": latencies, "errors": errors, "large_sent": sent}


async def measure(servers: Servers, rounds: int, seconds: float, workers: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{servers.ports['metergate']}"
    url = f"{base}/openai/v1/chat/completions"
    await servers.wait_ready()
    await fund_customer(base)
    await phase(url, 1.0, workers, large=False)  # warm-up
    pooled: dict[str, list[float]] = {"without": [], "with": []}
    large: list[int] = []
    errors: list[int] = []
    for _ in range(rounds):
        for name in ("without", "with"):  # interleaved: drift on a shared machine hits both alike
            result = await phase(url, seconds, workers, large=name == "with")
            pooled[name] += result["latencies"]
            errors += result["errors"]
            large += result["large_sent"]
    summary: dict[str, Any] = {"errors": errors, "large_requests": len(large),
                               "large_statuses": sorted(set(large))}
    for name, values in pooled.items():
        values.sort()
        summary[name] = {"requests": len(values), "p50_ms": percentile(values, 0.50) * 1000,
                         "p99_ms": percentile(values, 0.99) * 1000}
    summary["p99_ratio"] = summary["with"]["p99_ms"] / summary["without"]["p99_ms"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase and round")
    parser.add_argument("--workers", type=int, default=4, help="concurrent small-request workers")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--old", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure a server that counts every prompt on the event loop")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    configs = {"bounded (this build)": {}}
    if args.old:
        configs["on the loop (before)"] = {"tokenizer_inline_max_bytes": 256 * 1024 * 1024,
                                           "tokenizer_exact_max_bytes": 256 * 1024 * 1024}
    results: dict[str, Any] = {}
    for label, settings in configs.items():
        with tempfile.TemporaryDirectory(prefix="mg-large-") as tmp:
            servers = Servers(Path(tmp), args.server_cpus, "WARNING", {**settings, "max_body_bytes": 4 * 1024 * 1024})
            servers.start()
            try:
                results[label] = asyncio.run(measure(servers, args.rounds, args.duration, args.workers))
            finally:
                servers.stop()
    print(f"small requests ({args.workers} workers, customer {CUSTOMER}) beside one client sending "
          f"{LARGE_BYTES / 1e6:.0f} MB prompts in a loop; server on CPU {args.server_cpus}, client on "
          f"{args.client_cpus}; {args.rounds} interleaved rounds of {args.duration:g} s per phase")
    print(f"{'server':<22} {'large client':<13} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8}")
    failed = False
    for label, r in results.items():
        for name in ("without", "with"):
            row = r[name]
            print(f"{label:<22} {name:<13} {row['requests']:>9} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}")
        print(f"{'':<22} p99 with / without: {r['p99_ratio']:.2f}x; large requests sent: {r['large_requests']} "
              f"(statuses {r['large_statuses']})")
        failed = failed or bool(r["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
