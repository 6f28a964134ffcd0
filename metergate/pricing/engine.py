"""The pricing engine: what one request or event is worth under one rule, exactly, rounded once.

The price of a priced item (a proxy request or an event) is, in the rule's asset's major unit::

    exact = event_fee
          + sum(quantity x rate) / per_units                      for each rate
          + tier charge(period prior, quantity) / per_units       for each tier table (rules.Tiers.charge)
          + cost_usd x (1 + markup) / asset_usd_value             cost-plus, when the rule has a markup
    exact = max(exact, minimum)
    amount = to_minor(exact, scale)                               the one rounding step: half-up

Every term is an exact ``Decimal``; nothing is rounded before the last line, which is
:func:`metergate.money.to_minor` (half-up to the asset's smallest unit) applied once per item. The provider
cost enters as integer nano-dollars (:data:`metergate.money.COST_SCALE`). Tiers count the customer's usage of
the tiered quantity over the UTC period (month, ISO week or day) in which the item started; ``period_prior``
is that count before this item.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from metergate.metering.usage import Usage
from metergate.money import COST_SCALE, to_minor
from metergate.pricing.rules import FALLBACK, Period, Rule

_NANOS = Decimal(10) ** COST_SCALE
_ZERO = Decimal(0)


class CostUnknown(Exception):
    """A cost-plus rule cannot price an item whose provider cost is unknown."""


@dataclass(frozen=True, slots=True)
class Price:
    asset: str
    amount: int  # smallest unit, rounded once, half-up
    exact: Decimal  # major unit, before rounding (after the minimum)
    lines: tuple[tuple[str, Decimal], ...]  # (component, exact major-unit amount) before the minimum
    minimum_applied: bool = False

    def as_detail(self) -> dict[str, Any]:
        return {"exact": str(self.exact), "lines": {name: str(value) for name, value in self.lines},
                "minimum_applied": self.minimum_applied}


def request_quantities(usage: Usage) -> dict[str, Decimal]:
    """A proxy request's disjoint quantities (see :mod:`metergate.pricing.rules`)."""
    uncached = (usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
                - usage.audio_input_tokens - usage.image_input_tokens)
    quantities = {"input_tokens": Decimal(uncached), "cached_input_tokens": Decimal(usage.cached_input_tokens),
                  "cache_write_tokens": Decimal(usage.cache_write_tokens),
                  "output_tokens": Decimal(usage.output_tokens - usage.reasoning_tokens),
                  "reasoning_tokens": Decimal(usage.reasoning_tokens), "requests": Decimal(1)}
    if usage.audio_input_tokens:
        quantities["audio_input_tokens"] = Decimal(usage.audio_input_tokens)
    if usage.image_input_tokens:
        quantities["image_input_tokens"] = Decimal(usage.image_input_tokens)
    for name, count in usage.units:  # media units (audio seconds, characters, images): never folded into tokens
        quantities[name] = Decimal(count)
    return quantities


def fold(rule: Rule, quantities: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Count each token kind the rule does not price as its base kind (``cached_input_tokens`` as input...)."""
    out = dict(quantities)
    priced = rule.priced
    for kind, base in FALLBACK.items():
        if kind in out and kind not in priced:
            out[base] = out.get(base, _ZERO) + out.pop(kind)
    return out


def price(rule: Rule, quantities: Mapping[str, Decimal], *, scale: int, cost_nanos: int | None = None,
          period_prior: Mapping[str, Decimal] | None = None) -> Price:
    """Price one item; raise :class:`CostUnknown` when a cost-plus rule gets no cost."""
    q = fold(rule, quantities)
    prior = period_prior or {}
    lines: list[tuple[str, Decimal]] = []
    if rule.event_fee:
        lines.append(("event_fee", rule.event_fee))
    for name, rate in rule.rates:
        amount = q.get(name, _ZERO) * rate / rule.per_units
        if amount:
            lines.append((name, amount))
    for tiers in rule.tiers:
        amount = tiers.charge(prior.get(tiers.counter, Decimal(0)), q.get(tiers.quantity, Decimal(0)))
        if amount:
            lines.append((f"tiers:{tiers.quantity}", amount / rule.per_units))
    if rule.markup is not None:
        if cost_nanos is None:
            raise CostUnknown(rule.id)
        assert rule.asset_usd_value is not None  # validated with the markup
        lines.append(("cost_plus", Decimal(cost_nanos) / _NANOS * (1 + rule.markup) / rule.asset_usd_value))
    exact = sum((value for _, value in lines), Decimal(0))
    minimum_applied = exact < rule.minimum
    if minimum_applied:
        exact = rule.minimum
    return Price(rule.asset, to_minor(exact, scale), exact, tuple(lines), minimum_applied)


def period_start_ms(period: Period, at_ms: int) -> int:
    """The start (epoch ms) of the UTC calendar month, ISO week (Monday) or day containing ``at_ms``."""
    day = dt.datetime.fromtimestamp(at_ms // 1000, tz=dt.UTC).date()
    if period == "month":
        day = day.replace(day=1)
    elif period == "week":
        day = day - dt.timedelta(days=day.weekday())
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return int(start.timestamp()) * 1000
