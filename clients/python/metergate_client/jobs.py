"""``client.hold(...)``: a GPU job's or agent's spending, held up front and captured as it goes.

    with client.hold("acme", estimate=Decimal("30"), asset="GPU_SECONDS", ttl_s=120) as job:
        while work_left():
            step()
            if job.heartbeat(seconds_of_step).stop:   # captured; the next increment is held
                break                                   # the wallet cannot cover the next increment

On entry the estimate is held (402 :class:`InsufficientFunds` when the wallet cannot cover it). Each
heartbeat reports the units used since the last one; the client sends the cumulative total, so a retried or
repeated heartbeat never bills twice, captures it, and holds ``increment`` (default: the estimate) for the
next interval. ``allowance`` is what the job may still use before the next heartbeat. On exit — also on an
exception — usage recorded with :meth:`add` but not yet sent is captured and the rest of the hold released
(a void when there is nothing to capture): a crashed job holds nothing.
"""

from __future__ import annotations

from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from metergate_client.calls import Amount, capture, decimal_text, heartbeat, new_key, void_hold
from metergate_client.errors import InsufficientFunds, MetergateError
from metergate_client.models import Heartbeat, Hold, to_major

if TYPE_CHECKING:
    from metergate_client.aio import AsyncClient
    from metergate_client.client import Client

OnStop = Literal["return", "raise"]


class _JobState:
    """What the sync and async jobs share: the amounts, the keys and the answers' bookkeeping."""

    def __init__(self, customer: str, *, estimate: Amount, asset: str, ttl_s: int, increment: Amount | None,
                 on_stop: OnStop, key: str | None) -> None:
        self.customer, self.asset, self.ttl_s, self.on_stop = customer, asset, ttl_s, on_stop
        self.estimate = Decimal(decimal_text(estimate, "estimate"))
        self.increment = Decimal(decimal_text(increment if increment is not None else estimate, "increment"))
        self.key = key or new_key("job")
        self.used = Decimal(0)  # cumulative, as the server captures it
        self.sent = Decimal(0)  # what the last heartbeat reported
        self.beats = 0
        self.scale = 0
        self.allowance = Decimal(0)
        self.stopped = False
        self.hold: Hold | None = None

    @property
    def hold_id(self) -> str:
        assert self.hold is not None, "the job's hold exists inside its with block"
        return self.hold.id

    def add(self, units: Amount) -> None:
        self.used += Decimal(decimal_text(units, "units"))

    def beat(self) -> tuple[Decimal, str]:
        self.beats += 1
        return self.used, f"{self.key}:beat:{self.beats}"

    def answered(self, beat: Heartbeat, sent: Decimal) -> None:
        self.sent = sent
        self.hold = beat.hold
        self.allowance = to_major(beat.allowance_minor, self.scale)
        self.stopped = beat.stop

    def refusal(self, portal_url: str | None) -> InsufficientFunds:
        return InsufficientFunds(402, "insufficient_funds",
                                 f"The wallet of {self.customer!r} cannot cover the next {self.increment} "
                                 f"{self.asset} of hold {self.hold_id}.", None,
                                 {"portal_url": portal_url} if portal_url else {})


class Job:
    def __init__(self, client: Client, state: _JobState) -> None:
        self._client = client
        self._s = state

    @property
    def hold(self) -> Hold:
        assert self._s.hold is not None
        return self._s.hold

    @property
    def allowance(self) -> Decimal:
        """How much more the job may use before its next heartbeat."""
        return self._s.allowance

    @property
    def used(self) -> Decimal:
        return self._s.used

    @property
    def stopped(self) -> bool:
        return self._s.stopped

    def add(self, units: Amount) -> None:
        """Record usage without a call; the next heartbeat (or the exit) captures it."""
        self._s.add(units)

    def heartbeat(self, units: Amount = 0) -> Heartbeat:
        """Report ``units`` used since the last heartbeat: capture them, hold the next increment."""
        self._s.add(units)
        used, key = self._s.beat()
        beat = self._client._send(heartbeat(self._s.hold_id, used=used, next_amount=self._s.increment,
                                            ttl_s=self._s.ttl_s, idempotency_key=key))
        self._s.answered(beat, used)
        if beat.stop and self._s.on_stop == "raise":
            raise self._s.refusal(self._client.top_up_url(self._s.customer))
        return beat

    def __enter__(self) -> Job:
        self._s.scale = self._client.asset_scale(self._s.asset)
        self._s.hold = self._client.create_hold(self._s.customer, self._s.estimate, asset=self._s.asset,
                                                ttl_s=self._s.ttl_s, idempotency_key=self._s.key)
        self._s.allowance = self._s.estimate
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        unsent = self._s.used - self._s.sent
        try:
            if unsent > 0:
                self._s.hold = self._client._send(capture(self._s.hold_id, unsent, final=True,
                                                          idempotency_key=f"{self._s.key}:final"))
            else:
                self._s.hold = self._client._send(void_hold(self._s.hold_id, idempotency_key=f"{self._s.key}:void"))
        except MetergateError:
            if exc is None:
                raise
            # The job's own exception matters more; the hold expires at its TTL if this release failed.


class AsyncJob:
    def __init__(self, client: AsyncClient, state: _JobState) -> None:
        self._client = client
        self._s = state

    @property
    def hold(self) -> Hold:
        assert self._s.hold is not None
        return self._s.hold

    @property
    def allowance(self) -> Decimal:
        return self._s.allowance

    @property
    def used(self) -> Decimal:
        return self._s.used

    @property
    def stopped(self) -> bool:
        return self._s.stopped

    def add(self, units: Amount) -> None:
        self._s.add(units)

    async def heartbeat(self, units: Amount = 0) -> Heartbeat:
        self._s.add(units)
        used, key = self._s.beat()
        beat = await self._client._send(heartbeat(self._s.hold_id, used=used, next_amount=self._s.increment,
                                                  ttl_s=self._s.ttl_s, idempotency_key=key))
        self._s.answered(beat, used)
        if beat.stop and self._s.on_stop == "raise":
            raise self._s.refusal(await self._client.top_up_url(self._s.customer))
        return beat

    async def __aenter__(self) -> AsyncJob:
        self._s.scale = await self._client.asset_scale(self._s.asset)
        self._s.hold = await self._client.create_hold(self._s.customer, self._s.estimate, asset=self._s.asset,
                                                      ttl_s=self._s.ttl_s, idempotency_key=self._s.key)
        self._s.allowance = self._s.estimate
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        unsent = self._s.used - self._s.sent
        try:
            if unsent > 0:
                self._s.hold = await self._client._send(capture(self._s.hold_id, unsent, final=True,
                                                                idempotency_key=f"{self._s.key}:final"))
            else:
                self._s.hold = await self._client._send(void_hold(self._s.hold_id,
                                                                  idempotency_key=f"{self._s.key}:void"))
        except MetergateError:
            if exc is None:
                raise


__all__ = ["AsyncJob", "Job", "OnStop"]
