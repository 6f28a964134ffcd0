"""Operating-system names for metergate's own threads.

Python 3.11 names a ``threading.Thread`` only inside Python: ``top -H``, ``ps -L``, ``/proc/<pid>/task/*/comm``
and profilers all show every thread as ``python``. The SQLite writer can take as much CPU as the event loop
(bench/README.md), so an operator, and the benchmark, need to tell them apart. On Linux the calling thread's
kernel name is set with ``prctl(PR_SET_NAME)``; elsewhere, or if that fails, nothing happens. A thread is
named once, in Python (``threading.Thread(name=...)``, ``thread_name_prefix``); the kernel's name is that one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15
_MAX = 15  # the kernel keeps 15 bytes of a thread's name (16 with the terminating NUL)

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def name_os_thread() -> bool:
    """Give the calling thread its Python name (cut to 15 bytes) as the kernel's; False when it could not."""
    if _prctl is None:
        return False
    raw = threading.current_thread().name.encode("ascii", "replace")[:_MAX]
    return bool(_prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0)


__all__ = ["name_os_thread"]
