"""Admin API: what the admin API could not list before — a customer's proxy API keys, and the open holds.

* ``GET /admin/v1/customers/{id}/api-keys`` — the customer's keys, newest first (never a secret: only the
  prefix shown when it was issued), revoked ones with ``revoked_at_ms``;
* ``GET /admin/v1/holds?customer_id&limit`` — pending holds of the key's mode, soonest expiry first: the jobs,
  agents and proxy requests holding funds right now.

Read-only, in the admin key's mode, at most ``limit`` (1-200, default 50) rows.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web
from sqlalchemy import Connection, select

from metergate.admin.api import PREFIX, AdminApi
from metergate.http import json_response
from metergate.wallet import schema as t
from metergate.wallet.holds import HoldView, hold_view
from metergate.wallet.ledger import hold_of
from metergate.wallet.models import ApiKey
from metergate.wallet.sql import SqlWalletStore


class ListingsApi:
    def __init__(self, store: SqlWalletStore, admin: AdminApi) -> None:
        self._store = store
        self._admin = admin

    def routes(self) -> list[web.RouteDef]:
        return [web.get(f"{PREFIX}/customers/{{customer_id}}/api-keys", self.api_keys),
                web.get(f"{PREFIX}/holds", self.open_holds)]

    async def api_keys(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        limit = AdminApi._limit(request)

        def read(conn: Connection) -> list[dict[str, Any]]:
            k = t.api_keys.c
            rows = conn.execute(select(k.id, k.mode, k.customer_id, k.prefix, k.created_at_ms, k.revoked_at_ms)
                                .where(k.mode == mode, k.customer_id == customer_id)
                                .order_by(k.created_at_ms.desc(), k.id).limit(limit))
            return [asdict(ApiKey(id=r.id, mode=r.mode, customer_id=r.customer_id, prefix=r.prefix,
                                  created_at_ms=int(r.created_at_ms),
                                  revoked_at_ms=None if r.revoked_at_ms is None else int(r.revoked_at_ms)))
                    for r in rows]

        return json_response({"data": await self._store.read(read)})

    async def open_holds(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        limit = AdminApi._limit(request)
        customer_id = request.query.get("customer_id")

        def read(conn: Connection) -> list[HoldView]:
            h = t.holds.c
            query = select(t.holds).where(h.mode == mode, h.state == "pending")
            if customer_id is not None:
                query = query.where(h.customer_id == customer_id)
            rows = conn.execute(query.order_by(h.expires_at_ms, h.id).limit(limit))
            return [hold_view(hold_of(r)) for r in rows]

        return json_response({"data": await self._store.read(read)})
