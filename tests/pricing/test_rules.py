"""The pricing engine without I/O: which rule a request gets, which rule sets are refused, and what each pricing
model charges — every expected amount computed by hand in the comment beside it, rounding included."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from metergate.config.settings import PricingSettings
from metergate.metering.pricing import PriceBook
from metergate.metering.usage import Usage
from metergate.pricing.engine import CostUnknown, period_start_ms, price, request_quantities
from metergate.pricing.rules import InvalidPriceRules, RuleSet, parse_rule_set
from metergate.pricing.versions import config_version

ASSETS = {"USD", "CREDITS"}
SCALES = {"USD": 6, "CREDITS": 0}


def rules(*items: dict[str, Any]) -> RuleSet:
    return parse_rule_set({"rules": [{"asset": "USD", **item} for item in items]}, ASSETS)


def amount(rule_set: RuleSet, attributes: dict[str, str], quantities: dict[str, Any], **kwargs: Any) -> int:
    rule = rule_set.choose(attributes)
    assert rule is not None
    q = {k: Decimal(v) for k, v in quantities.items()}
    return price(rule, q, scale=SCALES[rule.asset], **kwargs).amount


# ----------------------------------------------------------------------------------------- rule matching

DIMENSIONAL = rules(
    {"id": "any", "event_fee": "1"},
    {"id": "gpt-4o", "match": {"type": "request", "model": "gpt-4o"}, "event_fee": "2"},
    {"id": "gpt-4o-chat", "match": {"type": "request", "model": "gpt-4o", "feature": "chat"}, "event_fee": "3"},
    {"id": "chat", "match": {"type": "request", "feature": "chat", "model": "*"}, "event_fee": "4"},  # "*": absent
    {"id": "acme-gpu", "match": {"type": "gpu", "customer": "acme"}, "event_fee": "5"},
    {"id": "gpu", "match": {"type": "gpu"}, "event_fee": "6"},
)
R = {"type": "request"}


@pytest.mark.parametrize(("attributes", "expected"), [
    # the most specific matching rule wins
    ({**R, "model": "gpt-4o", "feature": "chat"}, "gpt-4o-chat"),
    ({**R, "model": "gpt-4o", "feature": "search"}, "gpt-4o"),
    ({**R, "model": "gpt-4o"}, "gpt-4o"),
    ({**R, "model": "o1", "feature": "chat"}, "chat"),
    # '*' fallback: nothing more specific matches
    ({**R, "model": "o1"}, "any"),
    ({"model": "gpt-4o"}, "any"),  # not a request
    ({}, "any"),
    # a customer-specific rule beats the general one for that customer only
    ({"type": "gpu", "customer": "acme"}, "acme-gpu"),
    ({"type": "gpu", "customer": "globex"}, "gpu"),
])
def test_most_specific_rule_wins(attributes: dict[str, str], expected: str) -> None:
    rule = DIMENSIONAL.choose(attributes)
    assert rule is not None and rule.id == expected


def test_no_rule_matches_without_a_fallback() -> None:
    assert rules({"id": "a", "match": {"model": "a"}}).choose({"model": "b"}) is None


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("items", "code", "param"), [
    # equally specific rules that one request can match both: ambiguous unless a more specific rule settles it
    ([{"id": "m", "match": {"model": "a"}}, {"id": "f", "match": {"feature": "x"}}], "ambiguous_rules",
     "rules[1].match"),
    ([{"id": "m", "match": {"model": "a"}}, {"id": "g", "match": {"type": "gpu"}}], "ambiguous_rules",
     "rules[1].match"),  # an event of type gpu carrying model=a would match both
    ([{"id": "m", "match": {"model": "a", "route": "/o"}}, {"id": "f", "match": {"feature": "x", "route": "/o"}}],
     "ambiguous_rules", "rules[1].match"),
    # the same match twice, the same id twice
    ([{"id": "a", "match": {"model": "a"}}, {"id": "b", "match": {"model": "a", "feature": "*"}}], "duplicate_rule",
     "rules[1].match"),
    ([{"id": "a", "match": {"model": "a"}}, {"id": "a", "match": {"model": "b"}}], "duplicate_rule", "rules[1].id"),
    # assets, negative amounts, floats
    ([{"id": "a", "asset": "EUR"}], "unknown_asset", "rules[0].asset"),
    ([{"id": "a", "rates": {"input_tokens": "-0.1"}}], "negative_rate", "rules[0].rates.input_tokens"),
    ([{"id": "a", "event_fee": "-1"}], "negative_rate", "rules[0].event_fee"),
    ([{"id": "a", "rates": {"input_tokens": 0.1}}], "invalid_rule", "rules[0].rates.input_tokens"),
    ([{"id": "a", "per_units": "0"}], "invalid_rule", "rules[0].per_units"),
    ([{"id": "a", "colour": "red"}], "invalid_rule", "rules[0].colour"),
    # bad tiers
    ([{"id": "a", "tiers": [{"quantity": "q", "mode": "volume", "steps": [{"up_to": "10", "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers[0].steps[0].up_to"),
    ([{"id": "a", "tiers": [{"quantity": "q", "mode": "volume", "steps": [
        {"up_to": "10", "rate": "1"}, {"up_to": "10", "rate": "1"}, {"up_to": None, "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers[0].steps[1].up_to"),
    ([{"id": "a", "tiers": [{"quantity": "q", "mode": "volume", "steps": [
        {"up_to": None, "rate": "1"}, {"up_to": None, "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers[0].steps[0].up_to"),
    ([{"id": "a", "tiers": [{"quantity": "q", "mode": "stepped", "steps": [{"up_to": None, "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers[0].mode"),
    ([{"id": "a", "rates": {"q": "1"}, "tiers": [{"quantity": "q", "mode": "volume",
                                                  "steps": [{"up_to": None, "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers"),
    ([{"id": "a", "tiers": [{"quantity": "q", "mode": "volume", "steps": [{"up_to": None, "rate": "-2"}]}]}],
     "negative_rate", "rules[0].tiers[0].steps[0].rate"),
    # cost-plus in an asset other than USD needs its dollar value
    ([{"id": "a", "asset": "CREDITS", "markup": "0.2"}], "invalid_rule", "rules[0].asset_usd_value"),
])
def test_invalid_rule_sets_are_refused_with_code_and_path(items: list[dict[str, Any]], code: str,
                                                           param: str) -> None:
    with pytest.raises(InvalidPriceRules) as refused:
        rules(*items)
    assert (refused.value.code, refused.value.param, refused.value.status) == (code, param, 422)


def test_an_ambiguity_is_settled_by_a_more_specific_rule() -> None:
    settled = rules({"id": "m", "match": {"model": "a"}, "event_fee": "1"},
                    {"id": "f", "match": {"feature": "x"}, "event_fee": "2"},
                    {"id": "mf", "match": {"model": "a", "feature": "x"}, "event_fee": "3"})
    rule = settled.choose({"model": "a", "feature": "x"})
    assert rule is not None and rule.id == "mf"
    # equally specific rules that no request can match both are fine
    assert rules({"id": "a", "match": {"model": "a"}}, {"id": "b", "match": {"model": "b"}})


# ----------------------------------------------------------------------------------------- pricing models

PER_MTOK = {"per_units": "1000000"}


@pytest.mark.parametrize(("rule", "quantities", "expected"), [
    # per-event fee: $0.0025 = 2500 micro-dollars
    ({"event_fee": "0.0025"}, {}, 2500),
    # per-unit: 1000 x $0.30/M + 500 x $1.20/M = 0.0003 + 0.0006 = $0.0009
    ({**PER_MTOK, "rates": {"input_tokens": "0.30", "output_tokens": "1.20"}},
     {"input_tokens": 1000, "output_tokens": 500}, 900),
    # half-up: 5 x $0.10/M = $0.0000005 = 0.5 micro -> 1 (banker's rounding would give 0)
    ({**PER_MTOK, "rates": {"input_tokens": "0.10"}}, {"input_tokens": 5}, 1),
    # 4 x $0.10/M = 0.4 micro -> 0; 15 x $0.10/M = 1.5 micro -> 2; 25 x = 2.5 -> 3 (half-up, not half-even)
    ({**PER_MTOK, "rates": {"input_tokens": "0.10"}}, {"input_tokens": 4}, 0),
    ({**PER_MTOK, "rates": {"input_tokens": "0.10"}}, {"input_tokens": 15}, 2),
    ({**PER_MTOK, "rates": {"input_tokens": "0.10"}}, {"input_tokens": 25}, 3),
    # rounded once, over the sum: 5 x 0.1 + 5 x 0.1 micro = 1.0 micro -> 1 (rounding each line would give 2)
    ({**PER_MTOK, "rates": {"input_tokens": "0.10", "output_tokens": "0.10"}},
     {"input_tokens": 5, "output_tokens": 5}, 1),
    # an unpriced token kind counts as its base kind: 100 cached at the input rate $2/M = $0.0002
    ({**PER_MTOK, "rates": {"input_tokens": "2"}}, {"cached_input_tokens": 100}, 200),
    # ... unless the rule prices it: 100 cached at $0.5/M = $0.00005
    ({**PER_MTOK, "rates": {"input_tokens": "2", "cached_input_tokens": "0.5"}}, {"cached_input_tokens": 100}, 50),
    # reasoning tokens as output unless priced: (10 + 30) x $1/M = 40 micro; priced apart: 10 x 1 + 30 x 3 = 100
    ({**PER_MTOK, "rates": {"output_tokens": "1"}}, {"output_tokens": 10, "reasoning_tokens": 30}, 40),
    ({**PER_MTOK, "rates": {"output_tokens": "1", "reasoning_tokens": "3"}},
     {"output_tokens": 10, "reasoning_tokens": 30}, 100),
    # quantities a rule does not price are free
    ({"event_fee": "0.000001"}, {"gpu_seconds": 1000}, 1),
    # minimum charge: 10 x $0.30/M = $0.000003 < $0.001 -> $0.001
    ({**PER_MTOK, "rates": {"input_tokens": "0.30"}, "minimum": "0.001"}, {"input_tokens": 10}, 1000),
    # ... not applied above it: 10000 x $0.30/M x ... = $0.003
    ({**PER_MTOK, "rates": {"input_tokens": "0.30"}, "minimum": "0.001"}, {"input_tokens": 10000}, 3000),
])
def test_pricing_models_against_hand_computed_amounts(rule: dict[str, Any], quantities: dict[str, int],
                                                      expected: int) -> None:
    assert amount(rules({"id": "r", **rule}), {}, quantities) == expected


STEPS = [{"up_to": "1000", "rate": "0.01"}, {"up_to": "5000", "rate": "0.008"}, {"up_to": None, "rate": "0.005"}]


@pytest.mark.parametrize(("mode", "prior", "quantity", "expected_usd"), [
    # volume: the whole quantity at the rate of the step the period's new total reaches
    ("volume", 0, 1000, "10"),  # total 1000 <= 1000: 1000 x 0.01
    ("volume", 900, 200, "1.6"),  # total 1100: 200 x 0.008
    ("volume", 4999, 1, "0.008"),  # total 5000 <= 5000: step 2
    ("volume", 5000, 1, "0.005"),  # total 5001: step 3
    ("volume", 0, 6000, "30"),  # 6000 x 0.005
    # graduated: each slice at its step's rate
    ("graduated", 900, 200, "1.8"),  # 100 x 0.01 + 100 x 0.008
    ("graduated", 0, 6000, "47"),  # 1000 x 0.01 + 4000 x 0.008 + 1000 x 0.005 = 10 + 32 + 5
    ("graduated", 4500, 1000, "6.5"),  # 500 x 0.008 + 500 x 0.005
    ("graduated", 7000, 3, "0.015"),  # 3 x 0.005
    ("graduated", 0, 0, "0"),
])
def test_tiers_against_hand_computed_amounts(mode: str, prior: int, quantity: int, expected_usd: str) -> None:
    rule_set = rules({"id": "t", "tiers": [{"quantity": "units", "mode": mode, "key": "k", "steps": STEPS}]})
    prior_map = {"k:units:month": Decimal(prior)}
    assert amount(rule_set, {}, {"units": quantity}, period_prior=prior_map) == int(Decimal(expected_usd) * 10**6)


def test_tier_rates_are_per_units_and_rounded_once() -> None:
    # 1500 tokens graduated over (0, 1000] at $2/M and above at $1/M: (1000 x 2 + 500 x 1) / 1e6 = $0.0025,
    # then a $0.0000005 fee: 2500.5 micro -> 2501 (half-up, once)
    rule_set = rules({"id": "t", **PER_MTOK, "event_fee": "0.0000005", "tiers": [
        {"quantity": "output_tokens", "mode": "graduated",
         "steps": [{"up_to": "1000", "rate": "2"}, {"up_to": None, "rate": "1"}]}]})
    assert amount(rule_set, {}, {"output_tokens": 1500}) == 2501


@pytest.mark.parametrize(("rule", "cost_nanos", "expected"), [
    # $0.001234567 x 1.25 = $0.00154320875 -> 1543 micro
    ({"markup": "0.25"}, 1_234_567, 1543),
    # $0.000001 x 1.5 = 1.5 micro -> 2 (half-up)
    ({"markup": "0.5"}, 1000, 2),
    # zero markup passes the cost through: 2_499_999 nanos = 2499.999 micro -> 2500
    ({"markup": "0"}, 2_499_999, 2500),
    # another asset: $0.012345 x 1.2 = $0.014814; one credit is $0.01: 1.4814 credits -> 1
    ({"markup": "0.2", "asset": "CREDITS", "asset_usd_value": "0.01"}, 12_345_000, 1),
    # $0.0125 x 1.2 = $0.015 = 1.5 credits -> 2
    ({"markup": "0.2", "asset": "CREDITS", "asset_usd_value": "0.01"}, 12_500_000, 2),
    # cost-plus plus a fee: $0.000010 x 2 + $0.0001 = $0.00012
    ({"markup": "1", "event_fee": "0.0001"}, 10_000, 120),
])
def test_cost_plus_against_hand_computed_amounts(rule: dict[str, Any], cost_nanos: int, expected: int) -> None:
    assert amount(rules({"id": "c", **rule}), {}, {}, cost_nanos=cost_nanos) == expected


def test_cost_plus_without_a_cost_cannot_price() -> None:
    rule = rules({"id": "c", "markup": "0.1"}).rules[0]
    with pytest.raises(CostUnknown):
        price(rule, {}, scale=6)


def test_dimensional_rates_price_by_the_matching_rule() -> None:
    rule_set = rules(
        {"id": "default", **PER_MTOK, "rates": {"output_tokens": "10"}},
        {"id": "mini", "match": {"model": "mini"}, **PER_MTOK, "rates": {"output_tokens": "1"}},
        {"id": "mini-batch", "match": {"model": "mini", "feature": "batch"}, **PER_MTOK,
         "rates": {"output_tokens": "0.5"}})
    out = {"output_tokens": 1000}
    assert amount(rule_set, {"model": "big"}, out) == 10_000  # 1000 x $10/M
    assert amount(rule_set, {"model": "mini"}, out) == 1_000
    assert amount(rule_set, {"model": "mini", "feature": "batch"}, out) == 500


def test_config_version_prices_exactly_as_the_price_book() -> None:
    settings = PricingSettings.model_validate({"asset": "USD", "models": {
        "gpt-4o": {"input_per_mtok": "2.5", "cached_input_per_mtok": "1.25", "output_per_mtok": "10",
                   "request_fee": "0.0000005"},
        "claude": {"input_per_mtok": "3", "cache_write_per_mtok": "3.75", "output_per_mtok": "15"},
        "*": {"input_per_mtok": "0.3333", "output_per_mtok": "1.7777"}}})
    book = PriceBook(settings, 6)
    version = config_version(settings, {"USD"})
    for model in ("gpt-4o", "claude", "other"):
        for usage in (Usage(1, 0), Usage(7, 3), Usage(1000, 33, cached_input_tokens=500),
                      Usage(12_345, 678, cache_write_tokens=2000, cached_input_tokens=100),
                      Usage(5, 9, reasoning_tokens=4)):
            rate = book.rate_for(model)
            rule = version.rules.choose({"type": "request", "model": model})
            assert rate is not None and rule is not None
            assert price(rule, request_quantities(usage), scale=6).amount == book.price(rate, usage), (model, usage)


@pytest.mark.parametrize(("period", "at", "start"), [
    ("month", "2026-03-31T23:59:59Z", "2026-03-01T00:00:00Z"),
    ("week", "2026-03-01T12:00:00Z", "2026-02-23T00:00:00Z"),  # a Sunday: its ISO week began Monday
    ("day", "2026-03-01T12:00:00Z", "2026-03-01T00:00:00Z"),
])
def test_tier_periods_are_utc_calendar_periods(period: Any, at: str, start: str) -> None:
    from metergate.admin.reports import parse_time

    assert period_start_ms(period, parse_time(at, "at")) == parse_time(start, "start")
