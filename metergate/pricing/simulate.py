"""The dry-run simulator: re-price a period's recorded usage under another price version, touching nothing.

Every usage record of the mode with ``from <= created_at < to`` is priced again under the chosen version
(usually a draft) from what it recorded: a proxy request from its attributes (model, endpoint, route, the
route's provider, feature, customer) and its token counts, an event from the quantities and attributes kept
in its ``detail``; cost-plus rules use the recorded provider cost. The old price is the one recorded
(``price_amount``). Results are per customer and asset — a rule that draws another asset moves the new price
to that asset's row — with ``difference = new_total - old_total``, each rounded as the engine rounds (once per
record, half-up), so the totals are sums of integers.

Tiers start from zero at their period's start: the records since the start of the UTC month that contains
``from`` are replayed in order to place each record in its tiers, and only those inside the range are
reported. Records the version cannot price (no rule matches, or a cost-plus rule without a recorded cost) are
counted as ``unpriced`` and kept out of both totals; compute-route records (priced by their route, not by
price versions) as ``skipped``; records without usage price zero under every version (``no_usage``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from metergate.errors import BadRequest
from metergate.metering.usage import Usage
from metergate.money import format_minor
from metergate.pricing.engine import CostUnknown, fold, period_start_ms, price, request_quantities
from metergate.pricing.store import PricingStore
from metergate.pricing.versions import PriceVersion
from metergate.wallet.models import Mode, UsageRecord

MAX_RECORDS = 1_000_000  # per simulation, so that one request cannot keep the control plane busy for long
PAGE = 2_000  # records read and re-priced at a time: memory stays bounded whatever the range


@dataclass
class _Row:
    records: int = 0
    old_total: int = 0
    new_total: int = 0


@dataclass
class _Counts:
    records: int = 0
    repriced: int = 0
    no_usage: int = 0
    unpriced: int = 0
    skipped: int = 0
    unpriced_old_total: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def record_terms(record: UsageRecord, providers: dict[str, str]) -> tuple[dict[str, str], dict[str, Decimal]] | None:
    """The attributes and quantities a record was priced from; ``None`` for records not priced by versions."""
    event = record.detail.get("event") if isinstance(record.detail, dict) else None
    if isinstance(event, dict):
        attributes = {str(k): str(v) for k, v in (event.get("attributes") or {}).items()}
        attributes["type"] = str(event.get("type", ""))
        quantities = {str(k): Decimal(str(v)) for k, v in (event.get("quantities") or {}).items()}
        return attributes, quantities
    if record.endpoint == "compute":
        return None
    attributes = {"type": "request", "model": record.model, "endpoint": record.endpoint, "route": record.route,
                  "provider": providers.get(record.route, "")}
    if record.feature:
        attributes["feature"] = record.feature
    usage = Usage(input_tokens=record.tokens_input, output_tokens=record.tokens_output,
                  cached_input_tokens=record.tokens_cached_input, reasoning_tokens=record.tokens_reasoning,
                  cache_write_tokens=record.tokens_cache_write)
    return attributes, request_quantities(usage)


async def simulate(store: PricingStore, version: PriceVersion, mode: Mode, *, from_ms: int, to_ms: int,
                   scales: dict[str, int], providers: dict[str, str], page_size: int = PAGE) -> dict[str, Any]:
    has_tiers = any(rule.tiers for rule in version.rules.rules)
    load_from = period_start_ms("month", from_ms) if has_tiers else from_ms
    rows: dict[tuple[str, str], _Row] = defaultdict(_Row)
    counts = _Counts()
    counters: dict[tuple[str, str, int], Decimal] = defaultdict(Decimal)  # (customer, counter, period start)
    seen = 0
    after: tuple[int, int] | None = None
    while True:
        page = await store.usage_between(mode, load_from, to_ms, limit=page_size, after=after)
        if not page:
            break
        after = page[-1][0]
        seen += len(page)
        if seen > MAX_RECORDS:
            raise BadRequest(f"The range holds more than {MAX_RECORDS} usage records; simulate a shorter one.",
                             code="range_too_large", param="from")
        _reprice(version, [record for _, record in page], from_ms, providers, scales, rows, counts, counters)
    return _report(version, from_ms, to_ms, rows, counts, scales)


def _reprice(version: PriceVersion, records: list[UsageRecord], from_ms: int, providers: dict[str, str],
             scales: dict[str, int], rows: dict[tuple[str, str], _Row], counts: _Counts,
             counters: dict[tuple[str, str, int], Decimal]) -> None:
    for record in records:
        inside = record.created_at_ms >= from_ms
        if inside:
            counts.records += 1
        terms = record_terms(record, providers)
        if terms is None:
            counts.skipped += inside
            continue
        if record.usage_source == "none":
            if inside:
                counts.no_usage += 1
                rows[(record.customer_id, record.asset)].records += 1
            continue
        attributes, quantities = terms
        attributes["customer"] = record.customer_id
        rule = version.rules.choose(attributes)
        new_price = None
        if rule is not None:
            starts = {t.counter: period_start_ms(t.period, record.created_at_ms) for t in rule.tiers}
            prior = {c: counters[(record.customer_id, c, s)] for c, s in starts.items()}
            try:
                new_price = price(rule, quantities, scale=scales[rule.asset], cost_nanos=record.cost_nanos,
                                  period_prior=prior)
            except CostUnknown:
                new_price = None
            if new_price is not None:
                folded = fold(rule, quantities)
                for tiers in rule.tiers:
                    counters[(record.customer_id, tiers.counter, starts[tiers.counter])] += folded.get(
                        tiers.quantity, Decimal(0))
        if not inside:
            continue
        if new_price is None:
            counts.unpriced += 1
            counts.unpriced_old_total[record.asset] += record.price_amount
            continue
        counts.repriced += 1
        old = rows[(record.customer_id, record.asset)]
        old.records += 1
        old.old_total += record.price_amount
        rows[(record.customer_id, new_price.asset)].new_total += new_price.amount


def _report(version: PriceVersion, from_ms: int, to_ms: int, rows: dict[tuple[str, str], _Row], counts: _Counts,
            scales: dict[str, int]) -> dict[str, Any]:
    def money(asset: str, amount: int) -> str:
        return format_minor(amount, scales.get(asset, 0))

    customers = []
    totals: dict[str, _Row] = defaultdict(_Row)
    for (customer_id, asset), row in sorted(rows.items()):
        diff = row.new_total - row.old_total
        customers.append({"customer_id": customer_id, "asset": asset, "records": row.records,
                          "old_total": row.old_total, "new_total": row.new_total, "difference": diff,
                          "old_total_decimal": money(asset, row.old_total),
                          "new_total_decimal": money(asset, row.new_total), "difference_decimal": money(asset, diff)})
        total = totals[asset]
        total.records += row.records
        total.old_total += row.old_total
        total.new_total += row.new_total
    return {
        "version": version.id, "from_ms": from_ms, "to_ms": to_ms, "customers": customers,
        "totals": [{"asset": asset, "records": t.records, "old_total": t.old_total, "new_total": t.new_total,
                    "difference": t.new_total - t.old_total} for asset, t in sorted(totals.items())],
        "counts": {"records": counts.records, "repriced": counts.repriced, "no_usage": counts.no_usage,
                   "unpriced": counts.unpriced, "skipped": counts.skipped,
                   "unpriced_old_total": dict(counts.unpriced_old_total)},
    }
