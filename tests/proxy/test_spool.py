"""The settlement spool's journal (metergate/proxy/spool.py): what a stopped process owed is taken over once,
a live process's journal is left alone, a torn last line is skipped, paid bills are not owed again, and a
journal with nothing owed is emptied and removed.

Method: the journal through its public interface, two spools on one directory standing for two processes
(each journal is locked with ``flock``, which is per open file, so two spools in one process exclude each other
as two processes do); a process that died is a spool whose file was never closed nor unlocked (its descriptor
closed without ``SettlementSpool.close()``, as the kernel closes a killed process's files).
"""

from __future__ import annotations

from pathlib import Path

from metergate.proxy.spool import Owed, SettlementSpool
from metergate.wallet.models import UsageRecord


def bill(n: int, lease: str | None = None) -> Owed:
    record = UsageRecord(id=f"req_{n}", mode="test", customer_id="acme", hold_id=f"h{n}", route="/openai",
                         endpoint="chat", model="gpt-4o-mini", feature=None, stream=False, status_code=200,
                         usage_source="provider", tokens_input=3, tokens_cached_input=0, tokens_output=5,
                         tokens_reasoning=0, asset="USD", price_amount=100 + n, detail={"note": "é"})
    return Owed(f"h{n}", 100 + n, record, lease, 7 if lease else 0)


def die(spool: SettlementSpool) -> None:
    """The process is gone: its descriptor closes (and its lock goes) without a word written."""
    assert spool._file is not None
    spool._file.close()  # what the kernel does to a killed process's files: the lock goes with them
    spool._file = None


def test_a_dead_process_s_bills_are_taken_over_once_and_a_live_one_s_left_alone(tmp_path: Path) -> None:
    dead, live = SettlementSpool(tmp_path), SettlementSpool(tmp_path)
    assert dead.open() == [] and live.open() == []
    leased = bill(2, lease="lease:x")
    dead.owe(bill(1))
    dead.owe(leased)
    dead.owe(bill(3))
    dead.paid("h1")
    live.owe(bill(9))
    die(dead)
    heir = SettlementSpool(tmp_path)
    taken = heir.open()
    assert sorted(b.hold_id for b in taken) == ["h2", "h3"]  # not h1 (paid), not h9 (its process lives)
    assert [b for b in taken if b.hold_id == "h2"] == [leased]  # every field, as it was kept
    again = SettlementSpool(tmp_path)
    assert again.open() == []  # taken once: the dead journal is gone, the others are locked by their owners
    again.close()
    heir.paid("h2")
    heir.paid("h3")
    heir.close()  # nothing owed: its journal is removed
    live.close()  # still owes h9: its journal stays for the next process
    last = SettlementSpool(tmp_path)
    assert [b.hold_id for b in last.open()] == ["h9"]
    last.paid("h9")
    last.close()
    assert list(tmp_path.glob("*.jsonl")) == []


def test_a_torn_last_line_is_skipped_and_the_rest_taken(tmp_path: Path) -> None:
    dead = SettlementSpool(tmp_path)
    dead.open()
    dead.owe(bill(1))
    assert dead._file is not None
    dead._file.write('{"owe": "h2", "price": 1')  # the process died mid-write
    dead._file.flush()
    die(dead)
    heir = SettlementSpool(tmp_path)
    assert [b.hold_id for b in heir.open()] == ["h1"]
    heir.close()
