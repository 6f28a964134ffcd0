"""Quota leases: the part of a shared rate-limit window this process has claimed and admits against locally.

Why: counting each request in the shared store made every rate-limited request a durable write (an SQL
upsert), which doubled the CPU per request. Instead a process claims quota in chunks
(:mod:`metergate.wallet.quota`) and admits requests from its lease without a round trip until the lease is
spent. Chunk sizes follow the local rate: a subject whose lease ran out within ``HORIZON_MS`` of the last
claim gets a chunk twice as large next time, one that stays idle gets smaller chunks; a busy subject ends
up claiming about once per horizon.

Bounds, per subject, window and dimension (requests, tokens):

* **Never over the limit.** A process admits only what it leased, and the store never leases more than the
  limit in all, so the total admitted across processes never exceeds it.
* **Never refused while quota is unclaimed** in the shared window: a claim takes at least what the request
  lacks whenever that much remains.
* **Refused early by at most the others' unused leases.** A process holds at most ``cap = max(1, limit //
  MAX_LEASE_DIVISOR)`` unused, so with N processes a request is refused only when the window's admitted
  total plus the request exceeds ``limit - (N - 1) * cap``. Near the limit the store's taper makes chunks
  shrink towards exactly what a request needs, and a stopping process gives its unused lease back.
* **Refusals are mostly local.** The window's claimed totals seen at the last claim may refuse a request
  locally for ``KNOWN_TTL_MS`` (claimed quota only grows within a window, except for those give-backs), so
  a client hammering a spent limit costs the store about one call per second per subject, not one per
  request.

This module is pure bookkeeping: no I/O, times are passed in (the limiter's injectable clock).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from metergate.wallet.models import Mode, RateLimitCharge, RateLimitDenial
from metergate.wallet.quota import QuotaClaim, QuotaGrant

HORIZON_MS = 2_000
MAX_LEASE_DIVISOR = 16
KNOWN_TTL_MS = 1_000
_MAX_SCALE = 1 << 30
_MAX_LEASES = 100_000


def lease_cap(limit: int) -> int:
    """The most quota of a limit one process keeps unused: a fraction, so that replicas can share it."""
    return max(1, limit // MAX_LEASE_DIVISOR)


@dataclass(slots=True)
class Lease:
    """One subject's lease in one window (reset when the window or the limits change), and its sizing."""

    mode: Mode
    customer_id: str
    subject: str
    window_start_ms: int = -1
    limits: tuple[int | None, int | None] = (None, None)
    requests: int = 0  # leased and not yet admitted
    tokens: int = 0
    known: tuple[int, int] | None = None  # the window's claimed (requests, tokens), all processes, last seen
    known_at_ms: int = 0
    scale: int = 1  # the next chunk, in requests (tokens: this many times the request's tokens)
    last_claim_ms: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def covers(self, tokens: int) -> bool:
        rpm, tpm = self.limits
        return (rpm is None or self.requests >= 1) and (tpm is None or self.tokens >= tokens)


class LeaseBook:
    """Every lease of this process, by (mode, subject)."""

    def __init__(self) -> None:
        self._leases: dict[tuple[Mode, str], Lease] = {}

    def lease(self, mode: Mode, customer_id: str, charge: RateLimitCharge, window_start_ms: int) -> Lease:
        """The subject's lease for this window and these limits; an older window's lease is dropped."""
        key = (mode, charge.subject)
        lease = self._leases.get(key)
        if lease is None:
            if len(self._leases) >= _MAX_LEASES:
                self.prune(window_start_ms, idle_before_ms=window_start_ms)
            lease = self._leases[key] = Lease(mode, customer_id, charge.subject)
        limits = (charge.requests_per_minute, charge.tokens_per_minute)
        if lease.window_start_ms != window_start_ms or lease.limits != limits:
            lease.window_start_ms, lease.limits = window_start_ms, limits
            lease.requests = lease.tokens = 0
            lease.known = None
        return lease

    @staticmethod
    def take_all(leases: list[Lease], tokens: int) -> bool:
        """Admit one request of ``tokens`` against every lease if all cover it, else take nothing."""
        if not all(lease.covers(tokens) for lease in leases):
            return False
        for lease in leases:
            rpm, tpm = lease.limits
            if rpm is not None:
                lease.requests -= 1
            if tpm is not None:
                lease.tokens -= tokens
        return True

    @staticmethod
    def known_denial(lease: Lease, tokens: int, now_ms: int) -> RateLimitDenial | None:
        """A refusal this process can give without asking the store, or ``None``."""
        rpm, tpm = lease.limits
        if tpm is not None and tokens > tpm:
            return RateLimitDenial(lease.subject, "tokens", tpm, 0, lease.window_start_ms)  # can never fit
        if lease.known is None or now_ms - lease.known_at_ms >= KNOWN_TTL_MS:
            return None
        claimed_requests, claimed_tokens = lease.known
        if rpm is not None and lease.requests < 1 and claimed_requests + 1 > rpm:
            return RateLimitDenial(lease.subject, "requests", rpm, claimed_requests, lease.window_start_ms)
        if tpm is not None and claimed_tokens + (tokens - lease.tokens) > tpm and lease.tokens < tokens:
            return RateLimitDenial(lease.subject, "tokens", tpm, claimed_tokens, lease.window_start_ms)
        return None

    @staticmethod
    def claim(lease: Lease, tokens: int, now_ms: int) -> QuotaClaim:
        """What to ask the store for: what the request lacks, topped up by a chunk within the lease cap."""
        if lease.last_claim_ms is not None:
            elapsed = now_ms - lease.last_claim_ms
            if elapsed < HORIZON_MS:
                lease.scale = min(_MAX_SCALE, lease.scale * 2)
            else:
                lease.scale = max(1, lease.scale >> min(30, elapsed // HORIZON_MS - 1))
        lease.last_claim_ms = now_ms
        rpm, tpm = lease.limits
        need_r = want_r = need_t = want_t = 0
        if rpm is not None:
            need_r = 0 if lease.requests >= 1 else 1
            want_r = max(need_r, min(lease.scale, lease_cap(rpm) - lease.requests))
        if tpm is not None:
            need_t = max(0, tokens - lease.tokens)
            want_t = max(need_t, min(lease.scale * tokens, lease_cap(tpm) - lease.tokens))
        return QuotaClaim(lease.subject, rpm, tpm, need_r, want_r, need_t, want_t)

    @staticmethod
    def add(lease: Lease, granted: QuotaGrant, window_start_ms: int, limits: tuple[int | None, int | None],
            now_ms: int) -> None:
        """Credit a grant to the lease it was claimed for; dropped if that window or those limits are gone
        (quota of an ended window admits nothing)."""
        if lease.window_start_ms != window_start_ms or lease.limits != limits:
            return
        lease.requests += granted.requests
        lease.tokens += granted.tokens
        lease.known, lease.known_at_ms = (granted.claimed_requests, granted.claimed_tokens), now_ms

    @staticmethod
    def remember(lease: Lease, denial: RateLimitDenial, now_ms: int) -> None:
        """Keep what a refusal taught about the window's claimed quota (the other dimension stays unknown
        as 0, which refuses nothing)."""
        if lease.window_start_ms != denial.window_start_ms:
            return
        known = (denial.used, 0) if denial.dimension == "requests" else (0, denial.used)
        lease.known, lease.known_at_ms = known, now_ms

    def unused(self, window_start_ms: int) -> list[Lease]:
        """Leases of this window with quota left: what a stopping process gives back."""
        return [lease for lease in self._leases.values()
                if lease.window_start_ms == window_start_ms and (lease.requests or lease.tokens)]

    def prune(self, window_start_ms: int, *, idle_before_ms: int) -> int:
        """Forget leases of earlier windows not claimed from since ``idle_before_ms`` (nor being claimed)."""
        stale = [key for key, lease in self._leases.items()
                 if lease.window_start_ms < window_start_ms and not lease.lock.locked()
                 and (lease.last_claim_ms is None or lease.last_claim_ms < idle_before_ms)]
        for key in stale:
            del self._leases[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._leases)
