"""What a request cost the operator: the provider's price for the usage, in nano-dollars.

Rates come from ``genai-prices`` (compiled into its wheel; its network updater stays off) by provider
and model, or from per-model overrides in config (self-hosted models, negotiated prices). The rates
used are returned with the cost so that a usage record can be audited later. Looking a model up in
genai-prices costs most of a millisecond, so the flat per-token rates are cached per model for an
hour; tiered prices fall back to genai-prices' own arithmetic on every call.

Media usage (audio seconds, speech characters, audio and image input tokens) is priced by genai-prices'
own arithmetic, which knows whisper's per-hour and tts' per-character rates. DALL-E's per-image prices are
not in genai-prices: :data:`DEFAULT_IMAGE_COSTS` holds OpenAI's list prices, and an override's ``per_image``
replaces them. A unit nobody prices makes the whole cost unknown, never zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from metergate.config.settings import CostRate
from metergate.metering.heap import after_first_load
from metergate.metering.media_units import AUDIO_SECONDS, CHARACTERS, image_quantity
from metergate.metering.usage import Usage
from metergate.money import COST_SCALE, to_minor

log = logging.getLogger(__name__)
_MILLION = Decimal(1_000_000)
_CACHE_TTL_S = 3600.0
# OpenAI's list prices per image in US dollars (platform.openai.com/docs/pricing, "Image generation").
DEFAULT_IMAGE_COSTS: dict[str, dict[str, Decimal]] = {
    "dall-e-3": {image_quantity("1024x1024"): Decimal("0.04"), image_quantity("1024x1792"): Decimal("0.08"),
                 image_quantity("1792x1024"): Decimal("0.08"), image_quantity("1024x1024", "hd"): Decimal("0.08"),
                 image_quantity("1024x1792", "hd"): Decimal("0.12"),
                 image_quantity("1792x1024", "hd"): Decimal("0.12")},
    "dall-e-2": {image_quantity("256x256"): Decimal("0.016"), image_quantity("512x512"): Decimal("0.018"),
                 image_quantity("1024x1024"): Decimal("0.02")},
}


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
        self._raw = dict(overrides)
        self._cache: dict[tuple[str, str], tuple[float, _Rates | Any | None]] = {}

    def cost(self, provider_id: str, model: str, usage: Usage) -> Cost:
        if usage.units or usage.audio_input_tokens or usage.image_input_tokens:
            return self._media(provider_id, model, usage)
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

    def _media(self, provider_id: str, model: str, usage: Usage) -> Cost:
        """A media request's cost: its units at the override's or the default table's rates, the rest (tokens,
        seconds, characters) by the override's flat rates or genai-prices' arithmetic."""
        override = self._raw.get(model)
        unit_rates = {**DEFAULT_IMAGE_COSTS.get(model, {}), **(override.media_quantities() if override else {})}
        exact, used = Decimal(0), {}
        measured: dict[str, int] = {}  # what genai-prices prices: seconds and characters
        for name, count in usage.units:
            if name in unit_rates:
                exact += count * unit_rates[name]
                used[name] = str(unit_rates[name])
            elif override is None and name in (AUDIO_SECONDS, CHARACTERS):
                measured[name] = count
            else:
                return Cost(None, "unknown", {})
        tokens = usage.input_tokens or usage.output_tokens
        if override is not None:
            flat = self._flat(self._overrides[model], replace_media_tokens(usage), "override")
            audio = override.audio_input_per_mtok if override.audio_input_per_mtok is not None \
                else override.input_per_mtok
            image = override.image_input_per_mtok if override.image_input_per_mtok is not None \
                else override.input_per_mtok
            exact += (usage.audio_input_tokens * audio + usage.image_input_tokens * image) / _MILLION
            assert flat.nanos is not None
            return Cost(to_minor(exact, COST_SCALE) + flat.nanos, "override", {**flat.rates, **used})
        if not measured and not tokens:
            return Cost(to_minor(exact, COST_SCALE), "default-table", used)
        from genai_prices import Usage as GUsage
        from genai_prices import calc_price

        fields: dict[str, int] = {}
        if tokens:
            fields.update(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
            for name, value in (("input_audio_tokens", usage.audio_input_tokens),
                                ("input_image_tokens", usage.image_input_tokens),
                                ("cache_read_tokens", usage.cached_input_tokens)):
                if value:
                    fields[name] = value
        if AUDIO_SECONDS in measured:
            fields.update(audio_seconds=measured[AUDIO_SECONDS], input_audio_seconds=measured[AUDIO_SECONDS])
        if CHARACTERS in measured:
            fields["input_characters"] = measured[CHARACTERS]
        try:
            result = calc_price(GUsage(**fields), model_ref=model, provider_id=provider_id)
        except LookupError:
            return Cost(None, "unknown", {})
        except Exception as exc:  # a price table that cannot price this usage must not break metering
            log.warning("provider cost of %s/%s media usage failed: %s", provider_id, model, exc)
            return Cost(None, "unknown", {})
        finally:
            after_first_load("genai-prices")  # this may have been the price table's first import
        exact += Decimal(result.total_price)
        return Cost(to_minor(exact, COST_SCALE), "genai-prices", {**used, "media": "true"})

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


def replace_media_tokens(usage: Usage) -> Usage:
    """``usage`` without its audio and image input tokens and its units (priced apart by the caller)."""
    return Usage(input_tokens=usage.input_tokens - usage.audio_input_tokens - usage.image_input_tokens,
                 output_tokens=usage.output_tokens, cached_input_tokens=usage.cached_input_tokens,
                 reasoning_tokens=usage.reasoning_tokens, cache_write_tokens=usage.cache_write_tokens,
                 source=usage.source)
