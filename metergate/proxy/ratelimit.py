"""Rate limits: requests and tokens per minute, per customer and per proxy API key, shared by every replica.

A request is counted at admission, before its hold: one request, and its admission estimate of tokens
(estimated prompt tokens + maximum output tokens — the same figures the hold is priced from), against
every limit that applies to it, all or none. Windows are fixed, epoch-aligned minutes shared through the
wallet store (the SQL database, or Redis when configured), but a request is not a write there: each
process leases quota from a window in chunks and admits locally until its lease is spent
(:mod:`metergate.proxy.leases`; the claim rule in :mod:`metergate.wallet.quota`). The store never leases
more than a limit, so no interleaving of replicas admits past one; a refusal can come early by at most
the other replicas' unused leases (each under 1/16 of the limit).

Which limits apply: ``rate_limits.customer`` for every customer, replaced per customer by an override set
through the admin API (stored in the database; each replica keeps them in memory, reloads them every
``rate_limits.refresh_interval_s`` and learns of its own admin API's changes at once), plus
``rate_limits.api_key`` for each proxy API key. A request to which no limit applies costs no store call.
A refused request is answered 429 ``rate_limited`` with ``Retry-After`` (seconds until its window
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
from metergate.proxy.leases import Lease, LeaseBook
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
        self.leases = LeaseBook()

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
        await self.release()

    async def release(self) -> None:
        """Give this window's unused leases back, so that other replicas can admit them (at shutdown)."""
        window = _window_start(self.clock())
        by_customer: dict[tuple[Mode, str], list[tuple[str, int, int]]] = {}
        for lease in self.leases.unused(window):
            by_customer.setdefault((lease.mode, lease.customer_id), []).append(
                (lease.subject, lease.requests, lease.tokens))
            lease.requests = lease.tokens = 0
        for (mode, customer_id), releases in by_customer.items():
            try:
                await self._store.release_rate_quota(mode, customer_id, releases, window_start_ms=window)
            except Exception:
                log.warning("giving back unused rate-limit quota failed; it lapses with its window",
                            exc_info=True)

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
        self.leases.prune(_window_start(now), idle_before_ms=now - _KEEP_WINDOWS * WINDOW_MS)
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
        """Count the request, or raise :class:`TooManyRequests` having counted nothing.

        The fast path takes the request from this process's leases, with no await between the check and
        the take. Otherwise the subjects' locks are taken in subject order, so that one claim per subject is
        in flight and the requests queued behind it are served from its grant."""
        assert tokens >= 0, "a request cannot use negative tokens"
        charges = sorted(self.charges(identity), key=lambda ch: ch.subject)
        if not charges:
            return  # no limit applies: no store call
        mode, customer = identity.mode, identity.customer_id
        window = _window_start(self.clock())
        if self.leases.take_all([self.leases.lease(mode, customer, ch, window) for ch in charges], tokens):
            return
        async with contextlib.AsyncExitStack() as stack:
            for ch in charges:
                await stack.enter_async_context(self.leases.lease(mode, customer, ch, window).lock)
            for _ in range(3):  # a window (or an override) that changes during a claim voids its grant
                if await self._claim(identity, charges, tokens):
                    return
        raise AssertionError("three claims in a row outlived their windows")

    async def _claim(self, identity: Identity, charges: list[RateLimitCharge], tokens: int) -> bool:
        """Claim what the leases lack and admit; ``False`` when the grant came too late for its window."""
        mode, customer = identity.mode, identity.customer_id
        now = self.clock()
        window = _window_start(now)
        leases = [self.leases.lease(mode, customer, ch, window) for ch in charges]
        if self.leases.take_all(leases, tokens):
            return True  # served by a claim made while this request waited for the lock
        for lease in leases:
            denial = self.leases.known_denial(lease, tokens, now)
            if denial is not None:
                raise _refusal(denial, tokens, now)
        short: list[tuple[Lease, tuple[int | None, int | None]]] = [
            (lease, lease.limits) for lease in leases if not lease.covers(tokens)]
        claims = [self.leases.claim(lease, tokens, now) for lease, _ in short]
        outcome = await self._store.claim_rate_quota(mode, customer, claims, window_start_ms=window)
        done = self.clock()
        if isinstance(outcome, RateLimitDenial):
            for lease, _ in short:
                if lease.subject == outcome.subject:
                    self.leases.remember(lease, outcome, done)
            raise _refusal(outcome, tokens, now)
        granted = {g.subject: g for g in outcome}
        for lease, limits in short:
            self.leases.add(lease, granted[lease.subject], window, limits, done)
        return self.leases.take_all(leases, tokens)


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
