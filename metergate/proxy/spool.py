"""The settlement backlog on local disk, so that a bill waiting for the store outlives its process.

Why: while the wallet store is down, the bill of an answer already delivered waits in the process
(:mod:`metergate.proxy.settlement`). A ``kill -9``, an OOM kill or a node losing power would then lose it: the
hold expires, the tokens go unbilled and nothing says so. With ``settlement_spool_dir`` set (a local directory;
in Kubernetes an ``emptyDir``, which outlives a restart of the container) each bill is appended to a journal and
``fsync``-ed before it joins the backlog, and its outcome (settled, or written off) is appended when known. The
cost falls only on that path: a settlement the store takes at once never touches the disk.

A process owns its journal through an exclusive ``flock``, which the kernel releases when the process dies, however
it dies. A process starting takes over every journal in the directory that no live process holds: what they
still owe joins its own backlog (written to its own journal first), and the old file is deleted. Settling is
idempotent by hold id (a lease's capture by the request's key), so a bill that did commit before the crash is
answered with its first result and charged once.

Each entry names the durable way to bill it, fixed when it is kept: the hold's own ``settle`` for a hold the
store keeps, or, for a request admitted from an escrow lease (its hold lived only in the dead process's memory),
a capture from that lease under the request's key, which bills the wallet directly once the lease has expired.

Format: one JSON object per line, ``{"owe": hold_id, "price", "lease", "held", "record"}`` or ``{"paid":
hold_id}``. A torn last line (the process died mid-write) is skipped: its bill had not joined the backlog, so
the settlement it belongs to was still being tried inline, and its hold expires as any unsettled hold does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from metergate.wallet.models import UsageRecord

log = logging.getLogger(__name__)
_SUFFIX = ".settlements.jsonl"


@dataclass(frozen=True, slots=True)
class Owed:
    """A bill kept until the store takes it. ``lease``: the escrow lease it draws on (``held`` of it), when its
    hold lived only in process memory; ``None`` for a hold the store keeps."""

    hold_id: str
    price: int
    record: UsageRecord
    lease: str | None = None
    held: int = 0

    def line(self) -> dict[str, Any]:
        return {"owe": self.hold_id, "price": self.price, "lease": self.lease, "held": self.held,
                "record": dataclasses.asdict(self.record)}

    @classmethod
    def parse(cls, entry: dict[str, Any]) -> Owed:
        lease = entry.get("lease")
        return cls(str(entry["owe"]), int(entry["price"]), UsageRecord(**entry["record"]),
                   None if lease is None else str(lease), int(entry.get("held", 0)))


class SettlementSpool:
    """This process's journal in ``directory`` (created if missing), and the journals it took over."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._file: IO[str] | None = None
        self._open = 0  # bills in the journal not yet paid; at 0 the journal is emptied

    def open(self) -> list[Owed]:
        """Lock a new journal of this process's own; take over the journals of dead processes and return what
        they still owe (already copied into this journal)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{uuid.uuid4().hex}{_SUFFIX}"
        self._file = path.open("a", encoding="utf-8")
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        inherited: list[Owed] = []
        for other in sorted(self.directory.glob(f"*{_SUFFIX}")):
            if other == path:
                continue
            left = self._take_over(other)
            if left is not None:
                inherited.extend(left)
        for bill in inherited:
            self.owe(bill)
        if inherited:
            log.warning("settlement spool: %d bills left unsettled by a stopped process, to settle now",
                        len(inherited))
        return inherited

    def _take_over(self, path: Path) -> list[Owed] | None:
        """What ``path`` still owes, if no live process holds it (then it is deleted); ``None`` if one does."""
        try:
            f = path.open("r+", encoding="utf-8")
        except FileNotFoundError:  # taken over by another process starting beside this one
            return None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # its process is alive
            owed: dict[str, Owed] = {}
            for n, raw in enumerate(f, 1):
                try:
                    entry = json.loads(raw)
                    if "paid" in entry:
                        owed.pop(str(entry["paid"]), None)
                    else:
                        bill = Owed.parse(entry)
                        owed[bill.hold_id] = bill
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("settlement spool: %s line %d unreadable (%s); skipped", path.name, n, exc)
            path.unlink()
            return list(owed.values())

    def owe(self, owed: Owed) -> None:
        """Journal a bill before it joins the backlog (written through to the disk)."""
        self._append(owed.line())
        self._open += 1

    def paid(self, hold_id: str) -> None:
        """The bill of ``hold_id`` is settled or written off: no process is to settle it again."""
        self._append({"paid": hold_id})
        self._open -= 1
        if self._open <= 0 and self._file is not None:  # nothing owed: start the journal afresh
            self._file.truncate(0)
            self._file.seek(0)
            self._open = 0

    def _append(self, entry: dict[str, Any]) -> None:
        assert self._file is not None, "the spool is not open"
        self._file.write(json.dumps(entry, default=str, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Release the journal: empty, it is deleted; still owing, it stays for the next process to take."""
        f, self._file = self._file, None
        if f is None:
            return
        with contextlib.suppress(OSError):
            if self._open <= 0:
                Path(f.name).unlink()
        f.close()


__all__ = ["Owed", "SettlementSpool"]
