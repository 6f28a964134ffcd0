"""Admin API for billing modes, meter events, reconciliation and exports; scoped by the admin key's mode:

* ``GET``, ``PUT /admin/v1/customers/{id}/billing`` ``{"billing_mode", "asset_modes", "credit_limits", "memo",
  "changed_by"}`` — the configuration in effect, its change history and the overdraft limits applied
  (:mod:`metergate.billing.modes`). A PUT that changes nothing records nothing;
* ``GET /admin/v1/customers/{id}/meter-events`` — the customer's outbox rows: decision and delivery state;
* ``GET /admin/v1/billing/reconciliation?from&to&customer_id`` — per customer and asset, usage and
  ledger totals beside what was sent to Stripe, pending, failing, or not yet enqueued;
* ``GET /admin/v1/exports/{usage|ledger}?from&to&format=csv|jsonl&customer_id`` — streamed exports
  (:mod:`metergate.billing.exports`). ``from``/``to`` as in the margin report (default: the last 30 days).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.admin.reports import parse_time
from metergate.billing.exports import Format, Table, stream_export
from metergate.billing.modes import parse_config
from metergate.billing.store import BillingStore, ReconRow
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.wallet.models import Mode, now_ms

_DEFAULT_RANGE_MS = 30 * 86_400_000


class BillingAdminApi:
    def __init__(self, admin: AdminApi, store: BillingStore) -> None:
        self._admin = admin
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        billing = f"{PREFIX}/customers/{{customer_id}}/billing"
        return [web.get(billing, self.get_billing), web.put(billing, self.put_billing),
                web.get(f"{PREFIX}/customers/{{customer_id}}/meter-events", self.meter_events),
                web.get(f"{PREFIX}/billing/reconciliation", self.reconciliation),
                web.get(f"{PREFIX}/exports/usage", self.export_usage),
                web.get(f"{PREFIX}/exports/ledger", self.export_ledger)]

    async def _customer(self, request: web.Request, customer_id: str | None = None) -> tuple[Mode, str]:
        return await self._admin.customer(request, customer_id)

    async def _view(self, mode: Mode, customer_id: str) -> dict[str, Any]:
        changes = await self._store.changes(mode, customer_id)
        current = changes[-1] if changes else None
        balances = {b.asset: asdict(b) | {"available": b.available}
                    for b in await self._store.wallet.balances(mode, customer_id)}
        return {"customer_id": customer_id, "mode": mode,
                "billing_mode": current.config.billing_mode if current else "prepaid",
                "asset_modes": current.config.asset_modes if current else {},
                "credit_limits": current.config.credit_limits if current else {},
                "effective": {asset: (current.config.mode_of(asset) if current else "prepaid")
                              for asset in self._store.scales},
                "balances": balances, "changes": [c.as_json() for c in changes],
                "overdraft_changes": await self._store.overdraft_history(mode, customer_id)}

    async def get_billing(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        return json_response(await self._view(mode, customer_id))

    async def put_billing(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        body = await self._admin.read_json(request)
        config = parse_config(body, self._store.scales)
        memo, who = body.get("memo", ""), body.get("changed_by", "")
        if not isinstance(memo, str) or len(memo) > 500:
            raise BadRequest("'memo' must be a string of at most 500 characters.", param="memo")
        if not isinstance(who, str) or len(who) > 80:
            raise BadRequest("'changed_by' must be a string of at most 80 characters.", param="changed_by")
        token = request.headers.get("Authorization", "")[7:].strip()
        key = f"admin key {mode}:{hashlib.sha256(token.encode()).hexdigest()[:12]}"  # which key, not the key
        change = await self._store.set_config(mode, customer_id, config, memo=memo,
                                              changed_by=f"{who} ({key})" if who else key)
        return json_response({**await self._view(mode, customer_id), "changed": change is not None})

    async def meter_events(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._customer(request)
        return json_response({"customer_id": customer_id, "data": await self._store.outbox(mode, customer_id)})

    def _range(self, request: web.Request) -> tuple[int, int]:
        query = request.query
        to_ms = parse_time(query["to"], "to") if "to" in query else now_ms()
        from_ms = parse_time(query["from"], "from") if "from" in query else to_ms - _DEFAULT_RANGE_MS
        if from_ms >= to_ms:
            raise BadRequest("'from' must be before 'to'.", param="from")
        return from_ms, to_ms

    async def _scope(self, request: web.Request) -> tuple[Mode, str | None]:
        wanted = request.query.get("customer_id")
        if wanted is None:
            return self._admin.authenticate(request), None
        return await self._customer(request, wanted)

    async def reconciliation(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._scope(request)
        from_ms, to_ms = self._range(request)
        rows = await self._store.reconciliation(mode, from_ms=from_ms, to_ms=to_ms, customer_id=customer_id)
        totals: dict[str, dict[str, int]] = {}
        for row in rows:
            into = totals.setdefault(row.asset, {})
            for name, value in asdict(row).items():
                if isinstance(value, int):
                    into[name] = into.get(name, 0) + value
        return json_response({"mode": mode, "from_ms": from_ms, "to_ms": to_ms,
                              "data": [_recon(r) for r in rows], "totals": totals})

    async def _export(self, request: web.Request, table: Table) -> web.StreamResponse:
        mode, customer_id = await self._scope(request)
        from_ms, to_ms = self._range(request)
        fmt = request.query.get("format", "csv")
        if fmt not in ("csv", "jsonl"):
            raise BadRequest("'format' must be csv or jsonl.", param="format")
        chosen: Format = "csv" if fmt == "csv" else "jsonl"
        return await stream_export(request, self._store, table, chosen, mode, from_ms=from_ms, to_ms=to_ms,
                                   customer_id=customer_id)

    async def export_usage(self, request: web.Request) -> web.StreamResponse:
        return await self._export(request, "usage")

    async def export_ledger(self, request: web.Request) -> web.StreamResponse:
        return await self._export(request, "ledger")


def _recon(row: ReconRow) -> dict[str, Any]:
    """A row with its verdicts: every invoiced unit is either sent or pending (``balanced``), and nothing is
    left to send (``complete``)."""
    return {**asdict(row),
            "balanced": row.invoiced_charged == row.sent_value + row.pending_value and row.unenqueued_records == 0,
            "complete": row.pending_events == 0 and row.unenqueued_records == 0}
