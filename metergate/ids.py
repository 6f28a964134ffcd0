"""Identifiers the product generates (request ids, and the hold ids, ledger keys and usage record ids derived
from them): 32 hex digits that sort by the time they were made.

Why time-ordered: these ids are the keys of unique B-tree indexes on the hot write path (the ledger's
idempotency key ``settle:<hold id>``, a hold's id, a usage record's id). A random key lands on a random leaf,
so every request of a group commit dirties a leaf page of its own in each index (and SQLite writes each whole
page to its WAL at COMMIT). With the time first, as in a UUIDv7, a batch's keys are neighbours at the right
edge of each index and share a page or two.

Layout: 12 hex digits of milliseconds since the epoch (48 bits, until the year 10889), then 20 hex digits
(80 bits) from the OS's random source. Uniqueness rests on the random part alone (2**80 per millisecond); the
time only orders. Ids made in the same millisecond are unordered among themselves, which costs nothing: they
still fall on the same page. An id reveals when it was made, which a request id says in its response anyway.
"""

from __future__ import annotations

import os
import time

_ID_BATCH = 256  # random parts drawn from the OS at a time
_parts: list[str] = []
os.register_at_fork(after_in_child=_parts.clear)  # a forked process never reuses its parent's random parts


def _random_part() -> str:
    """80 random bits from the OS as 20 hex digits, drawn in batches: one ``getrandom`` call (which also gives
    up the GIL) per ``_ID_BATCH`` ids rather than per id."""
    if not _parts:
        drawn = os.urandom(10 * _ID_BATCH).hex()
        _parts.extend(drawn[i:i + 20] for i in range(0, len(drawn), 20))
    try:
        return _parts.pop()
    except IndexError:  # another thread took the last one meanwhile
        return os.urandom(10).hex()


def time_ordered_hex() -> str:
    """A new id: 32 lowercase hex digits, the time (ms) first (see the module docstring)."""
    return f"{time.time_ns() // 1_000_000:012x}{_random_part()}"


__all__ = ["time_ordered_hex"]
