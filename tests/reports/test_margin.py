"""Margin reports add up, to the smallest unit, to what the usage records say.

Method: real requests through a gateway (the official ``openai`` SDK against the mock upstream, whose
provider costs come from genai-prices) for several customers, features and models, on a gateway that
prices ``gpt-4o-mini`` below its provider cost and serves one model genai-prices does not know. Then
``GET /admin/v1/reports/margin`` for every grouping, as JSON and as CSV, and every figure is compared
with sums recomputed here, independently, from the usage records read back through the admin API.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from metergate.wallet.models import UsageRecord
from tests.conftest import DEFAULT_PRICING, LIVE_ADMIN_KEY, Gateway, Upstream, start_gateway

# gpt-4o-mini costs $0.15 / $0.60 per million input / output tokens (genai-prices): priced here at a loss.
# "house-model" has no provider price anywhere, so its cost is unknown.
LOSSY_PRICING: dict[str, Any] = {"asset": "USD", "models": {
    **DEFAULT_PRICING["models"],  # type: ignore[dict-item]
    "gpt-4o-mini": {"input_per_mtok": "0.05", "output_per_mtok": "0.10"},
    "house-model": {"input_per_mtok": "1.00", "output_per_mtok": "2.00"},
}}
CUSTOMERS = ("acme", "globex", "initech")
GROUPINGS = ("customer", "feature", "model", "day", "week", "month")
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01
NANOS_PER_MICRO = 1000  # USD has scale 6; provider costs have scale 9


@pytest.fixture
async def lossy(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'margin.db'}", pricing=LOSSY_PRICING)
    yield gw
    await gw.close()
    await runner.cleanup()


def _ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def _traffic(gw: Gateway) -> None:
    """Requests of every kind the report must add up: profit, loss, unknown cost, failure, stream."""
    for customer in CUSTOMERS:
        await gw.customer(customer, funds=50_000_000)
    acme, globex, initech = (gw.openai(c) for c in CUSTOMERS)
    chat = {"X-Metergate-Feature": "chat"}
    search = {"X-Metergate-Feature": "search"}
    await acme.chat.completions.create(model="gpt-4o", messages=_ask("Price our wallets."), max_tokens=40,
                                       extra_headers=chat)
    await acme.chat.completions.create(model="gpt-4o", messages=_ask("Summarise the ledger."), max_tokens=30,
                                       extra_headers={**search, "X-Mock-Behavior": "words:25"})
    await acme.chat.completions.create(model="gpt-4o-mini", messages=_ask("Be brief."), max_tokens=20)
    stream = await acme.chat.completions.create(model="gpt-4o", messages=_ask("Stream it."), max_tokens=20,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_headers=chat)
    async for _ in stream:
        pass
    for words in (30, 45, 60):
        await globex.chat.completions.create(model="gpt-4o-mini", messages=_ask("Explain holds " * 20),
                                             max_tokens=80, extra_headers={**chat, "X-Mock-Behavior": f"words:{words}"})
    await globex.embeddings.create(model="text-embedding-3-small", input="metered embeddings", extra_headers=search)
    await initech.chat.completions.create(model="house-model", messages=_ask("In house."), max_tokens=25,
                                          extra_headers=chat)
    await initech.chat.completions.create(model="gpt-4o", messages=_ask("And outside."), max_tokens=25)
    with pytest.raises(openai.InternalServerError):
        await initech.chat.completions.create(model="gpt-4o", messages=_ask("Fail."), max_tokens=25,
                                              extra_headers={"X-Mock-Behavior": "error:500"})


async def _records(gw: Gateway) -> list[dict[str, Any]]:
    records = [r for c in CUSTOMERS for r in await gw.usage(c)]
    assert all(r["price_amount"] == r["charged_amount"] for r in records), "every wallet could pay in full"
    return records


def _day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).date()


def _iso_week(ms: int) -> str:
    year, week, _ = _day(ms).isocalendar()
    return f"{year}-W{week:02d}"


KEYS: dict[str, Callable[[dict[str, Any]], str]] = {
    "customer": lambda r: r["customer_id"],
    "feature": lambda r: r["feature"] or "",
    "model": lambda r: r["model"],
    "day": lambda r: _day(r["created_at_ms"]).isoformat(),
    "week": lambda r: _iso_week(r["created_at_ms"]),
    "month": lambda r: _day(r["created_at_ms"]).strftime("%Y-%m"),
    "total": lambda r: "",
}


def expected(records: list[dict[str, Any]], grouping: str) -> dict[str, dict[str, int]]:
    """Per group: the report's integer figures, recomputed from the usage records."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        g = out.setdefault(KEYS[grouping](r), dict.fromkeys(
            ("requests", "charged", "price", "written_off", "revenue_nanos", "cost_nanos", "margin_nanos",
             "unknown_cost_requests", "unknown_cost_charged", "no_usage_requests"), 0))
        g["requests"] += 1
        g["charged"] += r["charged_amount"]
        g["price"] += r["price_amount"]
        g["written_off"] += r["written_off_amount"]
        if r["cost_nanos"] is not None:
            g["revenue_nanos"] += r["price_amount"] * NANOS_PER_MICRO
            g["cost_nanos"] += r["cost_nanos"]
            g["margin_nanos"] += r["price_amount"] * NANOS_PER_MICRO - r["cost_nanos"]
        elif r["usage_source"] == "none":
            g["no_usage_requests"] += 1
        else:
            g["unknown_cost_requests"] += 1
            g["unknown_cost_charged"] += r["charged_amount"]
    return out


def _figures(row: dict[str, Any]) -> dict[str, int]:
    return {"requests": row["requests"], "charged": row["charged"], "price": row["price"],
            "written_off": row["written_off"], "revenue_nanos": row["revenue_nanos"],
            "cost_nanos": row["cost_nanos"], "margin_nanos": row["margin_nanos"],
            "unknown_cost_requests": row["unknown_cost"]["requests"],
            "unknown_cost_charged": row["unknown_cost"]["charged"], "no_usage_requests": row["no_usage_requests"]}


def _csv_figures(row: dict[str, str]) -> dict[str, int]:
    return {name: int(row[name]) for name in (
        "requests", "charged", "price", "written_off", "revenue_nanos", "cost_nanos", "margin_nanos",
        "unknown_cost_requests", "unknown_cost_charged", "no_usage_requests")}


async def _report(gw: Gateway, group_by: str, fmt: str = "json", **params: Any) -> httpx.Response:
    r = await gw.admin.get("/reports/margin", params={"group_by": group_by, "format": fmt, "from": "2000-01-01",
                                                        "to": FAR_FUTURE_MS, **params})
    assert r.status_code == 200, r.text
    return r


# ------------------------------------------------------------------------------------------ the sums


async def test_margin_per_group_equals_price_minus_cost_over_the_usage_records(lossy: Gateway) -> None:
    await _traffic(lossy)
    records = await _records(lossy)
    assert {r["model"] for r in records} == {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "house-model"}
    assert any(r["cost_nanos"] is None and r["usage_source"] != "none" for r in records), "an unknown cost"
    assert any(r["usage_source"] == "none" for r in records), "a request that used nothing"
    total = expected(records, "total")[""]
    assert total["margin_nanos"] == (sum(r["price_amount"] for r in records if r["cost_nanos"] is not None)
                                     * NANOS_PER_MICRO - sum(r["cost_nanos"] or 0 for r in records))
    for grouping in GROUPINGS:
        body = (await _report(lossy, grouping)).json()
        assert body["group_by"] == grouping and body["mode"] == "test" and body["truncated"] is False
        got = {row["key"]: _figures(row) for row in body["data"]}
        assert got == expected(records, grouping), grouping
        [totals] = body["totals"]
        assert totals["asset"] == "USD" and _figures(totals) == total, grouping
        for row in body["data"]:
            assert row["margin_nanos"] == row["revenue_nanos"] - row["cost_nanos"]
            assert row["negative_margin"] is (row["margin_nanos"] < 0)
            assert row["margin_basis"] == "usd"
        if grouping in ("day", "week", "month"):
            assert all(row["period_start"] < row["period_end"] for row in body["data"])


async def test_negative_margin_customers_and_models_are_flagged(lossy: Gateway) -> None:
    await _traffic(lossy)
    records = await _records(lossy)
    body = (await _report(lossy, "customer")).json()
    by_model = expected(records, "model")
    assert by_model["gpt-4o-mini"]["margin_nanos"] < 0 < by_model["gpt-4o"]["margin_nanos"]
    # A few-token embedding prices below one micro-dollar and rounds to nothing, so it may lose too.
    assert body["negative_margin"]["models"] == sorted(m for m, g in by_model.items() if g["margin_nanos"] < 0)
    assert "gpt-4o-mini" in body["negative_margin"]["models"]
    by_customer = expected(records, "customer")
    assert by_customer["globex"]["margin_nanos"] < 0 < by_customer["acme"]["margin_nanos"]
    losing = sorted(c for c, g in by_customer.items() if g["margin_nanos"] < 0)
    assert body["negative_margin"]["customers"] == losing == ["globex"]
    assert {row["key"] for row in body["data"] if row["negative_margin"]} == {"globex"}


async def test_csv_totals_equal_json_totals(lossy: Gateway) -> None:
    await _traffic(lossy)
    for grouping in GROUPINGS:
        body = (await _report(lossy, grouping)).json()
        r = await _report(lossy, grouping, "csv")
        assert r.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in r.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        groups = [row for row in rows if row["row_type"] == "group"]
        [total] = [row for row in rows if row["row_type"] == "total"]
        assert _csv_figures(total) == _figures(body["totals"][0])
        assert {row["key"]: _csv_figures(row) for row in groups} == {
            row["key"]: _figures(row) for row in body["data"]}
        for name in ("charged", "revenue_nanos", "cost_nanos", "margin_nanos", "unknown_cost_requests"):
            assert sum(int(row[name]) for row in groups) == int(total[name]), (grouping, name)


# ------------------------------------------------------------------------------------------ periods


def _seeded(customer: str, at: dt.datetime, index: int, *, price: int, cost: int | None) -> UsageRecord:
    return UsageRecord(
        id=f"req_seed{index}", mode="test", customer_id=customer, hold_id=f"hold_seed{index}", route="/openai",
        endpoint="chat.completions", model="gpt-4o", feature=None, stream=False, status_code=200,
        usage_source="provider", tokens_input=10, tokens_cached_input=0, tokens_output=10, tokens_reasoning=0,
        asset="USD", price_amount=price, cost_nanos=cost, created_at_ms=int(at.timestamp() * 1000))


async def test_days_add_up_into_iso_weeks_and_calendar_months(gateway: Gateway) -> None:
    # History written through the wallet store (the pipeline stamps "now"); the report is read over HTTP.
    await gateway.customer("acme", funds=10_000_000)
    moments = [dt.datetime(2024, 12, 30, 0, 0, tzinfo=dt.UTC),  # a Monday: ISO week 2025-W01, December
               dt.datetime(2025, 1, 5, 23, 59, 59, tzinfo=dt.UTC),  # the Sunday of that week, January
               dt.datetime(2025, 1, 6, 0, 0, tzinfo=dt.UTC),  # the next Monday: 2025-W02
               dt.datetime(2025, 2, 1, 12, 0, tzinfo=dt.UTC)]
    for i, at in enumerate(moments):
        hold, _ = await gateway.store.reserve("test", "acme", "USD", 1000, hold_id=f"hold_seed{i}", ttl_ms=60_000)
        await gateway.store.settle(hold.id, 100 + i, _seeded("acme", at, i, price=100 + i,
                                                            cost=None if i == 3 else 50_000 + i))
    params = {"from": "2024-12-01", "to": "2025-03-01T00:00:00Z"}
    weeks = (await _report(gateway, "week", **params)).json()["data"]
    assert [(w["key"], w["requests"], w["margin_nanos"]) for w in weeks] == [
        ("2025-W01", 2, 100_000 + 101_000 - 50_000 - 50_001), ("2025-W02", 1, 102_000 - 50_002),
        ("2025-W05", 1, 0)]
    assert (weeks[0]["period_start"], weeks[0]["period_end"]) == ("2024-12-30T00:00:00.000Z",
                                                                  "2025-01-06T00:00:00.000Z")
    assert weeks[2]["unknown_cost"] == {"requests": 1, "charged": 103}
    months = (await _report(gateway, "month", **params)).json()["data"]
    assert [(m["key"], m["requests"], m["charged"]) for m in months] == [
        ("2024-12", 1, 100), ("2025-01", 2, 101 + 102), ("2025-02", 1, 103)]
    narrow = (await _report(gateway, "day", **{"from": "2025-01-05", "to": "2025-01-06"})).json()
    assert [d["key"] for d in narrow["data"]] == ["2025-01-05"]  # "to" is exclusive


# ------------------------------------------------------------------------------------------ scope and input


async def test_the_report_is_scoped_to_the_admin_keys_mode(lossy: Gateway) -> None:
    await _traffic(lossy)
    async with httpx.AsyncClient(base_url=lossy.admin.base_url,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        r = await live.get("/reports/margin", params={"group_by": "customer", "from": "2000-01-01"})
    assert r.status_code == 200 and r.json()["mode"] == "live"
    assert r.json()["data"] == [] and r.json()["totals"] == []
    async with httpx.AsyncClient(base_url=lossy.admin.base_url) as anonymous:
        r = await anonymous.get("/reports/margin")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"


@pytest.mark.parametrize(("params", "param"), [
    ({"group_by": "planet"}, "group_by"),
    ({"format": "xml"}, "format"),
    ({"from": "yesterday"}, "from"),
    ({"to": "2025-13-01"}, "to"),
    ({"from": "2025-02-01", "to": "2025-01-01"}, "from"),
])
async def test_bad_report_parameters_are_refused_by_name(gateway: Gateway, params: dict[str, str],
                                                         param: str) -> None:
    r = await gateway.admin.get("/reports/margin", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["param"] == param


async def test_an_asset_other_than_usd_reports_revenue_but_no_margin(upstream: Upstream, tmp_path: Path) -> None:
    credits = {"asset": "CREDITS", "models": {"gpt-4o": {"input_per_mtok": "5000", "output_per_mtok": "20000"}}}
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'credits.db'}", pricing=credits,
                                     assets=[{"code": "USD", "scale": 6}, {"code": "CREDITS", "scale": 3}])
    try:
        await gw.admin.post("/customers", json={"id": "acme"})
        r = await gw.admin.post("/customers/acme/credits",
                                json={"amount": 10**9, "asset": "CREDITS", "idempotency_key": "seed"})
        assert r.status_code == 201, r.text
        await gw.openai("acme").chat.completions.create(model="gpt-4o", messages=_ask("hi"), max_tokens=10)
        [record] = await gw.usage("acme")
        [total] = (await _report(gw, "customer")).json()["totals"]
        assert (total["asset"], total["charged"], total["cost_nanos"]) == (
            "CREDITS", record["charged_amount"], record["cost_nanos"])
        assert record["cost_nanos"] > 0
        assert (total["revenue_nanos"], total["margin_nanos"], total["margin_basis"]) == (None, None, "not_usd")
        assert total["negative_margin"] is False
    finally:
        await gw.close()
        await runner.cleanup()


async def test_an_asset_valued_in_dollars_reports_margin_at_that_value(upstream: Upstream, tmp_path: Path) -> None:
    """CREDITS worth $0.001 each, scale 3: one smallest unit is $0.000001, i.e. 1,000 nano-dollars; a
    fractional value rounds half-up once per row."""
    credits = {"asset": "CREDITS", "models": {"gpt-4o": {"input_per_mtok": "5000", "output_per_mtok": "20000"}}}
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'valued.db'}", pricing=credits, assets=[
        {"code": "USD", "scale": 6},
        {"code": "CREDITS", "scale": 3, "value_per_unit": "0.001", "value_currency": "USD"}])
    try:
        await gw.admin.post("/customers", json={"id": "acme"})
        r = await gw.admin.post("/customers/acme/credits",
                                json={"amount": 10**9, "asset": "CREDITS", "idempotency_key": "seed"})
        assert r.status_code == 201, r.text
        await gw.openai("acme").chat.completions.create(model="gpt-4o", messages=_ask("hi"), max_tokens=10)
        [record] = await gw.usage("acme")
        [total] = (await _report(gw, "customer")).json()["totals"]
        revenue = record["charged_amount"] * 1_000
        assert (total["asset"], total["revenue_nanos"], total["cost_nanos"]) == ("CREDITS", revenue,
                                                                                 record["cost_nanos"])
        assert (total["margin_nanos"], total["margin_basis"]) == (revenue - record["cost_nanos"], "valued")
    finally:
        await gw.close()
        await runner.cleanup()


def test_valuations_convert_exactly_or_round_half_up_once() -> None:
    from decimal import Decimal

    from metergate.reports.margin import margin_row, valuations
    from metergate.wallet.models import UsageAggregate

    values = valuations([("USD", 6, None, None), ("GPU_SECONDS", 0, "0.0000025", "USD"),
                         ("MILLITOKENS", 3, "0.0000000025", "USD"), ("EUR_CREDITS", 2, "1.10", "EUR"),
                         ("TOKENS", 0, None, None)])
    # $0.0000025 a GPU-second is 2,500 nano-dollars; 0.0000000025 per 1,000 smallest units is 0.0025 each.
    assert values == {"USD": Decimal(1000), "GPU_SECONDS": Decimal(2500), "MILLITOKENS": Decimal("0.0025")}

    def row(asset: str, charged: int) -> tuple[int | None, str]:
        agg = UsageAggregate("", asset, 1, charged, charged, 0, charged, 1, 0, 0, 0)
        r = margin_row(agg, values)
        return r.revenue_nanos, r.margin_basis

    assert row("USD", 7) == (7_000, "usd")
    assert row("GPU_SECONDS", 3) == (7_500, "valued")
    assert row("MILLITOKENS", 1_000) == (3, "valued")  # 2.5 nano-dollars, half-up: 3
    assert row("MILLITOKENS", 600) == (2, "valued")  # 1.5 -> 2
    assert row("MILLITOKENS", 200) == (1, "valued")  # 0.5 -> 1
    assert row("TOKENS", 5) == (None, "not_usd")
