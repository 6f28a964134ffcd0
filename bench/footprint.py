"""What a metergate process costs in memory and start-up, before and after, in one run.

    uv run python bench/footprint.py                 # baseline: main, checked out into a temp worktree
    uv run python bench/footprint.py --baseline REF  # any commit; --repeat N runs per cell (default 3)
    uv run python bench/footprint.py --source        # without bytecode: every import compiles its source

By default the servers run with bytecode, as in the image (``UV_COMPILE_BYTECODE=1`` compiles every module at
build time): ``PYTHONPYCACHEPREFIX`` names a cache in the temp dir and one unmeasured run per variant fills it.
Without bytecode (``--source``, and any environment with ``PYTHONDONTWRITEBYTECODE=1`` and no ``.pyc`` files,
this machine's included) the first request also pays for compiling genai-prices' 1.6 MB price table, a
transient of about 40 MB on the heap.

For each variant (``before``: ``REF`` checked out with ``git worktree add --detach`` into a temp dir; ``after``:
this tree) and each role (``sidecar``, ``all``), the real ``python -m metergate serve`` is started with the same
settings, the same interpreter and the same dependencies, on a fresh SQLite database funded beforehand, in front
of metergate's mock upstream (metergate/demo/mock_upstream.py, its own process). Measured, from
``/proc/<pid>/status``:

* **start-up**: wall time from spawning the process to the first 200 from ``/readyz``. It depends on the load
  the machine carries (other work on a shared machine slows it; RSS does not move with load);
* **idle RSS** (``VmRSS``) two seconds after ready;
* **streams RSS**: the highest VmRSS sampled while 64 streaming ``gpt-4o-mini`` chat completions are in flight
  at once (the upstream waits between chunks, so all 64 are open together), then **after**: VmRSS when they have
  ended; ``+gpt-4``: VmRSS after one more request by a cl100k_base model (both encodings in memory);
* **peak** (``VmHWM``): the highest RSS of the process's life, start-up included.

Each variant runs with the allocator environment its own tree's image sets (:func:`image_memory_env`: the
runtime stage's ``LD_PRELOAD``, ``MALLOC_*`` and ``PYTHONMALLOC`` in that tree's Dockerfile), since the image is
what runs in a pod: a baseline whose image sets none runs on glibc's malloc. ``--allocator glibc`` runs both
without (the library is preloaded only where this machine has it; the report names what each variant ran with).

Cells are interleaved (before, after, before, ...) so that drift on the machine hits both alike; each figure is
the median over ``--repeat`` runs, and ``after/before`` is the ratio of those medians. A second table measures
one tiktoken encoding alone in a fresh interpreter: as tiktoken loads it (``tiktoken.get_encoding``) and as
metergate does (its Python ranks dropped, freed heap trimmed).
Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("sidecar", "all")
CUSTOMER = "bench"
MODEL, CL100K_MODEL = "gpt-4o-mini", "gpt-4"
HEADERS = {"X-Metergate-Customer": CUSTOMER, "X-Metergate-Mode": "test",
           # 20 words, 40 ms apart: each stream stays open about 0.8 s, so all of them are in flight together.
           "X-Mock-Behavior": "words:20,chunk-delay:0.04"}
READY_TIMEOUT_S = 120
SETTLE_S = 2.0
# The variables of an image's runtime stage that decide how the process allocates memory.
MEMORY_ENV = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "PYTHONMALLOC")


def image_memory_env(tree: Path) -> dict[str, str]:
    """The memory variables (:data:`MEMORY_ENV`) that ``tree``'s Dockerfile sets in its last (runtime) stage,
    so that a benchmark runs the server as the image would; none when the tree has no Dockerfile."""
    dockerfile = tree / "Dockerfile"
    if not dockerfile.exists():
        return {}
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    runtime = joined.split("\nFROM ")[-1]
    found: dict[str, str] = {}
    for line in runtime.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                if key in MEMORY_ENV:
                    found[key] = value
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def mib(kib: float) -> float:
    return kib / 1024


@dataclass
class Cell:
    variant: str
    role: str
    startup_s: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)
    streams: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    both: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)


@contextlib.contextmanager
def baseline_tree(ref: str, workdir: Path) -> Iterator[Path]:
    """``ref`` checked out (detached) into a temp worktree, removed afterwards; the repository is not touched."""
    path = workdir / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), ref], cwd=ROOT, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


def seed(database: Path) -> None:
    """Create the schema and fund the customer with this tree's store (both variants share the schema)."""
    from metergate.wallet.sql import SqlWalletStore

    async def run() -> None:
        store = SqlWalletStore(f"sqlite:///{database}")
        await store.open()
        await store.create_customer("test", CUSTOMER, "Bench")
        await store.credit("test", CUSTOMER, "USD", 10**12, idempotency_key="seed")
        await store.close()

    asyncio.run(run())


async def wait_ready(proc: subprocess.Popen[bytes], url: str, started: float) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return time.monotonic() - started
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"serve not ready in {READY_TIMEOUT_S}s")
            await asyncio.sleep(0.01)


async def stream_load(url: str, pid: int, streams: int, model: str = MODEL) -> float:
    """``streams`` streaming chat completions at once; the highest VmRSS sampled while they run, in KiB."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say something about prepaid wallets."}],
            "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}
    highest = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one() -> None:
            async with session.post(f"{url}/openai/v1/chat/completions", json=body, headers=HEADERS) as r:
                data = await r.read()
                if r.status != 200 or not data.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"stream failed: {r.status} {data[-200:]!r}")

        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        while not all(t.done() for t in tasks):
            highest = max(highest, status_kib(pid, "VmRSS"))
            await asyncio.sleep(0.02)
        for t in tasks:
            t.result()
    return highest


def run_cell(cell: Cell, tree: Path, upstream: str, workdir: Path, streams: int,
             env_extra: dict[str, str] | None = None) -> None:
    database = workdir / f"{cell.variant}-{cell.role}-{len(cell.idle)}.db"
    seed(database)
    port = free_port()
    config = workdir / f"{cell.variant}-{cell.role}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "host": "127.0.0.1", "port": port, "database_url": f"sqlite:///{database}", "role": cell.role,
        "routes": [{"prefix": "/openai", "upstream": upstream, "api_key": "sk-bench-provider-key"}],
        "pricing": {"asset": "USD", "models": {"*": {"input_per_mtok": "1", "output_per_mtok": "2"}}},
        "admin_keys": ["mg_test_" + "b" * 24], "portal_secrets": {"k1": secrets.token_urlsafe(32)}}))
    # `-m metergate` imports from the working directory first: the baseline tree runs its own code.
    env = {**os.environ, "PYTHONPATH": str(tree), **(env_extra or {})}
    if "PYTHONPYCACHEPREFIX" in env:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    log = open(workdir / f"{cell.variant}-{cell.role}.log", "ab")  # noqa: SIM115 - closed below
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config),
                             "--log-level", "WARNING"], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    async def measure() -> None:
        cell.startup_s.append(await wait_ready(proc, url, started))
        await asyncio.sleep(SETTLE_S)
        cell.idle.append(mib(status_kib(proc.pid, "VmRSS")))
        cell.streams.append(mib(await stream_load(url, proc.pid, streams)))
        await asyncio.sleep(SETTLE_S / 2)
        cell.after.append(mib(status_kib(proc.pid, "VmRSS")))
        await stream_load(url, proc.pid, 1, CL100K_MODEL)
        await asyncio.sleep(SETTLE_S / 2)
        cell.both.append(mib(status_kib(proc.pid, "VmRSS")))
        cell.peak.append(mib(status_kib(proc.pid, "VmHWM")))

    try:
        asyncio.run(measure())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_ENCODING_PROBE = """
import sys
from pathlib import Path
def rss():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1])
import tiktoken
from metergate.metering import tokenizer
tokenizer.seed_cache()
before = rss()
if sys.argv[1] == "tiktoken":
    import os
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tokenizer.cache_dir())
    tiktoken.get_encoding(sys.argv[2])
else:
    tokenizer._encoding(sys.argv[2])
print(rss() - before)
"""


def encoding_costs(env_extra: dict[str, str]) -> dict[tuple[str, str], float]:
    """RSS an encoding adds to a fresh interpreter (MiB), loaded by tiktoken alone or by metergate, with this
    tree's allocator (``env_extra``)."""
    out = {}
    env = {**os.environ, **{k: v for k, v in env_extra.items() if k in MEMORY_ENV}}
    for name in ("o200k_base", "cl100k_base"):
        for how in ("tiktoken", "metergate"):
            kib = subprocess.run([sys.executable, "-c", _ENCODING_PROBE, how, name], cwd=ROOT, check=True,
                                 capture_output=True, text=True, env=env).stdout.split()[-1]
            out[(name, how)] = mib(int(kib))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="commit to compare with (default main)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per (variant, role) cell")
    parser.add_argument("--streams", type=int, default=64, help="streams in flight at once")
    parser.add_argument("--roles", nargs="+", default=list(ROLES), choices=ROLES)
    parser.add_argument("--source", action="store_true", help="run without bytecode (see above)")
    parser.add_argument("--allocator", choices=("image", "glibc"), default="image",
                        help="image: each variant with its Dockerfile's memory variables (default); glibc: none")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    print(f"footprint: before = {args.baseline} ({commit}), after = this tree; {args.repeat} runs per cell, "
          f"{args.streams} streams; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (start-up time moves with load, RSS does not); "
          f"{'no bytecode (every import compiles)' if args.source else 'with bytecode, as in the image'}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="mg-footprint-") as tmp:
        workdir = Path(tmp)
        up_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-c", "import sys; from aiohttp import web; "
             "from metergate.demo.mock_upstream import build_mock_upstream; "
             "web.run_app(build_mock_upstream(), host='127.0.0.1', port=int(sys.argv[1]), print=None, "
             "access_log=None)", str(up_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with baseline_tree(args.baseline, workdir) as base:
                trees = {"before": base, "after": ROOT}
                cells = {(v, r): Cell(v, r) for r in args.roles for v in trees}
                bytecode = ({"PYTHONDONTWRITEBYTECODE": "1"} if args.source
                            else {"PYTHONPYCACHEPREFIX": str(workdir / "pycache")})
                env_extra = {v: {**bytecode, **(image_memory_env(t) if args.allocator == "image" else {})}
                             for v, t in trees.items()}
                for variant in trees:
                    memory = {k: v for k, v in env_extra[variant].items() if k in MEMORY_ENV}
                    print(f"  {variant}: {' '.join(f'{k}={v}' for k, v in memory.items()) or 'glibc malloc'}")
                if not args.source:
                    for variant, tree in trees.items():  # every module either role imports, compiled once
                        run_cell(Cell(f"warm-{variant}", "all"), tree, f"http://127.0.0.1:{up_port}", workdir,
                                 args.streams, env_extra[variant])
                    print("  bytecode compiled (one unmeasured run per variant)", flush=True)
                for i in range(args.repeat):
                    order = list(trees) if i % 2 == 0 else list(reversed(trees))
                    for role in args.roles:
                        for variant in order:
                            run_cell(cells[(variant, role)], trees[variant], f"http://127.0.0.1:{up_port}",
                                     workdir, args.streams, env_extra[variant])
                            print(f"  run {i + 1}/{args.repeat} {variant:6s} {role:7s} done", flush=True)
            costs = encoding_costs(env_extra["after"])
        finally:
            upstream.send_signal(signal.SIGTERM)
            upstream.wait(timeout=10)
    print_table(cells, args.roles, args.streams)
    print("\none encoding alone, RSS it adds to a fresh interpreter (MiB):")
    print(f"{'encoding':12s} {'tiktoken':>9s} {'metergate':>10s} {'ratio':>6s}")
    for name in ("o200k_base", "cl100k_base"):
        t, m = costs[(name, "tiktoken")], costs[(name, "metergate")]
        print(f"{name:12s} {t:9.1f} {m:10.1f} {m / t:6.2f}")
    return 0


def print_table(cells: dict[tuple[str, str], Cell], roles: list[str], streams: int) -> None:
    columns = [("start-up s", "startup_s", "{:.2f}"), ("idle MiB", "idle", "{:.0f}"),
               (f"{streams} streams", "streams", "{:.0f}"), ("after", "after", "{:.0f}"),
               ("+gpt-4", "both", "{:.0f}"), ("peak", "peak", "{:.0f}")]
    print(f"\n{'role':8s} {'variant':13s}" + "".join(f"{c[0]:>12s}" for c in columns))
    for role in roles:
        before, after = cells[("before", role)], cells[("after", role)]
        for name, cell in (("before", before), ("after", after)):
            print(f"{role:8s} {name:13s}" + "".join(
                f"{fmt.format(statistics.median(getattr(cell, attr))):>12s}" for _, attr, fmt in columns))
        print(f"{role:8s} {'after/before':13s}" + "".join(
            f"{statistics.median(getattr(after, attr)) / statistics.median(getattr(before, attr)):>12.2f}"
            for _, attr, _ in columns))


if __name__ == "__main__":
    raise SystemExit(main())
