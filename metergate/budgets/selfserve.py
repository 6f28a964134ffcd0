"""What a proxy key (or the app, with its trusted customer header) may read about itself, without an admin key.

* ``GET /v1/metergate/balance`` — the wallet's balances (the one the node spends from) and, for every node on
  the caller's budget path, its limits with their use in the current window and what remains;
* ``GET /v1/metergate/usage`` — the same limits, and the caller's node's recent usage records (the node and
  its subtree, among the customer's latest ``limit``, at most 200).

The caller is identified exactly as a proxied request is (:mod:`metergate.proxy.identify`), so a key sees its
own customer's wallet and its own node's path, nothing else, and the node header is trusted only from the app.
Use is the quota *claimed* in the window (what admission counts), so it can run ahead of what was spent by
replicas' unused leases (each under 1/16 of the limit). Errors use the OpenAI envelope.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from metergate.budgets.admission import NODE_HEADER, BudgetGuard, Ticket
from metergate.budgets.model import ROOT, path_text
from metergate.config.settings import Settings
from metergate.errors import BadRequest
from metergate.http import json_response
from metergate.money import format_minor
from metergate.proxy.identify import Identifier, Identity
from metergate.wallet.store import WalletStore

PREFIX = "/v1/metergate"
_MAX_USAGE = 200


class SelfService:
    def __init__(self, settings: Settings, store: WalletStore, identifier: Identifier, guard: BudgetGuard) -> None:
        self._store = store
        self._identifier = identifier
        self._guard = guard
        self._scales = {asset.code: asset.scale for asset in settings.assets}

    def routes(self) -> list[web.RouteDef]:
        return [web.get(f"{PREFIX}/balance", self.balance), web.get(f"{PREFIX}/usage", self.usage)]

    async def _caller(self, request: web.Request) -> tuple[Identity, Ticket | None]:
        identity = await self._identifier.identify(request)
        ticket = await self._guard.resolve(identity.mode, identity.customer_id, key_id=identity.key_id,
                                           header=request.headers.get(NODE_HEADER),
                                           header_trusted=identity.via == "header", model=None)
        return identity, ticket

    async def _budget(self, ticket: Ticket | None) -> list[dict[str, Any]]:
        if ticket is None:
            return []
        tree = await self._guard.tree(ticket.mode, ticket.customer_id)
        use = await self._store.budget_use(ticket.mode, ticket.customer_id, at_ms=self._guard.clock())
        out = []
        for node in ticket.path:
            limits = []
            for limit in tree.limits.get(node.id, ()):
                used = use.get(limit.id, 0)
                limits.append({**limit.as_json(), "used": used, "remaining": max(0, limit.amount - used)})
            out.append({"node": node.id, "kind": node.kind, "name": node.name, "limits": limits,
                        "allowed_models": list(node.allowed_models) if node.allowed_models is not None else None})
        return out

    def _head(self, identity: Identity, ticket: Ticket | None) -> dict[str, Any]:
        node = ticket.node.id if ticket is not None else ROOT
        return {"customer_id": identity.customer_id, "mode": identity.mode, "node": node,
                "node_path": ticket.path_text if ticket is not None else ROOT}

    async def balance(self, request: web.Request) -> web.Response:
        identity, ticket = await self._caller(request)
        balances = [{"asset": b.asset, "available": b.available,
                     "available_decimal": format_minor(b.available, self._scales.get(b.asset, 0))}
                    for b in await self._store.balances(identity.mode, identity.customer_id)]
        return json_response({**self._head(identity, ticket), "balances": balances,
                              "budget": await self._budget(ticket)})

    async def usage(self, request: web.Request) -> web.Response:
        identity, ticket = await self._caller(request)
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise BadRequest("'limit' must be an integer.", param="limit") from None
        if not 1 <= limit <= _MAX_USAGE:
            raise BadRequest(f"'limit' must be between 1 and {_MAX_USAGE}.", param="limit")
        path = path_text(ticket.path) if ticket is not None else None
        records = []
        for _, record in await self._store.usage(identity.mode, identity.customer_id, limit=limit):
            if path is not None and path != ROOT and not (
                    record.budget_path == path or (record.budget_path or "").startswith(path + "/")):
                continue
            records.append({"id": record.id, "created_at_ms": record.created_at_ms, "model": record.model,
                            "endpoint": record.endpoint, "status_code": record.status_code,
                            "tokens_input": record.tokens_input, "tokens_output": record.tokens_output,
                            "asset": record.asset, "charged_amount": record.charged_amount,
                            "budget_path": record.budget_path})
        return json_response({**self._head(identity, ticket), "budget": await self._budget(ticket),
                              "data": records})
