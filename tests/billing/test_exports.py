"""Exports of usage records and ledger entries add up, to the smallest unit, to the ledger and to what the
admin API reports (balances, margin report), in CSV and in JSON Lines; and each admin key sees only its
mode's customers, billing settings, meter events and exported rows.

Method: invoiced and prepaid customers in test mode and an invoiced customer in live mode make real
requests through the proxy; every export is streamed, parsed and summed here, then compared with the
admin API's own figures.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Any

from tests.billing.conftest import BillGate, eventually
from tests.billing.test_invoiced import ask
from tests.payments.fake_stripe import FakeStripe


async def _export(bg: BillGate, table: str, fmt: str, mode: str = "test", **params: Any) -> list[dict[str, Any]]:
    r = await bg.admin(mode).get(f"/exports/{table}", params={"format": fmt, **params})
    assert r.status_code == 200, r.text
    if fmt == "csv":
        assert r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        return [{k: int(v) if v.lstrip("-").isdigit() else v for k, v in row.items()} for row in rows]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def _sums(rows: list[dict[str, Any]], *fields: str) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for row in rows:
        for name in fields:
            out.setdefault(row["asset"], Counter())[name] += int(row[name])
    return out


async def _seed(bg: BillGate) -> None:
    await bg.gw.customer("inv", funds=0)
    await bg.set_billing("inv", billing_mode="invoiced")
    await bg.gw.customer("pre", funds=2_000_000)
    await bg.gw.customer("liv", funds=3_000_000, mode="live")
    await bg.set_billing("liv", mode="live", billing_mode="invoiced")
    for _ in range(3):
        await ask(bg, "inv")
    for _ in range(2):
        await ask(bg, "pre")
        await ask(bg, "liv", mode="live")


async def test_export_totals_equal_ledger_and_admin_api_to_the_unit(billgate: BillGate) -> None:
    await _seed(billgate)
    admin = billgate.gw.admin
    for fmt in ("csv", "jsonl"):
        usage = await _export(billgate, "usage", fmt)
        ledger = await _export(billgate, "ledger", fmt)
        assert {r["customer_id"] for r in usage} == {"inv", "pre"}
        assert len(usage) == 5 and len({r["id"] for r in usage}) == 5
        charged = _sums(usage, "charged_amount", "price_amount", "written_off_amount")["USD"]
        moved = _sums(ledger, "credits_delta", "posted_delta", "pending_delta")["USD"]

        # Ledger: what usage charged is exactly what the captures posted, and nothing is left pending.
        assert charged["charged_amount"] == moved["posted_delta"] and moved["pending_delta"] == 0
        assert charged["price_amount"] == charged["charged_amount"] + charged["written_off_amount"]
        # Admin API: balances per customer add up to the same integers.
        credits = debits = 0
        for customer in ("inv", "pre"):
            [balance] = (await admin.get(f"/customers/{customer}/balance")).json()["balances"]
            credits += balance["credits_posted"]
            debits += balance["credits_posted"] - balance["posted"]  # posted = credits - debits
        assert credits == moved["credits_delta"] == 2_000_000
        assert debits == moved["posted_delta"]
        # And the margin report's totals over the same records.
        report = (await admin.get("/reports/margin", params={"group_by": "customer"})).json()
        [total] = report["totals"]
        assert (total["requests"], total["charged"], total["price"]) == (
            len(usage), charged["charged_amount"], charged["price_amount"])
        per_customer = {row["key"]: row["charged"] for row in report["data"]}
        for customer in ("inv", "pre"):
            assert per_customer[customer] == sum(r["charged_amount"] for r in usage if r["customer_id"] == customer)


async def test_exports_can_be_scoped_to_a_customer_and_a_period(billgate: BillGate) -> None:
    await _seed(billgate)
    usage = await _export(billgate, "usage", "jsonl", customer_id="inv")
    assert {r["customer_id"] for r in usage} == {"inv"} and len(usage) == 3
    empty = await _export(billgate, "ledger", "csv", **{"from": "2020-01-01", "to": "2020-02-01"})
    assert empty == []


async def test_test_keys_never_see_live_billing_data(billgate: BillGate, fake_stripe: FakeStripe) -> None:
    await _seed(billgate)
    test, live = billgate.gw.admin, billgate.live
    for path in ("/customers/liv/billing", "/customers/liv/meter-events"):
        r = await test.get(path)
        assert r.status_code == 404, r.text
    r = await test.put("/customers/liv/billing", json={"billing_mode": "prepaid"})
    assert r.status_code == 404
    assert (await live.get("/customers/liv/billing")).json()["billing_mode"] == "invoiced"
    r = await test.get("/exports/usage", params={"customer_id": "liv"})
    assert r.status_code == 404
    for table in ("usage", "ledger"):
        for fmt in ("csv", "jsonl"):
            test_rows = await _export(billgate, table, fmt)
            live_rows = await _export(billgate, table, fmt, mode="live")
            assert "liv" not in {r["customer_id"] for r in test_rows}
            assert {r["customer_id"] for r in live_rows} == {"liv"}
    recon = (await test.get("/billing/reconciliation")).json()
    assert {row["customer_id"] for row in recon["data"]} == {"inv"}

    async def live_sent() -> bool:
        rows = (await live.get("/customers/liv/meter-events")).json()["data"]
        return len(rows) == 2 and {r["state"] for r in rows} == {"sent"}

    await eventually(live_sent, what="the live customer's meter events")
    live_ids = {r["id"] for r in await billgate.usage("liv", mode="live")}
    for identifier, event in fake_stripe.meter_events.items():
        assert event["livemode"] is (identifier in live_ids)  # live usage went to Stripe with the live key only
    live_recon = (await live.get("/billing/reconciliation")).json()
    assert {row["customer_id"] for row in live_recon["data"]} == {"liv"}
