"""metergate benchmark: direct vs bare pass-through proxy vs metergate, in one run.

    uv run python bench/run.py            # default run, about 2.5 minutes
    uv run python bench/run.py --quick    # smoke run, under 40 seconds

Three targets are measured in the same run, interleaved round by round so that drift on the machine
hits all three alike:

* ``direct``       the fixed-response upstream (bench/upstream.py) itself;
* ``passthrough``  a bare aiohttp proxy (bench/passthrough.py) in front of it;
* ``metergate``    ``python -m metergate serve`` with metering and the SQLite ledger on (temp database,
                   one customer funded for the whole run, identified by the trusted customer header).

For each target: non-streaming and streaming chat completions, at concurrency 1 and 32. Each server
is its own process; by default all servers are pinned to CPU 0 and this load generator to CPU 1
(``taskset``/``sched_setaffinity``). The load generator is one aiohttp ClientSession with a fixed
number of workers; each cell runs a warm-up, then a fixed measurement window, every loop bounded by
time and count. Per-round numbers are reduced to medians; ratios and added latencies are computed
within a round first (metergate vs the pass-through / direct measured minutes apart would compare noise).
Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from upstream import COMPLETION_TOKENS, MODEL, PROMPT_TOKENS  # noqa: E402

from metergate.wallet.execution import WRITER_THREAD  # noqa: E402 - the name the ledger's thread has in /proc

TARGETS = ("direct", "passthrough", "metergate")
ADMIN_KEY = "mg_test_" + "b" * 24
CUSTOMER = "bench"
FUNDS = 10**12  # micro-dollars: a million dollars, far more than any run can spend
# Integer micro-dollar price per request for the canned usage, so the ledger check is exact.
INPUT_PER_MTOK, OUTPUT_PER_MTOK = 1, 2
PRICE_PER_REQUEST = PROMPT_TOKENS * INPUT_PER_MTOK + COMPLETION_TOKENS * OUTPUT_PER_MTOK
MAX_REQUESTS_PER_WORKER = 200_000  # a count bound on every worker loop, beside the time bound
MAX_ERRORS_PER_CELL = 200

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a metering benchmark."},
    {"role": "user", "content": "Explain in two sentences why prepaid wallets help an API business "
                                "control risk, and how real-time metering of tokens makes them practical."},
]
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-app-does-not-hold-the-key",
           "X-Metergate-Customer": CUSTOMER, "X-Metergate-Mode": "test"}


def payload(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Servers:
    """The three server processes, started pinned, stopped by their own pids."""

    def __init__(self, workdir: Path, server_cpus: str | None, metergate_log_level: str,
                 metergate_settings: dict[str, Any] | None = None, passthrough_loop: str = "uvloop",
                 tree: Path = ROOT) -> None:
        self.workdir = workdir
        self.tree = tree  # the checkout whose metergate `-m metergate` runs (its working directory)
        self.passthrough_loop = passthrough_loop
        self.extra = metergate_settings or {}
        self.server_cpus = server_cpus
        self.log_level = metergate_log_level
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in ("upstream", "passthrough", "metergate")}
        self.db_path = workdir / "ledger.db"

    def _spawn(self, name: str, argv: list[str]) -> None:
        prefix = ["taskset", "-c", self.server_cpus] if self.server_cpus is not None else []
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen([*prefix, sys.executable, *argv], cwd=self.tree, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)

    def start(self) -> None:
        up = f"http://127.0.0.1:{self.ports['upstream']}"
        self._spawn("upstream", [str(HERE / "upstream.py"), "--port", str(self.ports["upstream"])])
        self._spawn("passthrough", [str(HERE / "passthrough.py"), "--port", str(self.ports["passthrough"]),
                                    "--upstream", up, "--loop", self.passthrough_loop])
        config = {
            "host": "127.0.0.1", "port": self.ports["metergate"],
            "database_url": f"sqlite+aiosqlite:///{self.db_path}",
            "routes": [{"prefix": "/openai", "upstream": up, "api_key": "sk-bench-provider-key"}],
            "pricing": {"asset": "USD", "models": {MODEL: {"input_per_mtok": str(INPUT_PER_MTOK),
                                                           "output_per_mtok": str(OUTPUT_PER_MTOK)}}},
            "admin_keys": [ADMIN_KEY],
            "portal_secrets": {"k1": secrets.token_urlsafe(32)},
            **self.extra,
        }
        cfg = self.workdir / "metergate.yaml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self._spawn("metergate", ["-m", "metergate", "serve", "--config", str(cfg),
                                  "--log-level", self.log_level])

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def procs_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    async def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for name, port in self.ports.items():
                path = "/livez" if name == "metergate" else "/"
                while True:
                    proc = self.procs[name]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                           f"{self.workdir / (name + '.log')}:\n{self.log_tail(name)}")
                    try:
                        async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                            await r.read()
                            if name != "metergate" or r.status == 200:
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not become ready in {timeout_s:.0f}s")
                    await asyncio.sleep(0.1)

    def log_tail(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # aiohttp's run_app shuts down cleanly on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _stat_seconds(stat: Path) -> float:
    """utime + stime from a /proc ``stat`` file (a process's: all its threads; a task's: that thread)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads), from /proc; 0 where /proc is unavailable."""
    try:
        return _stat_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0


def thread_cpu_seconds(pid: int, name: str) -> float:
    """CPU time of the process's threads that the kernel knows by ``name`` (see
    metergate.observability.threads); 0 when there is none or /proc is unavailable."""
    total = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            if (task / "comm").read_text().strip() == name:
                total += _stat_seconds(task / "stat")
    return total


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all CPUs, all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------- load


@dataclass
class Cell:
    target: str
    stream: bool
    concurrency: int
    round: int
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    proxy_cpu_us: float | None = None  # proxy process CPU per request (passthrough / metergate)
    writer_cpu_us: float | None = None  # of which metergate's SQLite writer thread (the ledger)
    upstream_cpu_us: float = 0.0
    gen_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0  # CPU used by everything else on the machine during the window
    error_samples: list[str] = field(default_factory=list)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def run_cell(url: str, cell: Cell, warmup_s: float, duration_s: float,
                   cpu_pids: dict[str, int], all_pids: list[int] | None = None) -> int:
    """Drive ``url`` with ``cell.concurrency`` workers; fill ``cell``; return every successful request."""
    body = payload(cell.stream)
    latencies: list[float] = []
    completed_in_window = 0
    ok_total = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    snapshot: dict[str, float] = {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal completed_in_window, ok_total
        for _ in range(MAX_REQUESTS_PER_WORKER):
            t0 = time.perf_counter()
            if t0 >= t_end or cell.errors >= MAX_ERRORS_PER_CELL:
                return
            try:
                async with session.post(url, data=body, headers=HEADERS) as r:
                    data = await r.read()
                    ok = r.status == 200 and (data.endswith(b"data: [DONE]\n\n") if cell.stream
                                              else data.endswith(b"}"))
                    if not ok and len(cell.error_samples) < 3:
                        cell.error_samples.append(f"HTTP {r.status}: {data[:200]!r}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                if len(cell.error_samples) < 3:
                    cell.error_samples.append(repr(exc))
            t1 = time.perf_counter()
            if not ok:
                cell.errors += 1
                await asyncio.sleep(0.01)
                continue
            ok_total += 1
            if t_measure <= t1 <= t_end:  # completed inside the window: counted and sampled
                completed_in_window += 1
                latencies.append(t1 - t0)

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        ours = [os.getpid(), *(all_pids or [])]
        snapshot.update({name: cpu_seconds(pid) for name, pid in cpu_pids.items()},
                        writer=thread_cpu_seconds(cpu_pids["proxy"], WRITER_THREAD) if "proxy" in cpu_pids else 0.0,
                        gen=time.process_time(), t=time.perf_counter(),
                        others=machine_busy_seconds() - sum(cpu_seconds(p) for p in ours))
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        now = time.perf_counter()
        for name, pid in cpu_pids.items():
            snapshot[name] = cpu_seconds(pid) - snapshot[name]
        if "proxy" in cpu_pids:
            snapshot["writer"] = thread_cpu_seconds(cpu_pids["proxy"], WRITER_THREAD) - snapshot["writer"]
        snapshot["gen"] = time.process_time() - snapshot["gen"]
        snapshot["others"] = machine_busy_seconds() - sum(cpu_seconds(p) for p in ours) - snapshot["others"]
        snapshot["t"] = now - snapshot["t"]

    connector = aiohttp.TCPConnector(limit=cell.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30),
                                     skip_auto_headers=("User-Agent",)) as session:
        await asyncio.gather(sampler(), *(worker(session) for _ in range(cell.concurrency)))

    latencies.sort()
    cell.requests = completed_in_window
    cell.rps = completed_in_window / duration_s
    cell.p50_ms = percentile(latencies, 0.50) * 1000
    cell.p99_ms = percentile(latencies, 0.99) * 1000
    if completed_in_window:
        per_req = 1e6 / completed_in_window
        cell.upstream_cpu_us = snapshot.get("upstream", 0.0) * per_req
        if "proxy" in snapshot:
            cell.proxy_cpu_us = snapshot["proxy"] * per_req
            if cell.target == "metergate":
                cell.writer_cpu_us = snapshot["writer"] * per_req
    window = max(snapshot.get("t", duration_s), 1e-9)
    cell.gen_cpu_pct = 100 * snapshot.get("gen", 0.0) / window
    cell.other_cpu_pct = max(0.0, 100 * snapshot.get("others", 0.0) / window)
    return ok_total


# ---------------------------------------------------------------------------------------- metergate admin


async def admin(session: aiohttp.ClientSession, base: str, method: str, path: str,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with session.request(method, f"{base}/admin/v1{path}", json=body,
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        data: dict[str, Any] = await r.json()
        if r.status >= 300:
            raise RuntimeError(f"admin {method} {path}: HTTP {r.status} {data}")
        return data


async def fund_customer(base: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await admin(session, base, "POST", "/customers", {"id": CUSTOMER, "name": "Bench"})
        await admin(session, base, "POST", f"/customers/{CUSTOMER}/credits",
                    {"amount": FUNDS, "idempotency_key": "bench-seed"})


async def ledger_balance(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        data = await admin(session, base, "GET", f"/customers/{CUSTOMER}/balance")
        return dict(data["balances"][0])


# ---------------------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def fmt(value: float | None, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def paired(rs: list[Cell], base: list[Cell], fn: Any) -> float:
    """Median over rounds of ``fn(cell, baseline cell of the same round)``."""
    return med([fn(c, x) for c, x in zip(rs, base, strict=True)])


def report(cells: list[Cell], stream_modes: list[bool], concurrencies: list[int],
           rounds: int) -> tuple[str, dict[str, Any]]:
    by = {(c.target, c.stream, c.concurrency, c.round): c for c in cells}
    lines: list[str] = []
    summary: dict[str, Any] = {}
    head = (f"{'target':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}"
            f"{'x pass':>8}{'x direct':>9}{'proxy us/req':>13}{'ledger':>8}{'upstr us/req':>13}{'gen CPU':>8}"
            f"{'other':>7}"
            f"{'err':>5}")
    for stream in stream_modes:
        for conc in concurrencies:
            lines.append(f"\n{'streaming' if stream else 'non-streaming'} chat completions, concurrency {conc}")
            lines.append(head)
            lines.append("-" * len(head))
            for target in TARGETS:
                rs = [by[(target, stream, conc, r)] for r in range(rounds)]
                d = [by[("direct", stream, conc, r)] for r in range(rounds)]
                p = [by[("passthrough", stream, conc, r)] for r in range(rounds)]
                proxied = target != "direct"
                row: dict[str, Any] = {
                    "rps": med([c.rps for c in rs]), "p50_ms": med([c.p50_ms for c in rs]),
                    "p99_ms": med([c.p99_ms for c in rs]),
                    "added_p50_ms": paired(rs, d, lambda c, x: c.p50_ms - x.p50_ms) if proxied else None,
                    "added_p99_ms": paired(rs, d, lambda c, x: c.p99_ms - x.p99_ms) if proxied else None,
                    "ratio_vs_passthrough": paired(rs, p, lambda c, x: c.rps / x.rps if x.rps else math.nan)
                    if target == "metergate" else None,
                    # What metering and the ledger add over a bare proxy (the proxying itself excluded).
                    "added_p50_vs_passthrough_ms": paired(rs, p, lambda c, x: c.p50_ms - x.p50_ms)
                    if target == "metergate" else None,
                    "ratio_vs_direct": paired(rs, d, lambda c, x: c.rps / x.rps if x.rps else math.nan)
                    if proxied else None,
                    "proxy_cpu_us": med([c.proxy_cpu_us or math.nan for c in rs]) if proxied else None,
                    "writer_cpu_us": med([c.writer_cpu_us if c.writer_cpu_us is not None else math.nan for c in rs])
                    if target == "metergate" else None,
                    "upstream_cpu_us": med([c.upstream_cpu_us for c in rs]),
                    "gen_cpu_pct": med([c.gen_cpu_pct for c in rs]),
                    "other_cpu_pct": med([c.other_cpu_pct for c in rs]),
                    "errors": sum(c.errors for c in rs),
                    "rps_per_round": [round(c.rps, 1) for c in rs],
                }
                summary[f"{'stream' if stream else 'unary'}/c{conc}/{target}"] = row
                lines.append(
                    f"{target:<12}{fmt(row['rps'], '.0f', 9)}{fmt(row['p50_ms'], '.2f', 9)}"
                    f"{fmt(row['p99_ms'], '.2f', 9)}{fmt(row['added_p50_ms'], '+.2f', 9)}"
                    f"{fmt(row['added_p99_ms'], '+.2f', 9)}{fmt(row['ratio_vs_passthrough'], '.2f', 8)}"
                    f"{fmt(row['ratio_vs_direct'], '.2f', 9)}{fmt(row['proxy_cpu_us'], '.0f', 13)}"
                    f"{fmt(row['writer_cpu_us'], '.0f', 8)}"
                    f"{fmt(row['upstream_cpu_us'], '.0f', 13)}{fmt(row['gen_cpu_pct'], '.0f', 7)}%"
                    f"{fmt(row['other_cpu_pct'], '.0f', 6)}%{row['errors']:>5}")
    return "\n".join(lines), summary


def verdicts(summary: dict[str, Any], stream_modes: list[bool], concurrencies: list[int]) -> list[str]:
    out = []
    for stream in stream_modes:
        kind = "stream" if stream else "unary"
        for conc in concurrencies:
            row = summary[f"{kind}/c{conc}/metergate"]
            ratio = row["ratio_vs_passthrough"]
            ok = ratio is not None and ratio >= 0.5
            out.append(f"  [{'PASS' if ok else 'MISS'}] {kind:<6} c={conc:<3} throughput vs pass-through "
                       f"{ratio:.2f} (target >= 0.50)")
            if conc == 1:
                added = row["added_p50_ms"]
                ok = added is not None and added <= 0.5
                out.append(f"  [{'PASS' if ok else 'MISS'}] {kind:<6} c={conc:<3} added p50 vs direct "
                           f"{added:+.2f} ms (target <= 0.50 ms)")
                out.append(f"  [info] {kind:<6} c={conc:<3} added p50 vs pass-through "
                           f"{row['added_p50_vs_passthrough_ms']:+.2f} ms (metering and the ledger alone)")
                floor = summary[f"{kind}/c{conc}/passthrough"]["added_p50_ms"]
                out.append(f"  [info] {kind:<6} c={conc:<3} the bare pass-through alone adds {floor:+.2f} ms vs "
                           f"direct: the floor for any proxy on aiohttp here"
                           + (" (above the 0.50 ms target)" if floor > 0.5 else ""))
    return out


# ---------------------------------------------------------------------------------------- main


def _setting(text: str) -> tuple[str, Any]:
    """KEY=VALUE; a VALUE that parses as JSON is taken as JSON, so that nested settings can be set
    (``rate_limits={"customer": {"requests_per_minute": 1000000000}}``); any other VALUE is a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 rounds of 0.4 s windows (under 40 s in all)")
    parser.add_argument("--duration", type=float, help="measurement window per cell and round, seconds "
                                                       "(default 2.0; --quick 0.4)")
    parser.add_argument("--warmup", type=float, help="warm-up before each window, seconds (default 0.4; "
                                                     "--quick 0.15)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; medians are taken over them "
                                                   "(default 5; --quick 3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="default: 1 32")
    parser.add_argument("--mode", choices=("both", "unary", "stream"), default="both",
                        help="non-streaming, streaming or both (default)")
    parser.add_argument("--server-cpus", default="0", help="CPU list for the server processes (taskset -c)")
    parser.add_argument("--client-cpus", default="1", help="CPU list for this load generator")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument("--metergate-log-level", default="WARNING",
                        help="metergate --log-level (INFO also turns on aiohttp's access log)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before starting, wait up to this long for other load on the machine to drop")
    parser.add_argument("--metergate-set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
                        help="a top-level metergate setting for the run, e.g. sqlite_writer=thread; a JSON "
                             "VALUE sets a nested one, e.g. 'rate_limits={\"customer\": {...}}' (repeatable)")
    parser.add_argument("--passthrough-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the pass-through's event loop (default uvloop, as metergate's event_loop default)")
    parser.add_argument("--json", type=Path, help="also write every per-round cell and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, ledger.db)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (0.4 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.15 if args.quick else 0.4)
    args.rounds = args.rounds or (3 if args.quick else 5)
    if not (0.1 <= args.duration <= 60 and 0 <= args.warmup <= 10 and 1 <= args.rounds <= 50
            and 0 <= args.wait_idle <= 600):
        parser.error("--duration must be 0.1-60 s, --warmup 0-10 s, --rounds 1-50, --wait-idle 0-600 s")
    if not all(1 <= c <= 512 for c in args.concurrency):
        parser.error("--concurrency values must be 1-512")
    return args


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "metergate"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(git unavailable)"
    return f"{head or '?'}{' + uncommitted changes under metergate/' if dirty else ''}"


def machine_notes(args: argparse.Namespace) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pin = ("no pinning" if args.no_pin else
           f"servers (upstream, passthrough, metergate) pinned to CPU {args.server_cpus} with taskset; "
           f"load generator pinned to CPU {args.client_cpus}")
    return (f"machine: {os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}\n"
            f"code: metergate {git_state()}\n"
            f"pinning: {pin}\n"
            f"metergate: `python -m metergate serve`, SQLite ledger (WAL) in a temp dir, log level "
            f"{args.metergate_log_level}; customer header identification, test mode"
            + "".join(f"; {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in args.metergate_set)
            + f"\npassthrough: bench/passthrough.py on the {args.passthrough_loop} event loop")


async def main_async(args: argparse.Namespace) -> int:
    stream_modes = {"both": [False, True], "unary": [False], "stream": [True]}[args.mode]
    server_cpus = None if args.no_pin else args.server_cpus
    if not args.no_pin:
        if shutil.which("taskset") is None:
            print("taskset not found: running unpinned", file=sys.stderr)
            server_cpus, args.no_pin = None, True
        else:
            os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-"))
    servers = Servers(workdir, server_cpus, args.metergate_log_level, dict(args.metergate_set),
                      passthrough_loop=args.passthrough_loop)
    cells: list[Cell] = []
    started = time.monotonic()
    cell_count = args.rounds * len(stream_modes) * len(args.concurrency) * len(TARGETS)
    print(machine_notes(args))
    wait_until = time.monotonic() + args.wait_idle
    while True:
        busy0, t0 = machine_busy_seconds(), time.perf_counter()
        await asyncio.sleep(0.5)
        background = 100 * (machine_busy_seconds() - busy0) / (time.perf_counter() - t0)
        if background <= 25 or time.monotonic() >= wait_until:
            break
        print(f"  waiting for the machine to go idle: {background:.0f}% of one CPU busy", flush=True)
    started = time.monotonic()  # the bench's own time, not the wait for an idle machine
    print(f"background load before start: {background:.0f}% of one CPU"
          + ("  (WARNING: the machine is busy; numbers will be noisy)" if background > 25 else ""))
    print(f"plan: {args.rounds} rounds x {cell_count // args.rounds} cells, {args.warmup:g}s warm-up + "
          f"{args.duration:g}s window each (~{cell_count * (args.warmup + args.duration):.0f}s of load)\n")
    try:
        launched = time.monotonic()
        servers.start()
        await servers.wait_ready()
        print(f"servers ready in {time.monotonic() - launched:.1f}s", flush=True)
        mg = f"http://127.0.0.1:{servers.ports['metergate']}"
        await fund_customer(mg)
        before = await ledger_balance(mg)
        urls = {"direct": f"http://127.0.0.1:{servers.ports['upstream']}/v1/chat/completions",
                "passthrough": f"http://127.0.0.1:{servers.ports['passthrough']}/v1/chat/completions",
                "metergate": f"{mg}/openai/v1/chat/completions"}
        metered_ok = 0
        # One untimed pass over every target and mode first: imports, tokenizer, first SQLite pages.
        for target in TARGETS:
            for stream in stream_modes:
                warm = Cell(target, stream, 4, -1)
                n = await run_cell(urls[target], warm, 0.0, 0.2 if args.quick else 0.5, {})
                metered_ok += n if target == "metergate" else 0
                if warm.errors:
                    raise RuntimeError(f"{target} failed during warm-up: {warm.error_samples}")
        for rnd in range(args.rounds):
            for stream in stream_modes:
                for conc in args.concurrency:
                    order = TARGETS[rnd % 3:] + TARGETS[:rnd % 3]  # rotate who goes first
                    for target in order:
                        cell = Cell(target, stream, conc, rnd)
                        pids = {"upstream": servers.pid("upstream")}
                        if target != "direct":
                            pids["proxy"] = servers.pid(target)
                        n = await run_cell(urls[target], cell, args.warmup, args.duration, pids,
                                           list(servers.procs_pids()))
                        metered_ok += n if target == "metergate" else 0
                        cells.append(cell)
                        if cell.errors:
                            print(f"  ! {target} {'stream' if stream else 'unary'} c={conc}: {cell.errors} "
                                  f"errors, e.g. {cell.error_samples}", file=sys.stderr)
            print(f"  round {rnd + 1}/{args.rounds} done ({time.monotonic() - started:.0f}s)", flush=True)
        await asyncio.sleep(0.2)  # let the last settlements commit
        after = await ledger_balance(mg)
        deadline = time.monotonic() + 6  # an escrow lease goes back after escrow.idle_s (2 s) without use
        while after["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            after = await ledger_balance(mg)
    finally:
        servers.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table, summary = report(cells, stream_modes, args.concurrency, args.rounds)
    print(table)
    charged = after["debits_posted"] - before["debits_posted"]
    ledger_ok = after["pending"] == 0 and charged == metered_ok * PRICE_PER_REQUEST
    print(f"\nledger check: {metered_ok} successful metergate requests x {PRICE_PER_REQUEST} micro-USD = "
          f"{metered_ok * PRICE_PER_REQUEST}; ledger debits_posted grew by {charged}, pending holds "
          f"{after['pending']} -> {'OK' if ledger_ok else 'MISMATCH'}")
    print("\ntargets (medians of per-round values):")
    print("\n".join(verdicts(summary, stream_modes, args.concurrency)))
    print(f"\ntotal wall time {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({
            "notes": machine_notes(args), "args": {k: str(v) for k, v in vars(args).items()},
            "summary": summary, "cells": [asdict(c) for c in cells],
            "ledger": {"requests": metered_ok, "charged": charged, "ok": ledger_ok}}, indent=1))
    errors = sum(c.errors for c in cells)
    return 0 if ledger_ok and not errors else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
