"""The dry-run simulator on a recorded period: requests through the ``openai`` SDK and an event are recorded, a
draft with per-unit rates, graduated tiers and no rule for embeddings re-prices them, and the report must equal
the hand computation below (record by record, half-up, then summed) without changing anything."""

from __future__ import annotations

import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from tests.conftest import Gateway
from tests.proxy.test_openai_sdk import MESSAGES, ledger

DRAFT = [
    {"id": "mini", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD", "per_units": "1000000",
     "event_fee": "0.00001", "rates": {"input_tokens": "0.5", "output_tokens": "2"}},
    {"id": "big", "match": {"type": "request", "model": "gpt-4o"}, "asset": "USD", "per_units": "1000000",
     "rates": {"input_tokens": "4"}, "tiers": [{"quantity": "output_tokens", "mode": "graduated", "steps": [
         {"up_to": "10", "rate": "30"}, {"up_to": None, "rate": "10"}]}]},
    {"id": "gpu", "match": {"type": "gpu.job"}, "asset": "USD", "rates": {"gpu_seconds": "0.002"}},
]


def half_up(micros: Decimal) -> int:
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def hand_priced(records: list[dict[str, Any]]) -> tuple[dict[str, list[int]], int]:
    """Per customer [old, new] totals in micro-dollars ($/M tokens = micro-dollars per token), and how many
    records no draft rule prices."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    big_output_so_far: dict[str, int] = defaultdict(int)
    unpriced = 0
    for r in records:
        event = r["detail"].get("event")
        if event is not None:
            new = half_up(Decimal(event["quantities"]["gpu_seconds"]) * Decimal("0.002") * 1_000_000)
        elif r["model"] == "gpt-4o-mini":
            new = half_up(Decimal(r["tokens_input"]) * Decimal("0.5") + r["tokens_output"] * 2 + 10)
        elif r["model"] == "gpt-4o":
            prior, out = big_output_so_far[r["customer_id"]], r["tokens_output"]
            below = max(0, min(10, prior + out) - prior)  # the slice of this request under the 10-token step
            new = half_up(Decimal(r["tokens_input"] * 4) + below * 30 + (out - below) * 10)
            big_output_so_far[r["customer_id"]] += out
        else:
            unpriced += 1
            continue
        totals[r["customer_id"]][0] += r["price_amount"]
        totals[r["customer_id"]][1] += new
    return totals, unpriced


async def test_simulated_report_matches_the_hand_computation(gateway: Gateway) -> None:
    start = int(time.time() * 1000) - 1
    # Prices in force while usage is recorded: the configuration's, plus a rule for GPU events.
    config = (await gateway.admin.get("/price-versions/config")).json()["rules"]
    gpu_now = {"id": "gpu-now", "match": {"type": "gpu.job"}, "asset": "USD", "rates": {"gpu_seconds": "0.001"}}
    r = await gateway.admin.post("/price-versions", json={"rules": [*config, gpu_now]})
    assert (await gateway.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})).status_code == 200
    for customer in ("acme", "globex"):
        await gateway.customer(customer, funds=5_000_000)
    acme, globex = gateway.openai("acme"), gateway.openai("globex")
    for model, tokens in (("gpt-4o-mini", 20), ("gpt-4o", 30), ("gpt-4o", 25), ("gpt-4o-mini", 7)):
        await acme.chat.completions.create(model=model, messages=MESSAGES, max_tokens=tokens)
    await globex.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=12)
    await globex.embeddings.create(model="text-embedding-3-small", input="prepaid wallets")
    r = await gateway.admin.post("/events", json={"events": [
        {"id": "job-1", "customer_id": "globex", "type": "gpu.job", "quantities": {"gpu_seconds": "12.345"}}]})
    assert r.json()["accepted"] == 1
    end = int(time.time() * 1000) + 1

    draft = (await gateway.admin.post("/price-versions", json={"rules": DRAFT})).json()["id"]
    records = sorted([*await gateway.usage("acme"), *await gateway.usage("globex")],
                     key=lambda rec: rec["created_at_ms"])
    assert len(records) == 7
    expected, unpriced = hand_priced(records)
    before = (await ledger(gateway, "acme"), await ledger(gateway, "globex"))

    r = await gateway.admin.post(f"/price-versions/{draft}/simulate", json={"from": start, "to": end})
    assert r.status_code == 200, r.text
    report = r.json()
    got = {row["customer_id"]: [row["old_total"], row["new_total"]] for row in report["customers"]}
    assert got == dict(expected)
    for row in report["customers"]:
        assert row["difference"] == row["new_total"] - row["old_total"] and row["asset"] == "USD"
    assert report["counts"] == {"records": 7, "repriced": 6, "no_usage": 0, "unpriced": unpriced, "skipped": 0,
                                "unpriced_old_total": {"USD": next(rec["price_amount"] for rec in records
                                                                   if rec["model"].startswith("text-"))}}
    assert unpriced == 1
    [total] = report["totals"]
    assert (total["old_total"], total["new_total"]) == (sum(v[0] for v in expected.values()),
                                                        sum(v[1] for v in expected.values()))
    # Read two records at a time (pages continue after (created_at, seq)), the report is the same.
    from metergate.pricing.simulate import simulate
    from metergate.pricing.store import PricingStore
    from metergate.wallet.sql import SqlWalletStore

    assert isinstance(gateway.store, SqlWalletStore)
    pricing = PricingStore(gateway.store)
    version = await pricing.get("test", draft)
    assert version is not None
    paged = await simulate(pricing, version, "test", from_ms=start, to_ms=end, scales={"USD": 6},
                           providers={"/openai": "openai"}, page_size=2)
    assert paged == report
    # The gpt-4o tiers cross their step on the first request and start above it on the second.
    assert sum(rec["tokens_output"] for rec in records if rec["model"] == "gpt-4o") > 10

    # Nothing changed; a range without records reports nothing.
    assert (await ledger(gateway, "acme"), await ledger(gateway, "globex")) == before
    r = await gateway.admin.post(f"/price-versions/{draft}/simulate", json={"from": start - 10_000, "to": start})
    assert r.json()["customers"] == [] and r.json()["counts"]["records"] == 0
    r = await gateway.admin.post(f"/price-versions/{draft}/simulate", json={"from": end, "to": start})
    assert r.status_code == 400
