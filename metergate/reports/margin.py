"""Margin: what wallets were charged (revenue), what the provider cost, and the difference, per group.

Exact by construction. The database sums integers (``WalletStore.usage_summary``); this module only
converts units by multiplying by a power of ten and adds and subtracts integers, so every figure is
exact to the smallest unit and the rows of a grouping add up to its total.

Units. Revenue is ``charged_amount`` in the pricing asset's smallest unit. Provider cost is in
nano-dollars (:data:`metergate.money.COST_SCALE`). An asset coded ``USD`` with a scale of at most 9 is
converted to nano-dollars by multiplying by ``10**(9 - scale)`` (×1000 for micro-dollars), exactly; margin
is then ``margin_nanos = revenue_nanos - cost_nanos``. Another asset (credits, tokens, GPU-seconds) is
converted only if the operator gave it a value in US dollars (``value_per_unit`` with ``value_currency:
USD``, per major unit, in settings or through the admin API): ``revenue_nanos`` is then its charged amount
times that value, rounded half-up to the nano-dollar once per row (``margin_basis: "valued"``; a row's
rounding can make rows differ from their total by under a nano-dollar each). Any other asset has no
exchange rate to dollars, so its revenue is reported in its own smallest unit and its ``revenue_nanos`` and
``margin_nanos`` are ``null`` (``margin_basis: "not_usd"``) — never guessed.

Unknown cost. A record whose cost is unknown (a model with no price in genai-prices or the overrides)
is counted in ``unknown_cost_requests`` / ``unknown_cost_charged`` and left out of ``revenue_nanos``,
``cost_nanos`` and ``margin_nanos``: it is never treated as free. A request that used nothing (refused
or failed upstream before any output) is counted in ``no_usage_requests``; it was charged nothing.

Periods are UTC calendar days, ISO weeks (Monday to Monday, keyed ``YYYY-Www``) and months, built by
adding up the days; a period cut by the report's range holds only the records inside the range.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal, get_args

from metergate.money import COST_SCALE
from metergate.wallet.models import Mode, UsageAggregate, UsageGrouping
from metergate.wallet.store import WalletStore

Grouping = Literal["customer", "feature", "model", "day", "week", "month", "budget_node"]
GROUPINGS: tuple[str, ...] = get_args(Grouping)
MAX_GROUPS = 10_000  # rows per report; beyond it the rows are cut (``truncated``), the totals never are
_DAY_MS = 86_400_000
# What the database groups by: periods longer than a day are added up from days here.
_STORED: dict[str, UsageGrouping] = {"customer": "customer", "feature": "feature", "model": "model", "day": "day",
                                     "week": "day", "month": "day", "budget_node": "budget_node"}
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class MarginRow:
    """One group's figures in one asset; see the module docstring for units and the unknown-cost rule."""

    key: str  # customer id, feature ("" for none), model, period key, or "" for a total
    asset: str
    requests: int
    charged: int  # every record, asset's smallest unit
    price: int  # what the usage was worth under the price table (charged + written off)
    written_off: int
    revenue_nanos: int | None  # charged over the records whose cost is known; None: asset not USD
    cost_nanos: int  # over the records whose cost is known
    margin_nanos: int | None
    unknown_cost_requests: int
    unknown_cost_charged: int
    no_usage_requests: int
    period_start_ms: int | None = None
    period_end_ms: int | None = None

    @property
    def negative(self) -> bool:
        return self.margin_nanos is not None and self.margin_nanos < 0

    valued: bool = False  # revenue converted at an operator-given value, not USD itself

    @property
    def margin_basis(self) -> str:
        if self.margin_nanos is None:
            return "not_usd"
        return "valued" if self.valued else "usd"


@dataclass(frozen=True, slots=True)
class MarginReport:
    mode: Mode
    group_by: Grouping
    from_ms: int
    to_ms: int
    rows: list[MarginRow]
    totals: list[MarginRow]  # one per asset
    negative_customers: list[MarginRow]  # customers at negative margin over the range
    negative_models: list[MarginRow]
    truncated: bool


Valuations = Mapping[str, Decimal]  # asset code -> nano-dollars per smallest unit


def valuations(assets: Iterable[tuple[str, int, str | None, str | None]]) -> dict[str, Decimal]:
    """Nano-dollars per smallest unit of each asset that has a dollar value, from ``(code, scale,
    value_per_unit, value_currency)``: USD itself (scale at most 9), and any asset valued in USD."""
    out: dict[str, Decimal] = {}
    for code, scale, value, currency in assets:
        if code.upper() == "USD" and scale <= COST_SCALE:
            out[code] = Decimal(10) ** (COST_SCALE - scale)
        elif value is not None and (currency or "").upper() == "USD":
            out[code] = Decimal(value) * Decimal(10) ** COST_SCALE / Decimal(10) ** scale
    return out


async def valuations_for(mode: Mode, configured: Sequence[Any], registry: Any | None) -> dict[str, Decimal]:
    """The mode's valuations from its assets (``code``, ``scale``, ``value_per_unit``, ``value_currency``):
    the registry's (settings' and the operator's, :class:`metergate.wallet.assets.AssetRegistry`), else the
    configured ones."""
    assets = await registry.all(mode) if registry is not None else configured
    return valuations((a.code, a.scale, None if a.value_per_unit is None else str(a.value_per_unit), a.value_currency)
                      for a in assets)


def nanos_per_unit(asset: str, values: Valuations) -> Decimal | None:
    """What one smallest unit of ``asset`` is in nano-dollars, or ``None`` without a conversion."""
    return values.get(asset)


def _nanos(amount: int, rate: Decimal) -> int:
    return int((amount * rate).to_integral_value(rounding=ROUND_HALF_UP))


def margin_row(agg: UsageAggregate, values: Valuations, *, key: str | None = None,
               period: tuple[int, int] | None = None) -> MarginRow:
    factor = nanos_per_unit(agg.asset, values)
    revenue = _nanos(agg.costed_charged, factor) if factor is not None else None
    return MarginRow(
        key=agg.key if key is None else key, asset=agg.asset, requests=agg.requests, charged=agg.charged_amount,
        price=agg.price_amount, written_off=agg.written_off_amount, revenue_nanos=revenue,
        cost_nanos=agg.cost_nanos, margin_nanos=revenue - agg.cost_nanos if revenue is not None else None,
        unknown_cost_requests=agg.cost_unknown_count, unknown_cost_charged=agg.unmargined_charged,
        no_usage_requests=agg.no_usage_count,
        period_start_ms=period[0] if period else None, period_end_ms=period[1] if period else None,
        valued=factor is not None and agg.asset.upper() != "USD")


def period_of(day: int, grouping: Grouping) -> tuple[str, int, int]:
    """The key and ``[start, end)`` in epoch milliseconds of the period holding UTC day number ``day``."""
    date = _EPOCH + dt.timedelta(days=day)
    if grouping == "day":
        start, end = date, date + dt.timedelta(days=1)
        key = date.isoformat()
    elif grouping == "week":
        start = date - dt.timedelta(days=date.weekday())
        end = start + dt.timedelta(days=7)
        year, week, _ = date.isocalendar()
        key = f"{year}-W{week:02d}"
    elif grouping == "month":
        start = date.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        key = f"{date.year}-{date.month:02d}"
    else:
        raise ValueError(f"{grouping!r} is not a period")
    return key, (start - _EPOCH).days * _DAY_MS, (end - _EPOCH).days * _DAY_MS


def _add(a: UsageAggregate, b: UsageAggregate) -> UsageAggregate:
    sums = {f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(UsageAggregate)
            if f.name not in ("key", "asset")}
    return UsageAggregate(key=a.key, asset=a.asset, **sums)


def roll_up(days: Iterable[UsageAggregate], grouping: Grouping, scales: Valuations) -> list[MarginRow]:
    """Add day aggregates (keyed by UTC day number) up into ``grouping`` periods, in time order."""
    buckets: dict[tuple[str, str], tuple[UsageAggregate, int, int]] = {}
    for agg in days:
        key, start, end = period_of(int(agg.key), grouping)
        held = buckets.get((key, agg.asset))
        buckets[(key, agg.asset)] = (_add(held[0], agg) if held else agg, start, end)
    return [margin_row(agg, scales, key=key, period=(start, end))
            for (key, _asset), (agg, start, end) in sorted(buckets.items(), key=lambda item: (item[1][1], item[0]))]


async def margin_report(store: WalletStore, mode: Mode, group_by: Grouping, *, from_ms: int, to_ms: int,
                        scales: Valuations) -> MarginReport:
    """The report over ``from_ms <= created_at_ms < to_ms``: rows, totals and negative-margin flags."""
    async def summary(grouping: UsageGrouping) -> list[UsageAggregate]:
        return await store.usage_summary(mode, group_by=grouping, from_ms=from_ms, to_ms=to_ms,
                                         limit=MAX_GROUPS + 1)

    periodic = _STORED[group_by] == "day"
    aggs = await summary(_STORED[group_by])
    truncated = len(aggs) > MAX_GROUPS
    aggs = aggs[:MAX_GROUPS]
    rows = roll_up(aggs, group_by, scales) if periodic else [margin_row(a, scales) for a in aggs]
    totals = [margin_row(a, scales) for a in await summary("total")]
    customers = rows if group_by == "customer" else [margin_row(a, scales) for a in await summary("customer")]
    models = rows if group_by == "model" else [margin_row(a, scales) for a in await summary("model")]
    return MarginReport(mode=mode, group_by=group_by, from_ms=from_ms, to_ms=to_ms, rows=rows, totals=totals,
                        negative_customers=[r for r in customers if r.negative],
                        negative_models=[r for r in models if r.negative], truncated=truncated)


# ---------------------------------------------------------------------------------- rendering

def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_json(row: MarginRow) -> dict[str, object]:
    out: dict[str, object] = {
        "key": row.key, "asset": row.asset, "requests": row.requests, "charged": row.charged, "price": row.price,
        "written_off": row.written_off, "revenue_nanos": row.revenue_nanos, "cost_nanos": row.cost_nanos,
        "margin_nanos": row.margin_nanos, "margin_basis": row.margin_basis, "negative_margin": row.negative,
        "unknown_cost": {"requests": row.unknown_cost_requests, "charged": row.unknown_cost_charged},
        "no_usage_requests": row.no_usage_requests,
    }
    if row.period_start_ms is not None and row.period_end_ms is not None:
        out["period_start"] = iso_ms(row.period_start_ms)
        out["period_end"] = iso_ms(row.period_end_ms)
    return out


def report_json(report: MarginReport) -> dict[str, object]:
    return {
        "object": "margin_report", "mode": report.mode, "group_by": report.group_by,
        "from": iso_ms(report.from_ms), "to": iso_ms(report.to_ms), "from_ms": report.from_ms,
        "to_ms": report.to_ms,
        "units": {"charged": "pricing asset's smallest unit", "nanos": "1e-9 US dollar"},
        "data": [row_json(r) for r in report.rows],
        "totals": [row_json(r) for r in report.totals],
        "negative_margin": {"customers": [r.key for r in report.negative_customers],
                            "models": [r.key for r in report.negative_models]},
        "truncated": report.truncated,
    }


CSV_COLUMNS = ("row_type", "group_by", "key", "period_start", "period_end", "asset", "requests", "charged",
               "price", "written_off", "revenue_nanos", "cost_nanos", "margin_nanos", "margin_basis",
               "unknown_cost_requests", "unknown_cost_charged", "no_usage_requests", "negative_margin")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # A customer, feature or model name comes from clients: never let a spreadsheet run it as a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not isinstance(value, int) else text


def report_csv(report: MarginReport) -> str:
    """One line per group, then one ``total`` line per asset; empty cells are nulls."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row_type, rows in (("group", report.rows), ("total", report.totals)):
        for r in rows:
            period = (iso_ms(r.period_start_ms) if r.period_start_ms is not None else None,
                      iso_ms(r.period_end_ms) if r.period_end_ms is not None else None)
            writer.writerow([_cell(v) for v in (
                row_type, report.group_by, r.key, *period, r.asset, r.requests, r.charged, r.price,
                r.written_off, r.revenue_nanos, r.cost_nanos, r.margin_nanos, r.margin_basis,
                r.unknown_cost_requests, r.unknown_cost_charged, r.no_usage_requests, r.negative)])
    return out.getvalue()
