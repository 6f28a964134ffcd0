"""A/B in one run: what the image's allocator (jemalloc, preloaded) costs metergate per request against glibc's.

    uv run python bench/allocator.py             # 5 rounds of 2 s windows per target, unary, c=32
    uv run python bench/allocator.py --stream    # streamed requests
    uv run python bench/allocator.py --quick     # 3 rounds of 0.5 s windows
    uv run python bench/allocator.py --malloc-conf narenas:2   # another MALLOC_CONF than the image's

Two ``python -m metergate serve`` processes of this tree, identical but for their memory environment:
``glibc`` has none, ``image`` has what the Dockerfile's runtime stage sets (``LD_PRELOAD``, ``MALLOC_CONF``:
bench/footprint.py's :func:`image_memory_env`). Only the metergate process gets it; the upstreams and the
pass-throughs of bench/run.py's ``Servers`` run on glibc in both. Rounds interleave the two (bench/ab.py); the
ratios are taken within a round, then the medians reported. Memory itself is bench/footprint.py's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import ab_args, ab_parser, measure_ab, print_medians, print_plan, run_timed  # noqa: E402
from footprint import image_memory_env  # noqa: E402
from run import ROOT, Servers  # noqa: E402 - bench/ is a directory of scripts

TARGETS = ("glibc", "image")


class AllocatorServers(Servers):
    """run.py's servers, the metergate process with ``memory_env`` added to its environment."""

    def __init__(self, *args: object, memory_env: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.memory_env = memory_env

    def _spawn(self, name: str, argv: list[str]) -> None:
        if name != "metergate" or not self.memory_env:
            super()._spawn(name, argv)
            return
        prefix = ["taskset", "-c", self.server_cpus] if self.server_cpus is not None else []
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.memory_env}
        self.procs[name] = subprocess.Popen([*prefix, sys.executable, *argv], cwd=self.tree, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)


async def main_async(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    memory = image_memory_env(ROOT)
    if args.malloc_conf is not None:
        memory["MALLOC_CONF"] = args.malloc_conf
    if not memory:
        print("the Dockerfile sets no memory variables: nothing to compare", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-alloc-"))
    servers = {
        "glibc": AllocatorServers(workdir / "glibc", args.server_cpus, "WARNING", memory_env={}),
        "image": AllocatorServers(workdir / "image", args.server_cpus, "WARNING", memory_env=memory),
    }
    print_plan(args, f"image: {' '.join(f'{k}={v}' for k, v in memory.items())}")
    try:
        cells = await measure_ab(servers, stream=args.stream, concurrency=args.concurrency,
                                 rounds=args.rounds, duration=args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_medians(cells)
    pairs = list(zip(cells["glibc"], cells["image"], strict=True))
    rps = [b.rps / a.rps for a, b in pairs if a.rps]
    cpu = [(b.proxy_cpu_us or 0) / a.proxy_cpu_us for a, b in pairs if a.proxy_cpu_us]
    print(f"\nimage / glibc, per round: req/s {' '.join(f'{r:.2f}' for r in rps)}; "
          f"proxy CPU per request {' '.join(f'{r:.2f}' for r in cpu)}")
    print(f"medians: req/s x{statistics.median(rps):.3f}, proxy CPU per request x{statistics.median(cpu):.3f}")
    errors = sum(c.errors for cs in cells.values() for c in cs)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser(__doc__)
    parser.add_argument("--malloc-conf", help="the image target's MALLOC_CONF instead of the Dockerfile's")
    return run_timed(main_async, ab_args(parser, argv))


if __name__ == "__main__":
    raise SystemExit(main())
