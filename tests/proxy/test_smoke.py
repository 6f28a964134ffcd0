"""The core loop through the official openai SDK: a priced, held, settled request and its receipt."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from tests.conftest import Gateway


async def test_chat_completion_is_charged_exactly_and_receipted(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    client = gateway.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=50)
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None
    # 0.30 $/Mtok in, 1.20 $/Mtok out, in micro-dollars, half-up.
    exact = Decimal(usage.prompt_tokens) * Decimal("0.30") + Decimal(usage.completion_tokens) * Decimal("1.20")
    expected = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert raw.headers["X-Metergate-Charged"] == f"0.{expected:06d}"
    assert raw.headers["X-Metergate-Usage-Source"] == "provider"
    records = await gateway.usage()
    assert len(records) == 1
    assert records[0]["charged_amount"] == expected
    assert records[0]["tokens_input"] == usage.prompt_tokens
    balance = await gateway.balance()
    assert balance["available"] == 1_000_000 - expected and balance["pending"] == 0
    assert await gateway.store.audit() == []
