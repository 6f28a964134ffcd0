"""A large prompt never stalls the proxy: it is priced at one token per byte before it is counted, counted
off the event loop, or (above a size) never tokenized; and absurd integers are refused, not overflowed.

Method: real requests through a gateway with small size thresholds (so that the tiers are reached with
small bodies), against the mock upstream. Each refusal is checked for status, error code, an upstream that
saw nothing and an unchanged ledger; each success for the hold's basis in the usage record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Upstream, start_gateway

CHAT = "/openai/v1/chat/completions"
HEADERS = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}


@pytest.fixture
async def small_tiers(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'tiers.db'}",
                                     tokenizer_inline_max_bytes=1024, tokenizer_exact_max_bytes=64 * 1024)
    yield gw
    await gw.close()
    await runner.cleanup()


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **extra}


async def _ledger(gw: Gateway) -> tuple[list[Any], dict[str, Any]]:
    r = await gw.admin.get("/customers/acme/ledger")
    assert r.status_code == 200, r.text
    return r.json()["data"], await gw.balance()


async def test_large_prompt_from_an_empty_wallet_is_refused_before_counting(small_tiers: Gateway) -> None:
    await small_tiers.customer("acme", funds=0)
    before = await _ledger(small_tiers)
    text = "lorem ipsum " * 4000  # 48 kB: counted in the pool, if the wallet covered it
    r = await small_tiers.admin.post(f"{small_tiers.url}{CHAT}", json=_chat(text), headers=HEADERS)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds"
    # The amount required is the upper bound, one token per byte at 5 USD/Mtok (0.24 USD), not the count
    # (about 8000 tokens: 0.04 USD).
    assert Decimal("0.24") <= Decimal(r.json()["error"]["required"]) < Decimal("0.25")
    assert small_tiers.upstream.requests == []
    assert await _ledger(small_tiers) == before


async def test_large_prompt_covered_at_its_upper_bound_is_counted_exactly(small_tiers: Gateway) -> None:
    await small_tiers.customer("acme", funds=1_000_000)
    r = await small_tiers.admin.post(f"{small_tiers.url}{CHAT}", json=_chat("lorem ipsum " * 4000), headers=HEADERS)
    assert r.status_code == 200, r.text
    [record] = await small_tiers.usage()
    assert record["detail"]["tokens_exact"] is True
    assert record["detail"]["hold"] < 100_000  # the exact count (~8000 tokens), well under the 48 kB bound


async def test_huge_prompt_is_held_at_its_upper_bound_without_tokenizing(small_tiers: Gateway) -> None:
    await small_tiers.customer("acme", funds=10_000_000)
    text = "lorem ipsum " * 8000  # 96 kB, above tokenizer_exact_max_bytes
    r = await small_tiers.admin.post(f"{small_tiers.url}{CHAT}", json=_chat(text), headers=HEADERS)
    assert r.status_code == 200, r.text
    [record] = await small_tiers.usage()
    assert record["detail"]["tokens_exact"] is False
    assert record["detail"]["hold"] >= 96_000 * 5  # at least one token per byte at 5 USD/Mtok


async def test_huge_prompt_beyond_the_wallet_is_refused(small_tiers: Gateway) -> None:
    await small_tiers.customer("acme", funds=1_000)
    before = await _ledger(small_tiers)
    r = await small_tiers.admin.post(f"{small_tiers.url}{CHAT}", json=_chat("x" * 100_000), headers=HEADERS)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds"
    assert small_tiers.upstream.requests == []
    assert await _ledger(small_tiers) == before


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n"])
@pytest.mark.parametrize("value", [2**63, 10**30, 2**64 + 1])
async def test_absurd_integers_are_refused_not_overflowed(gateway: Gateway, field: str, value: int) -> None:
    await gateway.customer("acme", funds=1_000_000)
    before = await _ledger(gateway)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], field: value}
    r = await gateway.admin.post(f"{gateway.url}{CHAT}", json=body, headers=HEADERS)
    assert r.status_code in (400, 402), r.text
    assert r.json()["error"]["code"] in ("invalid_request", "insufficient_funds")
    assert gateway.upstream.requests == []
    assert await _ledger(gateway) == before
