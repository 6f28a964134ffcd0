"""The ledger's building blocks, shared by every wallet operation: the prepared hot statements, appending an
entry, and turning rows into values.

Every function here runs inside a transaction that the caller opened (see :mod:`metergate.wallet.sql`); none
commits. An entry's deltas are exactly what its operation did to the account's balance columns, so each
column stays the sum of its deltas (:func:`metergate.wallet.audit.audit_ledger`).
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

from sqlalchemy import Connection, bindparam, insert, select, update

from metergate.wallet import schema as t
from metergate.wallet.errors import HoldNotFound, IdempotencyConflict
from metergate.wallet.execution import Prepared
from metergate.wallet.models import Balance, EntryKind, Hold, LedgerEntry, Mode, now_ms

AnyRow = Any  # a SQLAlchemy Row, or a Prepared statement's named tuple of the same columns

_a, _h, _e = t.accounts.c, t.holds.c, t.ledger_entries.c
ACCOUNT_WHERE = (_a.mode == bindparam("b_mode"), _a.customer_id == bindparam("b_customer"),
                 _a.asset == bindparam("b_asset"))
_ACCOUNT_COLUMNS = (_a.mode, _a.customer_id, _a.asset, _a.credits_posted, _a.debits_posted, _a.debits_pending,
                    _a.overdraft_limit)
RESERVE = Prepared(update(t.accounts)
                   .where(*ACCOUNT_WHERE,
                          _a.credits_posted + _a.overdraft_limit - _a.debits_posted - _a.debits_pending
                          >= bindparam("b_amount"))
                   .values(debits_pending=_a.debits_pending + bindparam("b_amount"))
                   .returning(*_ACCOUNT_COLUMNS))
OVERDRAW = Prepared(update(t.accounts)
                    .where(*ACCOUNT_WHERE)
                    .values(debits_pending=_a.debits_pending + bindparam("b_amount"))
                    .returning(*_ACCOUNT_COLUMNS))
SELECT_ACCOUNT = Prepared(select(t.accounts).where(*ACCOUNT_WHERE))
SELECT_ACCOUNT_LOCKED = Prepared(select(t.accounts).where(*ACCOUNT_WHERE).with_for_update())
# Every balance column moved at once, by deltas; the caller holds the account row (locked on PostgreSQL).
MOVE_ACCOUNT = Prepared(update(t.accounts).where(*ACCOUNT_WHERE).values(
    credits_posted=_a.credits_posted + bindparam("b_credits"),
    debits_pending=_a.debits_pending + bindparam("b_pending"),
    debits_posted=_a.debits_posted + bindparam("b_posted")))
SELECT_HOLD = Prepared(select(t.holds).where(_h.id == bindparam("b_hold")))
SELECT_HOLD_LOCKED = Prepared(select(t.holds).where(_h.id == bindparam("b_hold")).with_for_update())
UPDATE_HOLD = Prepared(update(t.holds).where(_h.id == bindparam("b_hold")).values(
    state=bindparam("b_state"), amount=bindparam("b_amount"), captured_amount=bindparam("b_captured"),
    expires_at_ms=bindparam("b_expires"), resolved_at_ms=bindparam("b_resolved")))
SELECT_ENTRY = Prepared(select(t.ledger_entries).where(_e.mode == bindparam("b_mode"),
                                                       _e.idempotency_key == bindparam("b_key")))
INSERT_HOLD = Prepared(insert(t.holds), columns=(
    "id", "mode", "customer_id", "asset", "amount", "state", "captured_amount", "expires_at_ms", "created_at_ms"))
INSERT_ENTRY = Prepared(insert(t.ledger_entries).returning(_e.seq), columns=(
    "idempotency_key", "request_hash", "mode", "customer_id", "asset", "kind", "amount", "credits_delta",
    "posted_delta", "pending_delta", "hold_id", "memo", "created_at_ms", "grant_id"))


def request_hash(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def append(conn: Connection, key: str, hashed: str, mode: str, customer_id: str, asset: str, kind: EntryKind,
           amount: int, *, credits: int = 0, posted: int = 0, pending: int = 0, hold_id: str | None = None,
           memo: str = "", grant_id: str | None = None, at_ms: int | None = None) -> LedgerEntry:
    """Insert one ledger entry; a duplicate ``key`` raises ``IntegrityError`` (the idempotency guard)."""
    created = now_ms() if at_ms is None else at_ms
    seq = INSERT_ENTRY.scalar_one(conn, {
        "idempotency_key": key, "request_hash": hashed, "mode": mode, "customer_id": customer_id,
        "asset": asset, "kind": kind, "amount": amount, "credits_delta": credits, "posted_delta": posted,
        "pending_delta": pending, "hold_id": hold_id, "memo": memo, "created_at_ms": created, "grant_id": grant_id})
    return LedgerEntry(seq, key, cast(Mode, mode), customer_id, asset, kind, amount, credits, posted, pending,
                       hold_id, memo, created, grant_id)


def move_account(conn: Connection, mode: str, customer_id: str, asset: str, *, credits: int = 0, pending: int = 0,
                 posted: int = 0) -> None:
    if credits or pending or posted:
        MOVE_ACCOUNT.run(conn, {"b_mode": mode, "b_customer": customer_id, "b_asset": asset, "b_credits": credits,
                                "b_pending": pending, "b_posted": posted})


def lock_account(conn: Connection, mode: str, customer_id: str, asset: str) -> Balance:
    """The account's balance, its row locked on PostgreSQL until the transaction ends (one writer on SQLite)."""
    row = SELECT_ACCOUNT_LOCKED.first(conn, {"b_mode": mode, "b_customer": customer_id, "b_asset": asset})
    return balance_row(row) if row is not None else Balance(mode, customer_id, asset, 0, 0, 0)  # type: ignore[arg-type]


def balance_of(conn: Connection, mode: str, customer_id: str, asset: str) -> Balance:
    row = SELECT_ACCOUNT.first(conn, {"b_mode": mode, "b_customer": customer_id, "b_asset": asset})
    return balance_row(row) if row is not None else Balance(mode, customer_id, asset, 0, 0, 0)  # type: ignore[arg-type]


def hold_row(conn: Connection, hold_id: str) -> AnyRow | None:
    return SELECT_HOLD.first(conn, {"b_hold": hold_id})


def entry_row(conn: Connection, mode: str, key: str) -> AnyRow | None:
    return SELECT_ENTRY.first(conn, {"b_mode": mode, "b_key": key})


def balance_row(row: AnyRow) -> Balance:
    return Balance(mode=row.mode, customer_id=row.customer_id, asset=row.asset,
                   credits_posted=int(row.credits_posted), debits_posted=int(row.debits_posted),
                   debits_pending=int(row.debits_pending), overdraft_limit=int(row.overdraft_limit))


def hold_of(row: AnyRow) -> Hold:
    return Hold(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset, amount=int(row.amount),
                state=row.state, expires_at_ms=int(row.expires_at_ms), created_at_ms=int(row.created_at_ms),
                captured_amount=int(row.captured_amount))


def entry_of(row: AnyRow) -> LedgerEntry:
    return LedgerEntry(seq=row.seq, idempotency_key=row.idempotency_key, mode=row.mode,
                       customer_id=row.customer_id, asset=row.asset, kind=row.kind, amount=int(row.amount),
                       credits_delta=int(row.credits_delta), posted_delta=int(row.posted_delta),
                       pending_delta=int(row.pending_delta), hold_id=row.hold_id, memo=row.memo,
                       created_at_ms=int(row.created_at_ms), grant_id=row.grant_id)


def locked_hold(conn: Connection, hold_id: str) -> Hold:
    """The hold, locked for this transaction (PostgreSQL); ``HoldNotFound`` if there is none."""
    row = SELECT_HOLD_LOCKED.first(conn, {"b_hold": hold_id})
    if row is None:
        raise HoldNotFound(hold_id)
    return hold_of(row)


def previous_entry(conn: Connection, mode: Mode, key: str, hashed: str) -> Any | None:
    """The ledger entry an earlier call with this idempotency key wrote, if any; ``IdempotencyConflict`` when
    that call had other content."""
    entry = entry_row(conn, mode, key)
    if entry is not None and entry.request_hash != hashed:
        raise IdempotencyConflict(key)
    return entry
