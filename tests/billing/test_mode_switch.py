"""Switching a customer between invoiced and prepaid mid-period leaves a clear record, bills each usage record
in the mode in effect when it was recorded, and leaves the invoiced debt to Stripe rather than to the wallet.

Method: one customer through invoiced → prepaid → invoiced with real requests in each period; the change
records, overdraft history, outbox decisions and Stripe's meter events are read back and compared with the
usage records of each period.
"""

from __future__ import annotations

import openai
import pytest

from tests.billing.conftest import BillGate, eventually
from tests.billing.test_invoiced import ask
from tests.payments.fake_stripe import FakeStripe


async def test_switching_modes_mid_period_bills_each_record_in_its_mode(billgate: BillGate,
                                                                        fake_stripe: FakeStripe) -> None:
    admin = billgate.gw.admin
    await billgate.gw.customer("sw", funds=0)
    await billgate.set_billing("sw", billing_mode="invoiced", changed_by="finance-bot", memo="Q3 invoice")
    invoiced_1 = [await ask(billgate, "sw") for _ in range(2)]
    debt = sum(p for _, p in invoiced_1)

    # To prepaid: the invoiced debt stays (Stripe collects it); the wallet starts from what is credited next.
    view = await billgate.set_billing("sw", billing_mode="prepaid", memo="moved to prepaid")
    assert view["changed"] and view["effective"]["USD"] == "prepaid"
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(billgate, "sw")
    assert refused.value.status_code == 402
    r = await admin.post("/customers/sw/credits", json={"amount": 1_000_000, "idempotency_key": "sw-topup"})
    assert r.status_code == 201
    prepaid = [await ask(billgate, "sw") for _ in range(2)]
    [balance] = (await admin.get("/customers/sw/balance")).json()["balances"]
    assert balance["available"] == 1_000_000 - sum(p for _, p in prepaid)  # the debt is not repaid from credits

    # Back to invoiced.
    await billgate.set_billing("sw", billing_mode="invoiced")
    invoiced_2 = [await ask(billgate, "sw")]

    async def settled() -> bool:
        rows = await billgate.outbox("sw")
        return len(rows) == 6 - 1 and all(r["state"] in ("sent", "skipped") for r in rows)

    # 5 usage records with a price, plus the refused request which left no record (refused before a hold).
    await eventually(settled, what="the outbox to settle")
    decisions = {r["usage_id"]: (r["billing_mode"], r["state"]) for r in await billgate.outbox("sw")}
    for request_id, _ in invoiced_1 + invoiced_2:
        assert decisions[request_id] == ("invoiced", "sent")
    for request_id, _ in prepaid:
        assert decisions[request_id] == ("prepaid", "skipped")
    assert set(fake_stripe.meter_events) == {r for r, _ in invoiced_1 + invoiced_2}

    view = (await admin.get("/customers/sw/billing")).json()
    changes = view["changes"]
    assert [(c["from"]["billing_mode"], c["billing_mode"]) for c in changes] == [
        ("prepaid", "invoiced"), ("invoiced", "prepaid"), ("prepaid", "invoiced")]
    assert changes[0]["changed_by"].startswith("finance-bot (admin key test:") and changes[0]["memo"] == "Q3 invoice"
    assert changes[1]["balances_at_change"]["USD"]["debits_posted"] == debt
    assert changes[1]["targets"]["USD"] == debt  # the frozen invoiced debt
    assert changes[0]["created_at_ms"] < changes[1]["created_at_ms"] < changes[2]["created_at_ms"]
    assert [c["to_limit"] for c in view["overdraft_changes"]][1] == debt

    recon = (await admin.get("/billing/reconciliation", params={"customer_id": "sw"})).json()["data"][0]
    assert recon["invoiced_charged"] == sum(p for _, p in invoiced_1 + invoiced_2) == recon["sent_value"]
    assert recon["prepaid_charged"] == sum(p for _, p in prepaid)
    assert recon["balanced"] and recon["complete"]
    assert await billgate.audits() == []


async def test_a_repeated_put_records_nothing(billgate: BillGate) -> None:
    await billgate.gw.customer("same", funds=0)
    first = await billgate.set_billing("same", billing_mode="invoiced", credit_limits={"USD": 5_000})
    again = await billgate.set_billing("same", billing_mode="invoiced", credit_limits={"USD": 5_000})
    assert first["changed"] and not again["changed"]
    assert len(again["changes"]) == 1 and len(again["overdraft_changes"]) == 1
