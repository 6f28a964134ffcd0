"""`metergate demo`, the README's first command, end to end: it drains a wallet through the official SDK, ends
on a 402 whose portal link opens, then shows a stream stopped when a trial credit runs out; it exits 0."""

from __future__ import annotations

import re

import pytest

from metergate.demo.run import run_demo


def test_the_demo_runs_to_its_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo() == 0
    out = capsys.readouterr().out
    assert re.search(r"Request \d+ refused: HTTP 402 insufficient_funds", out)
    assert "the portal link opens a real page: HTTP 200, shows the balance" in out
    assert "finish_reason='length', stop_reason='insufficient_funds'" in out
    assert re.search(r"Ledger: \d+ append-only entries for acme\. Done\.", out)
