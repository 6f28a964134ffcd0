"""Reading a provider's usage never fails in any way but :class:`UsageAnomaly`, and what it returns is in bounds.

Method: Hypothesis puts arbitrary JSON values (huge and negative integers, floats, strings, booleans, null,
lists, objects) in every field each reader looks at, and in the usage object's place itself. Each reader must
return a :class:`Usage` whose counts are integers in ``[0, MAX_TOKENS]`` with subsets inside their totals, or
``None`` (no usage), or raise :class:`UsageAnomaly`: nothing else, so an upstream cannot turn its answer into a
500 or an unbilled request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metergate.metering.usage import (
    MAX_AUDIO_SECONDS,
    MAX_TOKENS,
    Usage,
    UsageAnomaly,
    from_anthropic,
    from_openai,
    from_openai_audio,
    from_openai_images,
    from_responses,
    reported_seconds,
)

COUNTS = st.one_of(st.integers(0, 200), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
FIELDS: dict[str, tuple[Callable[[Any], Usage | None], list[str], dict[str, list[str]]]] = {
    "openai": (from_openai, ["prompt_tokens", "completion_tokens", "total_tokens"],
               {"prompt_tokens_details": ["cached_tokens"], "completion_tokens_details": ["reasoning_tokens"]}),
    "responses": (from_responses, ["input_tokens", "output_tokens", "total_tokens"],
                  {"input_tokens_details": ["cached_tokens"], "output_tokens_details": ["reasoning_tokens"]}),
    "anthropic": (from_anthropic, ["input_tokens", "output_tokens", "cache_creation_input_tokens",
                                   "cache_read_input_tokens"], {}),
    # A transcription's usage of type "tokens" (a usage of another type is no token usage: None).
    "audio": (lambda u: from_openai_audio({**u, "type": "tokens"} if isinstance(u, dict) else u),
              ["input_tokens", "output_tokens", "total_tokens"],
              {"input_token_details": ["audio_tokens", "text_tokens"]}),
    "images": (from_openai_images, ["input_tokens", "output_tokens", "total_tokens"],
               {"input_tokens_details": ["text_tokens", "image_tokens"]}),
}


@st.composite
def reports(draw: st.DrawFn, top: list[str], nested: dict[str, list[str]]) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)  # not even an object
    usage: dict[str, Any] = {name: draw(COUNTS) for name in top if draw(st.integers(0, 3))}  # some left out
    for parent, names in nested.items():
        usage[parent] = draw(st.one_of(JSON, st.fixed_dictionaries({n: COUNTS for n in names})))
    return usage


def check(read: Callable[[Any], Usage | None], reported: Any) -> None:
    try:
        usage = read(reported)
    except UsageAnomaly:
        return
    if usage is None:
        assert reported is None
        return
    counts = (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens,
              usage.cache_write_tokens)
    assert all(type(c) is int and 0 <= c <= 3 * MAX_TOKENS for c in counts)
    assert usage.cached_input_tokens + usage.cache_write_tokens <= usage.input_tokens
    assert usage.audio_input_tokens + usage.image_input_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens


@pytest.mark.parametrize("provider", list(FIELDS))
@given(data=st.data())
def test_any_reported_usage_is_believed_in_bounds_or_is_an_anomaly(provider: str, data: st.DataObject) -> None:
    read, top, nested = FIELDS[provider]
    check(read, data.draw(reports(top, nested)))


@pytest.mark.parametrize(("reported", "expected"), [
    ({"prompt_tokens": 0, "completion_tokens": 0}, Usage()),  # an explicit zero is kept
    ({"prompt_tokens": MAX_TOKENS, "completion_tokens": 1}, Usage(MAX_TOKENS, 1)),  # the bound itself
    ({"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": None}, Usage(9, 3)),
    (None, None),  # no usage reported: nothing to believe or doubt
])
def test_plausible_openai_usage_is_read_as_reported(reported: Any, expected: Usage | None) -> None:
    assert from_openai(reported) == expected


def test_embeddings_usage_needs_no_completion_count() -> None:
    assert from_openai({"prompt_tokens": 8, "total_tokens": 8}, output=False) == Usage(8, 0)
    with pytest.raises(UsageAnomaly, match="completion_tokens is missing"):
        from_openai({"prompt_tokens": 8, "total_tokens": 8})


@given(seconds=st.one_of(COUNTS, st.floats(-1e7, 1e7)), kind=st.sampled_from(["duration", "tokens", None]))
def test_reported_seconds_are_whole_and_bounded_or_an_anomaly(seconds: Any, kind: str | None) -> None:
    try:
        whole = reported_seconds({"type": kind, "seconds": seconds})
    except UsageAnomaly:
        return
    if kind != "duration" or seconds is None:
        assert whole is None
        return
    assert type(whole) is int and 0 <= whole <= MAX_AUDIO_SECONDS
    assert whole - 1 < seconds <= whole  # rounded up, never down


def test_whisper_seconds_round_up_to_the_whole_second() -> None:
    assert reported_seconds({"type": "duration", "seconds": 29.01}) == 30
    assert reported_seconds({"type": "duration", "seconds": 30}) == 30
    assert reported_seconds({"type": "duration", "seconds": 0}) == 0  # an explicit zero stays zero
    assert reported_seconds({"duration": 7.5}, field="duration") == 8
