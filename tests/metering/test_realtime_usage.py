"""Reading a Realtime ``response.done`` usage: text and audio apart, every count validated, nothing unexplained
billed at less than the dearest kind; and price rules that fold audio into text rather than let it go free.

Method: table-driven cases of real and broken reports against :func:`from_response_done`, Hypothesis for
arbitrary JSON in every field (only a :class:`RealtimeUsage` in bounds, ``None`` or ``UsageAnomaly`` may come
out), and the pricing engine on hand-computed amounts.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metergate.metering.realtime import RealtimeUsage, from_response_done, genai_audio_rates
from metergate.metering.usage import MAX_TOKENS, UsageAnomaly
from metergate.pricing.engine import price
from metergate.pricing.rules import parse_rule_set


def report(text_in: Any = 30, audio_in: Any = 50, cached: Any = 20, cached_text: Any = 10, cached_audio: Any = 10,
           text_out: Any = 5, audio_out: Any = 40, **top: Any) -> dict[str, Any]:
    usage = {"input_tokens": 80, "output_tokens": 45, "total_tokens": 125,
             "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "cached_tokens": cached,
                                     "cached_tokens_details": {"text_tokens": cached_text,
                                                               "audio_tokens": cached_audio}},
             "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}
    usage.update(top)
    return usage


def test_a_whole_report_splits_into_disjoint_kinds() -> None:
    assert from_response_done(report()) == RealtimeUsage(text_input=20, audio_input=40, cached_text_input=10,
                                                         cached_audio_input=10, text_output=5, audio_output=40)


@pytest.mark.parametrize(("usage", "expected"), [
    # Details that leave part of a total unexplained: that part counts as audio, the dearer kind.
    (report(audio_in=None, cached=0, cached_text=0, cached_audio=0), RealtimeUsage(30, 50, 0, 0, 5, 40)),
    (report(audio_out=None), RealtimeUsage(20, 40, 10, 10, 5, 40)),
    ({"input_tokens": 12, "output_tokens": 7}, RealtimeUsage(0, 12, 0, 0, 0, 7)),
    # Cached tokens whose own split is missing: audio as far as there is audio input, then text.
    (report(cached_text=None, cached_audio=None), RealtimeUsage(30, 30, 0, 20, 5, 40)),
    # Explicit zeros stay zeros.
    ({"input_tokens": 0, "output_tokens": 0}, RealtimeUsage()),
])
def test_incomplete_details_never_bill_less(usage: dict[str, Any], expected: RealtimeUsage) -> None:
    assert from_response_done(usage) == expected


@pytest.mark.parametrize("usage", [
    # Not integers, or out of bounds.
    report(text_in=1.5), report(audio_out="40"), report(text_out=True), report(cached=-1),
    {"input_tokens": MAX_TOKENS + 1, "output_tokens": 0},
    # Subsets beyond their totals.
    report(text_in=70), report(cached=81), report(cached_text=25, cached_audio=0), report(audio_out=41),
    # Missing totals, wrong shapes.
    {"output_tokens": 3}, {"input_tokens": 3}, "usage", [1], report(input_token_details=[1]),
])
def test_implausible_reports_are_anomalies(usage: Any) -> None:
    with pytest.raises(UsageAnomaly):
        from_response_done(usage)


def test_no_usage_is_none() -> None:
    assert from_response_done(None) is None


COUNTS = st.one_of(st.integers(0, 120), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=3),
                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
FIELDS = ("text_in", "audio_in", "cached", "cached_text", "cached_audio", "text_out", "audio_out")


@given(st.fixed_dictionaries({name: COUNTS for name in FIELDS}), st.integers(0, 200), st.integers(0, 200))
def test_any_counts_read_in_bounds_or_are_an_anomaly(counts: dict[str, Any], total_in: int, total_out: int) -> None:
    usage = report(**counts, input_tokens=total_in, output_tokens=total_out)
    try:
        read = from_response_done(usage)
    except UsageAnomaly:
        return
    assert read is not None
    kinds = [read.text_input, read.audio_input, read.cached_text_input, read.cached_audio_input,
             read.text_output, read.audio_output]
    assert all(isinstance(c, int) and 0 <= c <= MAX_TOKENS for c in kinds)
    assert read.input_tokens == total_in and read.output_tokens == total_out


RULES = {"rules": [
    {"id": "audio", "match": {"model": "rt"}, "asset": "USD", "per_units": "1000000",
     "rates": {"input_tokens": "4", "cached_input_tokens": "0.4", "output_tokens": "16",
               "audio_input_tokens": "32", "audio_output_tokens": "64"}},
    {"id": "text-only", "match": {"model": "plain"}, "asset": "USD", "per_units": "1000000",
     "rates": {"input_tokens": "4", "cached_input_tokens": "0.4", "output_tokens": "16"}},
]}
USAGE = RealtimeUsage(text_input=100, audio_input=200, cached_text_input=300, cached_audio_input=400,
                      text_output=10, audio_output=20)


@pytest.mark.parametrize(("rule", "exact"), [
    # 100x4 + 200x32 + (300+400)x0.4 (cached audio as cached input) + 10x16 + 20x64, per million.
    ("audio", Decimal("0.00852")),
    # No audio rates: audio as the text of its side, never free: 300x4 + 700x0.4 + 30x16.
    ("text-only", Decimal("0.00196")),
])
def test_rules_price_audio_on_its_own_rates_or_as_text(rule: str, exact: Decimal) -> None:
    rules = parse_rule_set(RULES, {"USD"})
    chosen = next(r for r in rules.rules if r.id == rule)
    priced = price(chosen, USAGE.quantities(), scale=6)
    assert priced.exact == exact and priced.amount == int(exact * 10**6)


def test_genai_prices_knows_realtime_audio_rates() -> None:
    rates = genai_audio_rates("openai", "gpt-realtime")
    assert rates is not None and rates.audio_output > rates.text_output
    assert rates.nanos(USAGE) == int((100 * rates.text_input + 200 * rates.audio_input
                                      + 300 * rates.cached_text_input + 400 * rates.cached_audio_input
                                      + 10 * rates.text_output + 20 * rates.audio_output) * 1000)
    assert genai_audio_rates("openai", "gpt-4o-mini") is None  # no audio prices: text rates apply
