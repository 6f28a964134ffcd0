"""Rate-limit quota claims on the SQL wallet database (SQLite and PostgreSQL).

A window is a row of ``rate_limit_windows`` whose ``requests`` and ``tokens`` now hold the quota *claimed*
by every process (leased, admitted or not), never more than the limit. A claim runs in one write
transaction: it makes sure each subject's row exists (``INSERT ... ON CONFLICT DO NOTHING``), locks the
rows in subject order (``SELECT ... FOR UPDATE`` on PostgreSQL, so two replicas never wait on each other's
rows in opposite orders; SQLite has one writer), applies :func:`metergate.wallet.quota.grant` to each and
writes the grants only if every subject's need fits (all or none). A claim is made per chunk of requests,
not per request, so this costs a few statements per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select, update

from metergate.wallet import schema as t
from metergate.wallet.models import Mode, RateLimitDenial
from metergate.wallet.quota import QuotaClaim, QuotaGrant, grant


def claim_quota(conn: Connection, insert_: Callable[[Any], Any], mode: Mode, window_start_ms: int,
                claims: list[QuotaClaim]) -> list[QuotaGrant] | RateLimitDenial:
    w = t.rate_limit_windows
    ordered = sorted(claims, key=lambda c: c.subject)
    grants: list[QuotaGrant] = []
    for claim in ordered:
        conn.execute(insert_(w).values(mode=mode, subject=claim.subject, window_start_ms=window_start_ms,
                                       requests=0, tokens=0).on_conflict_do_nothing())
        row = conn.execute(select(w.c.requests, w.c.tokens).where(
            w.c.mode == mode, w.c.subject == claim.subject, w.c.window_start_ms == window_start_ms,
        ).with_for_update()).one()
        outcome = grant(claim, int(row.requests), int(row.tokens), window_start_ms)
        if isinstance(outcome, RateLimitDenial):
            return outcome  # nothing written but empty rows, which claim nothing
        grants.append(outcome)
    for g in grants:
        if g.requests or g.tokens:
            conn.execute(update(w).where(
                w.c.mode == mode, w.c.subject == g.subject, w.c.window_start_ms == window_start_ms,
            ).values(requests=g.claimed_requests, tokens=g.claimed_tokens))
    return grants


def release_quota(conn: Connection, mode: Mode, window_start_ms: int,
                  releases: list[tuple[str, int, int]]) -> None:
    """Give back (subject, requests, tokens) a process claimed in this window and will not use."""
    w = t.rate_limit_windows
    for subject, requests, tokens in sorted(releases):
        assert requests >= 0 and tokens >= 0, "a release gives back what was claimed"
        conn.execute(update(w).where(
            w.c.mode == mode, w.c.subject == subject, w.c.window_start_ms == window_start_ms,
            w.c.requests >= requests, w.c.tokens >= tokens,
        ).values(requests=w.c.requests - requests, tokens=w.c.tokens - tokens))
