"""The webhook outbox: every operator notification, committed to the SQL system of record before anyone
is told it exists, then sent until the receiver accepts it or every attempt is used.

Runs its statements through the wallet store's own transactions (SQLite's writer thread, PostgreSQL's
pool), like :mod:`metergate.payments.store`. Invariants: a row's ``id`` (the ``webhook-id``) and
``payload`` never change, so every attempt and every redelivery is the same message, which a receiver
deduplicates by id; a row is sent by at most one replica at a time (a claim with a lease; on PostgreSQL
the claim's ``SELECT ... FOR UPDATE SKIP LOCKED`` lets replicas share the due rows without waiting on
each other); a row leaves ``pending`` only as ``delivered`` or ``failed``, and only through its claim.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, and_, delete, insert, or_, select, update

from metergate.wallet import schema as w
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.webhooks import schema as s

Status = Literal["pending", "delivered", "failed", "skipped"]
STATUSES: tuple[Status, ...] = ("pending", "delivered", "failed", "skipped")
_CURSOR = re.compile(r"^([0-9]{1,16}):([A-Za-z0-9_]{0,64})$")
_PRUNE_BATCH = 500


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    mode: Mode
    type: str
    customer_id: str | None
    payload: str  # the body every attempt sends, byte for byte (UTF-8)
    created_at_ms: int
    status: Status
    attempts: int
    next_attempt_at_ms: int
    delivered_at_ms: int | None
    last_error: str | None

    @property
    def cursor(self) -> str:
        return f"{self.created_at_ms}:{self.id}"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "customer_id": self.customer_id, "status": self.status,
                "attempts": self.attempts, "created_at_ms": self.created_at_ms,
                "next_attempt_at_ms": self.next_attempt_at_ms if self.status == "pending" else None,
                "delivered_at_ms": self.delivered_at_ms, "last_error": self.last_error,
                "payload": json.loads(self.payload)}


def parse_cursor(text: str) -> tuple[int, str]:
    """``<created_at_ms>:<id>`` as a list or the follow endpoint handed it out; ``ValueError`` otherwise."""
    found = _CURSOR.match(text)
    if found is None:
        raise ValueError(text)
    return int(found.group(1)), found.group(2)


_SEQUENCE = itertools.count()


def new_id(at_ms: int) -> str:
    """Ordered like the notifications: the creation time, then this process's sequence, then randomness (so
    that two notifications of one millisecond follow in the order they were made)."""
    return f"ntf_{at_ms:012x}{next(_SEQUENCE) % 65536:04x}{uuid.uuid4().hex[:16]}"


class WebhookOutbox:
    def __init__(self, sql: SqlWalletStore) -> None:
        self.sql = sql

    async def open(self) -> None:
        """Create the table on a wallet opened before this module was imported."""
        await self.sql.write(lambda conn: w.metadata.create_all(conn, tables=list(s.TABLES), checkfirst=True))

    # ---------------------------------------------------------------- writing

    @staticmethod
    def insert(conn: Connection, event_type: str, mode: Mode, customer_id: str | None, data: dict[str, Any], *,
               deliver: bool, at_ms: int | None = None) -> str:
        """Add one notification inside the caller's transaction (so it commits with the event it reports);
        returns its id. ``deliver``: whether a ``notify_url`` will send it (else it is ``skipped``)."""
        at = now_ms() if at_ms is None else at_ms
        msg_id = new_id(at)
        body = json.dumps({"id": msg_id, "type": event_type, "created": at // 1000, "mode": mode,
                           "customer_id": customer_id, "data": data}, separators=(",", ":"), default=str)
        conn.execute(insert(s.webhook_outbox).values(
            id=msg_id, mode=mode, type=event_type, customer_id=customer_id, payload=body, created_at_ms=at,
            status="pending" if deliver else "skipped", next_attempt_at_ms=at, attempts=0, claimed_until_ms=0,
            last_error=None if deliver else "no notify_url configured"))
        return msg_id

    async def add(self, event_type: str, mode: Mode, customer_id: str | None, data: dict[str, Any], *,
                  deliver: bool) -> str:
        """Add one notification in a transaction of its own; committed when this returns."""
        msg_id: str = await self.sql.write(
            lambda conn: self.insert(conn, event_type, mode, customer_id, data, deliver=deliver))
        return msg_id

    # ---------------------------------------------------------------- delivering

    async def claim(self, *, batch: int, lease_ms: int) -> tuple[str, list[Webhook]]:
        """Claim up to ``batch`` due rows for ``lease_ms``; rows another replica holds are skipped."""
        token = uuid.uuid4().hex
        o = s.webhook_outbox.c

        def op(conn: Connection) -> list[Webhook]:
            at = now_ms()
            due = and_(o.status == "pending", o.next_attempt_at_ms <= at, o.claimed_until_ms < at)
            # FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite (one writer) renders no locking clause.
            ids = conn.execute(select(o.id).where(due).order_by(o.next_attempt_at_ms).limit(batch)
                               .with_for_update(skip_locked=True)).scalars().all()
            if not ids:
                return []
            conn.execute(update(s.webhook_outbox).where(o.id.in_(ids), due).values(
                claim_token=token, claimed_until_ms=at + lease_ms))
            return [_row(r) for r in conn.execute(select(s.webhook_outbox).where(
                o.claim_token == token, o.status == "pending").order_by(o.created_at_ms, o.id)).all()]

        return token, await self.sql.write(op)

    async def mark_delivered(self, msg_id: str, token: str) -> bool:
        o = s.webhook_outbox.c
        changed: int = await self.sql.write(lambda conn: conn.execute(update(s.webhook_outbox).where(
            o.id == msg_id, o.claim_token == token, o.status == "pending").values(
            status="delivered", delivered_at_ms=now_ms(), attempts=o.attempts + 1, last_error=None,
            claim_token=None, claimed_until_ms=0)).rowcount)
        return changed == 1

    async def mark_retry(self, msg_id: str, token: str, error: str, *, next_attempt_at_ms: int | None) -> None:
        """A failed attempt: try again at ``next_attempt_at_ms``, or (``None``) give up: ``failed``."""
        o = s.webhook_outbox.c
        values: dict[str, Any] = {"attempts": o.attempts + 1, "last_error": error[:2000], "claim_token": None,
                                  "claimed_until_ms": 0}
        if next_attempt_at_ms is None:
            values["status"] = "failed"
        else:
            values["next_attempt_at_ms"] = next_attempt_at_ms
        await self.sql.write(lambda conn: conn.execute(update(s.webhook_outbox).where(
            o.id == msg_id, o.claim_token == token, o.status == "pending").values(**values)))

    async def release(self, token: str) -> None:
        """Give back what is left of a claim (a replica shutting down mid-batch), so that those rows are due
        again at once instead of when the lease runs out."""
        o = s.webhook_outbox.c
        await self.sql.write(lambda conn: conn.execute(update(s.webhook_outbox).where(
            o.claim_token == token, o.status == "pending").values(claim_token=None, claimed_until_ms=0)))

    async def due(self) -> int:
        """How many rows are pending and due now, claimed or not (what a flush waits for)."""
        o = s.webhook_outbox.c
        at = now_ms()
        rows = await self.sql.read(lambda conn: conn.execute(select(o.id).where(
            o.status == "pending", o.next_attempt_at_ms <= at).limit(1)).all())
        return len(rows)

    async def prune(self, *, before_ms: int) -> int:
        """Forget a bounded batch of delivered, failed and skipped rows created before ``before_ms``."""
        o = s.webhook_outbox.c
        old = select(o.id).where(o.status != "pending", o.created_at_ms < before_ms).limit(_PRUNE_BATCH)
        pruned: int = await self.sql.write(
            lambda conn: conn.execute(delete(s.webhook_outbox).where(o.id.in_(old.scalar_subquery()))).rowcount)
        return pruned

    # ---------------------------------------------------------------- reading, redelivering

    async def get(self, mode: Mode, msg_id: str) -> Webhook | None:
        o = s.webhook_outbox.c
        found = await self.sql.read(lambda conn: conn.execute(select(s.webhook_outbox).where(
            o.id == msg_id, o.mode == mode)).first())
        return _row(found) if found is not None else None

    async def page(self, mode: Mode, *, status: Status | None = None, limit: int = 50,
                   before: tuple[int, str] | None = None) -> list[Webhook]:
        """Newest first; ``before``: the cursor of the last row of the previous page."""
        o = s.webhook_outbox.c
        where = [o.mode == mode]
        if status is not None:
            where.append(o.status == status)
        if before is not None:
            where.append(or_(o.created_at_ms < before[0], and_(o.created_at_ms == before[0], o.id < before[1])))
        rows = await self.sql.read(lambda conn: conn.execute(select(s.webhook_outbox).where(*where).order_by(
            o.created_at_ms.desc(), o.id.desc()).limit(limit)).all())
        return [_row(r) for r in rows]

    async def after(self, mode: Mode, cursor: tuple[int, str], *, limit: int) -> list[Webhook]:
        """Oldest first, strictly after ``cursor``: what a follower has not seen yet."""
        o = s.webhook_outbox.c
        later = or_(o.created_at_ms > cursor[0], and_(o.created_at_ms == cursor[0], o.id > cursor[1]))
        rows = await self.sql.read(lambda conn: conn.execute(select(s.webhook_outbox).where(
            o.mode == mode, later).order_by(o.created_at_ms, o.id).limit(limit)).all())
        return [_row(r) for r in rows]

    async def tail(self, mode: Mode) -> tuple[int, str]:
        """The cursor of the mode's newest row (or of now, when there is none)."""
        newest = await self.page(mode, limit=1)
        return (newest[0].created_at_ms, newest[0].id) if newest else (int(time.time() * 1000), "")

    async def redeliver(self, mode: Mode, msg_id: str, *, deliver: bool) -> Webhook | None:
        """Send the same message (same id, same body) again now, with a fresh set of attempts; ``None`` when
        the mode has no such row. A row being sent at this moment is sent once more, whatever that attempt gets."""
        o = s.webhook_outbox.c

        def op(conn: Connection) -> Any:
            conn.execute(update(s.webhook_outbox).where(o.id == msg_id, o.mode == mode).values(
                status="pending" if deliver else "skipped", attempts=0, next_attempt_at_ms=now_ms(),
                delivered_at_ms=None, claim_token=None, claimed_until_ms=0,
                last_error=None if deliver else "no notify_url configured"))
            return conn.execute(select(s.webhook_outbox).where(o.id == msg_id, o.mode == mode)).first()

        found = await self.sql.write(op)
        return _row(found) if found is not None else None


def _row(r: Any) -> Webhook:
    return Webhook(r.id, r.mode, r.type, r.customer_id, r.payload, int(r.created_at_ms), r.status, int(r.attempts),
                   int(r.next_attempt_at_ms), None if r.delivered_at_ms is None else int(r.delivered_at_ms),
                   r.last_error)
