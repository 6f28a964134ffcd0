"""The SQL store's usage records: the row each settled request writes beside its ledger entry, read back per
customer and summarised for reports.

Why here: the money operations (:mod:`metergate.wallet.sql`), the batch engine and the subsystems with tables of
their own (pricing) all write or read the same row; one prepared INSERT and one row-to-record conversion keep
them agreeing on its columns. A summary is one aggregate query over integers, so SQLite and PostgreSQL agree to
the unit.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, Row, and_, case, func, insert, literal, select

from metergate.wallet import schema as t
from metergate.wallet.execution import Prepared
from metergate.wallet.models import Mode, UsageAggregate, UsageGrouping, UsageRecord
from metergate.wallet.sqlrunner import SqlRunner

USAGE_FIELDS: tuple[str, ...] = tuple(UsageRecord.__dataclass_fields__)
INSERT_USAGE = Prepared(insert(t.usage_records), columns=USAGE_FIELDS)


class UsageReports(SqlRunner):
    """Reading usage records back (see the module docstring)."""

    async def usage(self, mode: Mode, customer_id: str, *, limit: int,
                    before: int | None = None) -> list[tuple[int, UsageRecord]]:
        c = t.usage_records.c
        stmt = select(t.usage_records).where(c.mode == mode, c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(c.seq < before)
        rows = await self.read(lambda conn: conn.execute(stmt.order_by(c.seq.desc()).limit(limit)).all())
        return [(r.seq, usage_of(r)) for r in rows]

    async def usage_summary(self, mode: Mode, *, group_by: UsageGrouping, from_ms: int, to_ms: int,
                            limit: int) -> list[UsageAggregate]:
        return await self.read(usage_summary_in, mode, group_by, from_ms, to_ms, limit)


_DAY_MS = 86_400_000


def usage_summary_in(conn: Connection, mode: Mode, group_by: UsageGrouping, from_ms: int, to_ms: int,
                   limit: int) -> list[UsageAggregate]:
    """One aggregate query; every sum is over integers, so SQLite and PostgreSQL agree to the unit."""
    c = t.usage_records.c
    keys: dict[str, Any] = {"customer": c.customer_id, "feature": func.coalesce(c.feature, ""), "model": c.model,
                            "day": c.created_at_ms // _DAY_MS,  # integer division on both backends
                            # "<customer>:<budget path>" ("<customer>:" for requests outside any budget node)
                            "budget_node": c.customer_id + literal(":") + func.coalesce(c.budget_path, "")}
    known = c.cost_nanos.is_not(None)
    no_usage = and_(c.cost_nanos.is_(None), c.usage_source == "none")
    unknown = and_(c.cost_nanos.is_(None), c.usage_source != "none")

    def total(expr: Any) -> Any:
        return func.coalesce(func.sum(expr), 0)

    key = keys.get(group_by)
    stmt = select(
        (key if key is not None else literal("")).label("key"), c.asset, func.count().label("requests"),
        total(c.price_amount).label("price"), total(c.charged_amount).label("charged"),
        total(c.written_off_amount).label("written_off"),
        total(case((known, c.charged_amount), else_=0)).label("costed_charged"),
        total(func.coalesce(c.cost_nanos, 0)).label("cost"),
        total(case((unknown, 1), else_=0)).label("cost_unknown"),
        total(case((no_usage, 1), else_=0)).label("no_usage"),
        total(case((known, 0), else_=c.charged_amount)).label("unmargined"),
    ).where(c.mode == mode, c.created_at_ms >= from_ms, c.created_at_ms < to_ms)
    if key is not None:
        stmt = stmt.group_by(key, c.asset).order_by(key, c.asset)
    else:
        stmt = stmt.group_by(c.asset).order_by(c.asset)
    return [UsageAggregate(key=str(r.key), asset=r.asset, requests=int(r.requests), price_amount=int(r.price),
                           charged_amount=int(r.charged), written_off_amount=int(r.written_off),
                           costed_charged=int(r.costed_charged), cost_nanos=int(r.cost),
                           cost_unknown_count=int(r.cost_unknown), no_usage_count=int(r.no_usage),
                           unmargined_charged=int(r.unmargined))
            for r in conn.execute(stmt.limit(limit)).all()]


def usage_values(usage: UsageRecord, **changes: Any) -> dict[str, Any]:
    """The record's column values, with ``changes`` applied (cheaper than ``dataclasses.replace``)."""
    values = {name: getattr(usage, name) for name in USAGE_FIELDS}
    values.update(changes)
    return values


def usage_of(row: Row[Any]) -> UsageRecord:
    mapping = cast(dict[str, Any], row._mapping)
    return UsageRecord(**{name: mapping[name] for name in USAGE_FIELDS})

