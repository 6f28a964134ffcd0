"""Payment state beside the wallet: Stripe customers, top-up attempts, auto top-up settings, spend caps.

Runs its statements through the wallet store's own transactions (SQLite's writer thread, PostgreSQL's
pool), so payment rows and wallet rows share one database and one writer. Money never moves here: a top-up
is credited through :meth:`WalletStore.credit`, keyed by the Stripe object's id.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from metergate.payments import schema as p
from metergate.wallet import schema as w
from metergate.wallet.ledger import entry_of
from metergate.wallet.models import LedgerEntry, Mode, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore

TopUpKind = Literal["checkout", "auto"]
TopUpState = Literal["pending", "in_flight", "succeeded", "failed"]
_TERMINAL = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class TopUp:
    id: str
    mode: Mode
    customer_id: str
    asset: str
    amount: int
    kind: TopUpKind
    state: TopUpState
    stripe_id: str | None
    error_code: str | None
    error_message: str | None
    created_at_ms: int
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class AutoTopUpSetting:
    mode: Mode
    customer_id: str
    asset: str
    threshold: int  # trigger when available falls below this
    amount: int  # credit this much each time
    updated_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class SpendCaps:
    mode: Mode
    customer_id: str
    asset: str
    daily: int | None
    monthly: int | None


_CACHE_MAX = 10_000  # wallets whose auto top-up setting is remembered between settlements


class PaymentsStore:
    def __init__(self, wallet: SqlWalletStore, money: WalletStore | None = None) -> None:
        """``wallet``: the SQL database the payment tables live in; ``money``: the store that moves and reads
        balances (the same one, or the Redis real-time wallet over it, which must see every credit)."""
        self.wallet = wallet
        self.money: WalletStore = money or wallet
        # Auto top-up settings as last read, by wallet: (expires at, monotonic; the setting or None).
        self._auto_topups: dict[tuple[Mode, str, str], tuple[float, AutoTopUpSetting | None]] = {}

    async def open(self) -> None:
        """Create the payment tables on a wallet opened before this module was imported."""
        await self.wallet.write(lambda conn: w.metadata.create_all(conn, tables=list(p.TABLES), checkfirst=True))

    # ---------------------------------------------------------------- Stripe customers

    async def stripe_customer(self, mode: Mode, customer_id: str) -> str | None:
        c = p.stripe_customers.c
        found: str | None = await self.wallet.read(lambda conn: conn.execute(select(c.stripe_customer_id).where(
            c.mode == mode, c.customer_id == customer_id)).scalar())
        return found

    async def save_stripe_customer(self, mode: Mode, customer_id: str, stripe_customer_id: str) -> str:
        """Store the id unless another replica stored one first; return the one stored."""
        with contextlib.suppress(IntegrityError):
            await self.wallet.write(lambda conn: conn.execute(insert(p.stripe_customers).values(
                mode=mode, customer_id=customer_id, stripe_customer_id=stripe_customer_id,
                created_at_ms=now_ms())))
        stored = await self.stripe_customer(mode, customer_id)
        assert stored is not None
        return stored

    # ---------------------------------------------------------------- top-ups

    async def create_topup(self, mode: Mode, customer_id: str, asset: str, amount: int, kind: TopUpKind, *,
                           stripe_id: str | None = None) -> TopUp:
        at = now_ms()
        topup = TopUp(f"tu_{uuid.uuid4().hex}", mode, customer_id, asset, amount, kind, "pending", stripe_id,
                      None, None, at, at)
        await self.wallet.write(lambda conn: conn.execute(insert(p.topups).values(**_values(topup))))
        return topup

    async def begin_auto_topup(self, mode: Mode, customer_id: str, asset: str, amount: int, *, day_start_ms: int,
                               daily_cap: int) -> TopUp | None:
        """Claim the wallet's one in-flight slot, within the daily cap; ``None`` when either refuses."""
        at = now_ms()
        topup = TopUp(f"tu_{uuid.uuid4().hex}", mode, customer_id, asset, amount, "auto", "in_flight", None,
                      None, None, at, at)
        c = p.topups.c

        def op(conn: Connection) -> bool:
            today = conn.execute(select(func.count()).select_from(p.topups).where(
                c.mode == mode, c.customer_id == customer_id, c.asset == asset, c.kind == "auto",
                c.created_at_ms >= day_start_ms)).scalar_one()
            if today >= daily_cap:
                return False
            if conn.execute(select(c.id).where(c.in_flight_key == _flight(mode, customer_id, asset))).first():
                return False
            conn.execute(insert(p.topups).values(**_values(topup), in_flight_key=_flight(mode, customer_id, asset)))
            return True

        try:
            claimed = await self.wallet.write(op)
        except IntegrityError:
            return None  # another replica claimed the slot meanwhile
        return topup if claimed else None

    async def set_stripe_id(self, topup_id: str, stripe_id: str) -> None:
        c = p.topups.c
        await self.wallet.write(lambda conn: conn.execute(update(p.topups).where(c.id == topup_id).values(
            stripe_id=stripe_id, updated_at_ms=now_ms())))

    async def finish_topup(self, topup_id: str, state: Literal["succeeded", "failed"], *,
                           error_code: str | None = None, error_message: str | None = None,
                           also: Callable[[Connection, TopUp], object] | None = None) -> TopUp | None:
        """Record an outcome once: a succeeded top-up stays succeeded whatever arrives later (events come out
        of order), a failed one may still succeed. Returns the top-up if this call changed its state.

        ``also``: run in the same transaction when this call changes the state (the outbox row that notifies
        the outcome, so that the outcome and its notification commit together or not at all)."""
        c = p.topups.c
        allowed = ("pending", "in_flight") if state == "failed" else ("pending", "in_flight", "failed")

        def op(conn: Connection) -> Any:
            changed = conn.execute(update(p.topups).where(c.id == topup_id, c.state.in_(allowed)).values(
                state=state, in_flight_key=None, error_code=error_code if state == "failed" else None,
                error_message=error_message if state == "failed" else None, updated_at_ms=now_ms())).rowcount
            row = conn.execute(select(p.topups).where(c.id == topup_id)).first() if changed else None
            if row is not None and also is not None:
                also(conn, _topup(row))
            return row

        row = await self.wallet.write(op)
        return _topup(row) if row is not None else None

    async def stale_in_flight(self, *, updated_before_ms: int, limit: int = 100) -> list[TopUp]:
        """Auto top-ups still in flight since before ``updated_before_ms`` (their process died mid-charge)."""
        c = p.topups.c
        rows = await self.wallet.read(lambda conn: conn.execute(select(p.topups).where(
            c.state == "in_flight", c.updated_at_ms < updated_before_ms).order_by(c.updated_at_ms).limit(limit)).all())
        return [_topup(r) for r in rows]

    async def get_topup(self, topup_id: str) -> TopUp | None:
        c = p.topups.c
        row = await self.wallet.read(lambda conn: conn.execute(select(p.topups).where(c.id == topup_id)).first())
        return _topup(row) if row is not None else None

    async def topups(self, mode: Mode, customer_id: str, *, limit: int = 20) -> list[TopUp]:
        c = p.topups.c
        rows = await self.wallet.read(lambda conn: conn.execute(select(p.topups).where(
            c.mode == mode, c.customer_id == customer_id).order_by(c.created_at_ms.desc()).limit(limit)).all())
        return [_topup(r) for r in rows]

    # ---------------------------------------------------------------- auto top-up settings and spend caps

    async def auto_topup(self, mode: Mode, customer_id: str, asset: str, *,
                         max_age_s: float = 0) -> AutoTopUpSetting | None:
        """The wallet's auto top-up setting; with ``max_age_s``, as read at most that long ago (the check
        after every settlement would otherwise read it once per request). A change made through this
        store is seen at once; one made by another replica within ``max_age_s``."""
        wallet = (mode, customer_id, asset)
        now = time.monotonic()
        if max_age_s > 0 and (hit := self._auto_topups.get(wallet)) is not None and hit[0] > now:
            return hit[1]
        c = p.auto_topup_settings.c
        row = await self.wallet.read(lambda conn: conn.execute(select(p.auto_topup_settings).where(
            c.mode == mode, c.customer_id == customer_id, c.asset == asset)).first())
        setting = _setting(row) if row else None
        if max_age_s > 0:
            if len(self._auto_topups) >= _CACHE_MAX:
                self._auto_topups = {k: v for k, v in self._auto_topups.items() if v[0] > now}
            self._auto_topups[wallet] = (now + max_age_s, setting)
        return setting

    async def auto_topups(self) -> list[AutoTopUpSetting]:
        rows = await self.wallet.read(lambda conn: conn.execute(select(p.auto_topup_settings)).all())
        return [_setting(r) for r in rows]

    async def set_auto_topup(self, setting: AutoTopUpSetting | None, *, mode: Mode, customer_id: str,
                             asset: str, also: Callable[[Connection], object] | None = None) -> None:
        """Replace the wallet's auto top-up (``None`` turns it off); ``also`` runs in the same transaction
        (the notification of the change)."""
        c = p.auto_topup_settings.c

        def op(conn: Connection) -> None:
            conn.execute(delete(p.auto_topup_settings).where(
                c.mode == mode, c.customer_id == customer_id, c.asset == asset))
            if setting is not None:
                conn.execute(insert(p.auto_topup_settings).values(
                    mode=mode, customer_id=customer_id, asset=asset, threshold=setting.threshold,
                    amount=setting.amount, updated_at_ms=now_ms()))
            if also is not None:
                also(conn)

        await self.wallet.write(op)
        self._auto_topups.pop((mode, customer_id, asset), None)

    async def spend_caps(self, mode: Mode, customer_id: str, asset: str) -> SpendCaps | None:
        c = p.spend_caps.c
        row = await self.wallet.read(lambda conn: conn.execute(select(p.spend_caps).where(
            c.mode == mode, c.customer_id == customer_id, c.asset == asset)).first())
        if row is None:
            return None
        return SpendCaps(mode, customer_id, asset, _opt(row.daily), _opt(row.monthly))

    async def set_spend_caps(self, caps: SpendCaps, *, also: Callable[[Connection], object] | None = None) -> None:
        """Replace the wallet's caps; ``also`` runs in the same transaction (the notification of the change)."""
        c = p.spend_caps.c

        def op(conn: Connection) -> None:
            conn.execute(delete(p.spend_caps).where(
                c.mode == caps.mode, c.customer_id == caps.customer_id, c.asset == caps.asset))
            if caps.daily is not None or caps.monthly is not None:
                conn.execute(insert(p.spend_caps).values(
                    mode=caps.mode, customer_id=caps.customer_id, asset=caps.asset, daily=caps.daily,
                    monthly=caps.monthly, updated_at_ms=now_ms()))
            if also is not None:
                also(conn)

        await self.wallet.write(op)

    async def spent_since(self, mode: Mode, customer_id: str, asset: str, since_ms: int) -> int:
        """What the wallet has captured since ``since_ms``, plus what it holds now (spend in flight)."""
        e = w.ledger_entries.c

        def op(conn: Connection) -> int:
            posted = conn.execute(select(func.coalesce(func.sum(e.posted_delta), 0)).where(
                e.mode == mode, e.customer_id == customer_id, e.asset == asset,
                e.created_at_ms >= since_ms)).scalar_one()
            pending = conn.execute(select(w.accounts.c.debits_pending).where(
                w.accounts.c.mode == mode, w.accounts.c.customer_id == customer_id,
                w.accounts.c.asset == asset)).scalar()
            return int(posted) + int(pending or 0)

        result: int = await self.wallet.read(op)
        return result

    # ---------------------------------------------------------------- transaction history

    async def history(self, mode: Mode, customer_id: str, *, limit: int, before: int | None = None,
                      kinds: tuple[str, ...] = ()) -> list[LedgerEntry]:
        """Ledger entries newest first, optionally only of ``kinds``, paginated by sequence number."""
        e = w.ledger_entries.c
        stmt = select(w.ledger_entries).where(e.mode == mode, e.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(e.seq < before)
        if kinds:
            stmt = stmt.where(e.kind.in_(kinds))
        rows = await self.wallet.read(lambda conn: conn.execute(stmt.order_by(e.seq.desc()).limit(limit)).all())
        return [entry_of(r) for r in rows]


def _flight(mode: str, customer_id: str, asset: str) -> str:
    return f"{mode}\n{customer_id}\n{asset}"


def _setting(row: Any) -> AutoTopUpSetting:
    return AutoTopUpSetting(row.mode, row.customer_id, row.asset, int(row.threshold), int(row.amount),
                            int(row.updated_at_ms))


def _opt(value: Any) -> int | None:
    return None if value is None else int(value)


def _values(topup: TopUp) -> dict[str, Any]:
    return {name: getattr(topup, name) for name in TopUp.__dataclass_fields__}


def _topup(row: Any) -> TopUp:
    return TopUp(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset, amount=int(row.amount),
                 kind=row.kind, state=row.state, stripe_id=row.stripe_id, error_code=row.error_code,
                 error_message=row.error_message, created_at_ms=int(row.created_at_ms),
                 updated_at_ms=int(row.updated_at_ms))
