"""Quotes through the admin API: hand-computed amounts for token counts, the same amount the proxy holds for a chat
payload, drafts named explicitly, events — and no quote changes a balance, the ledger or the usage records."""

from __future__ import annotations

from typing import Any

from tests.conftest import Gateway
from tests.proxy.test_openai_sdk import MESSAGES, ledger, record_by_id


async def snapshot(gateway: Gateway) -> tuple[Any, ...]:
    return (await gateway.balance(), await ledger(gateway), await gateway.usage(), await gateway.store.audit())


async def quote(gateway: Gateway, **body: Any) -> dict[str, Any]:
    r = await gateway.admin.post("/quote", json={"customer_id": "acme", **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def test_quotes_price_without_touching_the_wallet(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    r = await gateway.admin.post("/price-versions", json={"rules": [
        {"id": "mini", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD", "per_units": "1000000",
         "rates": {"input_tokens": "1", "output_tokens": "2"}, "minimum": "0.01"},
        {"id": "gpu", "match": {"type": "gpu.job"}, "asset": "USD", "rates": {"gpu_seconds": "0.0015"}}]})
    draft = r.json()["id"]
    before = await snapshot(gateway)

    # gpt-4o: 1000 x $5/M + 500 x $20/M + $0.0001 = 5000 + 10000 + 100 micro-dollars
    answer = await quote(gateway, model="gpt-4o", usage={"input_tokens": 1000, "output_tokens": 500})
    assert (answer["amount"], answer["amount_decimal"], answer["version"]) == (15_100, "0.015100", "config")
    # gpt-4o-mini: 1000 x 0.30 + 3 cached x 0.15 + 1 x 1.20 = 300 + 0.45 + 1.2 = 301.65 micro -> 302 (half-up)
    answer = await quote(gateway, model="gpt-4o-mini",
                         usage={"input_tokens": 1000, "cached_input_tokens": 3, "output_tokens": 1})
    assert answer["amount"] == 302
    # the draft, named: 1000 x $1/M + 500 x $2/M = $0.002, below its $0.01 minimum
    answer = await quote(gateway, model="gpt-4o-mini", usage={"input_tokens": 1000, "output_tokens": 500},
                         version=draft)
    assert (answer["amount"], answer["rule"], answer["price"]["minimum_applied"]) == (10_000, "mini", True)
    # an event type only the draft prices: 90 x $0.0015 = $0.135
    answer = await quote(gateway, type="gpu.job", quantities={"gpu_seconds": "90"}, version=draft)
    assert answer["amount"] == 135_000
    r = await gateway.admin.post("/quote", json={"customer_id": "acme", "type": "gpu.job",
                                                 "quantities": {"gpu_seconds": "90"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_matching_rule"  # not in force
    r = await gateway.admin.post("/quote", json={"customer_id": "nobody", "model": "gpt-4o"})
    assert r.status_code == 404

    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    estimate = await quote(gateway, payload=payload)
    assert await snapshot(gateway) == before  # nothing above changed anything

    # A chat payload is quoted at what the proxy holds for it.
    raw = await gateway.openai().chat.completions.with_raw_response.create(**payload)
    record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
    assert record["detail"]["hold"] == estimate["amount"] > 0


async def test_bad_quotes_are_refused_with_the_field_named(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    for body, param in (({"model": "gpt-4o", "usage": {"input_tokens": -1}}, "usage.input_tokens"),
                        ({"model": "gpt-4o", "usage": {"tokens": 1}}, "usage"),
                        ({"type": "gpu.job", "quantities": {"gpu_seconds": "x"}}, "quantities.gpu_seconds"),
                        ({"model": "gpt-4o", "version": "pv_nope"}, "version_id"),
                        ({"model": "gpt-4o", "colour": "red"}, "colour"),
                        ({"endpoint": "0", "payload": {"model": "gpt-4o", "messages": MESSAGES}}, "endpoint")):
        r = await gateway.admin.post("/quote", json={"customer_id": "acme", **body})
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json()["error"]["param"] == param, body
    assert await gateway.store.audit() == []
