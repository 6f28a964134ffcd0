"""Pricing v1: what a request is worth to the operator's customer.

Rates per model (exact match first, then ``*``), in the pricing asset's major unit per million tokens,
plus a per-request fee. The exact price is a ``Decimal``; it becomes an integer in the asset's
smallest unit through :func:`metergate.money.to_minor` (half-up, once per request).

The proxy prices through :mod:`metergate.pricing` (rules, versions, tiers, cost-plus); the configuration's
``pricing:`` section is its version 0 (:func:`metergate.pricing.versions.config_version`), which the tests
check prices exactly as this book does. The book stays as that reference and for tools that price offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from metergate.config.settings import ModelRate, PricingSettings
from metergate.metering.usage import Usage
from metergate.money import to_minor

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Rate:
    model_key: str  # the table key that matched: the model itself or "*"
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    cache_write_per_mtok: Decimal
    output_per_mtok: Decimal
    request_fee: Decimal

    @classmethod
    def from_settings(cls, key: str, rate: ModelRate) -> Rate:
        cached = rate.cached_input_per_mtok if rate.cached_input_per_mtok is not None else rate.input_per_mtok
        write = rate.cache_write_per_mtok if rate.cache_write_per_mtok is not None else rate.input_per_mtok
        return cls(key, rate.input_per_mtok, cached, write, rate.output_per_mtok, rate.request_fee)

    def exact(self, usage: Usage) -> Decimal:
        uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        tokens = (uncached * self.input_per_mtok + usage.cached_input_tokens * self.cached_input_per_mtok
                  + usage.cache_write_tokens * self.cache_write_per_mtok + usage.output_tokens * self.output_per_mtok)
        return tokens / _MILLION + self.request_fee

    def as_detail(self) -> dict[str, str]:
        return {"rate_key": self.model_key, "input_per_mtok": str(self.input_per_mtok),
                "cached_input_per_mtok": str(self.cached_input_per_mtok),
                "cache_write_per_mtok": str(self.cache_write_per_mtok),
                "output_per_mtok": str(self.output_per_mtok), "request_fee": str(self.request_fee)}


class PriceBook:
    def __init__(self, settings: PricingSettings, scale: int) -> None:
        self.asset = settings.asset
        self.scale = scale
        self._rates = {key: Rate.from_settings(key, rate) for key, rate in settings.models.items()}

    def rate_for(self, model: str) -> Rate | None:
        return self._rates.get(model) or self._rates.get("*")

    def price(self, rate: Rate, usage: Usage) -> int:
        """The price of ``usage`` in the asset's smallest unit, rounded half-up."""
        return to_minor(rate.exact(usage), self.scale)
