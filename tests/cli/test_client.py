"""The Python client against a real ``metergate serve``: jobs held, captured and released; exact money; every
typed error raised from a real answer of the server.

Method: one ``metergate serve`` subprocess per module (SQLite), each test with its own customers; the proxy's
own answers (402, 403, 429, 502) are read with ``error_from_response`` from real proxy requests.
"""

from __future__ import annotations

from decimal import Decimal

import httpx2 as httpx
import pytest

import metergate_client as mg
from metergate_client import Client
from tests.cli.server import MeterServer
from tests.conftest import ADMIN_KEY, free_port


def gpu_customer(client: Client, customer: str, seconds: str) -> None:
    client.create_customer(customer)
    client.create_grant(customer, seconds, asset="GPU_SECONDS", idempotency_key=f"pack-{customer}")


def gpu(client: Client, customer: str) -> mg.Balance:
    [balance] = [b for b in client.balances(customer) if b.asset == "GPU_SECONDS"]
    return balance


# ---------------------------------------------------------------------- client.hold


def test_a_gpu_job_driven_by_client_hold_stops_at_zero(client: Client) -> None:
    gpu_customer(client, "trainer", "10")
    steps = []
    with client.hold("trainer", estimate="3", asset="GPU_SECONDS", ttl_s=60) as job:
        while True:
            step = min(Decimal(3), job.allowance)  # the job keeps to its allowance
            steps.append(step)
            if job.heartbeat(step).stop:
                break
    assert steps == [Decimal(3), Decimal(3), Decimal(3), Decimal("1.000")]
    assert (job.used, job.stopped) == (Decimal(10), True)
    assert (job.hold.state, job.hold.captured_minor, job.hold.pending_minor) == ("captured", 10_000, 0)
    assert (gpu(client, "trainer").available, gpu(client, "trainer").pending_minor) == (Decimal("0.000"), 0)


def test_a_job_asked_to_raise_raises_insufficient_funds_with_a_portal_link_at_zero(client: Client) -> None:
    gpu_customer(client, "raiser", "2")
    with pytest.raises(mg.InsufficientFunds) as refused, \
            client.hold("raiser", estimate="2", asset="GPU_SECONDS", on_stop="raise") as job:
        job.heartbeat(2)
    assert refused.value.portal_url is not None and refused.value.portal_url.startswith("http://127.0.0.1")
    assert gpu(client, "raiser").available_minor == 0


def test_a_crash_inside_the_with_block_releases_the_hold(client: Client) -> None:
    gpu_customer(client, "crasher", "10")
    with pytest.raises(RuntimeError, match="CUDA out of memory"), \
            client.hold("crasher", estimate="4", asset="GPU_SECONDS") as job:
        job.heartbeat("1.5")
        job.add("0.25")  # used, not yet reported: captured on the way out
        assert gpu(client, "crasher").pending_minor == 4_000
        raise RuntimeError("CUDA out of memory")
    hold = client.get_hold(job.hold.id)
    assert (hold.state, hold.captured_minor, hold.pending_minor) == ("captured", 1_750, 0)
    assert (gpu(client, "crasher").available, gpu(client, "crasher").pending_minor) == (Decimal("8.250"), 0)


def test_a_crash_before_any_usage_voids_the_hold_and_charges_nothing(client: Client) -> None:
    gpu_customer(client, "early", "5")
    with pytest.raises(KeyboardInterrupt), client.hold("early", estimate="5", asset="GPU_SECONDS") as job:
        raise KeyboardInterrupt
    assert client.get_hold(job.hold.id).state == "voided"
    assert (gpu(client, "early").available, gpu(client, "early").pending_minor) == (Decimal("5.000"), 0)


def test_a_job_the_wallet_cannot_cover_is_refused_with_insufficient_funds_and_a_portal_link(client: Client) -> None:
    gpu_customer(client, "poor", "1")
    with pytest.raises(mg.InsufficientFunds) as refused, client.hold("poor", estimate="2", asset="GPU_SECONDS"):
        raise AssertionError("the block never runs")
    assert (refused.value.status, refused.value.code) == (402, "insufficient_funds")
    assert refused.value.portal_url is not None
    assert httpx.get(refused.value.portal_url).status_code == 200  # the customer's top-up page opens


def test_a_heartbeat_retried_with_its_key_bills_once(client: Client) -> None:
    gpu_customer(client, "replay", "10")
    hold = client.create_hold("replay", "2", asset="GPU_SECONDS", idempotency_key="replay-job")
    again = client.create_hold("replay", "2", asset="GPU_SECONDS", idempotency_key="replay-job")
    assert again.id == hold.id
    first = client.heartbeat(hold.id, used="1", next_amount="2", idempotency_key="beat-1")
    second = client.heartbeat(hold.id, used="1", next_amount="2", idempotency_key="beat-1")
    assert first.raw == second.raw
    client.void_hold(hold.id)
    assert gpu(client, "replay").available == Decimal("9.000")


# ---------------------------------------------------------------------- money, quotes, preflight


def test_credit_is_exact_and_idempotent(client: Client) -> None:
    client.create_customer("payer", "Payer Inc")
    first = client.credit("payer", Decimal("12.345678"), idempotency_key="invoice-7")
    replay = client.credit("payer", "12.345678", idempotency_key="invoice-7")
    assert first.entry.seq == replay.entry.seq
    customer = client.get_customer("payer")
    assert [(b.asset, b.available, b.available_minor) for b in customer.balances] == \
        [("USD", Decimal("12.345678"), 12_345_678)]
    assert [e.amount for e in client.ledger("payer").data] == [Decimal("12.345678")]
    with pytest.raises(TypeError, match="not float"):
        client.credit("payer", 0.1)  # type: ignore[arg-type]


def test_quote_and_preflight_price_without_holding_anything(client: Client) -> None:
    client.create_customer("asker")
    client.credit("asker", "0.000500", idempotency_key="seed-asker")
    quote = client.quote("asker", model="gpt-4o-mini", usage={"input_tokens": 1000, "output_tokens": 500})
    assert (quote.asset, quote.amount, quote.amount_minor) == ("USD", Decimal("0.000900"), 900)
    verdict = client.preflight("asker", model="gpt-4o-mini", usage={"input_tokens": 1000, "output_tokens": 500})
    assert (verdict.allowed, verdict.available, verdict.shortfall) == (False, Decimal("0.000500"),
                                                                      Decimal("0.000400"))
    small = client.preflight("asker", type="api.call", quantities={"quantity": 3})
    assert (small.allowed, small.quote.asset, small.quote.amount) == (False, "CALLS", Decimal(3))
    [usd] = client.balances("asker")
    assert (usd.available_minor, usd.pending_minor) == (500, 0)


# ---------------------------------------------------------------------- typed errors from real answers


def test_every_admin_error_type_comes_from_a_real_answer(server: MeterServer, client: Client) -> None:
    with Client(server.url, "mg_test_" + "x" * 24) as wrong, pytest.raises(mg.AuthenticationFailed) as bad_key:
        wrong.list_customers()
    assert (bad_key.value.status, bad_key.value.code) == (401, "invalid_admin_key")
    with pytest.raises(mg.NotFound) as missing:
        client.get_customer("nobody")
    assert missing.value.code == "customer_not_found"
    client.create_customer("twice")
    with pytest.raises(mg.Conflict) as exists:
        client.create_customer("twice")
    assert exists.value.code == "already_exists" and not isinstance(exists.value, mg.IdempotencyConflict)
    client.credit("twice", "1", idempotency_key="same")
    with pytest.raises(mg.IdempotencyConflict) as conflict:
        client.credit("twice", "2", idempotency_key="same")
    assert (conflict.value.status, conflict.value.param) == (409, "idempotency_key")
    with pytest.raises(mg.InvalidRequest) as invalid:
        client.credit("twice", "0.0000001")  # finer than USD's micro-dollar
    assert (invalid.value.code, invalid.value.param) == ("invalid_amount", "amount_decimal")
    dead = f"http://127.0.0.1:{free_port()}"
    with Client(dead, ADMIN_KEY, retry=mg.RetryPolicy(max_retries=1, backoff_s=0.01)) as gone, \
            pytest.raises(mg.ConnectionFailed, match="cannot reach metergate at"):
        gone.list_customers()


def test_the_proxys_refusals_map_to_typed_errors(server: MeterServer, client: Client) -> None:
    client.create_customer("limited")
    client.credit("limited", "1", idempotency_key="seed-limited")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.put(f"{server.url}/admin/v1/customers/limited/rate-limits", headers=admin,
                  json={"requests_per_minute": 1, "tokens_per_minute": None})
    assert r.status_code == 200, r.text
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    def proxied(customer: str, body: dict[str, object] = chat) -> mg.ApiError:
        answer = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=30,
                            headers={"X-Metergate-Customer": customer, "X-Metergate-Mode": "test"})
        return mg.error_from_response(answer)

    unreachable = proxied("limited")  # admitted (counted), then the upstream's port is closed
    assert isinstance(unreachable, mg.ServerError) and unreachable.code == "upstream_unreachable"
    limited = proxied("limited")
    assert isinstance(limited, mg.RateLimited) and limited.status == 429
    assert limited.retry_after_s is not None and 0 < limited.retry_after_s <= 60
    client.create_customer("broke")
    short = proxied("broke")
    assert isinstance(short, mg.InsufficientFunds) and short.portal_url is not None
    unknown = proxied("stranger")
    assert isinstance(unknown, mg.PermissionDenied) and unknown.code == "unknown_customer"


# ---------------------------------------------------------------------- async


async def test_the_async_client_runs_a_job_and_sends_events(server: MeterServer, client: Client) -> None:
    gpu_customer(client, "agent", "3")
    async with mg.AsyncClient(server.url, ADMIN_KEY) as aclient:
        async with aclient.hold("agent", estimate="1", asset="GPU_SECONDS") as job:
            beats = 0
            while not (await job.heartbeat(min(Decimal(1), job.allowance))).stop:
                beats += 1
        assert (beats, job.used, job.hold.state) == (2, Decimal(3), "captured")
        ids = [await aclient.events.send("agent", "gpu.job", quantities={"gpu_seconds": "0"}) for _ in range(3)]
        await aclient.events.flush()
        assert (aclient.events.tally.accepted, aclient.events.tally.rejected) == (3, [])
        again = await aclient.send_events([{"id": ids[0], "customer_id": "agent", "type": "gpu.job",
                                             "quantities": {"gpu_seconds": "0"}}])
        assert [r.status for r in again] == ["duplicate"]
    assert gpu(client, "agent").available_minor == 0
