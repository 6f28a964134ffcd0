"""Price rules: the validated form of a price version's JSON rule set, and how a rule is chosen.

A rule set is ``{"rules": [rule, ...]}``; each rule::

    {"id": "gpt-4o-chat",                          # unique in the version; names the rule in errors and records
     "match": {"model": "gpt-4o", "feature": "*"},  # attribute -> exact value; "*" (or leaving it out) is any
     "asset": "USD",                               # the asset this rule draws
     "per_units": "1000000",                       # rates and tier rates are per this many units (default 1)
     "event_fee": "0.0001",                        # per request or event, in the asset's major unit
     "rates": {"input_tokens": "5.00", "output_tokens": "20.00"},       # per ``per_units`` of each quantity
     "tiers": [{"quantity": "output_tokens", "mode": "graduated",      # or "volume"
                "period": "month", "key": "out",                       # period: month | week | day (UTC)
                "steps": [{"up_to": "1000000", "rate": "20"}, {"up_to": null, "rate": "15"}]}],
     "markup": "0.25", "asset_usd_value": "1",     # cost-plus: cost x (1 + markup), in the rule's asset
     "minimum": "0.0005"}                          # the least a priced request or event is charged

Amounts are decimal strings (or integers); floats are refused, as everywhere money is involved.

**Which rule prices a request.** A rule matches when every attribute it names exactly has that value on the
request (``*`` matches anything, a missing attribute matches only ``*``). Among the matching rules the
most specific wins: the one naming the most attributes exactly. Ties cannot happen at run time, because
validation refuses them: two rules of equal specificity that some request could match both (no attribute on
which they name different values) must be settled by a third rule that is more specific and matches every
such request — one whose exact attributes are a subset of the two rules' combined ones, e.g. their union.
Two rules with the same match are refused as ``duplicate_rule``; an unsettled pair as ``ambiguous_rules``.

**Quantities.** A proxy request has the disjoint quantities ``input_tokens`` (uncached prompt tokens),
``cached_input_tokens``, ``cache_write_tokens``, ``output_tokens`` (not reasoning), ``reasoning_tokens``
and ``requests`` (1). On the media endpoints a request also has ``audio_input_tokens`` and
``image_input_tokens`` (subsets of the prompt, out of ``input_tokens``) and media units: ``audio_seconds``,
``characters``, ``images_<size>_<quality>``; a Realtime API response also has ``audio_input_tokens``,
``cached_audio_input_tokens`` and ``audio_output_tokens`` (its text kinds then count text only); an event has
whatever it reports. A token kind the rule does not price (no rate, no tier) is counted as its base kind: cached,
cache-write and image input tokens as ``input_tokens``, reasoning tokens as ``output_tokens``, audio as the text
kind of its side (cached audio as ``cached_input_tokens``) — so the configuration file's rates, which price
reasoning as output, keep their meaning, and a rule without audio rates prices audio as text rather than for free.
Any other quantity a rule does not price is free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from metergate.errors import MetergateError

TierMode = Literal["volume", "graduated"]
Period = Literal["month", "week", "day"]

MAX_RULES = 1000
MAX_STEPS = 50
MAX_MATCH = 16
MAX_RATES = 64
MAX_DECIMAL = Decimal(10) ** 15
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")
_QUANTITY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_DECIMAL_TEXT = re.compile(r"^-?[0-9]{1,16}(\.[0-9]{1,18})?$")
_RULE_KEYS = {"id", "match", "asset", "per_units", "event_fee", "rates", "tiers", "markup", "asset_usd_value",
              "minimum"}
_TIER_KEYS = {"quantity", "mode", "period", "key", "steps"}
#: A token kind that a rule does not price is counted as its base kind (see the module docstring).
#: Chains resolve in one pass, in this order: cached audio counts as cached input (OpenAI prices them alike),
#: which counts as input when the rule prices no cached input either.
FALLBACK = {"cached_audio_input_tokens": "cached_input_tokens", "audio_input_tokens": "input_tokens",
            "audio_output_tokens": "output_tokens", "image_input_tokens": "input_tokens",
            "cached_input_tokens": "input_tokens", "cache_write_tokens": "input_tokens",
            "reasoning_tokens": "output_tokens"}


class InvalidPriceRules(MetergateError):
    """A rule set that cannot be priced from: 422 with a stable code and the offending rule's path in
    ``param`` (``rules[2].tiers[0].steps[1].up_to``). Nothing is stored when it is raised."""

    status = 422
    type = "invalid_request_error"
    default_code = "invalid_price_rules"


@dataclass(frozen=True, slots=True)
class TierStep:
    up_to: Decimal | None  # inclusive upper bound of the period's cumulative quantity; None: no bound
    rate: Decimal


@dataclass(frozen=True, slots=True)
class Tiers:
    quantity: str
    mode: TierMode
    period: Period
    key: str  # the period counter: rules that share a key count the same usage
    steps: tuple[TierStep, ...]

    @property
    def counter(self) -> str:
        return f"{self.key}:{self.quantity}:{self.period}"

    def charge(self, prior: Decimal, quantity: Decimal) -> Decimal:
        """The exact charge (rate units, before ``per_units``) for ``quantity`` on top of ``prior`` in the period.

        Graduated: each slice of ``(prior, prior + quantity]`` at the rate of the step it falls in. Volume: the
        whole ``quantity`` at the rate of the step that the period's new total ``prior + quantity`` reaches.
        """
        if quantity <= 0:
            return Decimal(0)
        end = prior + quantity
        if self.mode == "volume":
            for step in self.steps:
                if step.up_to is None or end <= step.up_to:
                    return quantity * step.rate
            raise AssertionError("the last step is unbounded")  # validated
        total = Decimal(0)
        low = Decimal(0)
        for step in self.steps:
            high = step.up_to
            start = max(low, prior)
            stop = end if high is None else min(high, end)
            if stop > start:
                total += (stop - start) * step.rate
            if high is None or high >= end:
                break
            low = high
        return total


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    match: tuple[tuple[str, str], ...]  # the exact attributes, sorted; "*" entries are dropped
    asset: str
    per_units: Decimal = Decimal(1)
    event_fee: Decimal = Decimal(0)
    rates: tuple[tuple[str, Decimal], ...] = ()
    tiers: tuple[Tiers, ...] = ()
    markup: Decimal | None = None
    asset_usd_value: Decimal | None = None
    minimum: Decimal = Decimal(0)
    # The quantities it prices (its rates' and tiers'): asked for every token kind of every priced item.
    priced: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "priced", frozenset([name for name, _ in self.rates]
                                                     + [t.quantity for t in self.tiers]))

    @property
    def specificity(self) -> int:
        return len(self.match)

    def matches(self, attributes: dict[str, str]) -> bool:
        return all(attributes.get(name) == value for name, value in self.match)

    def prices(self, quantity: str) -> bool:
        return quantity in self.priced


Shape = tuple[str, ...]  # the attribute names a rule matches exactly, sorted


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: dict[str, Any] = field(default_factory=dict, compare=False)  # the JSON as stored
    # Rules by shape, most specific shapes first, each a table from the exact values to the rule: choosing is a
    # dictionary lookup per shape, however many rules there are.
    _index: tuple[tuple[Shape, dict[tuple[str, ...], Rule]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes: dict[Shape, dict[tuple[str, ...], Rule]] = {}
        for rule in self.rules:
            shapes.setdefault(tuple(name for name, _ in rule.match), {})[tuple(v for _, v in rule.match)] = rule
        object.__setattr__(self, "_index", tuple(sorted(shapes.items(), key=lambda item: (-len(item[0]), item[0]))))

    def choose(self, attributes: dict[str, str]) -> Rule | None:
        """The most specific rule matching ``attributes``. The first hit in order of decreasing specificity is the
        only one at its level: validation refuses two equally specific rules that one request could match
        unless a more specific rule matches it — which would have been hit first."""
        for names, table in self._index:
            try:
                key = tuple(attributes[name] for name in names)
            except KeyError:
                continue
            rule = table.get(key)
            if rule is not None:
                return rule
        return None


def parse_rule_set(payload: Any, assets: set[str] | None) -> RuleSet:
    """Validate a JSON rule set against the mode's ``assets`` (``None``: a stored set, validated when it was
    written, whose assets are checked when it prices); raise :class:`InvalidPriceRules`."""
    if not isinstance(payload, dict) or set(payload) - {"rules"}:
        raise InvalidPriceRules("A rule set is an object with one key, 'rules'.", param="rules")
    raw = payload.get("rules")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_RULES:
        raise InvalidPriceRules(f"'rules' must be an array of 1 to {MAX_RULES} rules.", param="rules")
    rules = tuple(_rule(item, f"rules[{index}]", index, assets) for index, item in enumerate(raw))
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.id in seen:
            raise InvalidPriceRules(f"Rule id {rule.id!r} is used twice (rules[{seen[rule.id]}] and rules[{index}]).",
                                    code="duplicate_rule", param=f"rules[{index}].id")
        seen[rule.id] = index
    _check_overlaps(rules)
    normalized = {"rules": [_rule_json(rule) for rule in rules]}
    return RuleSet(rules, normalized)


def _check_overlaps(rules: tuple[Rule, ...]) -> None:
    """Refuse two rules with one match, and every ambiguous pair (see the module docstring).

    Rules of one shape never overlap (some value differs), so only pairs across shapes of equal specificity
    are compared; whether a more specific rule settles a pair is a lookup per more specific shape."""
    by_match: dict[tuple[tuple[str, str], ...], int] = {}
    for index, rule in enumerate(rules):
        if rule.match in by_match:
            raise InvalidPriceRules(
                f"rules[{index}] ({rule.id!r}) matches exactly what rules[{by_match[rule.match]}] matches; "
                "one request cannot have two prices.", code="duplicate_rule", param=f"rules[{index}].match")
        by_match[rule.match] = index
    shapes: dict[Shape, list[int]] = {}
    for index, rule in enumerate(rules):
        shapes.setdefault(tuple(name for name, _ in rule.match), []).append(index)
    tables = {shape: {tuple(v for _, v in rules[i].match) for i in members} for shape, members in shapes.items()}
    ordered = sorted(shapes)
    for x, shape_a in enumerate(ordered):
        for shape_b in ordered[x + 1:]:
            if len(shape_a) != len(shape_b):
                continue
            shared = set(shape_a) & set(shape_b)
            for i in shapes[shape_a]:
                ma = dict(rules[i].match)
                for j in shapes[shape_b]:
                    mb = dict(rules[j].match)
                    if any(ma[name] != mb[name] for name in shared):
                        continue  # no request can match both
                    union = {**ma, **mb}
                    if any(len(shape) > len(shape_a) and set(shape) <= union.keys()
                           and tuple(union[n] for n in shape) in values for shape, values in tables.items()):
                        continue  # a more specific rule wins wherever both match
                    first, second = sorted((i, j))
                    raise InvalidPriceRules(
                        f"rules[{first}] ({rules[first].id!r}) and rules[{second}] ({rules[second].id!r}) are "
                        f"equally specific and a request with {union} matches both; add a rule matching {union} "
                        "to say which price applies.", code="ambiguous_rules", param=f"rules[{second}].match")


def _rule(item: Any, path: str, index: int, assets: set[str] | None) -> Rule:
    if not isinstance(item, dict):
        raise InvalidPriceRules("A rule must be an object.", code="invalid_rule", param=path)
    unknown = sorted(set(item) - _RULE_KEYS)
    if unknown:
        raise InvalidPriceRules(f"Unknown rule field {unknown[0]!r}.", code="invalid_rule",
                                param=f"{path}.{unknown[0]}")
    rule_id = item.get("id", f"rule-{index}")
    if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
        raise InvalidPriceRules("'id' must be 1-64 letters, digits, '.', '_', ':', '@' or '-'.",
                                code="invalid_rule", param=f"{path}.id")
    asset = item.get("asset")
    if not isinstance(asset, str) or (assets is not None and asset not in assets):
        raise InvalidPriceRules(f"Unknown asset {asset!r}; this mode's assets: {sorted(assets or ())}.",
                                code="unknown_asset", param=f"{path}.asset")
    match = _match(item.get("match", {}), f"{path}.match")
    per_units = _decimal(item.get("per_units", 1), f"{path}.per_units", positive=True)
    rates_raw = item.get("rates", {})
    if not isinstance(rates_raw, dict) or len(rates_raw) > MAX_RATES:
        raise InvalidPriceRules(f"'rates' must be an object of at most {MAX_RATES} quantity: rate entries.",
                                code="invalid_rule", param=f"{path}.rates")
    rates = []
    for name, value in sorted(rates_raw.items()):
        if not _QUANTITY.match(name):
            raise InvalidPriceRules(f"Quantity name {name!r} must be lower-case letters, digits and '_'.",
                                    code="invalid_rule", param=f"{path}.rates.{name}")
        rates.append((name, _decimal(value, f"{path}.rates.{name}")))
    tiers_raw = item.get("tiers", [])
    if not isinstance(tiers_raw, list) or len(tiers_raw) > 8:
        raise InvalidPriceRules("'tiers' must be an array of at most 8 tier tables.", code="invalid_tiers",
                                param=f"{path}.tiers")
    tiers = tuple(_tiers(t, f"{path}.tiers[{k}]", rule_id) for k, t in enumerate(tiers_raw))
    priced = [name for name, _ in rates] + [t.quantity for t in tiers]
    for name in priced:
        if priced.count(name) > 1:
            raise InvalidPriceRules(f"Quantity {name!r} is priced twice (a rate and a tier table, or two tables).",
                                    code="invalid_tiers", param=f"{path}.tiers")
    markup = _decimal(item["markup"], f"{path}.markup") if "markup" in item else None
    usd_value = (_decimal(item["asset_usd_value"], f"{path}.asset_usd_value", positive=True)
                 if "asset_usd_value" in item else None)
    if markup is not None and usd_value is None:
        if asset != "USD":
            raise InvalidPriceRules("A cost-plus rule drawing an asset other than USD needs 'asset_usd_value' (the US "
                                    "dollar value of one unit of the asset) to convert the provider's cost.",
                                    code="invalid_rule", param=f"{path}.asset_usd_value")
        usd_value = Decimal(1)
    return Rule(id=rule_id, match=match, asset=asset, per_units=per_units,
                event_fee=_decimal(item.get("event_fee", 0), f"{path}.event_fee"), rates=tuple(rates), tiers=tiers,
                markup=markup, asset_usd_value=usd_value, minimum=_decimal(item.get("minimum", 0), f"{path}.minimum"))


def _match(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or len(raw) > MAX_MATCH:
        raise InvalidPriceRules(f"'match' must be an object of at most {MAX_MATCH} attribute: value entries.",
                                code="invalid_rule", param=path)
    exact = []
    for name, value in raw.items():
        if not _NAME.match(name):
            raise InvalidPriceRules(f"Attribute name {name!r} is not valid.", code="invalid_rule",
                                    param=f"{path}.{name}")
        if not isinstance(value, str) or not 1 <= len(value) <= 128:
            raise InvalidPriceRules("An attribute value must be a string of 1-128 characters ('*' for any).",
                                    code="invalid_rule", param=f"{path}.{name}")
        if value != "*":
            exact.append((name, value))
    return tuple(sorted(exact))


def _tiers(raw: Any, path: str, rule_id: str) -> Tiers:
    if not isinstance(raw, dict) or set(raw) - _TIER_KEYS:
        raise InvalidPriceRules(f"A tier table is an object with keys {sorted(_TIER_KEYS)}.", code="invalid_tiers",
                                param=path)
    quantity = raw.get("quantity")
    if not isinstance(quantity, str) or not _QUANTITY.match(quantity):
        raise InvalidPriceRules("'quantity' must name the quantity the tiers price.", code="invalid_tiers",
                                param=f"{path}.quantity")
    mode = raw.get("mode")
    if mode not in ("volume", "graduated"):
        raise InvalidPriceRules("'mode' must be 'volume' or 'graduated'.", code="invalid_tiers", param=f"{path}.mode")
    period = raw.get("period", "month")
    if period not in ("month", "week", "day"):
        raise InvalidPriceRules("'period' must be 'month', 'week' or 'day' (UTC).", code="invalid_tiers",
                                param=f"{path}.period")
    key = raw.get("key", rule_id)
    if not isinstance(key, str) or not _RULE_ID.match(key):
        raise InvalidPriceRules("'key' must be 1-64 letters, digits, '.', '_', ':', '@' or '-'.",
                                code="invalid_tiers", param=f"{path}.key")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not 1 <= len(steps_raw) <= MAX_STEPS:
        raise InvalidPriceRules(f"'steps' must be an array of 1 to {MAX_STEPS} steps.", code="invalid_tiers",
                                param=f"{path}.steps")
    steps = []
    previous = Decimal(0)
    for k, step in enumerate(steps_raw):
        step_path = f"{path}.steps[{k}]"
        if not isinstance(step, dict) or set(step) != {"up_to", "rate"}:
            raise InvalidPriceRules("A step is {'up_to': quantity or null, 'rate': decimal}.", code="invalid_tiers",
                                    param=step_path)
        last = k == len(steps_raw) - 1
        if step["up_to"] is None:
            if not last:
                raise InvalidPriceRules("Only the last step may be unbounded ('up_to': null).", code="invalid_tiers",
                                        param=f"{step_path}.up_to")
            up_to = None
        else:
            if last:
                raise InvalidPriceRules("The last step must be unbounded ('up_to': null) so every quantity has a "
                                        "rate.", code="invalid_tiers", param=f"{step_path}.up_to")
            up_to = _decimal(step["up_to"], f"{step_path}.up_to", positive=True)
            if up_to <= previous:
                raise InvalidPriceRules("Step bounds must increase strictly.", code="invalid_tiers",
                                        param=f"{step_path}.up_to")
            previous = up_to
        steps.append(TierStep(up_to, _decimal(step["rate"], f"{step_path}.rate")))
    return Tiers(quantity, mode, period, key, tuple(steps))


def _decimal(value: Any, param: str, *, positive: bool = False) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidPriceRules("Give amounts as decimal strings (\"0.30\") or integers; floats are inexact.",
                                code="invalid_rule", param=param)
    text = str(value)
    if not _DECIMAL_TEXT.match(text):
        raise InvalidPriceRules(f"{text!r} is not a plain decimal number.", code="invalid_rule", param=param)
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise InvalidPriceRules(f"{text!r} is not a decimal number.", code="invalid_rule", param=param) from None
    if number < 0:
        raise InvalidPriceRules(f"{text} is negative; rates, fees and bounds must be zero or more.",
                                code="negative_rate", param=param)
    if positive and number == 0:
        raise InvalidPriceRules("This must be greater than zero.", code="invalid_rule", param=param)
    if number >= MAX_DECIMAL:
        raise InvalidPriceRules(f"{text} is too large.", code="invalid_rule", param=param)
    return number


def plain(number: Decimal | None) -> str:
    """A decimal in plain notation (``str`` would write 5E-7), so that stored rules parse again."""
    return format(number, "f")


def _rule_json(rule: Rule) -> dict[str, Any]:
    """The canonical JSON of a validated rule: what is stored and shown back."""
    out: dict[str, Any] = {"id": rule.id, "match": dict(rule.match), "asset": rule.asset,
                           "per_units": plain(rule.per_units), "event_fee": plain(rule.event_fee),
                           "rates": {name: plain(rate) for name, rate in rule.rates}}
    if rule.tiers:
        out["tiers"] = [{"quantity": t.quantity, "mode": t.mode, "period": t.period, "key": t.key,
                         "steps": [{"up_to": None if s.up_to is None else plain(s.up_to), "rate": plain(s.rate)}
                                   for s in t.steps]} for t in rule.tiers]
    if rule.markup is not None:
        out["markup"] = plain(rule.markup)
        out["asset_usd_value"] = plain(rule.asset_usd_value)
    if rule.minimum:
        out["minimum"] = plain(rule.minimum)
    return out
