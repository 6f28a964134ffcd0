"""Every invoiced request becomes exactly one Stripe meter event, whatever happens on the way: Stripe down
(500s), Stripe slow (the event accepted but the answer lost to a timeout), metergate stopped with work
pending and started again on the same database, and two replicas reporting at once.

Method: real gateways on one database, real requests through the ``openai`` SDK, the fake Stripe switched
into outage and slow modes on demand. The fake keeps events by identifier and records every duplicate it
refuses, so "exactly once" is checked on Stripe's side (one event per usage id, right value) and on ours
(every outbox row ``sent``, reconciliation balanced and complete).
"""

from __future__ import annotations

from tests.billing.conftest import BillGate, eventually, start_billgate
from tests.billing.test_invoiced import ask
from tests.conftest import Upstream
from tests.payments.fake_stripe import FakeStripe


async def _usage_by_id(bg: BillGate, customer: str) -> dict[str, int]:
    return {r["id"]: r["charged_amount"] for r in await bg.usage(customer)}


async def test_exactly_one_event_per_request_through_an_outage_a_restart_and_a_slow_stripe(
        upstream: Upstream, billing_db: str, fake_stripe: FakeStripe) -> None:
    db = billing_db
    # First process: its reporter ticks once at start and then not for an hour, as if it died right after
    # settling these requests: nothing of theirs is in the outbox yet.
    first = await start_billgate(upstream, db, fake_stripe, report_interval_s=3600)
    await first.gw.customer("inv", funds=0)
    await first.set_billing("inv", billing_mode="invoiced")
    before = [await ask(first, "inv") for _ in range(3)]
    assert await first.outbox("inv") == []
    await first.stop()

    # Second process on the same database, with Stripe down: the scan finds the records, sending fails.
    fake_stripe.meter_outage_status = 500
    second = await start_billgate(upstream, db, fake_stripe)
    during = [await ask(second, "inv") for _ in range(2)]

    async def failing() -> bool:
        rows = await second.outbox("inv")
        return len(rows) == 5 and all(r["state"] == "pending" and r["attempts"] >= 2 for r in rows)

    await eventually(failing, what="retries during the outage")
    assert fake_stripe.meter_events == {}
    assert all("unexpected error" in r["last_error"] for r in await second.outbox("inv"))
    await second.stop()

    # Third process: Stripe is back but slow — it accepts each event and answers after the client gave up,
    # so every event is sent again and Stripe refuses the duplicate identifier.
    fake_stripe.meter_outage_status = None
    # Six times the reporter's send timeout (0.5 s): even on a loaded machine, whose event loop can run the
    # timeout and the late answer in one iteration, the answer is never the one that arrives first.
    fake_stripe.meter_delay_s = 3.0
    third = await start_billgate(upstream, db, fake_stripe)
    after = [await ask(third, "inv")]

    async def accepted() -> bool:
        return len(fake_stripe.meter_events) == 6

    await eventually(accepted, what="Stripe accepting every event")
    fake_stripe.meter_delay_s = 0

    async def all_sent() -> bool:
        return {r["state"] for r in await third.outbox("inv")} == {"sent"}

    await eventually(all_sent, what="every outbox row marked sent")
    charged = await _usage_by_id(third, "inv")
    assert set(fake_stripe.meter_events) == set(charged) == {r for r, _ in before + during + after}
    for request_id, price in before + during + after:
        assert charged[request_id] == price
        assert fake_stripe.meter_events[request_id]["payload"]["value"] == str(price)
    assert fake_stripe.meter_duplicates, "the slow phase should have made the reporter resend"
    assert any(r["duplicate"] for r in await third.outbox("inv"))

    r = await third.gw.admin.get("/billing/reconciliation", params={"customer_id": "inv"})
    [row] = r.json()["data"]
    assert row["invoiced_charged"] == row["sent_value"] == row["usage_charged"] == sum(charged.values())
    assert row["sent_events"] == row["invoiced_records"] == 6 and row["balanced"] and row["complete"]
    assert row["ledger_captured"] == row["usage_charged"]
    assert await third.audits() == []
    await third.stop()


async def test_two_replicas_never_send_an_event_twice(upstream: Upstream, billing_db: str,
                                                      fake_stripe: FakeStripe) -> None:
    db = billing_db
    fake_stripe.meter_outage_status = 503  # let a backlog build up so that both replicas find work at once
    a = await start_billgate(upstream, db, fake_stripe, batch_size=3)
    b = await start_billgate(upstream, db, fake_stripe, batch_size=3)
    try:
        await a.gw.customer("inv", funds=0)
        await a.set_billing("inv", billing_mode="invoiced")
        requests = [await ask(a if i % 2 else b, "inv") for i in range(12)]

        async def queued() -> bool:
            return len(await a.outbox("inv")) == 12

        await eventually(queued, what="the backlog")
        fake_stripe.meter_outage_status = None

        async def all_sent() -> bool:
            return {r["state"] for r in await a.outbox("inv")} == {"sent"}

        await eventually(all_sent, what="every event sent")
        assert set(fake_stripe.meter_events) == {r for r, _ in requests}
        # Leases: no row was sent by both replicas (Stripe would have refused the second as a duplicate).
        assert fake_stripe.meter_duplicates == []
        assert {r["duplicate"] for r in await a.outbox("inv")} == {False}
        assert await a.audits() == []
    finally:
        await a.stop()
        await b.stop()
