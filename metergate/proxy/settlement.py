"""Settling a hold from the proxy: retried while the store is down, never abandoned silently.

A settlement is the bill for an answer already delivered: the upstream was paid for it. So when the store
cannot take it, it is not dropped. It is tried a few times at once (a blip costs the caller a second at
most and the answer still carries its receipt); after that it joins this process's **backlog** and is
retried in the background, with backoff, until the store takes it. Settlement is idempotent by hold id, so a
retry after a commit whose acknowledgement was lost changes nothing; a hold (or escrow lease) that expired
meanwhile is captured late, from the wallet, as any capture beyond its hold.

The backlog is bounded (``settlement_backlog_max``): while it is full, new requests are refused with 503
``settlement_backlog`` before anything is held or sent upstream, since their bills could not be kept either.
At shutdown it is flushed for up to ``drain_deadline_s``. With ``settlement_spool_dir`` set, every backlogged
bill is journaled on local disk first (:mod:`metergate.proxy.spool`): what the store still refuses at shutdown
stays there, and so does everything after a ``kill -9``, for the next process on that directory to settle.
Without a spool the backlog is in memory, and whatever the store still refuses at shutdown is **written off
explicitly**: one ERROR line per request with its whole usage record (an operator can replay it) and
``metergate_settlements_unbilled_total``. A settlement the store
refuses for a reason of its own (a conflict, an unknown hold: a ``MetergateError`` of a 4xx status) is not
retried; it is written off the same way at once. Any other failure (a driver error, a 5xx such as the Redis
wallet's ``wallet_unavailable``) is the store being down, and is retried.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from dataclasses import dataclass

from metergate.errors import MetergateError, ServiceUnavailable
from metergate.observability.metrics import Metrics
from metergate.proxy.spool import Owed, SettlementSpool
from metergate.wallet.models import Settlement, UsageRecord
from metergate.wallet.store import HoldPath, WalletStore

log = logging.getLogger(__name__)
SETTLE_ATTEMPTS = 5  # at once, 0.1 + 0.2 + 0.4 + 0.8 s apart; then the backlog
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0
RETRY_CHUNK = 64  # backlogged settlements tried together (the store group-commits them)


@dataclass(frozen=True, slots=True)
class _Unsettled:
    via: HoldPath | None  # the path that placed the hold; None: a bill inherited from a stopped process
    owed: Owed

    @property
    def hold_id(self) -> str:
        return self.owed.hold_id

    @property
    def record(self) -> UsageRecord:
        return self.owed.record


class Settler:
    """Settles the proxy's holds, keeping the ones the store could not take until it can. ``store``: the
    wallet store, which settles what a stopped process left in the spool."""

    def __init__(self, store: WalletStore, *, max_backlog: int, metrics: Metrics,
                 spool: SettlementSpool | None = None) -> None:
        self.store = store
        self.max_backlog = max_backlog
        self.metrics = metrics
        self.spool = spool
        self._backlog: collections.deque[_Unsettled] = collections.deque()
        self._retrier: asyncio.Task[None] | None = None
        self._flushing = False  # shutting down: flush() tries the backlog itself (one round at a time)

    def open(self) -> None:
        """Open the spool (if any) and take on what stopped processes left in it."""
        if self.spool is not None:
            for owed in self.spool.open():
                self._enqueue(_Unsettled(None, owed))

    def admit(self) -> None:
        """Refuse a new request while the backlog is full (raises 503 ``settlement_backlog``)."""
        if len(self._backlog) >= self.max_backlog:
            raise ServiceUnavailable("The wallet store is not taking settlements; this request was not sent. "
                                     "Retry shortly.", code="settlement_backlog")

    async def settle(self, store: HoldPath, hold_id: str, price: int, record: UsageRecord) -> Settlement | None:
        """The settlement, or ``None`` when the store could not take it now (it is then backlogged, or written
        off if the store refused it for good)."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                return await store.settle(hold_id, price, record)
            except Exception as exc:
                if _refused(exc):
                    self._write_off(_Unsettled(store, Owed(hold_id, price, record)), exc, journaled=False)
                    return None
                if attempt == SETTLE_ATTEMPTS:
                    log.warning("%s: the store did not take the settlement of hold %s (%s); kept to retry",
                                record.id, hold_id, type(exc).__name__)
                    lease = store.lease_of(hold_id)
                    owed = Owed(hold_id, price, record, *(lease or (None, 0)))
                    if self.spool is not None:
                        self.spool.owe(owed)  # on disk before anything else, so that no crash forgets it
                    self._enqueue(_Unsettled(store, owed))
                    return None
                await asyncio.sleep(0.05 * 2 ** attempt)
        return None

    def _enqueue(self, unsettled: _Unsettled) -> None:
        self._backlog.append(unsettled)
        self.metrics.settlement_backlog.set(len(self._backlog))
        if not self._flushing and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.create_task(self._retry_forever(), name="metergate-settlement-backlog")

    async def _retry_forever(self) -> None:
        delay = RETRY_FIRST_S
        while self._backlog:
            await asyncio.sleep(delay)
            delay = RETRY_FIRST_S if await self._retry_round() else min(delay * 2, RETRY_MAX_S)

    async def _retry_round(self) -> bool:
        """Try the backlog, oldest first, a chunk at a time; ``False`` once the store fails again."""
        while self._backlog:
            chunk = [self._backlog[i] for i in range(min(RETRY_CHUNK, len(self._backlog)))]
            results = await asyncio.gather(*(self._settle(u) for u in chunk), return_exceptions=True)
            kept: list[_Unsettled] = []  # still not taken: back at the head of the backlog, in order
            for unsettled, result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException) and _refused(result):
                    self._write_off(unsettled, result)
                elif isinstance(result, BaseException):
                    kept.append(unsettled)
                else:
                    log.info("%s: settled late (hold %s, charged %d)", unsettled.record.id, unsettled.hold_id,
                             result)
                    if self.spool is not None:
                        self.spool.paid(unsettled.hold_id)
            for _ in chunk:
                self._backlog.popleft()
            self._backlog.extendleft(reversed(kept))
            self.metrics.settlement_backlog.set(len(self._backlog))
            if kept:
                return False
        return True

    async def flush(self, deadline_s: float) -> None:
        """Shutting down: settle what the backlog holds for up to ``deadline_s``, then write off the rest."""
        self._flushing = True
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
            self._retrier = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while self._backlog and loop.time() < deadline:
            if not await self._retry_round():
                await asyncio.sleep(min(RETRY_FIRST_S, max(0.0, deadline - loop.time())))
        if self._backlog and self.spool is not None:
            log.warning("%d settlements the store did not take are kept in the settlement spool (%s) for the "
                        "next process to settle", len(self._backlog), self.spool.directory)
            self._backlog.clear()
        while self._backlog:
            self._write_off(self._backlog.popleft(), None)
        self.metrics.settlement_backlog.set(0)
        if self.spool is not None:
            self.spool.close()

    async def _settle(self, unsettled: _Unsettled) -> int:
        """Try one kept bill; what it charged. A bill inherited from a stopped process is settled the durable
        way its entry names: a capture from the lease it drew on, or the hold's own settle."""
        owed = unsettled.owed
        if unsettled.via is not None:
            return (await unsettled.via.settle(owed.hold_id, owed.price, owed.record)).charged
        if owed.lease is not None:
            done = await self.store.system_of_record.capture_usage(
                owed.lease, owed.price, key=f"settle:{owed.hold_id}", usage=owed.record, held=owed.held)
            return done.charged
        return (await self.store.settle(owed.hold_id, owed.price, owed.record)).charged

    def _write_off(self, unsettled: _Unsettled, refused: BaseException | None, *, journaled: bool = True) -> None:
        """An answer delivered and not billed: said once, loudly, with everything needed to bill it by hand."""
        why = f"refused by the store ({getattr(refused, 'code', '')}: {refused})" if refused is not None else (
            "the store was still down at shutdown")
        record = json.dumps(dataclasses.asdict(unsettled.record), default=str, sort_keys=True)
        log.error("%s: UNBILLED, %s; hold %s, price %d; usage record: %s", unsettled.record.id, why,
                  unsettled.hold_id, unsettled.owed.price, record)
        self.metrics.settlements_unbilled.labels(unsettled.record.route).inc()
        if journaled and self.spool is not None:
            self.spool.paid(unsettled.hold_id)


def _refused(exc: BaseException) -> bool:
    """The store answered and said no (for good): retrying the same settlement cannot succeed."""
    return isinstance(exc, MetergateError) and exc.status < 500


__all__ = ["SETTLE_ATTEMPTS", "Settler"]
