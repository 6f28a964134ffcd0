"""Product-made ids (request ids and the hold ids, ledger keys and usage record ids named after them) sort by the
time they were made, so that the unique indexes they key take a batch's inserts at their right edge."""

from __future__ import annotations

import contextvars
import re

import pytest

from metergate import ids
from metergate.observability.logs import new_request_id


def test_request_ids_made_later_sort_after_earlier_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000, 1_700_000_000_000 + 50))
    monkeypatch.setattr(ids.time, "time_ns", lambda: next(clock) * 1_000_000)
    made = contextvars.copy_context().run(lambda: [new_request_id() for _ in range(50)])
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in made)


def test_a_burst_of_ids_has_no_duplicates() -> None:
    made = {ids.time_ordered_hex() for _ in range(5000)}
    assert len(made) == 5000
