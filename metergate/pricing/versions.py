"""Price versions: a rule set with the moment from which it prices, per mode.

A request or event is priced by the version *in force when it started*: the published version of its mode
with the latest ``effective_at`` at or before that moment (on a tie, the one published last). Drafts price
nothing until published, except in a quote or a simulation that names them. When a mode has no published
version in force, the configuration's ``pricing:`` section is its implicit version 0 (id ``"config"``):
one rule per model, matching ``type: request`` and the model (``*`` matches the type only), with the model's
rates per million tokens and its request fee — so prices from the file are unchanged. Media rates (per audio
second, per million characters, per image) become rates per million of their units.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from metergate.config.settings import PricingSettings
from metergate.pricing.rules import RuleSet, parse_rule_set, plain
from metergate.wallet.models import Mode

VersionState = Literal["draft", "published"]
CONFIG_VERSION_ID = "config"
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class PriceVersion:
    id: str
    mode: Mode | None  # None: the configuration's version 0, shared by both modes
    state: VersionState
    rules: RuleSet
    note: str
    created_at_ms: int
    effective_at_ms: int | None = None
    published_at_ms: int | None = None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "state": self.state, "note": self.note,
                "created_at_ms": self.created_at_ms, "effective_at_ms": self.effective_at_ms,
                "published_at_ms": self.published_at_ms, "rule_count": len(self.rules.rules)}

    def as_json(self) -> dict[str, Any]:
        return {**self.summary(), "rules": self.rules.source["rules"]}


def config_version(pricing: PricingSettings, assets: set[str]) -> PriceVersion:
    """The configuration file's prices as version 0."""
    rules: list[dict[str, Any]] = []
    for index, (model, rate) in enumerate(pricing.models.items()):
        rates = {"input_tokens": plain(rate.input_per_mtok), "output_tokens": plain(rate.output_per_mtok)}
        if rate.cached_input_per_mtok is not None:
            rates["cached_input_tokens"] = plain(rate.cached_input_per_mtok)
        if rate.cache_write_per_mtok is not None:
            rates["cache_write_tokens"] = plain(rate.cache_write_per_mtok)
        for quantity, per_mtok in (("audio_input_tokens", rate.audio_input_per_mtok),
                                   ("cached_audio_input_tokens", rate.cached_audio_input_per_mtok),
                                   ("audio_output_tokens", rate.audio_output_per_mtok),
                                   ("image_input_tokens", rate.image_input_per_mtok)):
            if per_mtok is not None:
                rates[quantity] = plain(per_mtok)
        for quantity, per_unit in rate.media_quantities().items():  # per unit, as rates per million units
            rates[quantity] = plain(per_unit * _MILLION)
        match = {"type": "request"} if model == "*" else {"type": "request", "model": model}
        rule_id = f"config{index}:" + re.sub(r"[^A-Za-z0-9_.:@-]", "_", model)
        rules.append({"id": rule_id[:64], "match": match, "asset": pricing.asset,
                      "per_units": "1000000", "event_fee": plain(rate.request_fee), "rates": rates})
    rule_set = parse_rule_set({"rules": rules}, assets) if rules else RuleSet(())
    return PriceVersion(CONFIG_VERSION_ID, None, "published", rule_set, "the configuration file's pricing", 0, 0, 0)


class VersionTimeline:
    """The published versions of one mode, ordered by when they take effect; answers "which one at t"."""

    def __init__(self, versions: list[PriceVersion], fallback: PriceVersion) -> None:
        published = [v for v in versions if v.state == "published" and v.effective_at_ms is not None]
        published.sort(key=lambda v: (v.effective_at_ms or 0, v.published_at_ms or 0, v.id))
        self._versions = published
        self._starts = [v.effective_at_ms or 0 for v in published]
        self.fallback = fallback

    def at(self, at_ms: int) -> PriceVersion:
        index = bisect_right(self._starts, at_ms)
        return self._versions[index - 1] if index else self.fallback

    @property
    def versions(self) -> list[PriceVersion]:
        return list(self._versions)
