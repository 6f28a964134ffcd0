"""Quota leases admit what an exact shared counter would, and never more than a limit across processes.

Method: Hypothesis drives limiters (:class:`RateLimiter`, the proxy's own) over one real SQLite store with
an injected clock that only the steps move: requests of random sizes by a customer through one of its
two API keys or the trusted header, with random pauses (a window rollover frees capacity). The reference
model is one exact counter per subject and minute that admits a request iff every limit still fits.
With one process the limiter must agree with the model on every request (admitted, or refused on the
same subject and dimension). With three processes on the same store: the admitted totals never pass a
limit, and a refusal comes early by at most the other processes' unused leases, each under
``lease_cap(limit)`` — the bound the README states.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metergate.config.settings import RateLimit, RateLimitSettings
from metergate.errors import TooManyRequests
from metergate.proxy.identify import Identity
from metergate.proxy.leases import lease_cap
from metergate.proxy.ratelimit import WINDOW_MS, RateLimiter
from metergate.wallet.sql import SqlWalletStore

T = TypeVar("T")
T0 = 1_900_000_000_000 - 1_900_000_000_000 % WINDOW_MS


@dataclass(frozen=True)
class Step:
    process: int
    pause_ms: int
    key: int | None  # which of the customer's two keys, None: the trusted header (no key limit)
    tokens: int


@dataclass(frozen=True)
class Limits:
    customer_rpm: int | None
    customer_tpm: int | None
    key_rpm: int | None


limits_st = st.builds(Limits, st.one_of(st.none(), st.integers(1, 40)),
                      st.one_of(st.none(), st.integers(50, 3000)), st.one_of(st.none(), st.integers(1, 20)))


def steps_st(processes: int) -> st.SearchStrategy[list[Step]]:
    pause = st.one_of(st.just(0), st.just(0), st.integers(1, 3_000), st.integers(20_000, 70_000))
    return st.lists(st.builds(Step, st.integers(0, processes - 1), pause, st.sampled_from([None, 0, 1]),
                              st.integers(1, 400)), min_size=1, max_size=60)


class Model:
    """The exact counter: per (subject, window) the requests and tokens admitted."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])

    def subjects(self, customer: str, key: str | None) -> list[tuple[str, int | None, int | None]]:
        out: list[tuple[str, int | None, int | None]] = []
        if self.limits.customer_rpm is not None or self.limits.customer_tpm is not None:
            out.append((f"customer:{customer}", self.limits.customer_rpm, self.limits.customer_tpm))
        if key is not None and self.limits.key_rpm is not None:
            out.append((f"key:{key}", self.limits.key_rpm, None))
        return sorted(out)

    def refusal(self, subjects: list[tuple[str, int | None, int | None]], window: int,
                tokens: int) -> tuple[str, str] | None:
        """(subject, dimension) of the first limit that refuses, as the limiter reports it, or None."""
        for subject, rpm, tpm in subjects:
            requests, used_tokens = self.used[(subject, window)]
            if tpm is not None and tokens > tpm:
                return subject, "tokens"
            if rpm is not None and requests + 1 > rpm:
                return subject, "requests"
            if tpm is not None and used_tokens + tokens > tpm:
                return subject, "tokens"
        return None

    def count(self, subjects: list[tuple[str, int | None, int | None]], window: int, tokens: int) -> None:
        for subject, _, _ in subjects:
            used = self.used[(subject, window)]
            used[0] += 1
            used[1] += tokens


class Harness:
    """One event loop and one store for a test's examples; each example gets fresh subjects and limiters."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = SqlWalletStore(f"sqlite:///{path}")
        self.run(self.store.open())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = Harness(tmp_path / "leases.db")
    yield h
    h.close()


def refused_on(exc: TooManyRequests, customer: str, key: str | None) -> tuple[str, str]:
    """(subject, dimension) of a refusal, read from its public answer: the message names who."""
    subject = f"key:{key}" if key is not None and f"API key {key}" in exc.message else f"customer:{customer}"
    assert f"customer {customer}" in exc.message or subject.startswith("key:"), exc.message
    return subject, str(exc.extra["dimension"])


def play(harness: Harness, limits: Limits, steps: list[Step], processes: int) -> None:
    now = [T0 + 7_000]
    settings_ = RateLimitSettings(customer=RateLimit(requests_per_minute=limits.customer_rpm,
                                                     tokens_per_minute=limits.customer_tpm),
                                  api_key=RateLimit(requests_per_minute=limits.key_rpm))
    limiters = [RateLimiter(settings_, harness.store, clock=lambda: now[0]) for _ in range(processes)]
    customer = "c-" + uuid.uuid4().hex[:12]  # examples share one database
    keys = [f"k-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    model = Model(limits)  # the exact counter (one process) or the actual admissions (several)
    for step in steps:
        now[0] += step.pause_ms
        window = now[0] - now[0] % WINDOW_MS
        key = None if step.key is None else keys[step.key]
        identity = Identity("test", customer, "header" if key is None else "api_key", key)
        subjects = model.subjects(customer, key)
        expected = model.refusal(subjects, window, step.tokens)
        try:
            harness.run(limiters[step.process].admit(identity, step.tokens))
            got = None
        except TooManyRequests as exc:
            got = refused_on(exc, customer, key)
            assert exc.extra["retry_after_s"] == max(1, -(-(window + WINDOW_MS - now[0]) // 1000))
        if processes == 1:
            assert got == expected, (step, model.used)
        if got is None:
            assert expected is None, f"admitted past a limit: {step} {model.used}"
            model.count(subjects, window, step.tokens)
        else:
            subject, dimension = got
            rpm, tpm = next((r, t) for s, r, t in subjects if s == subject)
            requests, used_tokens = model.used[(subject, window)]
            if dimension == "requests":
                assert rpm is not None and requests + 1 > rpm - (processes - 1) * lease_cap(rpm), (step, model.used)
            else:
                assert tpm is not None
                assert used_tokens + step.tokens > tpm - (processes - 1) * lease_cap(tpm), (step, model.used)


_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(limits=limits_st, steps=steps_st(1))
def test_one_process_admits_exactly_what_an_exact_counter_admits(harness: Harness, limits: Limits,
                                                                 steps: list[Step]) -> None:
    play(harness, limits, steps, processes=1)


@_SETTINGS
@given(limits=limits_st, steps=steps_st(3))
def test_three_processes_never_pass_a_limit_and_refuse_early_by_at_most_the_others_leases(
        harness: Harness, limits: Limits, steps: list[Step]) -> None:
    play(harness, limits, steps, processes=3)


# A table of hand-checked sequences (one process, limit 3 requests a minute): a window rollover frees
# capacity at the minute, not before.
@pytest.mark.parametrize(("pauses_ms", "admitted"), [
    ([0, 0, 0, 0], [True, True, True, False]),
    ([0, 0, 0, 52_999, 1], [True, True, True, False, True]),  # 7 s + 52.999 s: still the first minute
    ([0, 0, 0, 53_000, 0, 0, 0], [True, True, True, True, True, True, False]),  # 60 s: a new window
    ([60_000, 0, 0, 0, 60_000], [True, True, True, False, True]),
])
def test_the_window_frees_its_capacity_at_the_minute(harness: Harness, pauses_ms: list[int],
                                                     admitted: list[bool]) -> None:
    now = [T0 + 7_000]
    limiter = RateLimiter(RateLimitSettings(customer=RateLimit(requests_per_minute=3)), harness.store,
                          clock=lambda: now[0])
    identity = Identity("test", "c-" + uuid.uuid4().hex[:12], "header")
    outcomes = []
    for pause in pauses_ms:
        now[0] += pause
        try:
            harness.run(limiter.admit(identity, 10))
            outcomes.append(True)
        except TooManyRequests:
            outcomes.append(False)
    assert outcomes == admitted
