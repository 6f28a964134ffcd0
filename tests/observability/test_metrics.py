"""/metrics tells an operator what the ledger says: requests, tokens, money, denials and open holds agree with it.

Method: real requests through the official SDK (plain, streaming, an upstream error, a 402, an unknown
customer, a wallet too small for what the provider reported), then a scrape of ``/metrics`` parsed with
``prometheus_client``'s own text parser, compared sample by sample with the usage records the admin API
returns.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway
from tests.proxy.test_openai_sdk import MESSAGES

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gateway: Gateway) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{gateway.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def test_metrics_agree_with_the_ledger(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    client = gateway.openai("acme")
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                                  stream=True, stream_options={"include_usage": True})
    async for _ in stream:
        pass
    # A provider that reports no usage: metergate counts what it delivered.
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                                  stream=True, extra_headers={"X-Mock-Behavior": "no-usage"})
    async for _ in stream:
        pass
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                             extra_headers={"X-Mock-Behavior": "error:500"})
    with pytest.raises(openai.PermissionDeniedError):
        await gateway.openai("nobody").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await gateway.customer("poor", funds=1)
    with pytest.raises(openai.APIStatusError) as refused:
        await gateway.openai("poor").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    assert refused.value.status_code == 402

    # A wallet holding exactly the estimate, while the provider reports more than was estimated (the
    # reply's first word is several tokens, max_tokens is 1): the shortfall is written off.
    body: Any = refused.value.body
    shortfall = int(Decimal(body["required"]) * 1_000_000) - 1
    credit = await gateway.admin.post("/customers/poor/credits",
                                      json={"amount": shortfall, "idempotency_key": "top-up"})
    assert credit.status_code == 201, credit.text
    await gateway.openai("poor").chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1,
                                                         extra_headers={"X-Mock-Behavior": "words:1"})

    samples = await scrape(gateway)
    records = await gateway.usage("acme") + await gateway.usage("poor")
    assert len(records) == 5
    endpoint = records[0]["endpoint"]
    assert value(samples, "metergate_requests_total", route="/openai", endpoint=endpoint, status_class="2xx",
                 outcome="ok") == 4
    assert value(samples, "metergate_requests_total", route="/openai", endpoint=endpoint, status_class="5xx",
                 outcome="error") == 1
    assert value(samples, "metergate_denials_total", reason="unknown_customer") == 1
    assert value(samples, "metergate_denials_total", reason="insufficient_funds") == 1
    assert value(samples, "metergate_open_holds") == 0

    for source in ("provider", "estimated"):
        mine = [r for r in records if r["usage_source"] == source]
        assert mine, source
        assert value(samples, "metergate_tokens_total", type="input", source=source) == sum(
            r["tokens_input"] for r in mine)
        assert value(samples, "metergate_tokens_total", type="output", source=source) == sum(
            r["tokens_output"] for r in mine)
    written_off = sum(r["written_off_amount"] for r in records)
    assert written_off > 0
    assert value(samples, "metergate_written_off_total", asset="USD") == written_off
    assert value(samples, "metergate_charged_total", asset="USD") == sum(r["charged_amount"] for r in records)
    assert value(samples, "metergate_cost_nanodollars_total") == sum(r["cost_nanos"] or 0 for r in records)
    assert value(samples, "metergate_upstream_latency_seconds_count") == 5
    assert value(samples, "metergate_time_to_first_token_seconds_count") == 2
    assert value(samples, "metergate_time_to_first_token_seconds_bucket", le="+Inf") == 2


async def test_metrics_carry_no_customer_or_model_labels(gateway: Gateway) -> None:
    await gateway.customer("acme-corp-4711", funds=1_000_000)
    await gateway.openai("acme-corp-4711").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{gateway.url}/metrics")).text
    assert "acme-corp-4711" not in text
    assert "gpt-4o-mini" not in text
    labels = {name for family in text_string_to_metric_families(text) for sample in family.samples
              for name in sample.labels}
    assert labels <= {"route", "endpoint", "status_class", "outcome", "reason", "type", "source", "asset", "le"}


async def test_every_app_has_its_own_registry(gateway: Gateway) -> None:
    """Apps built side by side (as the tests build them) count separately."""
    from metergate.proxy.app import build_app

    other = build_app(gateway.settings)
    await gateway.customer("acme", funds=1_000_000)
    await gateway.openai("acme").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    from metergate.proxy.app import METRICS

    fresh = {(s.name, frozenset(s.labels.items())): s.value
             for f in text_string_to_metric_families(other[METRICS].render().decode()) for s in f.samples}
    assert total(fresh, "metergate_requests_total") == 0
    assert total(await scrape(gateway), "metergate_requests_total") == 1
