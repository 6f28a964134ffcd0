"""What a request used, read from what the provider reported or estimated from what was delivered.

``input_tokens`` counts every prompt token, cached ones included; ``cached_input_tokens`` (cache reads),
``cache_write_tokens`` (Anthropic's cache creation) and ``reasoning_tokens`` are subsets of the input and
output totals (OpenAI's convention; Anthropic's counts are converted to it); so are ``audio_input_tokens`` and
``image_input_tokens`` (a transcription's audio, an image edit's pictures), which providers price apart.
``units`` are what media endpoints use besides tokens: whole seconds of audio (``audio_seconds``), characters
of speech input (``characters``) and images by size and quality (``images_1024x1024_hd``), each a quantity
that price rules can name (:mod:`metergate.metering.media_units`). A provider's
explicit zero is kept as zero: an estimate only replaces usage the provider did not report.

What a provider reports is input like any other: every count must be a JSON integer in
``[0, MAX_TOKENS]``, the counts a usage object always carries must be there, and the subsets must fit
in their totals. A report that breaks any of these raises :class:`UsageAnomaly`; the caller bills the
request from metergate's own estimate and records the anomaly. Nothing is clamped or read as zero: a
string, a float, a negative or an absurd count never turns into "nothing to charge".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# "measured": counted by metergate itself where that count is what the provider bills (speech characters,
# images delivered, audio seconds read from the file's header).
Source = Literal["provider", "estimated", "measured", "none"]

# No model's context window or output comes near 10^8 tokens (the largest are around 10^7), and 10^8
# tokens at any price per million stays far inside int64 in every asset's smallest unit.
MAX_TOKENS = 100_000_000
_SHOWN_CHARS = 40  # how much of a rejected value an anomaly quotes


class UsageAnomaly(ValueError):
    """A provider's usage report metergate does not believe; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    source: Source = "provider"
    audio_input_tokens: int = 0
    image_input_tokens: int = 0
    units: tuple[tuple[str, int], ...] = ()  # (quantity, count) of media units, sorted, each count > 0

    def __post_init__(self) -> None:
        if min(self.input_tokens, self.output_tokens, self.cached_input_tokens, self.reasoning_tokens,
               self.cache_write_tokens, self.audio_input_tokens, self.image_input_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError("cache tokens exceed input tokens")
        if self.cached_input_tokens + self.cache_write_tokens + self.audio_input_tokens \
                + self.image_input_tokens > self.input_tokens:
            raise ValueError("audio and image tokens exceed input tokens")
        if self.units and (any(count <= 0 for _, count in self.units)
                           or list(self.units) != sorted(dict(self.units).items())):
            raise ValueError("media units must be positive counts, sorted by quantity, each named once")

    def unit(self, quantity: str) -> int:
        return dict(self.units).get(quantity, 0)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


NO_USAGE = Usage(source="none")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _count(usage: dict[str, Any], key: str, *, required: bool = False) -> int:
    value = usage.get(key)
    if value is None:
        if required:
            raise UsageAnomaly(f"usage.{key} is missing")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageAnomaly(f"usage.{key} is not an integer: {_shown(value)}")
    if not 0 <= value <= MAX_TOKENS:
        raise UsageAnomaly(f"usage.{key} = {_shown(value)} is outside [0, {MAX_TOKENS}]")
    return value


def _details(usage: dict[str, Any], key: str) -> dict[str, Any]:
    value = usage.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageAnomaly(f"usage.{key} is not an object: {_shown(value)}")
    return value


def _subset(part: int, part_name: str, whole: int, whole_name: str) -> int:
    if part > whole:
        raise UsageAnomaly(f"usage {part_name} = {part} exceeds {whole_name} = {whole}")
    return part


def _object(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise UsageAnomaly(f"usage is not an object: {_shown(usage)}")
    return usage


def from_openai(usage: Any, *, output: bool = True) -> Usage | None:
    """Read an OpenAI ``usage`` object (chat, completions, embeddings); ``None`` if there is none.
    ``output``: the endpoint generates text, so ``completion_tokens`` must be reported (embeddings: not)."""
    body = _object(usage)
    if body is None:
        return None
    prompt = _count(body, "prompt_tokens", required=True)
    completion = _count(body, "completion_tokens", required=output)
    cached = _count(_details(body, "prompt_tokens_details"), "cached_tokens")
    reasoning = _count(_details(body, "completion_tokens_details"), "reasoning_tokens")
    return Usage(input_tokens=prompt, output_tokens=completion,
                 cached_input_tokens=_subset(cached, "cached_tokens", prompt, "prompt_tokens"),
                 reasoning_tokens=_subset(reasoning, "reasoning_tokens", completion, "completion_tokens"),
                 source="provider")


def from_anthropic(usage: Any) -> Usage | None:
    """Read an Anthropic ``usage`` object. Its ``input_tokens`` excludes cache reads and writes; here
    they are added back so that ``input_tokens`` is the whole prompt, as for every other provider."""
    body = _object(usage)
    if body is None:
        return None
    base = _count(body, "input_tokens", required=True)
    write = _count(body, "cache_creation_input_tokens")
    read = _count(body, "cache_read_input_tokens")
    return Usage(input_tokens=base + write + read, output_tokens=_count(body, "output_tokens", required=True),
                 cached_input_tokens=read, cache_write_tokens=write, source="provider")


def from_responses(usage: Any) -> Usage | None:
    """Read an OpenAI Responses API ``usage`` object (``input_tokens`` includes cached tokens)."""
    body = _object(usage)
    if body is None:
        return None
    prompt = _count(body, "input_tokens", required=True)
    output = _count(body, "output_tokens", required=True)
    cached = _count(_details(body, "input_tokens_details"), "cached_tokens")
    reasoning = _count(_details(body, "output_tokens_details"), "reasoning_tokens")
    return Usage(input_tokens=prompt, output_tokens=output,
                 cached_input_tokens=_subset(cached, "cached_tokens", prompt, "input_tokens"),
                 reasoning_tokens=_subset(reasoning, "reasoning_tokens", output, "output_tokens"),
                 source="provider")


_GEMINI_COUNTS = frozenset({"promptTokenCount", "cachedContentTokenCount", "toolUsePromptTokenCount",
                            "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount"})


def from_gemini(usage: Any) -> Usage | None:
    """Read a Gemini ``usageMetadata`` object, by the provider's billing rules (as genai-prices reads it):
    ``promptTokenCount`` is the whole prompt, cached content included (``cachedContentTokenCount`` is a
    subset of it); tool-use prompt tokens are billed as input on top of it; the output is the candidates'
    tokens plus the thinking tokens (``thoughtsTokenCount``, billed at the output rate and recorded as
    reasoning)."""
    body = _object(usage)
    if body is None or not body.keys() & _GEMINI_COUNTS:
        return None  # an empty report is no report (an explicit zero is a count, and is kept)
    prompt = _count(body, "promptTokenCount", required=True)
    cached = _subset(_count(body, "cachedContentTokenCount"), "cachedContentTokenCount", prompt, "promptTokenCount")
    tool_prompt = _count(body, "toolUsePromptTokenCount")
    candidates = _count(body, "candidatesTokenCount")
    thoughts = _count(body, "thoughtsTokenCount")
    _count(body, "totalTokenCount")  # not used, but a report whose total is not a count is not believed
    return Usage(input_tokens=prompt + tool_prompt, output_tokens=candidates + thoughts,
                 cached_input_tokens=cached, reasoning_tokens=thoughts, source="provider")


def from_bedrock(usage: Any) -> Usage | None:
    """Read a Bedrock Converse ``usage`` object (``inputTokens``, ``outputTokens``, ``totalTokens``,
    ``cacheReadInputTokens``, ``cacheWriteInputTokens``). Like Anthropic's, its ``inputTokens`` excludes cache
    reads and writes, which are added back here; ``totalTokens`` is the sum of all four, so a smaller one is
    an anomaly."""
    body = _object(usage)
    if body is None:
        return None
    base = _count(body, "inputTokens", required=True)
    output = _count(body, "outputTokens", required=True)
    read = _count(body, "cacheReadInputTokens")
    write = _count(body, "cacheWriteInputTokens")
    total = _count(body, "totalTokens", required=True)
    if total < base + output:
        raise UsageAnomaly(f"usage totalTokens = {total} is below inputTokens + outputTokens = {base + output}")
    return Usage(input_tokens=base + read + write, output_tokens=output, cached_input_tokens=read,
                 cache_write_tokens=write, source="provider")


def from_openai_audio(usage: Any) -> Usage | None:
    """A transcription's token usage (gpt-4o-transcribe: ``{"type": "tokens", "input_tokens", "output_tokens",
    "input_token_details": {"audio_tokens", "text_tokens"}}``) or a speech stream's; ``None`` for none, or for
    usage of another ``type`` (``duration``: read by :func:`reported_seconds`)."""
    body = _object(usage)
    if body is None or body.get("type", "tokens") != "tokens":
        return None
    prompt = _count(body, "input_tokens", required=True)
    details = _details(body, "input_token_details")
    audio = _count(details, "audio_tokens")
    text = _count(details, "text_tokens")
    _subset(audio + text, "audio_tokens + text_tokens", prompt, "input_tokens")
    return Usage(input_tokens=prompt, output_tokens=_count(body, "output_tokens", required=True),
                 audio_input_tokens=audio, source="provider")


def from_openai_images(usage: Any) -> Usage | None:
    """An image generation's or edit's token usage (gpt-image-1: ``{"input_tokens", "output_tokens",
    "input_tokens_details": {"text_tokens", "image_tokens"}}``)."""
    body = _object(usage)
    if body is None:
        return None
    prompt = _count(body, "input_tokens", required=True)
    details = _details(body, "input_tokens_details")
    image = _count(details, "image_tokens")
    _subset(image + _count(details, "text_tokens"), "text_tokens + image_tokens", prompt, "input_tokens")
    return Usage(input_tokens=prompt, output_tokens=_count(body, "output_tokens", required=True),
                 image_input_tokens=image, source="provider")


MAX_AUDIO_SECONDS = 10**6  # about 11.5 days: no upload plays longer


def reported_seconds(usage: Any, *, field: str = "seconds") -> int | None:
    """Whole seconds (rounded up) of a ``{"type": "duration", "seconds": N}`` usage object (whisper-1), or of
    a ``duration`` field (``verbose_json``: pass the body and ``field="duration"``); ``None`` when absent.
    A number that is not finite, negative or absurd is an anomaly."""
    body = _object(usage)
    if body is None or (field == "seconds" and body.get("type") != "duration"):
        return None
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_AUDIO_SECONDS:
        raise UsageAnomaly(f"usage.{field} = {_shown(value)} is not a number of seconds in [0, {MAX_AUDIO_SECONDS}]")
    if isinstance(value, int):
        return value
    whole = int(value)  # a JSON number read as a float: round up to the next whole second, exactly
    return whole if whole == value else whole + 1
