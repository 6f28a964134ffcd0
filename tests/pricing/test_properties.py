"""Properties of rule matching and tiers, checked with Hypothesis against brute force: over small attribute
domains, a rule set that validation accepts gives every request at most one most specific rule (the one the
indexed lookup returns), and a set it refuses as ambiguous really has a request with two; graduated tiers
charge the same whether a quantity arrives at once or in two parts."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from metergate.pricing.rules import InvalidPriceRules, Rule, Tiers, TierStep, parse_rule_set

NAMES = ("a", "b", "c")
VALUES = ("x", "y")

matches = st.dictionaries(st.sampled_from(NAMES), st.sampled_from((*VALUES, "*")), max_size=3)


def brute_force(rules: tuple[Rule, ...], request: dict[str, str]) -> list[Rule]:
    """Every matching rule of the highest specificity among those matching."""
    matching = [r for r in rules if all(request.get(k) == v for k, v in r.match)]
    if not matching:
        return []
    best = max(r.specificity for r in matching)
    return [r for r in matching if r.specificity == best]


def requests() -> list[dict[str, str]]:
    out = []
    for values in itertools.product((*VALUES, None), repeat=len(NAMES)):
        out.append({name: value for name, value in zip(NAMES, values, strict=True) if value is not None})
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(matches, min_size=1, max_size=8))
def test_an_accepted_rule_set_has_one_winner_per_request_and_a_refused_one_a_tie(raw: list[dict[str, str]]) -> None:
    payload: dict[str, Any] = {"rules": [{"id": f"r{i}", "asset": "USD", "match": m} for i, m in enumerate(raw)]}
    try:
        rule_set = parse_rule_set(payload, {"USD"})
    except InvalidPriceRules as refused:
        assert refused.code in ("ambiguous_rules", "duplicate_rule")
        if refused.code == "ambiguous_rules":
            # validation refuses exactly when some request would have two most specific rules
            parsed = [parse_rule_set({"rules": [rule]}, {"USD"}).rules[0] for rule in payload["rules"]]
            assert any(len(brute_force(tuple(parsed), request)) > 1 for request in requests())
        return
    for request in requests():
        winners = brute_force(rule_set.rules, request)
        assert len(winners) <= 1, (request, winners)
        assert rule_set.choose(request) == (winners[0] if winners else None)


amounts = st.integers(min_value=0, max_value=10_000).map(Decimal)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=500), min_size=0, max_size=5, unique=True),
       st.lists(st.integers(min_value=0, max_value=100), min_size=6, max_size=6), amounts, amounts, amounts)
def test_graduated_tiers_are_additive_and_volume_tiers_price_at_the_reached_step(
        bounds: list[int], rates: list[int], prior: Decimal, first: Decimal, second: Decimal) -> None:
    ups = sorted(bounds)
    bounded = [TierStep(Decimal(up), Decimal(rates[i])) for i, up in enumerate(ups)]
    steps = (*bounded, TierStep(None, Decimal(rates[len(ups)])))
    graduated = Tiers("q", "graduated", "month", "k", steps)
    whole = graduated.charge(prior, first + second)
    assert graduated.charge(prior, first) + graduated.charge(prior + first, second) == whole
    assert whole >= 0
    volume = Tiers("q", "volume", "month", "k", steps)
    total = prior + first
    reached = next(s for s in steps if s.up_to is None or total <= s.up_to)
    assert volume.charge(prior, first) == first * reached.rate
