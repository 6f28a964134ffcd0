"""Rate-limit quota claims: how much of a shared window's remaining quota one process may lease at once.

A rate-limit window (one subject, one fixed minute) is shared by every replica through the store, which
keeps one number per dimension: the quota *claimed* so far. A process never counts single requests there;
it claims a chunk and admits against it locally (:mod:`metergate.proxy.leases`). Invariant: a window's
claimed quota never exceeds its limit, so what all processes admit in it never does either.

A claim asks, per subject and dimension, for at least ``need`` (what the request in hand lacks) and at
most ``want`` (the chunk the process would like). :func:`grant` is the rule every store applies
atomically (the SQL stores in :mod:`metergate.wallet.quota_sql`, Redis in a Lua script that mirrors it):

* refused, nothing taken, when ``need`` exceeds what remains — all subjects of a claim or none;
* otherwise ``max(need, min(want, remaining // TAPER))``: never more than a quarter of what is left, so
  that as a window fills, chunks shrink towards exactly what each request needs and the last of the quota
  goes to whichever replica asks, not to one that happened to ask for a big chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metergate.wallet.models import RateLimitDenial

TAPER = 4


@dataclass(frozen=True, slots=True)
class QuotaClaim:
    """One subject's part of a claim. A dimension without a limit has ``need == want == 0``."""

    subject: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    need_requests: int
    want_requests: int
    need_tokens: int
    want_tokens: int

    def __post_init__(self) -> None:
        assert 0 <= self.need_requests <= self.want_requests, "want must cover need"
        assert 0 <= self.need_tokens <= self.want_tokens, "want must cover need"
        assert self.requests_per_minute is not None or self.want_requests == 0, "no limit, nothing to claim"
        assert self.tokens_per_minute is not None or self.want_tokens == 0, "no limit, nothing to claim"


@dataclass(frozen=True, slots=True)
class QuotaGrant:
    """What a claim took for one subject, and the window's claimed totals (all processes) after it."""

    subject: str
    requests: int
    tokens: int
    claimed_requests: int
    claimed_tokens: int


def grant_one(limit: int | None, claimed: int, need: int, want: int) -> int | None:
    """The amount granted in one dimension, or ``None`` when ``need`` does not fit."""
    if limit is None:
        return 0
    remaining = limit - claimed
    if need > remaining:
        return None
    return max(need, min(want, remaining // TAPER))


def grant(claim: QuotaClaim, claimed_requests: int, claimed_tokens: int,
          window_start_ms: int) -> QuotaGrant | RateLimitDenial:
    """Apply the rule to one subject whose window has claimed what is given; requests are checked first."""
    dims: list[tuple[Literal["requests", "tokens"], int | None, int, int, int]] = [
        ("requests", claim.requests_per_minute, claimed_requests, claim.need_requests, claim.want_requests),
        ("tokens", claim.tokens_per_minute, claimed_tokens, claim.need_tokens, claim.want_tokens)]
    granted: list[int] = []
    for dimension, limit, claimed, need, want in dims:
        amount = grant_one(limit, claimed, need, want)
        if amount is None:
            assert limit is not None
            return RateLimitDenial(claim.subject, dimension, limit, claimed, window_start_ms)
        granted.append(amount)
    requests, tokens = granted
    return QuotaGrant(claim.subject, requests, tokens, claimed_requests + requests, claimed_tokens + tokens)
