"""Rate limits: requests and tokens per minute, per customer and per proxy API key, shared by every replica.

A request is counted at admission, before its hold: one request, and its admission estimate of tokens
(estimated prompt tokens + maximum output tokens — the same figures the hold is priced from), against
every limit that applies to it, all or none. The counts live in the wallet database as one row per
subject per fixed, epoch-aligned minute, charged by an atomic conditional upsert
(:meth:`metergate.wallet.store.WalletStore.consume_rate_limits`), so every replica on that database
shares them and no interleaving of replicas can count past a limit.

Which limits apply: ``rate_limits.customer`` for every customer, replaced per customer by an override set
through the admin API (stored in the database; each replica keeps them in memory, reloads them every
``rate_limits.refresh_interval_s`` and learns of its own admin API's changes at once), plus
``rate_limits.api_key`` for each proxy API key. A request to which no limit applies costs no database
call. A refused request is answered 429 ``rate_limited`` with ``Retry-After`` (seconds until its window
ends); it places no hold, changes no balance and never reaches the upstream. A request that was
admitted stays counted even if it is then refused for funds or fails upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from metergate.config.settings import RateLimit, RateLimitSettings
from metergate.errors import TooManyRequests
from metergate.proxy.identify import Identity
from metergate.wallet.models import Mode, RateLimitCharge, RateLimitDenial, RateLimitOverride, now_ms
from metergate.wallet.store import WalletStore

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
_KEEP_WINDOWS = 2  # windows older than this many minutes are pruned


class RateLimiter:
    def __init__(self, settings: RateLimitSettings, store: WalletStore, *,
                 clock: Callable[[], int] = now_ms) -> None:
        self._settings = settings
        self._store = store
        #: Milliseconds since the epoch; a seam for tests that need a window to roll over.
        self.clock = clock
        self._overrides: dict[tuple[Mode, str], RateLimitOverride] = {}
        self._task: asyncio.Task[None] | None = None
        self._pruned_before_ms = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("loading rate-limit overrides failed; defaults apply until the next refresh")
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("rate-limit refresh failed; keeping the overrides loaded before")

    async def refresh(self) -> None:
        """Reload every override, and prune windows that can no longer refuse anything (once a minute)."""
        overrides = await self._store.rate_limit_overrides()
        self._overrides = {(o.mode, o.customer_id): o for o in overrides}
        now = self.clock()
        limited = self._overrides or any(v is not None for v in (*_pair(self._settings.customer),
                                                                  *_pair(self._settings.api_key)))
        if limited and now - self._pruned_before_ms >= WINDOW_MS:  # a replica without limits writes nothing
            before = _window_start(now) - _KEEP_WINDOWS * WINDOW_MS
            await self._store.prune_rate_limit_windows(before_ms=before)
            self._pruned_before_ms = now

    # ------------------------------------------------------------------ overrides

    def apply(self, override: RateLimitOverride) -> None:
        """Take an override set through this process's admin API into effect at once."""
        self._overrides[(override.mode, override.customer_id)] = override

    def forget(self, mode: Mode, customer_id: str) -> None:
        """Drop an override deleted through this process's admin API: the defaults apply again."""
        self._overrides.pop((mode, customer_id), None)

    def customer_limits(self, mode: Mode, customer_id: str) -> tuple[int | None, int | None]:
        """Requests and tokens per minute for the customer: its override, else the defaults."""
        override = self._overrides.get((mode, customer_id))
        if override is None:
            return _pair(self._settings.customer)
        return override.requests_per_minute, override.tokens_per_minute

    # ------------------------------------------------------------------ admission

    def charges(self, identity: Identity) -> list[RateLimitCharge]:
        """The counters a request by ``identity`` is charged against; empty when no limit applies."""
        out: list[RateLimitCharge] = []
        rpm, tpm = self.customer_limits(identity.mode, identity.customer_id)
        if rpm is not None or tpm is not None:
            out.append(RateLimitCharge(f"customer:{identity.customer_id}", rpm, tpm))
        rpm, tpm = _pair(self._settings.api_key)
        if identity.key_id is not None and (rpm is not None or tpm is not None):
            out.append(RateLimitCharge(f"key:{identity.key_id}", rpm, tpm))
        return out

    async def admit(self, identity: Identity, tokens: int) -> None:
        """Count the request, or raise :class:`TooManyRequests` having counted nothing."""
        charges = self.charges(identity)
        if not charges:
            return  # no limit applies: no database call
        now = self.clock()
        window = _window_start(now)
        denial = await self._store.consume_rate_limits(identity.mode, charges, window_start_ms=window,
                                                       tokens=tokens)
        if denial is not None:
            raise _refusal(denial, tokens, now)


def _pair(limit: RateLimit) -> tuple[int | None, int | None]:
    return limit.requests_per_minute, limit.tokens_per_minute


def _window_start(ms: int) -> int:
    return ms - ms % WINDOW_MS


def _refusal(denial: RateLimitDenial, tokens: int, now: int) -> TooManyRequests:
    retry_after_s = max(1, -(-(denial.window_start_ms + WINDOW_MS - now) // 1000))  # ceiling, at least 1 s
    kind, _, subject = denial.subject.partition(":")
    who = f"customer {subject}" if kind == "customer" else f"API key {subject}"
    if denial.dimension == "requests":
        message = f"Rate limit reached for {who}: {denial.limit} requests per minute."
    elif tokens > denial.limit:
        message = (f"This request alone needs {tokens} tokens (prompt estimate + maximum output), more than "
                   f"the {denial.limit} tokens per minute allowed for {who}; lower max_tokens.")
    else:
        message = (f"Rate limit reached for {who}: {denial.limit} tokens per minute (used {denial.used}, "
                   f"this request needs {tokens}).")
    return TooManyRequests(f"{message} Retry after {retry_after_s} s.", retry_after_s=retry_after_s,
                           limit=denial.limit, dimension=denial.dimension)
