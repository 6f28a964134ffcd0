"""Token counts: offline tiktoken encodings, and the remembered counts of prompt parts agree with a fresh
count, whatever the length, the script or how often the same text comes back; remembering them does not keep
the texts (measured with tracemalloc)."""

from __future__ import annotations

import pytest
import tiktoken

from metergate.metering.tokenizer import PROMPT_CACHE_MAX_CHARS, counter_for, seed_cache

TEXTS = [
    "",
    "Hello, world!",
    "You are a concise assistant for a metering benchmark. " * 20,
    "混合スクリプトのテキスト and emoji 🎉🎉 with numbers 1234567890",
    "x" * (PROMPT_CACHE_MAX_CHARS + 1),  # too long to be remembered: counted each time
]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4", "claude-3-5-sonnet"])
def test_prompt_counts_equal_fresh_counts_every_time(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(seed_cache()))
    counter = counter_for(model)
    assert counter.exact
    reference = tiktoken.encoding_for_model(model) if model.startswith("gpt") else tiktoken.get_encoding("o200k_base")
    for _ in range(3):  # first a miss, then remembered
        for text in TEXTS:
            expected = len(reference.encode_ordinary(text))
            assert counter.count_prompt(text) == counter.count(text) == expected


def test_remembered_prompt_counts_do_not_keep_the_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(seed_cache()))
    counter = counter_for("gpt-4o-mini")
    counter.count_prompt("warm the encoding and the cache's structures")
    texts = 200  # distinct prompts of the longest remembered size, in a script stored 4 bytes per character
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(texts):
            text = f"{i:05d} " + "🎉" * (PROMPT_CACHE_MAX_CHARS - 6)
            assert counter.count_prompt(text) == counter.count_prompt(text) > 0  # the second one is remembered
            del text
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < texts * 1024, kept  # each text was 32 KiB: what stays is a digest and a count per text


@pytest.mark.parametrize(("model", "encoding"), [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")])
def test_an_encoding_without_its_python_ranks_still_counts_encodes_and_decodes(
        model: str, encoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # metergate drops the Encoding's Python dict of ranks once the Rust encoder is built (the bulk of its memory);
    # what metergate uses of it must keep working, and a registered encoding still pickles (by name).
    import pickle

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(seed_cache()))
    counter = counter_for(model)
    assert counter.exact
    enc = tiktoken.get_encoding(encoding)
    assert "_mergeable_ranks" not in enc.__dict__
    for text in TEXTS[1:4]:
        tokens = enc.encode_ordinary(text)
        assert counter.count(text) == len(tokens)
        assert enc.decode(tokens) == text
        assert b"".join(enc.decode_single_token_bytes(t) for t in tokens) == text.encode()
    assert enc.decode(enc.encode("<|endoftext|>", allowed_special="all")) == "<|endoftext|>"
    assert pickle.loads(pickle.dumps(enc)).encode_ordinary(TEXTS[1]) == enc.encode_ordinary(TEXTS[1])
