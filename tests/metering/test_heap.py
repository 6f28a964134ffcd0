"""Freed heap goes back to the kernel on whichever allocator the process runs: glibc's, or the jemalloc the
image preloads. Each case runs in a child interpreter, since the allocator is chosen when a process starts."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# 64 MiB in blocks that malloc serves (larger than Python's small-object limit), written so that their pages
# are in RSS, then freed; the child prints its allocator and its RSS in KiB freed-but-kept, then after the call.
CHILD = """
from pathlib import Path
from metergate.metering import heap
def rss():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1])
blocks = [b"x" * 16384 for _ in range(4096)]
del blocks
kept = rss()
heap.return_freed_memory()
print(heap.allocator(), kept, rss())
"""


def _jemalloc() -> str | None:
    found = ctypes.util.find_library("jemalloc")
    return "libjemalloc.so.2" if found else None


def _run(extra_env: dict[str, str]) -> tuple[str, int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra_env}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_freed_heap_is_returned_on_glibc() -> None:
    name, kept, after = _run({"MALLOC_TRIM_THRESHOLD_": str(1 << 30)})  # glibc alone never trims
    assert name == "glibc"
    assert kept - after > 32 * 1024


@pytest.mark.skipif(_jemalloc() is None, reason="libjemalloc2 is not installed")
def test_freed_heap_is_returned_on_jemalloc_without_waiting_for_its_decay() -> None:
    # Decay off: jemalloc would keep the freed pages for ever, so only the explicit purge can return them.
    name, kept, after = _run({"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"})
    assert name == "jemalloc"
    assert kept - after > 32 * 1024
