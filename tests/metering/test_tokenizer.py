"""Token counts: offline tiktoken encodings, and the remembered counts of prompt parts agree with a fresh
count, whatever the length, the script or how often the same text comes back."""

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
