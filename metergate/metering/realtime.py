"""What one Realtime API response used: text and audio tokens apart, read from ``response.done``.

OpenAI bills a Realtime response by ``response.usage``: ``input_tokens`` (the whole conversation context the
response saw, cached tokens included) split into ``input_token_details.text_tokens`` / ``audio_tokens`` /
``image_tokens``, with ``cached_tokens`` a subset whose own split is ``cached_tokens_details``; and
``output_tokens`` split into ``output_token_details.text_tokens`` / ``audio_tokens``. Audio costs several
times text, so the two are priced on their own rates (the quantities of :meth:`RealtimeUsage.quantities`).

The report is validated like every provider number (:mod:`metergate.metering.usage`): integers in
``[0, MAX_TOKENS]``, the splits within their totals. When the details do not add up to the totals, the
part they leave unexplained is priced as audio, the dearer kind, so that an inconsistent report never bills
less than a consistent one could have. A report that breaks a rule raises ``UsageAnomaly``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from metergate.metering.heap import after_first_load
from metergate.metering.usage import MAX_TOKENS, Source, Usage, UsageAnomaly

_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class RealtimeUsage:
    """Disjoint counts of one response (``uncached`` = input not served from the provider's cache)."""

    text_input: int = 0  # uncached text (and image) input
    audio_input: int = 0  # uncached audio input
    cached_text_input: int = 0
    cached_audio_input: int = 0
    text_output: int = 0
    audio_output: int = 0
    source: Source = "provider"

    def __post_init__(self) -> None:
        if min(self.text_input, self.audio_input, self.cached_text_input, self.cached_audio_input,
               self.text_output, self.audio_output) < 0:
            raise ValueError("token counts cannot be negative")

    @property
    def input_tokens(self) -> int:
        return self.text_input + self.audio_input + self.cached_text_input + self.cached_audio_input

    @property
    def output_tokens(self) -> int:
        return self.text_output + self.audio_output

    def as_usage(self) -> Usage:
        """The totals, as every usage record keeps them (the audio split goes into the record's detail)."""
        return Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                     cached_input_tokens=self.cached_text_input + self.cached_audio_input, source=self.source)

    def quantities(self) -> dict[str, Decimal]:
        """The response's quantities for a price rule (:mod:`metergate.pricing.rules`): text kinds count text
        only, and a rule without audio rates counts audio as text of its side."""
        return {"input_tokens": Decimal(self.text_input), "cached_input_tokens": Decimal(self.cached_text_input),
                "audio_input_tokens": Decimal(self.audio_input),
                "cached_audio_input_tokens": Decimal(self.cached_audio_input),
                "output_tokens": Decimal(self.text_output), "audio_output_tokens": Decimal(self.audio_output),
                "cache_write_tokens": Decimal(0), "reasoning_tokens": Decimal(0), "requests": Decimal(1)}

    def detail(self) -> dict[str, int]:
        return {"text_input": self.text_input, "audio_input": self.audio_input,
                "cached_text_input": self.cached_text_input, "cached_audio_input": self.cached_audio_input,
                "text_output": self.text_output, "audio_output": self.audio_output}


def _count(node: dict[str, Any], key: str, where: str) -> int:
    value = node.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageAnomaly(f"{where}.{key} is not an integer: {str(value)[:40]!r}")
    if not 0 <= value <= MAX_TOKENS:
        raise UsageAnomaly(f"{where}.{key} = {value} is outside [0, {MAX_TOKENS}]")
    return value


def _object(node: Any, where: str) -> dict[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UsageAnomaly(f"{where} is not an object")
    return node


def _split(total: int, text: int, audio: int, where: str) -> tuple[int, int]:
    """(text, audio) of a total whose details may leave part of it unexplained: that part counts as audio."""
    if text + audio > total:
        raise UsageAnomaly(f"{where}: text {text} + audio {audio} tokens exceed the total {total}")
    return text, total - text


def from_response_done(usage: Any) -> RealtimeUsage | None:
    """Read ``response.usage`` of a ``response.done`` event; ``None`` when the response carries none."""
    if usage is None:
        return None
    body = _object(usage, "usage")
    if "input_tokens" not in body or "output_tokens" not in body:
        raise UsageAnomaly("usage.input_tokens and usage.output_tokens are required")
    total_in = _count(body, "input_tokens", "usage")
    total_out = _count(body, "output_tokens", "usage")
    ind = _object(body.get("input_token_details"), "usage.input_token_details")
    outd = _object(body.get("output_token_details"), "usage.output_token_details")
    where = "usage.input_token_details"
    text_in = _count(ind, "text_tokens", where) + _count(ind, "image_tokens", where)
    text_in, audio_in = _split(total_in, text_in, _count(ind, "audio_tokens", where), "input")
    cached = _count(ind, "cached_tokens", where)
    if cached > total_in:
        raise UsageAnomaly(f"usage cached_tokens = {cached} exceeds input_tokens = {total_in}")
    cd = _object(ind.get("cached_tokens_details"), f"{where}.cached_tokens_details")
    cached_text = _count(cd, "text_tokens", f"{where}.cached_tokens_details") + _count(
        cd, "image_tokens", f"{where}.cached_tokens_details")
    cached_text, cached_audio = _split(cached, cached_text, _count(cd, "audio_tokens", "cached"), "cached input")
    if cached_text > text_in or cached_audio > audio_in:
        # Unexplained cached tokens count as cached audio above; move what exceeds the audio input to text.
        if cached_audio > audio_in and cached_text + cached_audio - audio_in <= text_in:
            cached_text, cached_audio = cached_text + cached_audio - audio_in, audio_in
        else:
            raise UsageAnomaly("usage cached token details exceed the input token details")
    text_out, audio_out = _split(total_out, _count(outd, "text_tokens", "usage.output_token_details"),
                                 _count(outd, "audio_tokens", "usage.output_token_details"), "output")
    return RealtimeUsage(text_input=text_in - cached_text, audio_input=audio_in - cached_audio,
                         cached_text_input=cached_text, cached_audio_input=cached_audio,
                         text_output=text_out, audio_output=audio_out, source="provider")


@dataclass(frozen=True, slots=True)
class AudioRates:
    """A provider's per-million rates for a Realtime model, in US dollars."""

    text_input: Decimal
    cached_text_input: Decimal
    audio_input: Decimal
    cached_audio_input: Decimal
    text_output: Decimal
    audio_output: Decimal

    def nanos(self, usage: RealtimeUsage) -> int:
        from metergate.money import COST_SCALE, to_minor

        exact = (usage.text_input * self.text_input + usage.cached_text_input * self.cached_text_input
                 + usage.audio_input * self.audio_input + usage.cached_audio_input * self.cached_audio_input
                 + usage.text_output * self.text_output + usage.audio_output * self.audio_output) / _MILLION
        return to_minor(exact, COST_SCALE)

    def as_detail(self) -> dict[str, str]:
        return {"input_per_mtok": str(self.text_input), "cached_input_per_mtok": str(self.cached_text_input),
                "audio_input_per_mtok": str(self.audio_input),
                "cached_audio_input_per_mtok": str(self.cached_audio_input),
                "output_per_mtok": str(self.text_output), "audio_output_per_mtok": str(self.audio_output)}


@functools.lru_cache(maxsize=256)
def genai_audio_rates(provider_id: str, model: str) -> AudioRates | None:
    """The model's flat text and audio rates from genai-prices' offline table; ``None`` when it has no audio
    prices for it (or no flat ones). Cached: the table is compiled into the wheel and never updated here."""
    try:
        from genai_prices import Usage as GUsage
        from genai_prices import calc_price

        price = calc_price(GUsage(input_tokens=0, output_tokens=0), model_ref=model,
                           provider_id=provider_id).model_price
    except LookupError:
        return None
    finally:
        after_first_load("genai-prices")  # this may have been the price table's first import
    fields = (price.input_mtok, price.cache_read_mtok, price.input_audio_mtok,
              getattr(price, "cache_audio_read_mtok", None), price.output_mtok, price.output_audio_mtok)
    if not all(isinstance(v, Decimal) or v is None for v in fields) or price.input_audio_mtok is None:
        return None
    text_in, cached_text, audio_in, cached_audio, text_out, audio_out = (
        v if isinstance(v, Decimal) else None for v in fields)
    text_in = text_in or Decimal(0)
    cached_text = cached_text if cached_text is not None else text_in
    audio_in = audio_in or Decimal(0)
    return AudioRates(text_in, cached_text, audio_in, cached_audio if cached_audio is not None else cached_text,
                      text_out or Decimal(0), audio_out if audio_out is not None else text_out or Decimal(0))


__all__ = ["AudioRates", "RealtimeUsage", "from_response_done", "genai_audio_rates"]
