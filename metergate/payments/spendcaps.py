"""Customer-set spend caps (per UTC day and per calendar month, per wallet and asset), enforced at admission.

:meth:`SpendCaps.admit` is what the proxy calls before placing a hold: it refuses with 402
``spend_cap_reached`` when what the wallet has captured since the start of the day (month), plus what it
holds now, plus this request's hold would pass the cap. It reads the ledger, so every replica agrees; it is
a check before the hold rather than inside it, so requests admitted at the same instant can pass a cap by
at most their own holds (a customer's budget guard, not the wallet's solvency, which the hold enforces).
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from metergate.errors import PaymentRequired
from metergate.payments.store import PaymentsStore, SpendCaps
from metergate.wallet.errors import STORAGE_DOWN
from metergate.wallet.models import Mode, now_ms

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000


class SpendCapReached(PaymentRequired):
    def __init__(self, period: str, cap: int, spent: int, asset: str) -> None:
        super().__init__(f"The {period} spend cap of {cap} {asset} (smallest unit) is reached: {spent} spent.",
                         code="spend_cap_reached", period=period, cap=cap, spent=spent, asset=asset)


def period_starts(at_ms: int) -> tuple[int, int]:
    """The UTC day's and the UTC calendar month's first millisecond."""
    day = at_ms // _DAY_MS * _DAY_MS
    date = dt.datetime.fromtimestamp(day / 1000, dt.UTC)
    month = int(date.replace(day=1).timestamp() * 1000)
    return day, month


class SpendCapGuard:
    """Caps are looked up at most once per ``cache_ttl_s`` per wallet, so that wallets without caps — most
    of them — cost the hot path no database read; a changed cap applies within that bound."""

    def __init__(self, store: PaymentsStore, *, cache_ttl_s: float = 2.0) -> None:
        self._store = store
        self._ttl_s = cache_ttl_s
        self._cache: dict[tuple[str, str, str], tuple[float, SpendCaps | None]] = {}
        self._warned_at = 0.0

    async def _caps(self, mode: Mode, customer_id: str, asset: str) -> SpendCaps | None:
        key = (mode, customer_id, asset)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        caps = await self._store.spend_caps(mode, customer_id, asset)
        if len(self._cache) >= 100_000:
            self._cache.clear()
        self._cache[key] = (now, caps)
        return caps

    async def admit(self, mode: Mode, customer_id: str, asset: str, amount: int) -> None:
        """Raise :class:`SpendCapReached` if holding ``amount`` more would pass a cap.

        With the database unreachable the caps cannot be read and the request is let through (logged): a
        cap is a limit the customer chose, the wallet's balance is the hard one, and the wallet (the Redis
        projection, or the SQL hold itself) still enforces that. A cap must not turn an outage the wallet
        rides out into refusals."""
        try:
            caps = await self._caps(mode, customer_id, asset)
            if caps is None:
                return
            day, month = period_starts(now_ms())
            for period, cap, since in (("daily", caps.daily, day), ("monthly", caps.monthly, month)):
                if cap is None:
                    continue
                spent = await self._store.spent_since(mode, customer_id, asset, since)
                if spent + amount > cap:
                    raise SpendCapReached(period, cap, spent, asset)
        except STORAGE_DOWN as exc:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("spend caps unreadable (%s); requests pass unchecked until the database is back",
                            type(exc).__name__)


def validate_caps(mode: Mode, customer_id: str, asset: str, daily: object, monthly: object) -> SpendCaps:
    from metergate.errors import BadRequest

    for name, value in (("daily", daily), ("monthly", monthly)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**15):
            raise BadRequest(f"'{name}' must be null or a positive integer in the asset's smallest unit.",
                             code="invalid_amount", param=name)
    return SpendCaps(mode, customer_id, asset, daily, monthly)  # type: ignore[arg-type]
