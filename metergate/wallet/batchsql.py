"""The batch engine's statements and rows: how one batch of :mod:`metergate.wallet.batchops` operations is
loaded from and written to SQLite (``sqlite3``) and PostgreSQL (``asyncpg``), on the driver directly.

Why on the driver: per statement, SQLAlchemy's Core execution costs more Python than SQLite spends running
it, and a batch's work is a handful of statements. Each statement here is plain SQL text, prepared once per
connection by the driver (``sqlite3``'s statement cache; asyncpg's), with every multi-row write an
``executemany``.

A batch, on either backend, inside one transaction that the caller opened and commits:

1. **read**: the holds it names (PostgreSQL: ``FOR UPDATE``, in id order), then the accounts they and its
   reserves touch with their consumption order (``FOR UPDATE``, in key order: hold rows, then account rows,
   the lock order of every wallet operation, so batches and classic operations never deadlock), their open
   grants, its holds' allocations with their grants, and the idempotency keys its extensions would write;
2. **decide** every operation in memory (:func:`metergate.wallet.engine.decide`);
3. **write**: one ``executemany`` per table for ledger rows, holds, allocations, grants, usage records, and
   last one aggregated ``UPDATE`` per touched account.

Idempotency stays the unique index on the ledger key, in the same transaction. A batch first runs without
reading the keys its extensions and captures would write (one more statement per batch, for what is almost never
there): each is decided as new. If one was written before (a replayed settlement), the index refuses the
batch's ledger INSERT and nothing of the batch stays written (SQLite: the transaction, which the batch opened,
is rolled back and begun again — a savepoint around the writes would cost a copy of every page they touch;
PostgreSQL: the one write statement never applied), and the batch is decided again from fresh rows, this time
with the keys read, so that the replay is found and answered with the first result. A key that still collides
(written concurrently by another process) fails the whole batch, and its caller re-applies each operation alone.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from metergate.wallet import batchops as bo
from metergate.wallet import batchstate as bs
from metergate.wallet import engine as en
from metergate.wallet.grants import DEFAULT_ORDER

USAGE_FIELDS = bs.USAGE_COLUMNS

_HOLD_COLS = ", ".join(bs.HOLD_COLUMNS)
_GRANT_COLS = ", ".join(f"g.{c}" for c in bs.GRANT_COLUMNS)
_ACCOUNT_COLS = ("a.mode, a.customer_id, a.asset, a.credits_posted, a.debits_posted, a.debits_pending, "
                 "a.overdraft_limit, ws.consumption_order")
_OPEN = "g.state IN ('active', 'scheduled') AND g.amount - g.consumed - g.held - g.removed > 0"


def _placeholders(n: int, style: str, start: int = 1) -> str:
    return ", ".join("?" if style == "qmark" else f"${i}" for i in range(start, start + n))


def _writes(style: str) -> dict[str, str]:
    """The write statements, in the driver's parameter style (``qmark``: sqlite3, ``numeric``: asyncpg)."""
    def p(n: int, start: int = 1) -> str:
        return _placeholders(n, style, start)

    json_cast = "" if style == "qmark" else "::json"
    usage_values = [*(p(1, i + 1) for i in range(len(USAGE_FIELDS)))]
    usage_values[USAGE_FIELDS.index("detail")] += json_cast

    def at(i: int) -> str:
        return p(1, i)

    return {  # the SQLite writes (PostgreSQL's are one statement, below)
        "hold": f"INSERT INTO holds ({_HOLD_COLS}) VALUES ({p(len(bs.HOLD_COLUMNS))})",
        "hold_update": (f"UPDATE holds SET amount = {at(1)}, state = {at(2)}, captured_amount = {at(3)}, "
                        f"expires_at_ms = {at(4)}, resolved_at_ms = {at(5)} WHERE id = {at(6)}"),
        "entry": f"INSERT INTO ledger_entries ({', '.join(bs.ENTRY_COLUMNS)}) VALUES ({p(len(bs.ENTRY_COLUMNS))})",
        "alloc": f"INSERT INTO hold_allocations (hold_id, grant_id, held, captured) VALUES ({p(4)})",
        "alloc_move": (f"UPDATE hold_allocations SET held = held + {at(1)}, captured = captured + {at(2)} "
                       f"WHERE hold_id = {at(3)} AND grant_id = {at(4)}"),
        "grant_move": (f"UPDATE grants SET held = held + {at(1)}, consumed = consumed + {at(2)}, "
                       f"removed = removed + {at(3)} WHERE id = {at(4)}"),
        "usage": f"INSERT INTO usage_records ({', '.join(USAGE_FIELDS)}) VALUES ({', '.join(usage_values)})",
        "account_move": (f"UPDATE accounts SET credits_posted = credits_posted + {at(1)}, "
                         f"debits_posted = debits_posted + {at(2)}, debits_pending = debits_pending + {at(3)} "
                         f"WHERE mode = {at(4)} AND customer_id = {at(5)} AND asset = {at(6)}"),
    }


# ------------------------------------------------------------------ rows into state


def _add_holds(state: bs.BatchState, rows: Sequence[Sequence[Any]]) -> None:
    for r in rows:
        state.holds[r[0]] = bs.HoldState(r[0], r[1], r[2], r[3], int(r[4]), r[5], int(r[6]), int(r[7]), int(r[8]),
                                         None if r[9] is None else int(r[9]), amount0=int(r[4]),
                                         captured0=int(r[6]))


def _add_account(state: bs.BatchState, r: Sequence[Any]) -> None:
    state.accounts[(r[0], r[1], r[2])] = bs.AccountState(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]),
                                                         int(r[6]), r[7] or DEFAULT_ORDER)


def _add_open_grant(state: bs.BatchState, r: Sequence[Any]) -> None:
    """A row of (mode, customer, asset, *GRANT_COLUMNS)."""
    account = state.accounts.get((r[0], r[1], r[2]))
    if account is not None:
        grant = bs.add_grant(state, r[3:])
        account.grant_ids.add(grant.id)
        account.grants.append(grant)


def _add_alloc(state: bs.BatchState, r: Sequence[Any]) -> None:
    """A row of (hold, grant, held, captured, *GRANT_COLUMNS of its grant, NULL for the unbacked part)."""
    state.allocs.setdefault(r[0], {})[r[1]] = bs.AllocState(r[1], int(r[2]), int(r[3]))
    if r[1] and r[4] is not None:
        grant = bs.add_grant(state, r[4:])
        # A grant the hold fully holds has nothing free now, but will once the hold releases it: it must be
        # drawable by the batch's later operations on the same account.
        if grant.state in ("active", "scheduled"):
            hold = state.holds[r[0]]
            account = state.accounts.get((hold.mode, hold.customer_id, hold.asset))
            if account is not None and grant.id not in account.grant_ids:
                account.grant_ids.add(grant.id)
                account.grants.append(grant)


def _alloc_holds(state: bs.BatchState, ops: Sequence[bo.EngineOp]) -> list[str]:
    """The committed holds whose allocations the batch needs (the ones it extends or settles)."""
    return sorted({op.hold_id for op in ops if not isinstance(op, bo.ReserveOp) and op.hold_id in state.holds})


# ------------------------------------------------------------------ what a batch writes


def new_holds(state: bs.BatchState) -> Iterable[bs.HoldState]:
    return (h for h in state.holds.values() if h.new)


def changed_holds(state: bs.BatchState) -> Iterable[bs.HoldState]:
    return (h for h in state.holds.values() if h.dirty and not h.new)


def hold_values(h: bs.HoldState) -> tuple[Any, ...]:
    return (h.id, h.mode, h.customer_id, h.asset, h.amount, h.state, h.captured_amount, h.expires_at_ms,
            h.created_at_ms, h.resolved_at_ms)


def alloc_rows(state: bs.BatchState) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(new allocations as (hold, grant, held, captured), moved ones as (held delta, captured delta, hold,
    grant))."""
    inserts: list[tuple[Any, ...]] = []
    moves: list[tuple[Any, ...]] = []
    for hold_id, allocs in state.allocs.items():
        for a in allocs.values():
            if a.new:
                inserts.append((hold_id, a.grant_id, a.held, a.captured))
            elif a.d_held or a.d_captured:
                moves.append((a.d_held, a.d_captured, hold_id, a.grant_id))
    return inserts, moves


def grant_moves(state: bs.BatchState) -> list[tuple[int, int, int, str]]:
    """One (held, consumed, removed, id) delta per grant the batch touched."""
    return [(g.d_held, g.d_consumed, g.d_removed, g.id) for g in state.grants.values()
            if g.d_held or g.d_consumed or g.d_removed]


def account_moves(state: bs.BatchState) -> list[tuple[int, int, int, str, str, str]]:
    """One (credits, posted, pending, mode, customer, asset) delta per account the batch touched, in key order."""
    return [(a.d_credits, a.d_posted, a.d_pending, a.mode, a.customer_id, a.asset)
            for _, a in sorted(state.accounts.items()) if a.d_credits or a.d_posted or a.d_pending]


# ------------------------------------------------------------------ SQLite


_SQ = _writes("qmark")
_SQ_HOLDS = f"SELECT {_HOLD_COLS} FROM holds WHERE id IN (SELECT value FROM json_each(?))"
_SQ_ACCOUNT = (f"SELECT {_ACCOUNT_COLS} FROM accounts a LEFT JOIN wallet_settings ws "
               "ON ws.mode = a.mode AND ws.customer_id = a.customer_id "
               "WHERE a.mode = ? AND a.customer_id = ? AND a.asset = ?")
_SQ_GRANTS = (f"SELECT g.mode, g.customer_id, g.asset, {_GRANT_COLS} FROM grants g "
              f"WHERE g.mode = ? AND g.customer_id = ? AND g.asset = ? AND {_OPEN}")
_SQ_ALLOCS = (f"SELECT al.hold_id, al.grant_id, al.held, al.captured, {_GRANT_COLS} FROM hold_allocations al "
              "LEFT JOIN grants g ON g.id = al.grant_id WHERE al.hold_id IN (SELECT value FROM json_each(?))")
_SQ_KEYS = ("SELECT mode, idempotency_key, request_hash FROM ledger_entries "
            "WHERE mode = ? AND idempotency_key IN (SELECT value FROM json_each(?))")


def apply_sqlite(raw: sqlite3.Connection, ops: Sequence[bo.EngineOp]) -> tuple[list[Any], bool]:
    """Load, decide and write one batch on the SQLite writer's connection, as the first statements of its open
    write transaction (``BEGIN IMMEDIATE``): first without reading the ledger keys it writes; if the unique index
    refused one, the transaction is rolled back, begun again, and the batch decided again with them (see the
    module docstring). Returns the outcomes, and whether it had to decide again."""
    try:
        return _apply_sqlite(raw, ops, keys=False), False
    except sqlite3.IntegrityError:
        if not any(isinstance(op, bo.ExtendOp | bo.CaptureOp) for op in ops):
            raise  # no key it could have read first: a collision of another kind
    raw.execute("ROLLBACK")
    raw.execute("BEGIN IMMEDIATE")
    return _apply_sqlite(raw, ops, keys=True), True


def _apply_sqlite(raw: sqlite3.Connection, ops: Sequence[bo.EngineOp], *, keys: bool) -> list[Any]:
    state = bs.BatchState(keys_read=keys)
    _add_holds(state, raw.execute(_SQ_HOLDS, (json.dumps(bs.hold_ids(ops)),)).fetchall())
    for key in bs.account_keys(ops, state.holds):
        row = raw.execute(_SQ_ACCOUNT, key).fetchone()
        if row is not None:
            _add_account(state, row)
            for g in raw.execute(_SQ_GRANTS, key).fetchall():
                _add_open_grant(state, g)
    alloc_holds = _alloc_holds(state, ops)
    if alloc_holds:
        for r in raw.execute(_SQ_ALLOCS, (json.dumps(alloc_holds),)).fetchall():
            _add_alloc(state, r)
    if keys:
        named = bs.extend_keys(ops, state.holds)
        for mode in sorted({m for m, _ in named}):
            for m, k, h in raw.execute(_SQ_KEYS, (mode, json.dumps([k for km, k in named if km == mode]))).fetchall():
                state.keys[(m, k)] = h
    outcomes = en.decide(state, ops)
    _write_sqlite(raw, state)
    return outcomes


def _write_sqlite(raw: sqlite3.Connection, state: bs.BatchState) -> None:
    news = [hold_values(h) for h in new_holds(state)]
    if news:
        raw.executemany(_SQ["hold"], news)
    changed = [(h.amount, h.state, h.captured_amount, h.expires_at_ms, h.resolved_at_ms, h.id)
               for h in changed_holds(state)]
    if changed:
        raw.executemany(_SQ["hold_update"], changed)
    if state.entries:
        raw.executemany(_SQ["entry"], state.entries)
    inserts, moves = alloc_rows(state)
    if inserts:
        raw.executemany(_SQ["alloc"], inserts)
    if moves:
        raw.executemany(_SQ["alloc_move"], moves)
    grants = grant_moves(state)
    if grants:
        raw.executemany(_SQ["grant_move"], grants)
    if state.usage:
        raw.executemany(_SQ["usage"], state.usage)
    accounts = account_moves(state)
    if accounts:
        raw.executemany(_SQ["account_move"], accounts)


# ------------------------------------------------------------------ PostgreSQL
#
# On PostgreSQL every statement is a round trip, and under load each costs as much as its work; and on a hot
# wallet the account row's lock is the bottleneck, held from whenever it is taken until the COMMIT's flush. So a
# batch first runs *optimistically*, in three round trips with the lock taken last: read its holds with their
# allocations, and its accounts with their order and open grants, without locks; decide; then write everything
# in one statement, committed on its own, whose parts are data-modifying CTEs over ``unnest`` of one array per
# column (empty arrays write nothing, so it is always the same prepared statement). That statement applies
# only if what the decisions relied on still holds, re-checked under each row's lock on its newest version
# (Read Committed re-evaluates an UPDATE's WHERE on the row it waited for): every hold it changes is still
# pending with the amounts read; every grant it draws is in the state read and keeps a free remainder >= 0;
# every account it moves keeps ``available >= min(0, what the batch expected)``, so no batch can overspend
# whatever another replica did meanwhile. If any part applies to fewer rows than decided, the statement raises
# (``batch conflict``) and nothing of it is written; the batch then runs again *pessimistically*, in a
# transaction that locks its holds and then its accounts (``FOR UPDATE``, in key order) before reading.

_HOLDS_AND_ALLOCS = (f"SELECT {', '.join(f'h.{c}' for c in bs.HOLD_COLUMNS)}, al.grant_id, al.held, al.captured, "
                     f"{_GRANT_COLS} FROM holds h LEFT JOIN hold_allocations al ON al.hold_id = h.id "
                     "LEFT JOIN grants g ON g.id = al.grant_id WHERE h.id = ANY($1::text[]) "
                     "ORDER BY h.id")
_ACCOUNTS_AND_GRANTS = (f"SELECT {_ACCOUNT_COLS}, {_GRANT_COLS} FROM accounts a LEFT JOIN wallet_settings ws "
                        "ON ws.mode = a.mode AND ws.customer_id = a.customer_id "
                        "LEFT JOIN grants g ON g.mode = a.mode AND g.customer_id = a.customer_id "
                        f"AND g.asset = a.asset AND {_OPEN} "
                        "WHERE (a.mode, a.customer_id, a.asset) IN "
                        "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[])) "
                        "ORDER BY a.mode, a.customer_id, a.asset")
# The pessimistic run locks first, then reads, each read a statement of its own. Not ``FOR UPDATE OF`` on the
# reads themselves: a row found changed by a transaction the lock waited for is re-read at its newest version,
# but the rows joined to it (a hold's allocations, an account's grants) keep the statement's older snapshot,
# and a decision over a fresh account and stale grants (free that another replica had just released) held
# what they no longer showed as unbacked: the account balanced, its grants drifted from it. A read that starts
# after the locks are held sees everything committed before them, consistently.
_LOCK_HOLDS = "SELECT 1 FROM holds WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
_LOCK_ACCOUNTS = ("SELECT 1 FROM accounts WHERE (mode, customer_id, asset) IN "
                  "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[])) "
                  "ORDER BY mode, customer_id, asset FOR UPDATE")
_PG_KEYS = ("SELECT mode, idempotency_key, request_hash FROM ledger_entries "
            "WHERE (mode, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))")


def _pg_type(column: str, table: Any) -> str:
    from sqlalchemy import JSON, BigInteger, Boolean, Integer

    kind = table.c[column].type
    if isinstance(kind, JSON):
        return "text"  # cast to json where it is inserted
    if isinstance(kind, Boolean):
        return "boolean"
    if isinstance(kind, BigInteger | Integer):
        return "bigint"
    return "text"


def _build_pg_write() -> tuple[str, list[int]]:
    """The one write statement, and how many columns each of its parts takes (in order)."""
    from metergate.wallet import schema as t

    n = 0
    widths: list[int] = []

    def unnest(columns: Sequence[tuple[str, str]], *, ordinality: bool = False) -> str:
        nonlocal n
        arrays = []
        for _, kind in columns:
            n += 1
            arrays.append(f"${n}::{kind}[]")
        widths.append(len(columns))
        names = ", ".join(name for name, _ in columns)
        if ordinality:
            return f"unnest({', '.join(arrays)}) WITH ORDINALITY AS u({names}, ord)"
        return f"unnest({', '.join(arrays)}) AS u({names})"

    def typed(names: Sequence[str], table: Any) -> list[tuple[str, str]]:
        return [(c, _pg_type(c, table)) for c in names]

    bigint = "bigint"
    hold_moves = [("amount", bigint), ("state", "text"), ("captured_amount", bigint), ("expires_at_ms", bigint),
                  ("resolved_at_ms", bigint), ("id", "text"), ("amount0", bigint), ("captured0", bigint)]
    grant_moves = [("dh", bigint), ("dc", bigint), ("dr", bigint), ("id", "text"), ("state0", "text")]
    account_moves = [("dc", bigint), ("dp", bigint), ("dq", bigint), ("mode", "text"), ("customer_id", "text"),
                     ("asset", "text"), ("floor", bigint)]
    usage_cols = ", ".join(f"u.{c}::json" if c == "detail" else f"u.{c}" for c in USAGE_FIELDS)
    parts = [
        f"new_holds AS (INSERT INTO holds ({_HOLD_COLS}) SELECT * FROM "
        f"{unnest(typed(bs.HOLD_COLUMNS, t.holds))})",
        "moved_holds AS (UPDATE holds h SET amount = u.amount, state = u.state, captured_amount = u.captured_amount, "
        "expires_at_ms = u.expires_at_ms, resolved_at_ms = u.resolved_at_ms FROM "
        f"{unnest(hold_moves)} WHERE h.id = u.id AND h.state = 'pending' AND h.amount = u.amount0 "
        "AND h.captured_amount = u.captured0 RETURNING 1)",
        f"entries AS (INSERT INTO ledger_entries ({', '.join(bs.ENTRY_COLUMNS)}) "
        f"SELECT {', '.join(f'u.{c}' for c in bs.ENTRY_COLUMNS)} FROM "
        f"{unnest(typed(bs.ENTRY_COLUMNS, t.ledger_entries), ordinality=True)} ORDER BY u.ord)",
        "new_allocs AS (INSERT INTO hold_allocations (hold_id, grant_id, held, captured) SELECT * FROM "
        f"{unnest([('hold_id', 'text'), ('grant_id', 'text'), ('held', bigint), ('captured', bigint)])})",
        "moved_allocs AS (UPDATE hold_allocations al SET held = al.held + u.dh, captured = al.captured + u.dc FROM "
        f"{unnest([('dh', bigint), ('dc', bigint), ('hold_id', 'text'), ('grant_id', 'text')])} "
        "WHERE al.hold_id = u.hold_id AND al.grant_id = u.grant_id)",
        "moved_grants AS (UPDATE grants g SET held = g.held + u.dh, consumed = g.consumed + u.dc, "
        f"removed = g.removed + u.dr FROM {unnest(grant_moves)} WHERE g.id = u.id AND g.state = u.state0 "
        "AND g.amount - g.consumed - g.held - g.removed - u.dh - u.dc - u.dr >= 0 RETURNING 1)",
        f"usage AS (INSERT INTO usage_records ({', '.join(USAGE_FIELDS)}) SELECT {usage_cols} FROM "
        f"{unnest(typed(USAGE_FIELDS, t.usage_records))})",
        "moved_accounts AS (UPDATE accounts a SET credits_posted = a.credits_posted + u.dc, "
        "debits_posted = a.debits_posted + u.dp, debits_pending = a.debits_pending + u.dq FROM "
        f"{unnest(account_moves)} "
        "WHERE a.mode = u.mode AND a.customer_id = u.customer_id AND a.asset = u.asset "
        "AND a.credits_posted + u.dc + a.overdraft_limit - a.debits_posted - u.dp - a.debits_pending - u.dq "
        ">= LEAST(0, u.floor) RETURNING 1)",
    ]
    n += 3
    # Checked in this order (holds, then accounts, then grants: the lock order of every wallet operation); a
    # shortfall fails the whole statement (the cast of a non-number), so that nothing of it commits.
    check = (f"SELECT CASE WHEN (SELECT count(*) FROM moved_holds) = ${n - 2} "
             f"AND (SELECT count(*) FROM moved_accounts) = ${n} AND (SELECT count(*) FROM moved_grants) = ${n - 1} "
             "THEN 0 ELSE CAST('batch conflict: ' || (SELECT count(*) FROM moved_accounts) AS integer) END")
    return "WITH " + ", ".join(parts) + " " + check, widths


_PG_WRITE, _PG_WIDTHS = _build_pg_write()


class BatchConflict(Exception):
    """An optimistic batch's write found rows changed since it read them: nothing of it was written."""


async def apply_postgres(con: Any, ops: Sequence[bo.EngineOp], *, locked: bool) -> list[Any]:
    """Load, decide and write one batch on an asyncpg connection. ``locked=False``: optimistically, outside any
    transaction, without reading the ledger keys it writes (the write commits on its own, or raises
    :class:`BatchConflict`, or the unique violation of a key written before, and then nothing was written);
    ``locked=True``: inside the caller's transaction, locking its holds, then its accounts, each before it reads
    them, and reading the keys."""
    state = bs.BatchState(keys_read=locked)
    allocs: list[Sequence[Any]] = []
    width = len(bs.HOLD_COLUMNS)
    ids = bs.hold_ids(ops)
    if locked:
        await con.execute(_LOCK_HOLDS, ids)
    for r in await con.fetch(_HOLDS_AND_ALLOCS, ids):
        if r[0] not in state.holds:
            _add_holds(state, [r[:width]])
        if r[width] is not None:
            allocs.append((r[0], *r[width:]))
    keys = bs.account_keys(ops, state.holds)
    if keys:
        columns = [[k[i] for k in keys] for i in range(3)]
        if locked:
            await con.execute(_LOCK_ACCOUNTS, *columns)
        for r in await con.fetch(_ACCOUNTS_AND_GRANTS, *columns):
            if (r[0], r[1], r[2]) not in state.accounts:
                _add_account(state, r[:8])
            if r[8] is not None:
                _add_open_grant(state, (r[0], r[1], r[2], *r[8:]))
    for r in allocs:
        _add_alloc(state, r)
    extend = bs.extend_keys(ops, state.holds) if locked else None
    if extend:
        for m, k, h in await con.fetch(_PG_KEYS, [m for m, _ in extend], [k for _, k in extend]):
            state.keys[(m, k)] = h
    try:
        outcomes = en.decide(state, ops)
    except AssertionError as inconsistent:
        if locked:
            raise
        # The optimistic reads are two statements, two snapshots: a hold another replica settled between them
        # can look pending beside an account that no longer holds it, and the engine's own checks refuse the
        # decision. Nothing was written: decide again, locked, over one consistent view.
        raise BatchConflict(str(inconsistent)) from inconsistent
    await _write_postgres(con, state)
    return outcomes


async def _write_postgres(con: Any, state: bs.BatchState) -> None:
    inserts, moves = alloc_rows(state)
    holds = [(h.amount, h.state, h.captured_amount, h.expires_at_ms, h.resolved_at_ms, h.id, h.amount0, h.captured0)
             for h in changed_holds(state)]
    grants = [(g.d_held, g.d_consumed, g.d_removed, g.id, g.state) for g in sorted(state.grants.values(),
                                                                                   key=lambda g: g.id)
              if g.d_held or g.d_consumed or g.d_removed]
    accounts = [(a.d_credits, a.d_posted, a.d_pending, a.mode, a.customer_id, a.asset, a.available)
                for _, a in sorted(state.accounts.items()) if a.d_credits or a.d_posted or a.d_pending]
    tables: list[Sequence[Sequence[Any]]] = [
        [hold_values(h) for h in new_holds(state)], holds, state.entries, inserts, moves, grants,
        state.usage, accounts,
    ]
    if not any(tables):
        return
    args: list[Any] = []
    for rows, width in zip(tables, _PG_WIDTHS, strict=True):
        args.extend(list(column) for column in zip(*rows, strict=True)) if rows else args.extend([[]] * width)
    args += [len(holds), len(grants), len(accounts)]
    from asyncpg import InvalidTextRepresentationError  # loaded with the connection that runs this

    try:
        await con.execute(_PG_WRITE, *args)
    except InvalidTextRepresentationError as error:
        if "batch conflict" not in str(error):
            raise
        raise BatchConflict(str(error)) from None


__all__ = ["BatchConflict", "apply_postgres", "apply_sqlite"]
