"""What a request cost the operator: the provider's price for the usage, in nano-dollars.

Rates come from ``genai-prices`` (compiled into its wheel; its network updater stays off) by provider
and model, or from per-model overrides in config (self-hosted models, negotiated prices). The rates
used are returned with the cost so that a usage record can be audited later. Looking a model up in
genai-prices costs most of a millisecond, so the flat per-token rates are cached per model for an
hour; tiered prices fall back to genai-prices' own arithmetic on every call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from metergate.config.settings import CostRate
from metergate.metering.heap import after_first_load
from metergate.metering.usage import Usage
from metergate.money import COST_SCALE, to_minor

log = logging.getLogger(__name__)
_MILLION = Decimal(1_000_000)
_CACHE_TTL_S = 3600.0


@dataclass(frozen=True, slots=True)
class Cost:
    nanos: int | None  # None: no price known for this model
    source: str  # "override", "genai-prices" or "unknown"
    rates: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Rates:
    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write: Decimal


class ProviderCosts:
    def __init__(self, overrides: dict[str, CostRate]) -> None:
        self._overrides = {
            model: _Rates(rate.input_per_mtok,
                          rate.cached_input_per_mtok if rate.cached_input_per_mtok is not None else rate.input_per_mtok,
                          rate.output_per_mtok,
                          rate.cache_write_per_mtok if rate.cache_write_per_mtok is not None else rate.input_per_mtok)
            for model, rate in overrides.items()
        }
        self._cache: dict[tuple[str, str], tuple[float, _Rates | Any | None]] = {}

    def cost(self, provider_id: str, model: str, usage: Usage) -> Cost:
        override = self._overrides.get(model)
        if override is not None:
            return self._flat(override, usage, "override")
        found = self._lookup(provider_id, model)
        if found is None:
            return Cost(None, "unknown", {})
        if isinstance(found, _Rates):
            return self._flat(found, usage, "genai-prices")
        from genai_prices import Usage as GUsage

        result = found.calc_price(GUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                                         cache_read_tokens=usage.cached_input_tokens,
                                         cache_write_tokens=usage.cache_write_tokens))
        return Cost(to_minor(Decimal(result["total_price"]), COST_SCALE), "genai-prices", {"tiered": "true"})

    @staticmethod
    def _flat(rates: _Rates, usage: Usage, source: str) -> Cost:
        uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        exact = (uncached * rates.input + usage.cached_input_tokens * rates.cached_input
                 + usage.cache_write_tokens * rates.cache_write + usage.output_tokens * rates.output) / _MILLION
        return Cost(to_minor(exact, COST_SCALE), source, {
            "input_per_mtok": str(rates.input), "cached_input_per_mtok": str(rates.cached_input),
            "cache_write_per_mtok": str(rates.cache_write), "output_per_mtok": str(rates.output)})

    def warm(self, pairs: list[tuple[str, str]]) -> None:
        """Load the price table and look up the priced models at start-up, not on the first request."""
        for provider_id, model in pairs:
            self._lookup(provider_id, model)

    def _lookup(self, provider_id: str, model: str) -> _Rates | Any | None:
        key = (provider_id, model)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < _CACHE_TTL_S:
            return cached[1]
        value: _Rates | Any | None
        try:
            from genai_prices import Usage as GUsage
            from genai_prices import calc_price

            price = calc_price(GUsage(input_tokens=0, output_tokens=0), model_ref=model,
                               provider_id=provider_id).model_price
            value = price
            rates = (price.input_mtok, price.output_mtok, price.cache_read_mtok,
                     getattr(price, "cache_write_mtok", None))
            if all(v is None or isinstance(v, Decimal) for v in rates):
                flat_input, flat_output, flat_cached, flat_write = (cast(Decimal | None, v) for v in rates)
                value = _Rates(flat_input or Decimal(0),
                               flat_cached if flat_cached is not None else flat_input or Decimal(0),
                               flat_output or Decimal(0),
                               flat_write if flat_write is not None else flat_input or Decimal(0))
        except LookupError:
            value = None
        except Exception as exc:  # a broken price table must not break metering
            log.warning("provider cost lookup failed for %s/%s: %s", provider_id, model, exc)
            value = None
        after_first_load("genai-prices")  # the price table's import: its transient heap back to the kernel
        self._cache[key] = (now, value)
        return value
