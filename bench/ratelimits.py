"""A/B in one run: what rate limits cost metergate per request (req/s and CPU per request, with and without).

    uv run python bench/ratelimits.py            # 5 rounds of 2 s windows per target, about a minute
    uv run python bench/ratelimits.py --quick    # 3 rounds of 0.5 s windows

Why: the wallet-engine issue measured that the README's example ``rate_limits`` halved serve's throughput
(each request upserted its window rows in SQL). Two ``python -m metergate serve`` processes, identical but
for ``rate_limits``: ``plain`` has none, ``limited`` has the README's example shape with limits far above the
load (``--limits`` to change them), so that nothing is refused and the difference is the cost of counting.
Each has its own upstream (bench/upstream.py) and SQLite ledger (servers started by run.py's ``Servers``);
all servers are pinned to CPU 0 and this load generator to CPU 1. Rounds interleave the two targets,
alternating which goes first; the ratios are taken within a round, then the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import ab_args, ab_parser, measure_ab, print_medians, print_plan, run_timed  # noqa: E402
from run import Servers  # noqa: E402 - bench/ is a directory of scripts

README_SHAPED_LIMITS: dict[str, Any] = {"customer": {"requests_per_minute": 10**9, "tokens_per_minute": 10**13},
                                        "api_key": {"requests_per_minute": 10**9}}
TARGETS = ("plain", "limited")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ab_parser(__doc__)
    parser.add_argument("--limits", type=json.loads, default=README_SHAPED_LIMITS,
                        help="the limited target's rate_limits, JSON (default: README-shaped, far above the load)")
    return ab_args(parser, argv)


async def main_async(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-rl-"))
    servers = {
        "plain": Servers(workdir / "plain", args.server_cpus, "WARNING"),
        "limited": Servers(workdir / "limited", args.server_cpus, "WARNING", {"rate_limits": args.limits}),
    }
    print_plan(args, f"limited: rate_limits={json.dumps(args.limits)}")
    try:
        cells = await measure_ab(servers, stream=args.stream, concurrency=args.concurrency,
                                 rounds=args.rounds, duration=args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_medians(cells)
    pairs = list(zip(cells["plain"], cells["limited"], strict=True))
    rps = statistics.median(b.rps / a.rps for a, b in pairs if a.rps)
    cpu = statistics.median((b.proxy_cpu_us or 0) / a.proxy_cpu_us for a, b in pairs if a.proxy_cpu_us)
    print(f"\nlimited / plain, per round, median: req/s x{rps:.2f}, proxy CPU per request x{cpu:.2f}")
    errors = sum(c.errors for cs in cells.values() for c in cs)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    return run_timed(main_async, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
