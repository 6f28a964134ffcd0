"""Two ``metergate serve`` setups measured against each other in the same run: the rounds shared by the A/B
benchmarks (bench/ratelimits.py, bench/tracing.py). Each setup is started, funded and warmed up; then each
round measures both, alternating which goes first, so that drift on the machine hits both sides alike."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from run import Cell, Servers, fund_customer, run_cell  # bench/ is a directory of scripts


async def measure_ab(servers: dict[str, Servers], *, stream: bool, concurrency: int, rounds: int,
                     duration: float) -> dict[str, list[Cell]]:
    """Every round's cell per setup (the dict's order is the first round's order). Stops the servers."""
    names = tuple(servers)
    cells: dict[str, list[Cell]] = {name: [] for name in names}
    try:
        for s in servers.values():
            s.workdir.mkdir()
            s.start()
        for s in servers.values():
            await s.wait_ready()
        urls: dict[str, str] = {}
        for name, s in servers.items():
            base = f"http://127.0.0.1:{s.ports['metergate']}"
            await fund_customer(base)
            urls[name] = f"{base}/openai/v1/chat/completions"
            warm = Cell("metergate", stream, 4, -1)
            await run_cell(urls[name], warm, 0.0, 0.5, {})  # imports, tokenizer, first SQLite pages
            if warm.errors:
                raise RuntimeError(f"{name} failed during warm-up: {warm.error_samples}")
        for rnd in range(rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                s = servers[name]
                cell = Cell("metergate", stream, concurrency, rnd)
                pids: dict[str, Any] = {"upstream": s.pid("upstream"), "proxy": s.pid("metergate")}
                await run_cell(urls[name], cell, 0.4, duration, pids,
                               [p for srv in servers.values() for p in srv.procs_pids()])
                cells[name].append(cell)
                if cell.errors:
                    print(f"  ! {name}: {cell.errors} errors, e.g. {cell.error_samples}", file=sys.stderr)
            print(f"  round {rnd + 1}/{rounds} done", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return cells


def print_plan(args: argparse.Namespace, *lines: str) -> None:
    """The run's header: the machine, the pinning, ``lines`` about the setups, the rounds planned."""
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; servers pinned to CPU "
          f"{args.server_cpus}, load generator to CPU {args.client_cpus}\n" + "".join(f"{line}\n" for line in lines)
          + f"plan: {args.rounds} rounds x 2 targets, {'stream' if args.stream else 'unary'}, c={args.concurrency}, "
          f"0.4 s warm-up + {args.duration:g} s window each", flush=True)


def print_medians(cells: dict[str, list[Cell]]) -> None:
    """Each setup's medians over the rounds: req/s, CPU per request (the proxy's, its ledger threads'), p50, and
    the share of the machine other processes took."""
    width = max(8, *(len(name) for name in cells))
    print(f"\n{'target':<{width}} {'req/s':>8} {'proxy us/req':>13} {'ledger us/req':>14} {'p50 ms':>7} {'other':>6}")
    for name, cs in cells.items():
        print(f"{name:<{width}} {statistics.median(c.rps for c in cs):>8.0f} "
              f"{statistics.median(c.proxy_cpu_us or 0 for c in cs):>13.0f} "
              f"{statistics.median(c.writer_cpu_us or 0 for c in cs):>14.0f} "
              f"{statistics.median(c.p50_ms for c in cs):>7.2f} "
              f"{statistics.median(c.other_cpu_pct for c in cs):>5.0f}%")


def ab_parser(doc: str) -> argparse.ArgumentParser:
    """The options every A/B benchmark takes; a script adds its own before :func:`ab_args`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.5 s windows")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument("--duration", type=float, help="measurement window per target and round, seconds "
                                                       "(default 2; --quick 0.5)")
    parser.add_argument("--concurrency", type=int, default=32, help="workers (default 32)")
    parser.add_argument("--stream", action="store_true", help="streaming requests instead of unary")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    return parser


def ab_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.duration = args.duration or (0.5 if args.quick else 2.0)
    if not (1 <= args.rounds <= 50 and 0.1 <= args.duration <= 60 and 1 <= args.concurrency <= 512):
        parser.error("--rounds 1-50, --duration 0.1-60 s, --concurrency 1-512")
    return args


def run_timed(main_async: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace) -> int:
    """Run a benchmark's main and print its wall time; its exit code."""
    started = time.monotonic()
    code = asyncio.run(main_async(args))
    print(f"total wall time {time.monotonic() - started:.0f}s")
    return code
