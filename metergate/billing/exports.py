"""Usage records and ledger entries by period, for finance tools: CSV or JSON Lines, streamed.

Rows are read in pages by ascending ``seq`` (keyset pagination: memory stays flat whatever the range) and
written as they are read, so an export of millions of rows starts at once. Amounts are the stored
integers in the asset's smallest unit, never converted, so a column summed by a spreadsheet equals the
ledger and the admin API to the unit. A range that ends in the past is stable; one that ends now may still
gain rows committed a moment later (a settlement in flight).

CSV cells holding text a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``) are prefixed with
``'``; numbers are written as they are.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from collections.abc import Iterable
from typing import Any, Literal

from aiohttp import web

from metergate.billing.store import BillingStore
from metergate.wallet.models import Mode

log = logging.getLogger(__name__)
Table = Literal["usage", "ledger"]
Format = Literal["csv", "jsonl"]
PAGE = 1000

USAGE_COLUMNS = ("seq", "id", "created_at", "created_at_ms", "customer_id", "asset", "route", "endpoint", "model",
                 "feature", "stream", "status_code", "usage_source", "tokens_input", "tokens_cached_input",
                 "tokens_output", "tokens_reasoning", "tokens_cache_write", "price_amount", "charged_amount",
                 "written_off_amount", "cost_nanos", "hold_id", "budget_path")
LEDGER_COLUMNS = ("seq", "idempotency_key", "created_at", "created_at_ms", "customer_id", "asset", "kind", "amount",
                  "credits_delta", "posted_delta", "pending_delta", "hold_id", "memo")


def iso(ms: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _row(table: Table, raw: dict[str, Any]) -> dict[str, Any]:
    columns = USAGE_COLUMNS if table == "usage" else LEDGER_COLUMNS
    row = {name: raw.get(name) for name in columns}
    row["created_at"] = iso(int(raw["created_at_ms"]))
    if table == "usage":
        row["stream"] = bool(raw["stream"])
        row["detail"] = raw.get("detail")
    return row


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def render(table: Table, fmt: Format, rows: Iterable[dict[str, Any]], *, header: bool) -> str:
    """One page of rows in ``fmt`` (the CSV header only with the first page)."""
    if fmt == "jsonl":
        return "".join(json.dumps(_row(table, r), separators=(",", ":"), default=str) + "\n" for r in rows)
    columns = USAGE_COLUMNS if table == "usage" else LEDGER_COLUMNS
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(columns)
    for r in rows:
        row = _row(table, r)
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


async def stream_export(request: web.Request, store: BillingStore, table: Table, fmt: Format, mode: Mode, *,
                        from_ms: int, to_ms: int, customer_id: str | None) -> web.StreamResponse:
    name = f"metergate-{table}-{mode}-{from_ms}-{to_ms}.{fmt}"
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})
    # The first page is read before the headers go out, so that a database error is still a JSON error.
    rows = await store.page(table, mode, from_ms=from_ms, to_ms=to_ms, after_seq=0, limit=PAGE,
                            customer_id=customer_id)
    await response.prepare(request)
    first = True
    try:
        while True:
            text = render(table, fmt, rows, header=first)
            if text:
                await response.write(text.encode())
            first = False
            if len(rows) < PAGE:
                break
            rows = await store.page(table, mode, from_ms=from_ms, to_ms=to_ms, after_seq=int(rows[-1]["seq"]),
                                    limit=PAGE, customer_id=customer_id)
    except Exception:
        # The headers are out: no JSON error can follow. Cut the connection without the final chunk, so that
        # the client sees an incomplete transfer instead of a file that merely looks shorter.
        log.exception("export of %s failed after %s; connection cut", table, "the first page" if first else "a page")
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
