"""Invoiced usage to Stripe Billing: a durable outbox and the reporter that drains it.

Every usage record of an invoiced customer becomes exactly one Stripe meter event
(``POST /v1/billing/meter_events`` through the official SDK): ``identifier`` = the usage record's id,
``payload[value]`` = its charged amount in the asset's smallest unit, ``payload[stripe_customer_id]`` =
the wallet's Stripe customer (the payments feature's mapping, created on first use), ``timestamp`` = when
the usage was recorded, ``event_name`` from ``billing.meter_event_names`` (per asset) or
``billing.meter_event_name`` (the pricing asset).

Nothing is dropped: the outbox is filled from ``usage_records`` by an anti-join (:meth:`BillingStore.enqueue`),
so a record whose process died right after settling is found by the next scan of any replica; rows live
in the database and survive restarts.

Nothing is sent twice: each row is leased to one replica at a time (``claimed_until_ms``; a crashed
replica's lease runs out and another takes over), marked ``sent`` once Stripe accepted it, and a resend
after a lost answer (a timeout, a crash between Stripe's answer and our ``UPDATE``) carries the same
``identifier`` and ``Idempotency-Key``: Stripe answers with the first response or rejects the duplicate
identifier, which counts as delivered.

Failures (Stripe down, slow, rate limiting) are retried per row with exponential backoff and jitter,
``billing.retry_base_s`` doubling up to ``billing.retry_max_s``, for ever: a row that keeps failing shows
in the reconciliation report as ``failing_events`` with its last error, and is never given up on silently.

Stripe's limits, and what they mean here: it enforces identifier uniqueness for at least 24 hours, so the
duplicate protection above holds for a resend within a day of the first attempt (a lease is seconds); it
refuses timestamps older than 35 days, so an event held back longer than that (Stripe down for a month, an
invoiced customer without a configured meter) keeps failing with Stripe's message in ``last_error`` and must be
settled by hand. Values are integers in the asset's smallest unit; a meter that bills in another unit sets its
own transform in Stripe.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import stripe

from metergate.billing.store import BillingStore, OutboxRow
from metergate.config.settings import Settings
from metergate.payments.stripe_api import StripeApi
from metergate.wallet.models import now_ms

log = logging.getLogger(__name__)
_FULL_SCAN_EVERY_S = 600  # between full anti-join scans; recent records are scanned every tick
_RECENT_MS = 3_600_000


def is_duplicate(error: stripe.StripeError) -> bool:
    """Stripe's refusal of an identifier it already holds: proof that the event was delivered before."""
    if not isinstance(error, stripe.InvalidRequestError):
        return False
    return error.code == "duplicate_meter_event" or "already exists with identifier" in str(error.user_message or "")


class MeterReporter:
    def __init__(self, settings: Settings, store: BillingStore, stripe_api: StripeApi) -> None:
        self.settings = settings
        self.config = settings.billing
        self.store = store
        self.stripe = stripe_api
        self._next_full_scan = 0.0
        self._names = dict(self.config.meter_event_names)
        self._names.setdefault(settings.pricing.asset, self.config.meter_event_name)

    def event_name(self, asset: str) -> str | None:
        return self._names.get(asset)

    async def run_once(self) -> int:
        """Scan, converge overdraft limits, then send what is due; returns how many events were sent."""
        full = time.monotonic() >= self._next_full_scan
        since = 0 if full else now_ms() - max(_RECENT_MS, int(self.settings.hold_ttl_s * 2000))
        while await self.store.enqueue(self.event_name, since_ms=since) >= 1000:
            pass
        if full:
            self._next_full_scan = time.monotonic() + _FULL_SCAN_EVERY_S
        await self.store.converge()
        sent = 0
        while True:
            token, rows = await self.store.claim(batch=self.config.batch_size,
                                                 lease_ms=int(self.config.lease_s * 1000))
            if not rows:
                return sent
            sem = asyncio.Semaphore(self.config.concurrency)
            deadline = time.monotonic() + self.config.lease_s * 0.8
            results = await asyncio.gather(*(self._bounded(sem, r, token, deadline) for r in rows))
            sent += sum(results)
            if len(rows) < self.config.batch_size or not any(results):
                return sent

    async def _bounded(self, sem: asyncio.Semaphore, row: OutboxRow, token: str, deadline: float) -> bool:
        async with sem:
            if time.monotonic() > deadline:
                return False  # the lease is about to run out: leave the row to the next claim, ours or another's
            return await self._send(row, token)

    async def _send(self, row: OutboxRow, token: str) -> bool:
        try:
            stripe_customer = await asyncio.wait_for(self.stripe.customer(row.mode, row.customer_id),
                                                     self.config.send_timeout_s)
            params: dict[str, Any] = {
                "event_name": row.event_name, "identifier": row.usage_id,
                "payload": {"stripe_customer_id": stripe_customer, "value": str(row.value)},
                "timestamp": row.usage_created_at_ms // 1000}
            duplicate = False
            try:
                await asyncio.wait_for(self.stripe.client(row.mode).v1.billing.meter_events.create_async(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": f"metergate-meter-{row.usage_id}"}), self.config.send_timeout_s)
            except stripe.StripeError as error:
                if not is_duplicate(error):
                    raise
                duplicate = True
            await self.store.mark_sent(row.usage_id, stripe_customer, duplicate=duplicate)
            return True
        except Exception as error:  # Stripe down or slow, payments not configured, a database hiccup
            delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** min(row.attempts, 30))
            delay *= random.uniform(0.5, 1.0)  # jitter: replicas and rows do not retry in lockstep
            message = f"{type(error).__name__}: {getattr(error, 'user_message', None) or error}"
            log.warning("meter event %s not sent (attempt %d): %s", row.usage_id, row.attempts + 1, message)
            await self.store.mark_retry(row.usage_id, token, message, next_attempt_at_ms=now_ms() + int(delay * 1000))
            return False

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("meter event reporting failed; retrying next interval")
            await asyncio.sleep(self.config.report_interval_s)
