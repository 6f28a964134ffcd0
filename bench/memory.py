"""Where a sidecar's memory goes: RSS, the allocator's heap and the process's mappings at each step of a load.

    uv run python bench/memory.py                        # idle, first request, second, 64 streams, again
    uv run python bench/memory.py --allocator glibc      # without the image's jemalloc
    uv run python bench/memory.py --imports              # what each imported package allocated, at idle
    uv run python bench/memory.py --tracemalloc 1        # and Python's allocations (slow, inflates RSS)
    uv run python bench/memory.py --env MALLOC_ARENA_MAX=2 --source

A real ``python -m metergate serve --role sidecar`` (bytecode in a temp ``PYTHONPYCACHEPREFIX``, as in the
image, unless ``--source``; with the memory variables of the Dockerfile's runtime stage, ``LD_PRELOAD`` of
jemalloc and its ``MALLOC_CONF``, unless ``--allocator glibc``) runs inside a small wrapper that answers
signals: SIGUSR1 writes a snapshot (VmRSS; the heap in use, free but kept, and mmapped (glibc's ``mallinfo2``)
or allocator metadata (jemalloc's ``stats.*``); RSS per mapping from /proc/self/smaps; a tracemalloc snapshot
when tracing), SIGUSR2 returns free heap (``malloc_trim(0)``, or jemalloc's ``arena.<all>.purge``) and writes
RSS again. The script prints each step and, between steps, the mappings that grew: ``[heap]`` and ``[anon]``
are the allocator's and Python's small-object arenas, a ``.so`` is a library's pages; with ``--tracemalloc``,
the source files whose allocations grew.

``--imports`` answers "which package is the idle process made of": an import hook records what each module's
own import allocated (tracemalloc's traced bytes while it executes, less its own imports'), summed by top-level
package, with the RSS of each shared library; the server is stopped at idle (tracing slows the first request).
Loopback only; the mock upstream is metergate's own (metergate/demo/mock_upstream.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import footprint as fp  # noqa: E402 - bench/ is a directory of scripts

ROOT = HERE.parent
_WRAPPER = r'''
import ctypes, gc, json, os, signal, sys, threading, tracemalloc
from pathlib import Path
out = Path(sys.argv.pop(1))
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallctl = getattr(libc, "mallctl", None)  # jemalloc's, when the image's LD_PRELOAD is in effect
if mallctl is None:
    libc.mallinfo2.restype = Info
def jemalloc(name):
    value, size = ctypes.c_size_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
    return value.value
def heap():
    """(in use, free but kept, mmapped / allocator metadata) in KiB."""
    if mallctl is None:
        info = libc.mallinfo2()
        return info.uordblks // 1024, info.fordblks // 1024, info.hblkhd // 1024
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    allocated, resident, metadata = (jemalloc(n) for n in ("stats.allocated", "stats.resident", "stats.metadata"))
    return allocated // 1024, (resident - allocated - metadata) // 1024, metadata // 1024
def rss():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1])
def mappings():
    sizes, name = {}, "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts and parts[0] == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(parts[1])
    return sizes
imports = {}  # module -> bytes its own import allocated (not its imports'), with --imports
if os.environ.pop("MG_MEMORY_IMPORTS", None):
    import importlib.abc
    tracemalloc.start(1)
    nested = threading.local()
    class Measured(importlib.abc.Loader):
        def __init__(self, inner):
            self.inner = inner
        def create_module(self, spec):
            return self.inner.create_module(spec)
        def exec_module(self, module):
            stack = nested.__dict__.setdefault("stack", [])
            start = tracemalloc.get_traced_memory()[0]
            stack.append(0)
            try:
                self.inner.exec_module(module)
            finally:
                children = stack.pop()
                total = tracemalloc.get_traced_memory()[0] - start
                imports[module.__name__] = imports.get(module.__name__, 0) + total - children
                if stack:
                    stack[-1] += total
        def __getattr__(self, name):
            return getattr(self.inner, name)
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                            spec.loader = Measured(spec.loader)
                        return spec
            return None
    sys.meta_path.insert(0, Finder())
step = [0]
def snapshot(*_):
    step[0] += 1
    used, free, mapped = heap()
    record = {"rss_kib": rss(), "heap_in_use_kib": used, "heap_free_kib": free, "mmapped_kib": mapped,
              "threads": threading.active_count(), "mappings": mappings(), "imports": imports}
    if tracemalloc.is_tracing() and not imports:
        tracemalloc.take_snapshot().dump(str(out / f"step{step[0]}.tracemalloc"))
    (out / f"step{step[0]}.json").write_text(json.dumps(record))
def trim(*_):
    gc.collect()
    if mallctl is None:
        libc.malloc_trim(0)
    else:
        mallctl(b"arena.4096.purge", None, None, None, 0)
    (out / "trimmed.json").write_text(json.dumps({"rss_kib": rss(), "mappings": mappings()}))
signal.signal(signal.SIGUSR1, snapshot)
signal.signal(signal.SIGUSR2, trim)
from metergate.cli import main
sys.exit(main(sys.argv[1:]))
'''
STEPS = ("idle", "after the first request", "after a second request", "after 64 streams at once",
         "after 64 more")


def grown(before: dict[str, int], after: dict[str, int], top: int = 5) -> str:
    deltas = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(after)), reverse=True)
    return ", ".join(f"{Path(k).name} {d / 1024:+.1f}" for d, k in deltas[:top] if d >= 256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--source", action="store_true", help="no bytecode: every import compiles its source")
    parser.add_argument("--tracemalloc", type=int, metavar="FRAMES", help="trace Python allocations")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for the server")
    parser.add_argument("--allocator", choices=("image", "glibc"), default="image",
                        help="image: the Dockerfile's memory variables (default); glibc: none")
    parser.add_argument("--imports", action="store_true", help="what each package's import allocated, at idle")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-memory-") as tmp:
        work = Path(tmp)
        memory = fp.image_memory_env(ROOT) if args.allocator == "image" else {}
        env = {**os.environ, "PYTHONPATH": str(ROOT), **memory, **dict(e.split("=", 1) for e in args.env)}
        args.label = " ".join(f"{k}={v}" for k, v in memory.items()) or "glibc malloc"
        if args.imports:
            env["MG_MEMORY_IMPORTS"] = "1"
        if args.source:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        if args.tracemalloc:
            env["PYTHONTRACEMALLOC"] = str(args.tracemalloc)
        up_port = fp.free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-c", "import sys; from aiohttp import web; "
             "from metergate.demo.mock_upstream import build_mock_upstream; "
             "web.run_app(build_mock_upstream(), host='127.0.0.1', port=int(sys.argv[1]), print=None, "
             "access_log=None)", str(up_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return run(work, env, up_port, args)
        finally:
            upstream.send_signal(signal.SIGTERM)
            upstream.wait(timeout=10)


def run(work: Path, env: dict[str, str], up_port: int, args: argparse.Namespace) -> int:
    database = work / "memory.db"
    fp.seed(database)
    port = fp.free_port()
    config = work / "sidecar.yaml"
    config.write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "database_url": f"sqlite:///{database}", "role": "sidecar",
        "routes": [{"prefix": "/openai", "upstream": f"http://127.0.0.1:{up_port}", "api_key": "sk-bench"}],
        "pricing": {"asset": "USD", "models": {"*": {"input_per_mtok": "1", "output_per_mtok": "2"}}},
        "admin_keys": ["mg_test_" + "b" * 24], "portal_secrets": {"k1": secrets.token_urlsafe(32)}}))
    out = work / "out"
    out.mkdir()
    if not args.source:  # one unmeasured run compiles what the sidecar imports
        warm_env = {k: v for k, v in env.items() if k != "MG_MEMORY_IMPORTS"}  # the hook slows the first request
        warm = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(out), "serve", "--config", str(config),
                                 "--log-level", "WARNING"], cwd=ROOT, env=warm_env)
        asyncio.run(_load(warm, port, 1, None))
        _stop(warm)
    server = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(out), "serve", "--config", str(config),
                               "--log-level", "WARNING"], cwd=ROOT, env=env)
    try:
        asyncio.run(_load(server, port, 0 if args.imports else args.streams, out))
    finally:
        _stop(server)
    if args.imports:
        return _print_imports(json.loads((out / "step1.json").read_text()))
    steps = [json.loads((out / f"step{i + 1}.json").read_text()) for i in range(len(STEPS))]
    print(f"sidecar, {'no bytecode' if args.source else 'bytecode'}, {args.label}"
          f"{', ' + ' '.join(args.env) if args.env else ''}:")
    print(f"{'step':<26} {'RSS MiB':>8} {'heap used':>10} {'heap free':>10} {'mmap/meta':>9} {'threads':>8}   grew")
    for i, (name, s) in enumerate(zip(STEPS, steps, strict=True)):
        growth = grown(steps[i - 1]["mappings"], s["mappings"]) if i else ""
        print(f"{name:<26} {s['rss_kib'] / 1024:8.1f} {s['heap_in_use_kib'] / 1024:10.1f} "
              f"{s['heap_free_kib'] / 1024:10.1f} {s['mmapped_kib'] / 1024:9.1f} {s['threads']:8d}   {growth}")
    trimmed = json.loads((out / "trimmed.json").read_text())
    print(f"{'then malloc_trim(0)':<26} {trimmed['rss_kib'] / 1024:8.1f}")
    if args.tracemalloc:
        import tracemalloc

        first = tracemalloc.Snapshot.load(str(out / "step1.tracemalloc"))
        last = tracemalloc.Snapshot.load(str(out / f"step{len(STEPS)}.tracemalloc"))
        print("\nPython allocations that grew from idle to the end (KiB, by file):")
        for stat in last.compare_to(first, "filename")[:15]:
            print(f"{stat.size_diff // 1024:8d}  {stat.traceback}")
    return 0


def _print_imports(idle: dict[str, Any], top: int = 25) -> int:
    """The idle process by package: what each one's imports allocated, and the shared libraries' pages."""
    by_package: dict[str, int] = {}
    for module, size in idle["imports"].items():
        by_package[module.split(".")[0]] = by_package.get(module.split(".")[0], 0) + size
    traced = sum(by_package.values())
    print(f"sidecar at idle: RSS {idle['rss_kib'] / 1024:.1f} MiB (under tracemalloc, which adds its own), "
          f"{len(idle['imports'])} modules imported, {traced / 2**20:.1f} MiB allocated by their imports")
    print(f"\n{'MiB':>6}  package (its modules' own imports)")
    for package, size in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{size / 2**20:6.2f}  {package}")
    libraries = {Path(k).name: v for k, v in idle["mappings"].items() if ".so" in k}
    print(f"\n{'MiB':>6}  shared library pages in RSS ({sum(libraries.values()) / 1024:.1f} MiB in all)")
    for name, kib in sorted(libraries.items(), key=lambda kv: -kv[1])[:10]:
        print(f"{kib / 1024:6.2f}  {name}")
    return 0


async def _load(proc: subprocess.Popen[bytes], port: int, streams: int, out: Path | None) -> None:
    url = f"http://127.0.0.1:{port}"
    await fp.wait_ready(proc, url, time.monotonic())
    if out is None:
        await fp.stream_load(url, proc.pid, streams)
        return

    async def snapshot(number: int) -> None:
        proc.send_signal(signal.SIGUSR1)
        _written(out / f"step{number}.json")

    await asyncio.sleep(fp.SETTLE_S)
    await snapshot(1)
    if not streams:  # --imports: idle only
        return
    for number, count in ((2, 1), (3, 1), (4, streams), (5, streams)):
        await fp.stream_load(url, proc.pid, count)
        await asyncio.sleep(1.0)
        await snapshot(number)
    proc.send_signal(signal.SIGUSR2)
    _written(out / "trimmed.json")


def _written(path: Path, timeout_s: float = 60) -> None:
    """Wait for the server's wrapper to write ``path`` (another process: polled; no request is in flight)."""
    for _ in range(int(timeout_s / 0.05)):
        if path.exists():
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server wrote no {path.name} in {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
