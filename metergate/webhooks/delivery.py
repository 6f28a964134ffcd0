"""The delivery loop: each replica claims due outbox rows and POSTs them to ``notify_url``, signed.

A 2xx answer marks the row delivered; anything else (an error status, a refused connection, a timeout
after ``webhooks.timeout_s``) schedules the next attempt after ``retry_base_s * 2**attempts``, capped at
``retry_max_s`` and jittered down by up to a quarter so that rows and replicas do not retry in lockstep;
after ``max_attempts`` the row is ``failed`` (the defaults spread twenty attempts over about a day). At
most ``concurrency`` deliveries are in flight per replica. A replica shutting down gives its unanswered
rows back at once; one that dies leaves its claim to run out (``lease_s``). Either way such a row is sent
again with the same ``webhook-id`` (the receiver may have got it), which is why receivers deduplicate by
it: delivery is at least once, processing exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from metergate.config.settings import Settings
from metergate.wallet.models import now_ms
from metergate.webhooks.outbox import Webhook, WebhookOutbox
from metergate.webhooks.signing import headers

log = logging.getLogger(__name__)
_DAY_MS = 86_400_000
_PRUNE_EVERY_S = 3600.0


class WebhookDelivery:
    def __init__(self, settings: Settings, outbox: WebhookOutbox, *,
                 jitter: Callable[[], float] = random.random) -> None:
        """``jitter``: a number in [0, 1) per retry (tests pass a constant to get the exact schedule)."""
        self.url = settings.notify_url
        self.config = settings.webhooks
        self.outbox = outbox
        signing = self.config.signing_secret
        self.signing_secret = signing.get_secret_value() if signing else None
        self.legacy_secret = settings.notify_secret.get_secret_value() if settings.notify_secret else None
        self._jitter = jitter
        self._session: aiohttp.ClientSession | None = None
        self._next_prune = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def headers(self, message: Webhook) -> dict[str, str]:
        """The headers of one attempt at ``message``, signed now."""
        return headers(message.payload.encode(), message.id, signing_secret=self.signing_secret,
                       legacy_secret=self.legacy_secret)

    def retry_delay_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt (1 for the first)."""
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** min(attempts - 1, 40))
        return float(delay * (1 - 0.25 * self._jitter()))

    async def _prune(self) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + _PRUNE_EVERY_S
            await self.outbox.prune(before_ms=now_ms() - self.config.retention_days * _DAY_MS)

    async def run_once(self) -> int:
        """Send what is due now, batch by batch, and wait for the answers; returns how many were delivered."""
        await self._prune()
        delivered = 0
        while True:
            token, rows = await self.outbox.claim(batch=self.config.batch_size,
                                                  lease_ms=int(self.config.lease_s * 1000))
            if not rows:
                return delivered
            sem = asyncio.Semaphore(self.config.concurrency)
            try:
                results = await asyncio.gather(*(self._bounded(sem, row, token) for row in rows))
            except asyncio.CancelledError:  # shutting down: what was not answered yet is due again at once
                await asyncio.shield(self.outbox.release(token))
                raise
            delivered += sum(results)
            if len(rows) < self.config.batch_size or not any(results):
                return delivered

    async def run_forever(self) -> None:
        """The loop a replica runs: keep up to ``concurrency`` deliveries in flight, claiming more as slots
        free up, so that one slow receiver answer holds one slot, not the rest of the outbox."""
        in_flight: dict[asyncio.Task[bool], str] = {}
        try:
            while True:
                free = self.config.concurrency - len(in_flight)
                rows: list[Webhook] = []
                if free > 0:
                    try:
                        await self._prune()
                        token, rows = await self.outbox.claim(batch=min(free, self.config.batch_size),
                                                              lease_ms=int(self.config.lease_s * 1000))
                    except Exception:
                        log.exception("webhook delivery failed; retrying next interval")
                    for row in rows:
                        task = asyncio.create_task(self._guarded(row, token))
                        in_flight[task] = token
                        task.add_done_callback(lambda t: in_flight.pop(t, None))
                if rows and len(in_flight) < self.config.concurrency:
                    continue  # more may be due
                if in_flight:
                    await asyncio.wait(list(in_flight), timeout=self.config.poll_interval_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(self.config.poll_interval_s)
        finally:  # cancelled (shutting down): give the unanswered rows back, so they are due again at once
            tokens = set(in_flight.values())
            for task in list(in_flight):
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            for token in tokens:
                await asyncio.shield(self.outbox.release(token))

    async def _guarded(self, message: Webhook, token: str) -> bool:
        try:
            return await self._send(message, token)
        except Exception:  # recording the outcome failed (storage): the claim runs out and the row is retried
            log.exception("webhook delivery of %s not recorded", message.id)
            return False

    async def _bounded(self, sem: asyncio.Semaphore, message: Webhook, token: str) -> bool:
        async with sem:
            return await self._send(message, token)

    async def _send(self, message: Webhook, token: str) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        try:
            async with self._session.post(self.url, data=message.payload.encode(), headers=self.headers(message),
                                          allow_redirects=False) as response:
                if response.status < 300:
                    return await self.outbox.mark_delivered(message.id, token)
                error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = message.attempts + 1
        give_up = attempts >= self.config.max_attempts
        log.warning("notification %s not delivered (attempt %d%s): %s", message.id, attempts,
                    ", giving up" if give_up else "", error)
        next_at = None if give_up else now_ms() + int(self.retry_delay_s(attempts) * 1000)
        await self.outbox.mark_retry(message.id, token, error, next_attempt_at_ms=next_at)
        return False

    async def flush(self) -> None:
        """Send until nothing is due (rows waiting for a later retry are left to it)."""
        while True:
            await self.run_once()
            if not await self.outbox.due():
                return
            await asyncio.sleep(0.01)  # another task or replica holds a due row: let it finish

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

