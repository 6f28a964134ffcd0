"""This checkout's ``metergate serve`` against another checkout's (a baseline), side by side in one run.

    git worktree add --detach /tmp/baseline main
    uv run python bench/trees.py --baseline /tmp/baseline              # unary, c=32
    uv run python bench/trees.py --baseline /tmp/baseline --stream -c 1

Each tree's server runs with this checkout's interpreter and libraries and its own ``metergate`` package (its
working directory comes first on the import path), with the SQLite ledger and the configuration of
bench/run.py. The rounds alternate which tree goes first (bench/ab.py); printed are the per-round req/s and
CPU per request of each, and the medians of the per-round ratios (this tree over the baseline).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from ab import ab_args, ab_parser, measure_ab, run_timed  # bench/ is a directory of scripts
from run import ROOT, Servers


async def main_async(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-trees-"))
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    servers = {name: Servers(workdir / name, args.server_cpus, "WARNING", tree=tree) for name, tree in trees.items()}
    try:
        cells = await measure_ab(servers, stream=args.stream, concurrency=args.concurrency, rounds=args.rounds,
                                 duration=args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, tree in trees.items():
        cs = cells[name]
        print(f"{name:<9} {tree}\n          req/s {[round(c.rps) for c in cs]}\n"
              f"          CPU us/req {[round(c.proxy_cpu_us or 0) for c in cs]} (ledger thread median "
              f"{statistics.median(c.writer_cpu_us or 0 for c in cs):.0f})")
    pairs = list(zip(cells["this"], cells["baseline"], strict=True))
    rps = statistics.median(a.rps / b.rps for a, b in pairs if b.rps)
    cpu = statistics.median((a.proxy_cpu_us or 0) / (b.proxy_cpu_us or 1) for a, b in pairs)
    print(f"this / baseline: req/s x{rps:.3f}, CPU per request x{cpu:.3f} "
          f"({'stream' if args.stream else 'unary'}, c={args.concurrency})")
    errors = sum(c.errors for cs in cells.values() for c in cs)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser(__doc__ or "")
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a worktree of main)")
    args = ab_args(parser, argv)
    if not (args.baseline / "metergate" / "__init__.py").is_file():
        parser.error(f"{args.baseline} is not a metergate checkout")
    return run_timed(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
