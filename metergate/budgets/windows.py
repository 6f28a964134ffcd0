"""Budget windows: which bucket an instant falls in, which buckets a limit counts, and when use frees up.

Every window is a sequence of buckets; a claim is counted in the bucket of the instant it is made, and a
limit counts the buckets of its window:

* **fixed** windows (``day``, ``week``, ``month`` in UTC — weeks start on Monday — or ``fixed`` of any
  length, aligned to the epoch) are one bucket each: use counts until the window ends, then all of it frees
  at once.
* **rolling** windows of length ``L`` are counted in ``B`` buckets of ``g = L / B`` (``buckets``, default 60:
  a granularity of 1/60 of the window). At instant ``t`` a limit counts the bucket containing ``t`` and the
  ``B - 1`` before it. What is guaranteed, exactly: the use counted in any ``B`` consecutive buckets never
  exceeds the limit, so any interval of length ``L - g`` (which touches at most ``B`` buckets) sees at most
  the limit; an interval of length ``L`` can touch ``B + 1`` buckets. Use made in a bucket frees exactly
  ``L`` after that bucket's start, that is between ``L - g`` and ``L`` after it was made, never later.

Pure arithmetic on epoch milliseconds; the callers pass the time in (an injectable clock in the tests).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Literal

WindowKind = Literal["day", "week", "month", "fixed", "rolling"]
KINDS: tuple[WindowKind, ...] = ("day", "week", "month", "fixed", "rolling")
DAY_MS = 86_400_000
_WEEK_MS = 7 * DAY_MS
_MONDAY_OFFSET_MS = 3 * DAY_MS  # 1970-01-01 was a Thursday: Mondays are 3 days after the epoch, modulo 7
MIN_LENGTH_MS = 1_000
MAX_LENGTH_MS = 366 * DAY_MS
DEFAULT_BUCKETS = 60
MAX_BUCKETS = 1_440


@dataclass(frozen=True, slots=True)
class Window:
    """A limit's window. ``length_ms`` is for ``fixed`` and ``rolling``; ``buckets`` for ``rolling``."""

    kind: WindowKind
    length_ms: int = 0
    buckets: int = 1

    def __post_init__(self) -> None:
        assert self.kind in KINDS, f"unknown window kind {self.kind!r}"
        if self.kind in ("fixed", "rolling"):
            assert MIN_LENGTH_MS <= self.length_ms <= MAX_LENGTH_MS, "window length out of bounds"
        if self.kind == "rolling":
            assert 1 <= self.buckets <= MAX_BUCKETS and self.length_ms % self.buckets == 0, "bad bucket count"
        else:
            assert self.buckets == 1, "a fixed window is one bucket"

    @property
    def bucket_ms(self) -> int:
        """The bucket length for windows of constant length (0 for ``month``, whose length varies)."""
        if self.kind == "day":
            return DAY_MS
        if self.kind == "week":
            return _WEEK_MS
        if self.kind == "month":
            return 0
        return self.length_ms // self.buckets

    def bucket_start(self, at_ms: int) -> int:
        """The first millisecond of the bucket containing ``at_ms``."""
        if self.kind == "month":
            return _month_start(at_ms // DAY_MS)
        if self.kind == "week":
            return at_ms - (at_ms - _MONDAY_OFFSET_MS) % _WEEK_MS
        size = self.bucket_ms
        return at_ms - at_ms % size

    def bucket_end(self, start_ms: int) -> int:
        """The first millisecond after the bucket that starts at ``start_ms``."""
        if self.kind == "month":
            first = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC)
            following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
            return int(following.timestamp() * 1000)
        return start_ms + self.bucket_ms

    def counted_from(self, bucket_start_ms: int) -> int:
        """The oldest bucket start a claim in the bucket ``bucket_start_ms`` counts (itself, when fixed)."""
        if self.kind != "rolling":
            return bucket_start_ms
        return bucket_start_ms - (self.buckets - 1) * self.bucket_ms

    def frees_at(self, bucket_start_ms: int) -> int:
        """When use counted in the bucket ``bucket_start_ms`` stops counting."""
        if self.kind != "rolling":
            return self.bucket_end(bucket_start_ms)
        return bucket_start_ms + self.length_ms

    def describe(self) -> str:
        if self.kind in ("day", "week", "month"):
            return f"per {self.kind}"
        seconds = self.length_ms / 1000
        span = f"{seconds:g} s"
        return f"per {span}" if self.kind == "fixed" else f"per rolling {span} ({self.buckets} buckets)"

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind}
        if self.kind in ("fixed", "rolling"):
            out["length_s"] = self.length_ms // 1000 if self.length_ms % 1000 == 0 else self.length_ms / 1000
        if self.kind == "rolling":
            out["buckets"] = self.buckets
        return out


@functools.lru_cache(maxsize=64)
def _month_start(day: int) -> int:
    """The first millisecond of the UTC month containing epoch day ``day`` (cached: admission asks per request)."""
    date = dt.datetime.fromtimestamp(day * DAY_MS / 1000, dt.UTC)
    return int(date.replace(day=1).timestamp() * 1000)


def retry_after_ms(window: Window, buckets: list[tuple[int, int]], *, limit: int, need: int, now_ms: int) -> int:
    """How long until ``need`` more fits under ``limit``, given the counted buckets' (start, use), oldest first.

    Use frees bucket by bucket (:meth:`Window.frees_at`); ``need`` larger than the limit never fits, which
    answers the end of the current window (the client is told the request is too large on its own)."""
    used = sum(u for _, u in buckets)
    if need > limit or not buckets:
        start = window.bucket_start(now_ms)
        return max(1, window.frees_at(start) - now_ms)
    for start, use in sorted(buckets):
        used -= use
        if used + need <= limit:
            return max(1, window.frees_at(start) - now_ms)
    return max(1, window.frees_at(window.bucket_start(now_ms)) - now_ms)
