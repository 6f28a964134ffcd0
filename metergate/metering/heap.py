"""Handing freed heap back to the kernel after a one-off load, so that a transient peak does not stay in RSS.

glibc's ``malloc`` keeps what a process frees for its own later use and returns to the kernel only the free
space at the top of the heap, so a load that briefly needs tens of MB leaves them in the process's RSS for
its whole life: the text, lines and dict of a tiktoken encoding's ranks (about 30 MB for o200k_base), or the
compiler's trees when a large module is imported from source without bytecode (genai-prices' 1.6 MB price
table: about 40 MB, found by ``bench/footprint.py --source``). ``malloc_trim(0)`` returns every free page of
every arena. It costs a few milliseconds, so it runs once after each such load, never per request; where there
is no glibc (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable
from functools import cache

_DONE: set[str] = set()
_LOCK = threading.Lock()


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim


def return_freed_memory(*, collect: bool = True) -> None:
    """Collect garbage (``collect``: cycles may hold the load's objects), then return free heap to the kernel."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


__all__ = ["after_first_load", "return_freed_memory"]
