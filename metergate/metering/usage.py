"""What a request used, read from what the provider reported or estimated from what was delivered.

``input_tokens`` counts every prompt token, cached ones included; ``cached_input_tokens`` (cache reads),
``cache_write_tokens`` (Anthropic's cache creation) and ``reasoning_tokens`` are subsets of the input and
output totals (OpenAI's convention; Anthropic's counts are converted to it). A provider's
explicit zero is kept as zero: an estimate only replaces usage the provider did not report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["provider", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    source: Source = "provider"

    def __post_init__(self) -> None:
        if min(self.input_tokens, self.output_tokens, self.cached_input_tokens, self.reasoning_tokens,
               self.cache_write_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError("cache tokens exceed input tokens")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


NO_USAGE = Usage(source="none")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def from_openai(usage: Any) -> Usage | None:
    """Read an OpenAI ``usage`` object (chat, completions, embeddings); ``None`` if absent or malformed."""
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    return Usage(input_tokens=prompt, output_tokens=completion, cached_input_tokens=min(cached, prompt),
                 reasoning_tokens=min(reasoning, completion), source="provider")


def from_anthropic(usage: Any) -> Usage | None:
    """Read an Anthropic ``usage`` object. Its ``input_tokens`` excludes cache reads and writes; here
    they are added back so that ``input_tokens`` is the whole prompt, as for every other provider."""
    if not isinstance(usage, dict) or ("input_tokens" not in usage and "output_tokens" not in usage):
        return None
    base = _int(usage.get("input_tokens"))
    write = _int(usage.get("cache_creation_input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    return Usage(input_tokens=base + write + read, output_tokens=_int(usage.get("output_tokens")),
                 cached_input_tokens=read, cache_write_tokens=write, source="provider")


def from_responses(usage: Any) -> Usage | None:
    """Read an OpenAI Responses API ``usage`` object (``input_tokens`` includes cached tokens)."""
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return None
    prompt = _int(usage.get("input_tokens"))
    output = _int(usage.get("output_tokens"))
    input_details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    cached = _int(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0
    reasoning = _int(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    return Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=min(cached, prompt),
                 reasoning_tokens=min(reasoning, output), source="provider")
