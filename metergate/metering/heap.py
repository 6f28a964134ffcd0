"""Handing freed heap back to the kernel after a one-off load, so that a transient peak does not stay in RSS.

An allocator keeps what a process frees for its own later use. glibc's ``malloc`` returns to the kernel only
the free space at the top of the heap, so a load that briefly needs tens of MB leaves them in the process's
RSS for its whole life: the text, lines and dict of a tiktoken encoding's ranks (about 30 MB for o200k_base),
or the compiler's trees when a large module is imported from source without bytecode (genai-prices' 1.6 MB
price table: about 40 MB, found by ``bench/footprint.py --source``). ``malloc_trim(0)`` returns every free
page of every arena.

The image runs on jemalloc instead (``LD_PRELOAD=libjemalloc.so.2``, see the Dockerfile and README's memory
section): its size classes fit tiktoken's 200,000 small token strings far tighter than glibc's 32-byte minimum
chunk (o200k_base: about 30 MiB of RSS instead of 41). jemalloc gives freed pages back by itself after
``dirty_decay_ms``; here its ``arena.<all>.purge`` does it at once, as ``malloc_trim`` does for glibc, so the
figures after a load do not depend on how long the process has been idle since.

Either costs a few milliseconds, so it runs once after each such load, never per request; where neither
exists (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable
from functools import cache

_DONE: set[str] = set()
_LOCK = threading.Lock()
_JEMALLOC_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena


@cache
def _purge() -> Callable[[], None] | None:
    """What returns free heap to the kernel with the allocator this process runs on, or None."""
    libc = ctypes.CDLL(None)
    mallctl = getattr(libc, "mallctl", None)  # jemalloc's, when it is preloaded
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
        command = f"arena.{_JEMALLOC_ALL_ARENAS}.purge".encode()

        def purge_jemalloc() -> None:
            mallctl(command, None, None, None, 0)

        return purge_jemalloc
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None

    def trim_glibc() -> None:
        trim(0)

    return trim_glibc


def allocator() -> str:
    """``jemalloc``, ``glibc`` or ``other``: which allocator this process's ``malloc`` is (for the logs and the
    footprint benchmark)."""
    libc = ctypes.CDLL(None)
    if getattr(libc, "mallctl", None) is not None:
        return "jemalloc"
    return "glibc" if getattr(libc, "malloc_trim", None) is not None else "other"


def return_freed_memory(*, collect: bool = True) -> None:
    """Collect garbage (``collect``: cycles may hold the load's objects), then return free heap to the kernel."""
    if collect:
        gc.collect()
    purge = _purge()
    if purge is not None:
        purge()


def after_first_load(name: str) -> None:
    """:func:`return_freed_memory` (without a collection: what a load leaves is freed by reference counting)
    the first time the load ``name`` completed in this process; nothing after that."""
    if name in _DONE:
        return
    with _LOCK:
        if name in _DONE:
            return
        _DONE.add(name)
    return_freed_memory(collect=False)


__all__ = ["after_first_load", "allocator", "return_freed_memory"]
