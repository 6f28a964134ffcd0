"""Settling a hold from the proxy: retried on storage errors, never abandoned silently."""

from __future__ import annotations

import asyncio
import logging

from metergate.wallet.models import Settlement, UsageRecord
from metergate.wallet.store import HoldPath

log = logging.getLogger(__name__)
SETTLE_ATTEMPTS = 5


async def settle_with_retries(store: HoldPath, hold_id: str, price: int, record: UsageRecord) -> Settlement | None:
    """Settle a hold, retrying storage errors with backoff (settlement is idempotent, so a retry after an
    unacknowledged commit is safe); after the last failure the hold is left to expire, and that is logged."""
    for attempt in range(1, SETTLE_ATTEMPTS + 1):
        try:
            return await store.settle(hold_id, price, record)
        except Exception:
            if attempt == SETTLE_ATTEMPTS:
                log.exception("%s: settlement failed; hold %s will expire", record.id, hold_id)
                return None
            await asyncio.sleep(0.05 * 2 ** attempt)
    return None
