"""Output of the admin commands: aligned tables for people, JSON for scripts (``--json``)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def when(ms: int | None) -> str:
    """Epoch milliseconds as a UTC time people read (``-`` for none)."""
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO = sys.stdout) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def fields(pairs: Sequence[tuple[str, object]], out: TextIO = sys.stdout) -> None:
    """One object as ``name  value`` lines."""
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        print(f"{name.ljust(width)}  {value}", file=out)


def dump(value: Any, out: TextIO = sys.stdout) -> None:
    """JSON for scripts: one document (or one line per record when following)."""
    print(json.dumps(value, separators=(",", ":"), sort_keys=True), file=out, flush=True)
