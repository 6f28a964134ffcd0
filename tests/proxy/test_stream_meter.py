"""The OpenAI stream meter reads the same usage and the same delivered text whether it parses every chunk
as it passes or, with ``lazy_text`` (the relay's setting when no mid-stream budget reads the text), keeps
text-only chunks unread until the text is asked for.

Method: Hypothesis builds chat-completion chunk streams the way OpenAI and vLLM write them (compact and
spaced JSON, ``"usage": null`` in every chunk or not at all, several choices, text that mentions "usage",
a usage chunk at the end or none: a stream cut short), feeds them to an eager and a lazy meter, and compares
verdicts, usage, delivered tokens, text order and the choices seen.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from metergate.proxy.adapters.openai import OpenAIStreamMeter, _no_usage

MODEL = "gpt-4o-mini"
TEXTS = st.sampled_from(["Hello", " world", ' "usage": null', " usage", "", " 🙂", "\n", ' {"usage": 1}'])


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[bytes]:
    compact = draw(st.booleans())
    usage_field = draw(st.booleans())
    indexes = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))

    def dump(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, separators=(",", ":") if compact else (", ", ": ")).encode()

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    out = []
    for text in draw(st.lists(TEXTS, max_size=12)):
        chunk: dict[str, Any] = {**head, "choices": [{"index": draw(st.sampled_from(indexes)),
                                                     "delta": {"content": text}, "finish_reason": None}]}
        if usage_field:
            chunk["usage"] = None
        out.append(dump(chunk))
    usage = {"prompt_tokens": 7, "completion_tokens": len(out), "total_tokens": 7 + len(out)}
    if draw(st.booleans()):  # a chunk with both text and usage (vLLM's continuous usage), mid-stream
        at = draw(st.integers(0, len(out)))
        out.insert(at, dump({**head, "choices": [{"index": indexes[0], "delta": {"content": " both"}}],
                             "usage": usage}))
    if draw(st.booleans()):  # the provider's usage chunk; absent when the stream was cut
        out.append(dump({**head, "choices": [], "usage": usage}))
        out.append(b"[DONE]")
    return out


def run(stream: list[bytes], lazy: bool) -> tuple[list[str], Any, int, str, set[int]]:
    meter = OpenAIStreamMeter(max_text_chars=10_000)
    meter.lazy_text = lazy
    verdicts = [meter.on_event(data) for data in stream]
    tokens = meter.delivered_output_tokens(MODEL)
    return verdicts, meter.usage, tokens, "".join(meter.text), meter.indexes


@settings(deadline=None)  # the first example loads the tokenizer
@given(chunk_streams())
def test_lazy_and_eager_meters_agree(stream: list[bytes]) -> None:
    assert run(stream, lazy=True) == run(stream, lazy=False)


def test_a_finished_stream_never_parses_its_text_chunks() -> None:
    meter = OpenAIStreamMeter(max_text_chars=10_000)
    meter.lazy_text = True
    head = b'"id":"c","object":"chat.completion.chunk","created":1,"model":"m"'
    meter.on_event(b"{" + head + b',"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}')
    for _ in range(5):
        meter.on_event(b"{" + head + b',"choices":[{"index":0,"delta":{"content":" there"}}],"usage":null}')
    meter.on_event(b"{" + head + b',"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":6}}')
    assert len(meter.unread) == 5 and meter.usage is not None and meter.usage.output_tokens == 6
    assert meter.delivered_output_tokens("gpt-4o-mini") > 0 and not meter.unread


def test_unread_chunks_are_bounded_by_the_text_limit() -> None:
    meter = OpenAIStreamMeter(max_text_chars=200)
    meter.lazy_text = True
    chunk = b'{"choices":[{"index":0,"delta":{"content":"word "}}]}'
    for _ in range(50):
        meter.on_event(chunk)
        assert meter.unread_bytes <= 200 + len(chunk)
    assert "".join(meter.text).startswith("word word")


def test_what_counts_as_a_chunk_without_usage() -> None:
    assert _no_usage(b'{"choices":[]}')
    assert _no_usage(b'{"choices":[],"usage":null}') and _no_usage(b'{"choices": [], "usage": null}')
    assert not _no_usage(b'{"choices":[],"usage":{"prompt_tokens":1}}')
    assert not _no_usage(b'{"x":{"usage":null},"usage":{"prompt_tokens":1}}')  # two keys: parse to be sure
    assert _no_usage(b'{"choices":[{"delta":{"content":"the \\"usage\\": {} key"}}]}')  # escaped text
