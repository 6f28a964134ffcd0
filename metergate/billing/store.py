"""Billing state beside the wallet: mode changes, overdraft history, the meter-event outbox, export pages.

Runs its statements through the wallet store's own transactions (SQLite's writer thread, PostgreSQL's
pool), like :mod:`metergate.payments.store`: a mode change and the overdraft limits it sets commit
together, in one transaction that locks the customer's row (PostgreSQL) or runs on the single writer
(SQLite), so two concurrent changes cannot interleave.

The only wallet column written here is ``accounts.overdraft_limit``, always with a row in
``overdraft_changes`` in the same transaction, and always to at least the account's exposure, so the
wallet's own audit (``available >= 0``) stays clean; :meth:`BillingStore.audit` checks the history.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, case, exists, func, select, update

from metergate.billing import schema as b
from metergate.billing.modes import PREPAID, BillingConfig, target_for
from metergate.wallet import schema as w
from metergate.wallet.errors import CustomerNotFound
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.sql import SqlWalletStore


@dataclass(frozen=True, slots=True)
class ModeChange:
    id: str
    mode: Mode
    customer_id: str
    config: BillingConfig
    previous: BillingConfig | None
    targets: dict[str, int]
    balances: dict[str, dict[str, int]]
    changed_by: str
    memo: str
    created_at_ms: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "customer_id": self.customer_id, **self.config.as_json(),
                "from": self.previous.as_json() if self.previous else PREPAID.as_json(),
                "targets": self.targets, "balances_at_change": self.balances, "changed_by": self.changed_by,
                "memo": self.memo, "created_at_ms": self.created_at_ms}


@dataclass(frozen=True, slots=True)
class OutboxRow:
    usage_id: str
    mode: Mode
    customer_id: str
    asset: str
    event_name: str
    value: int
    usage_created_at_ms: int
    attempts: int


# The meter-event outbox's columns an admin answer shows (GET /admin/v1/customers/{id}/meter-events), beside
# ``duplicate``; metergate.admin.answers publishes their types from the table.
OUTBOX_FIELDS = ("usage_id", "asset", "billing_mode", "state", "skip_reason", "event_name", "value",
                 "usage_created_at_ms", "attempts", "last_error", "stripe_customer_id", "sent_at_ms")


@dataclass(frozen=True, slots=True)
class ReconRow:
    """One customer and asset over a period: what the usage says, what reached Stripe, what the ledger says."""

    customer_id: str
    asset: str
    usage_records: int
    usage_charged: int
    written_off: int
    invoiced_records: int
    invoiced_charged: int
    prepaid_records: int
    prepaid_charged: int
    sent_events: int
    sent_value: int
    pending_events: int
    pending_value: int
    failing_events: int
    unenqueued_records: int
    skipped_zero: int
    skipped_unmapped: int
    ledger_captured: int


WalletChanged = Callable[[Mode, str, str], Awaitable[None]]


class BillingStore:
    def __init__(self, wallet: SqlWalletStore, scales: dict[str, int], *,
                 on_limit_changed: WalletChanged | None = None) -> None:
        """``on_limit_changed(mode, customer_id, asset)`` runs after an overdraft limit changed: a real-time
        wallet kept elsewhere (the Redis projection) must reload it from the ledger."""
        self.wallet = wallet
        self.scales = scales
        self.on_limit_changed = on_limit_changed

    async def open(self) -> None:
        """Create the billing tables on a wallet opened before this module was imported."""
        await self.wallet.write(lambda conn: w.metadata.create_all(conn, tables=list(b.TABLES), checkfirst=True))

    # ---------------------------------------------------------------- modes

    async def changes(self, mode: Mode, customer_id: str) -> list[ModeChange]:
        """The customer's mode changes, oldest first."""
        c = b.billing_mode_changes.c
        rows = await self.wallet.read(lambda conn: conn.execute(select(b.billing_mode_changes).where(
            c.mode == mode, c.customer_id == customer_id).order_by(c.seq)).all())
        return [_change(r) for r in rows]

    async def current(self, mode: Mode, customer_id: str) -> ModeChange | None:
        return await self.wallet.read(_latest, mode, customer_id)

    async def set_config(self, mode: Mode, customer_id: str, config: BillingConfig, *, changed_by: str,
                         memo: str = "") -> ModeChange | None:
        """Record ``config`` and apply its overdraft limits in one transaction; ``None`` when it is already
        the configuration in effect (a repeated PUT changes nothing and records nothing)."""
        change_id = f"bmc_{uuid.uuid4().hex}"
        wallet = self.wallet

        def op(conn: Connection) -> ModeChange | None:
            cu = w.customers.c
            if conn.execute(wallet.for_update(select(cu.id).where(cu.mode == mode, cu.id == customer_id))
                            ).first() is None:
                raise CustomerNotFound(customer_id)
            latest = _latest(conn, mode, customer_id)
            old = latest.config if latest else PREPAID
            if old == config:
                return None
            at = now_ms()
            targets: dict[str, int] = {}
            balances: dict[str, dict[str, int]] = {}
            for asset, scale in self.scales.items():
                if config.mode_of(asset) == "invoiced":
                    wallet.ensure_account(conn, mode, customer_id, asset)  # a hold needs a row to draw on
                account = _account(conn, wallet, mode, customer_id, asset)
                if account is None:
                    continue  # never used and prepaid: nothing to limit
                previous = latest.targets.get(asset, int(account.overdraft_limit)) if latest else int(
                    account.overdraft_limit)
                target = target_for(config, old, asset, scale=scale, credits_posted=int(account.credits_posted),
                                    debits_posted=int(account.debits_posted), previous_target=previous)
                targets[asset] = target
                balances[asset] = {"credits_posted": int(account.credits_posted),
                                   "debits_posted": int(account.debits_posted),
                                   "debits_pending": int(account.debits_pending),
                                   "overdraft_limit": int(account.overdraft_limit)}
                _apply(conn, account, target, f"mode_change:{change_id}", at, tighten_only=False)
            conn.execute(b.billing_mode_changes.insert().values(
                id=change_id, mode=mode, customer_id=customer_id, billing_mode=config.billing_mode,
                asset_modes=config.asset_modes, credit_limits=config.credit_limits, targets=targets,
                previous=old.as_json() if latest else None, balances=balances, changed_by=changed_by, memo=memo,
                created_at_ms=at))
            return ModeChange(change_id, mode, customer_id, config, old if latest else None, targets, balances,
                              changed_by, memo, at)

        change: ModeChange | None = await self.wallet.write(op)
        if change is not None and self.on_limit_changed is not None:
            for asset in change.targets:
                await self.on_limit_changed(mode, customer_id, asset)
        return change

    async def overdraft_history(self, mode: Mode, customer_id: str) -> list[dict[str, Any]]:
        o = b.overdraft_changes.c
        rows = await self.wallet.read(lambda conn: conn.execute(select(b.overdraft_changes).where(
            o.mode == mode, o.customer_id == customer_id).order_by(o.seq)).all())
        return [{"asset": r.asset, "from_limit": int(r.from_limit), "to_limit": int(r.to_limit),
                 "target": int(r.target), "reason": r.reason, "created_at_ms": int(r.created_at_ms)} for r in rows]

    async def converge(self) -> int:
        """Lower every overdraft limit standing above its target towards it (never below the exposure);
        returns how many limits changed. Runs on the control plane's reporter tick."""
        wallet = self.wallet

        def due(conn: Connection) -> list[tuple[Mode, str, str, int]]:
            out = []
            for (mode, customer_id), change in _all_latest(conn).items():
                for asset, target in change.targets.items():
                    account = _account(conn, wallet, mode, customer_id, asset, lock=False)
                    if account is not None and int(account.overdraft_limit) > max(target, _exposure(account)):
                        out.append((mode, customer_id, asset, target))
            return out

        changed = 0
        for mode, customer_id, asset, target in await self.wallet.read(due):
            def op(conn: Connection, mode: Mode = mode, customer_id: str = customer_id, asset: str = asset,
                   target: int = target) -> bool:
                account = _account(conn, wallet, mode, customer_id, asset)
                return account is not None and _apply(conn, account, target, "converge", now_ms(), tighten_only=True)

            if await self.wallet.write(op):
                changed += 1
                if self.on_limit_changed is not None:
                    await self.on_limit_changed(mode, customer_id, asset)
        return changed

    # ---------------------------------------------------------------- the outbox

    async def enqueue(self, event_name: Callable[[str], str | None], *, since_ms: int = 0, limit: int = 1000) -> int:
        """Give every usage record of a customer ever invoiced its outbox row, with its billing decision.

        An anti-join on the outbox, not a high-water mark: a record committed late (a settlement retried, a
        replica that died right after settling) is found all the same. ``since_ms`` narrows the scan to
        recent records between the full scans the reporter runs at start-up and now and then.
        """
        u, o = w.usage_records.c, b.meter_event_outbox.c

        def scan(conn: Connection) -> list[tuple[Any, BillingConfig]]:
            found: list[tuple[Any, BillingConfig]] = []
            for (mode, customer_id), history in _histories(conn).items():
                first = next((ch.created_at_ms for ch in history if _any_invoiced(ch.config)), None)
                if first is None:
                    continue
                rows = conn.execute(select(u.id, u.mode, u.customer_id, u.asset, u.charged_amount, u.created_at_ms)
                                    .where(u.mode == mode, u.customer_id == customer_id,
                                           u.created_at_ms >= max(first, since_ms),
                                           ~exists().where(o.usage_id == u.id))
                                    .order_by(u.seq).limit(limit - len(found))).all()
                for row in rows:
                    config = PREPAID
                    for ch in history:
                        if ch.created_at_ms <= row.created_at_ms:
                            config = ch.config
                    found.append((row, config))
                if len(found) >= limit:
                    break
            return found

        found = await self.wallet.read(scan)
        if not found:
            return 0
        at = now_ms()
        values = []
        for row, config in found:
            billing_mode = config.mode_of(row.asset)
            name = event_name(row.asset)
            charged = int(row.charged_amount)
            skip = "prepaid" if billing_mode == "prepaid" else "zero" if charged <= 0 else (
                "unmapped" if name is None else None)
            values.append(dict(usage_id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset,
                               billing_mode=billing_mode, state="skipped" if skip else "pending", skip_reason=skip,
                               event_name=name, value=charged, usage_created_at_ms=int(row.created_at_ms),
                               attempts=0, next_attempt_at_ms=at, claimed_until_ms=0, claim_token=None,
                               last_error=None, stripe_customer_id=None, duplicate=0, created_at_ms=at,
                               sent_at_ms=None))
        insert = self.wallet.dialect_insert(b.meter_event_outbox).values(values).on_conflict_do_nothing(
            index_elements=["usage_id"])
        inserted: int = await self.wallet.write(lambda conn: conn.execute(insert).rowcount)
        return inserted

    async def claim(self, *, batch: int, lease_ms: int) -> tuple[str, list[OutboxRow]]:
        """Lease up to ``batch`` due rows to this caller. A row leased by another replica is skipped until its
        lease runs out; the conditional ``UPDATE`` re-checks the lease on the newest row version."""
        token = uuid.uuid4().hex
        o = b.meter_event_outbox.c

        def op(conn: Connection) -> list[OutboxRow]:
            at = now_ms()
            due = and_(o.state == "pending", o.next_attempt_at_ms <= at, o.claimed_until_ms < at)
            ids = conn.execute(select(o.usage_id).where(due).order_by(o.next_attempt_at_ms).limit(batch)
                               ).scalars().all()
            if not ids:
                return []
            conn.execute(update(b.meter_event_outbox).where(o.usage_id.in_(ids), due).values(
                claim_token=token, claimed_until_ms=at + lease_ms))
            rows = conn.execute(select(b.meter_event_outbox).where(o.claim_token == token,
                                                                   o.state == "pending")).all()
            return [OutboxRow(r.usage_id, r.mode, r.customer_id, r.asset, r.event_name, int(r.value),
                              int(r.usage_created_at_ms), int(r.attempts)) for r in rows]

        return token, await self.wallet.write(op)

    async def mark_sent(self, usage_id: str, stripe_customer_id: str, *, duplicate: bool) -> None:
        """Sent once, whoever marks it: a row another replica marked already stays as it was marked."""
        o = b.meter_event_outbox.c
        await self.wallet.write(lambda conn: conn.execute(update(b.meter_event_outbox).where(
            o.usage_id == usage_id, o.state == "pending").values(
            state="sent", sent_at_ms=now_ms(), stripe_customer_id=stripe_customer_id, duplicate=int(duplicate),
            claim_token=None, claimed_until_ms=0, last_error=None, attempts=o.attempts + 1)))

    async def mark_retry(self, usage_id: str, token: str, error: str, *, next_attempt_at_ms: int) -> None:
        o = b.meter_event_outbox.c
        await self.wallet.write(lambda conn: conn.execute(update(b.meter_event_outbox).where(
            o.usage_id == usage_id, o.claim_token == token, o.state == "pending").values(
            attempts=o.attempts + 1, next_attempt_at_ms=next_attempt_at_ms, last_error=error[:2000],
            claim_token=None, claimed_until_ms=0)))

    async def outbox(self, mode: Mode, customer_id: str) -> list[dict[str, Any]]:
        o = b.meter_event_outbox.c
        rows = await self.wallet.read(lambda conn: conn.execute(select(b.meter_event_outbox).where(
            o.mode == mode, o.customer_id == customer_id).order_by(o.usage_created_at_ms, o.usage_id)).all())
        return [{k: getattr(r, k) for k in OUTBOX_FIELDS} | {"duplicate": bool(r.duplicate)} for r in rows]

    # ---------------------------------------------------------------- reconciliation

    async def reconciliation(self, mode: Mode, *, from_ms: int, to_ms: int,
                             customer_id: str | None = None) -> list[ReconRow]:
        u, o, e, c = w.usage_records.c, b.meter_event_outbox.c, w.ledger_entries.c, b.billing_mode_changes.c

        def total(expr: Any) -> Any:
            return func.coalesce(func.sum(expr), 0)

        def count(cond: Any) -> Any:
            return total(case((cond, 1), else_=0))

        def op(conn: Connection) -> list[ReconRow]:
            billed = select(c.customer_id).where(c.mode == mode).distinct()
            if customer_id is not None:
                billed = billed.where(c.customer_id == customer_id)
            usage = conn.execute(select(
                u.customer_id, u.asset, func.count().label("n"), total(u.charged_amount).label("charged"),
                total(u.written_off_amount).label("written_off"),
                count(o.billing_mode == "invoiced").label("inv_n"),
                total(case((o.billing_mode == "invoiced", u.charged_amount), else_=0)).label("inv"),
                count(o.billing_mode == "prepaid").label("pre_n"),
                total(case((o.billing_mode == "prepaid", u.charged_amount), else_=0)).label("pre"),
                count(o.state == "sent").label("sent_n"),
                total(case((o.state == "sent", o.value), else_=0)).label("sent"),
                count(o.state == "pending").label("pend_n"),
                total(case((o.state == "pending", o.value), else_=0)).label("pend"),
                count(and_(o.state == "pending", o.attempts > 0)).label("fail_n"),
                count(o.usage_id.is_(None)).label("unq"),
                count(o.skip_reason == "zero").label("zero"), count(o.skip_reason == "unmapped").label("unmapped"),
            ).select_from(w.usage_records.outerjoin(b.meter_event_outbox, o.usage_id == u.id)).where(
                u.mode == mode, u.customer_id.in_(billed), u.created_at_ms >= from_ms, u.created_at_ms < to_ms,
            ).group_by(u.customer_id, u.asset)).all()
            ledger = {(r.customer_id, r.asset): int(r.posted) for r in conn.execute(select(
                e.customer_id, e.asset, total(e.posted_delta).label("posted")).where(
                e.mode == mode, e.customer_id.in_(billed), e.created_at_ms >= from_ms, e.created_at_ms < to_ms,
            ).group_by(e.customer_id, e.asset)).all()}
            rows = [ReconRow(r.customer_id, r.asset, int(r.n), int(r.charged), int(r.written_off), int(r.inv_n),
                             int(r.inv), int(r.pre_n), int(r.pre), int(r.sent_n), int(r.sent), int(r.pend_n),
                             int(r.pend), int(r.fail_n), int(r.unq), int(r.zero), int(r.unmapped),
                             ledger.pop((r.customer_id, r.asset), 0)) for r in usage]
            rows += [ReconRow(cid, asset, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, posted)
                     for (cid, asset), posted in ledger.items()]
            return sorted(rows, key=lambda r: (r.customer_id, r.asset))

        return await self.wallet.read(op)

    # ---------------------------------------------------------------- exports

    async def page(self, table: str, mode: Mode, *, from_ms: int, to_ms: int, after_seq: int, limit: int,
                   customer_id: str | None = None) -> list[dict[str, Any]]:
        """One page of ``usage_records`` or ``ledger_entries`` in ``[from_ms, to_ms)``, by ascending seq."""
        t = w.usage_records if table == "usage" else w.ledger_entries
        stmt = select(t).where(t.c.mode == mode, t.c.created_at_ms >= from_ms, t.c.created_at_ms < to_ms,
                               t.c.seq > after_seq)
        if customer_id is not None:
            stmt = stmt.where(t.c.customer_id == customer_id)
        rows = await self.wallet.read(lambda conn: conn.execute(stmt.order_by(t.c.seq).limit(limit)).all())
        return [dict(r._mapping) for r in rows]

    # ---------------------------------------------------------------- audit

    async def audit(self) -> list[str]:
        """Every account's ``overdraft_limit`` equals its newest ``overdraft_changes.to_limit`` (0 without)."""
        def op(conn: Connection) -> list[str]:
            o = b.overdraft_changes.c
            newest = select(o.mode, o.customer_id, o.asset, func.max(o.seq).label("seq")).group_by(
                o.mode, o.customer_id, o.asset).subquery()
            recorded = {(r.mode, r.customer_id, r.asset): int(r.to_limit) for r in conn.execute(
                select(o.mode, o.customer_id, o.asset, o.to_limit).join(newest, o.seq == newest.c.seq)).all()}
            problems = []
            for a in conn.execute(select(w.accounts)).all():
                pk = (a.mode, a.customer_id, a.asset)
                if int(a.overdraft_limit) != recorded.get(pk, 0):
                    problems.append(f"{pk}: overdraft_limit {a.overdraft_limit} != recorded {recorded.get(pk, 0)}")
            return problems

        return await self.wallet.read(op)


# -------------------------------------------------------------------- helpers


def _change(row: Any) -> ModeChange:
    config = BillingConfig.from_json({"billing_mode": row.billing_mode, "asset_modes": row.asset_modes,
                                      "credit_limits": row.credit_limits})
    return ModeChange(row.id, row.mode, row.customer_id, config,
                      BillingConfig.from_json(row.previous) if row.previous else None,
                      {k: int(v) for k, v in row.targets.items()}, row.balances, row.changed_by, row.memo,
                      int(row.created_at_ms))


def _latest(conn: Connection, mode: Mode, customer_id: str) -> ModeChange | None:
    c = b.billing_mode_changes.c
    row = conn.execute(select(b.billing_mode_changes).where(c.mode == mode, c.customer_id == customer_id)
                       .order_by(c.seq.desc()).limit(1)).first()
    return _change(row) if row is not None else None


def _histories(conn: Connection) -> dict[tuple[Mode, str], list[ModeChange]]:
    out: dict[tuple[Mode, str], list[ModeChange]] = {}
    for row in conn.execute(select(b.billing_mode_changes).order_by(b.billing_mode_changes.c.seq)).all():
        out.setdefault((row.mode, row.customer_id), []).append(_change(row))
    return out


def _all_latest(conn: Connection) -> dict[tuple[Mode, str], ModeChange]:
    return {key: history[-1] for key, history in _histories(conn).items()}


def _any_invoiced(config: BillingConfig) -> bool:
    return config.billing_mode == "invoiced" or "invoiced" in config.asset_modes.values()


def _account(conn: Connection, wallet: SqlWalletStore, mode: Mode, customer_id: str, asset: str, *,
             lock: bool = True) -> Any:
    a = w.accounts.c
    stmt = select(w.accounts).where(a.mode == mode, a.customer_id == customer_id, a.asset == asset)
    return conn.execute(wallet.for_update(stmt) if lock else stmt).first()


def _exposure(account: Any) -> int:
    return int(account.debits_posted) + int(account.debits_pending) - int(account.credits_posted)


def _apply(conn: Connection, account: Any, target: int, reason: str, at: int, *, tighten_only: bool) -> bool:
    """Set the account's limit to ``max(target, exposure)``, recording the change; ``False`` if unchanged."""
    current = int(account.overdraft_limit)
    limit = max(target, _exposure(account), 0)
    if limit == current or (tighten_only and limit > current):
        return False
    a = w.accounts.c
    conn.execute(update(w.accounts).where(a.mode == account.mode, a.customer_id == account.customer_id,
                                          a.asset == account.asset).values(overdraft_limit=limit))
    conn.execute(b.overdraft_changes.insert().values(
        mode=account.mode, customer_id=account.customer_id, asset=account.asset, from_limit=current,
        to_limit=limit, target=target, reason=reason, created_at_ms=at))
    return True


__all__ = ["BillingStore", "ModeChange", "OutboxRow", "ReconRow"]
