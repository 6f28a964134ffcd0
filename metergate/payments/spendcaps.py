"""Customer-set spend caps (per UTC day and per calendar month, per wallet and asset), enforced at admission.

:meth:`SpendCapGuard.admit` is what the proxy calls before placing a hold: it refuses with 402
``spend_cap_reached`` when what the wallet has captured since the start of the day (month), plus what it
holds now, plus this request's hold would pass the cap. It reads the ledger, so every replica agrees; it is
a check before the hold rather than inside it, so requests admitted at the same instant can pass a cap by
at most their own holds (a customer's budget guard, not the wallet's solvency, which the hold enforces).

No ledger read per request (the rule of the wallet-engine issue: no per-request round trip on a hot wallet,
whose spend today is a growing sum): the caps and the spend are read together, at most once per
``cache_ttl_s`` per wallet, and between two reads this process admits against that snapshot, up to
1/``LOCAL_SHARE_DIVISOR`` of the headroom it showed (cap - spent). A request that does not fit in that
share reads the ledger again first, so near a cap every request is checked against the ledger as before.
With N replicas the spend they admit between reads stays within the headroom while N <= 16.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from metergate.errors import PaymentRequired
from metergate.payments.store import PaymentsStore, SpendCaps
from metergate.wallet.errors import STORAGE_DOWN
from metergate.wallet.models import Mode, now_ms

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000
LOCAL_SHARE_DIVISOR = 16


class SpendCapReached(PaymentRequired):
    def __init__(self, period: str, cap: int, spent: int, asset: str) -> None:
        super().__init__(f"The {period} spend cap of {cap} {asset} (smallest unit) is reached: {spent} spent.",
                         code="spend_cap_reached", period=period, cap=cap, spent=spent, asset=asset)


_EPOCH = dt.date(1970, 1, 1)
_last_day: list[tuple[int, tuple[int, int]]] = [(-1, (0, 0))]  # the day last asked for, and its answer


def period_starts(at_ms: int) -> tuple[int, int]:
    """The UTC day's and the UTC calendar month's first millisecond, in integer arithmetic. Every request of
    a capped wallet asks, almost always for the same day as the one before: that answer is kept."""
    days = at_ms // _DAY_MS
    last, starts = _last_day[0]
    if days == last:
        return starts
    date = _EPOCH + dt.timedelta(days=days)
    starts = (days * _DAY_MS, (date.replace(day=1) - _EPOCH).days * _DAY_MS)
    _last_day[0] = (days, starts)
    return starts


@dataclass(slots=True)
class _Snapshot:
    """A wallet's caps and spend as read at ``read_at`` (monotonic), and what this guard admitted since."""

    read_at: float
    periods: tuple[int, int]  # the day's and the month's start the spend was read for
    caps: SpendCaps | None
    spent: dict[str, int]  # by period ("daily", "monthly"), for the periods that have a cap
    admitted: int = 0


class SpendCapGuard:
    """Caps are looked up at most once per ``cache_ttl_s`` per wallet, so that wallets without caps — most
    of them — cost the hot path no database read; a changed cap applies within that bound."""

    def __init__(self, store: PaymentsStore, *, cache_ttl_s: float = 2.0) -> None:
        self._store = store
        self._ttl_s = cache_ttl_s
        self._cache: dict[tuple[str, str, str], _Snapshot] = {}
        self._warned_at = 0.0

    async def _read(self, mode: Mode, customer_id: str, asset: str, periods: tuple[int, int],
                    caps: SpendCaps | None, *, read_caps: bool) -> _Snapshot:
        if read_caps:
            caps = await self._store.spend_caps(mode, customer_id, asset)
        spent: dict[str, int] = {}
        if caps is not None:
            for period, cap, since in (("daily", caps.daily, periods[0]), ("monthly", caps.monthly, periods[1])):
                if cap is not None:
                    spent[period] = await self._store.spent_since(mode, customer_id, asset, since)
        if len(self._cache) >= 100_000:
            self._cache.clear()
        snapshot = self._cache[(mode, customer_id, asset)] = _Snapshot(time.monotonic(), periods, caps, spent)
        return snapshot

    async def admit(self, mode: Mode, customer_id: str, asset: str, amount: int) -> None:
        """Raise :class:`SpendCapReached` if holding ``amount`` more would pass a cap.

        With the database unreachable the caps cannot be read and the request is let through (logged): a
        cap is a limit the customer chose, the wallet's balance is the hard one, and the wallet (the Redis
        projection, or the SQL hold itself) still enforces that. A cap must not turn an outage the wallet
        rides out into refusals."""
        try:
            periods = period_starts(now_ms())
            snap = self._cache.get((mode, customer_id, asset))
            if snap is None or time.monotonic() - snap.read_at >= self._ttl_s or snap.periods != periods:
                snap = await self._read(mode, customer_id, asset, periods, None, read_caps=True)
            elif snap.caps is not None and not _within_share(snap, amount):
                snap = await self._read(mode, customer_id, asset, periods, snap.caps, read_caps=False)
            caps = snap.caps
            if caps is None:
                return
            for period, cap in (("daily", caps.daily), ("monthly", caps.monthly)):
                if cap is not None and snap.spent[period] + snap.admitted + amount > cap:
                    raise SpendCapReached(period, cap, snap.spent[period] + snap.admitted, asset)
            snap.admitted += amount
        except STORAGE_DOWN as exc:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("spend caps unreadable (%s); requests pass unchecked until the database is back",
                            type(exc).__name__)


def _within_share(snap: _Snapshot, amount: int) -> bool:
    """Whether this process may admit ``amount`` more on the snapshot without reading the ledger again."""
    assert snap.caps is not None
    for period, cap in (("daily", snap.caps.daily), ("monthly", snap.caps.monthly)):
        if cap is not None and snap.admitted + amount > (cap - snap.spent[period]) // LOCAL_SHARE_DIVISOR:
            return False
    return True


def validate_caps(mode: Mode, customer_id: str, asset: str, daily: object, monthly: object) -> SpendCaps:
    from metergate.errors import BadRequest

    for name, value in (("daily", daily), ("monthly", monthly)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**15):
            raise BadRequest(f"'{name}' must be null or a positive integer in the asset's smallest unit.",
                             code="invalid_amount", param=name)
    return SpendCaps(mode, customer_id, asset, daily, monthly)  # type: ignore[arg-type]
