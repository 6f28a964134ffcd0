"""A/B in one run: what tracing costs metergate per request (req/s and CPU per request, off and on).

    uv run python bench/tracing.py            # 5 rounds of 2 s windows per target, about a minute
    uv run python bench/tracing.py --quick    # 3 rounds of 0.5 s windows

Two ``python -m metergate serve`` processes, identical but for ``tracing``: ``off`` (the default) and ``otlp``,
exporting every span over OTLP/HTTP (batched, the SDK's defaults) to a sink in this process that answers 200
and counts the bytes. Each has its own upstream (bench/upstream.py) and SQLite ledger (run.py's ``Servers``);
all servers are pinned to CPU 0 and this load generator to CPU 1. Rounds interleave the two targets,
alternating which goes first; the ratios are taken within a round, then the medians are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import ab_args, ab_parser, measure_ab, print_medians, print_plan, run_timed  # noqa: E402
from aiohttp import web  # noqa: E402
from run import Servers  # noqa: E402 - bench/ is a directory of scripts

TARGETS = ("off", "otlp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ab_parser(__doc__)
    return ab_args(parser, argv)


async def main_async(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-otel-"))
    received = {"requests": 0, "bytes": 0}

    async def sink(request: web.Request) -> web.Response:
        received["requests"] += 1
        received["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    sink_app = web.Application()
    sink_app.router.add_post("/v1/traces", sink)
    sink_runner = web.AppRunner(sink_app, access_log=None)
    await sink_runner.setup()
    site = web.TCPSite(sink_runner, "127.0.0.1", 0)
    await site.start()
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{sink_runner.addresses[0][1]}/v1/traces"
    servers = {
        "off": Servers(workdir / "off", args.server_cpus, "WARNING", {"tracing": "off"}),
        "otlp": Servers(workdir / "otlp", args.server_cpus, "WARNING", {"tracing": "otlp"}),
    }
    print_plan(args, "otlp: spans exported to a sink on the load generator's CPU")
    try:
        cells = await measure_ab(servers, stream=args.stream, concurrency=args.concurrency,
                                 rounds=args.rounds, duration=args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        await sink_runner.cleanup()

    print_medians(cells)
    print(f"\nOTLP sink: {received['requests']} export requests, {received['bytes']} bytes")
    pairs = list(zip(cells["off"], cells["otlp"], strict=True))
    rps = statistics.median(b.rps / a.rps for a, b in pairs if a.rps)
    cpu = statistics.median((b.proxy_cpu_us or 0) / a.proxy_cpu_us for a, b in pairs if a.proxy_cpu_us)
    print(f"\notlp / off, per round, median: req/s x{rps:.2f}, proxy CPU per request x{cpu:.2f}")
    errors = sum(c.errors for cs in cells.values() for c in cs)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    return run_timed(main_async, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
