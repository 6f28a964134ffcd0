"""Admin API for budgets: nodes, limits and key attachments, scoped to the admin key's mode.

* ``GET/POST /admin/v1/customers/{id}/budget-nodes`` — the tree (each node with its limits and their use in
  the current window), or a new node ``{"id", "kind", "parent_id" (default: the customer's root),
  "name", "allowed_models"}``;
* ``GET/PATCH/DELETE /admin/v1/customers/{id}/budget-nodes/{node_id}`` (``root`` is the customer itself);
* ``POST /admin/v1/customers/{id}/budget-nodes/{node_id}/limits`` ``{"id", "dimension", "amount",
  "window": {"kind", "length_s", "buckets"}, "asset"}``;
* ``PATCH/DELETE /admin/v1/customers/{id}/budget-limits/{limit_id}``;
* ``PUT /admin/v1/api-keys/{key_id}/budget-node`` ``{"node_id": "..." | null}``;
* ``GET /admin/v1/customers/{id}/budget-alerts``, ``PUT/DELETE .../budget-alerts/{rule_id}`` ``{"target":
  "limit:<id>" | "balance:<asset>", "thresholds": [{"percent": 80}, {"amount": 5000}]}``
  (:mod:`metergate.budgets.alerts`);
* ``GET /admin/v1/customers/{id}/budget-alert-events`` — the thresholds' crossings: which fired, when, and
  whether they have recovered (active first, newest first; the latest :data:`FIRED_SHOWN`).

Idempotent: a create names its object's id, and the same create again answers 200 with what exists (409
``already_exists`` when it differs); PATCH, PUT and DELETE set a state. This process applies a change at
once; other replicas within ``key_cache_ttl_s``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from metergate.admin.api import PREFIX, AdminApi
from metergate.budgets.admission import BudgetGuard
from metergate.budgets.alerts import BudgetAlerts, Rule
from metergate.budgets.model import ROOT, Limit, Node, Tree
from metergate.budgets.windows import DEFAULT_BUCKETS, Window
from metergate.config.settings import Settings
from metergate.errors import BadRequest, NotFound
from metergate.http import json_response
from metergate.wallet.models import Mode
from metergate.wallet.sqlbudgets import NodeNotFound
from metergate.wallet.store import WalletStore

FIRED_SHOWN = 100  # the crossings one answer lists


class BudgetsApi:
    def __init__(self, settings: Settings, store: WalletStore, admin: AdminApi, guard: BudgetGuard,
                 alerts: BudgetAlerts | None = None) -> None:
        self._alerts = alerts
        self._settings = settings
        self._store = store
        self._admin = admin
        self._guard = guard
        self._assets = {asset.code for asset in settings.assets}

    def routes(self) -> list[web.RouteDef]:
        nodes = f"{PREFIX}/customers/{{customer_id}}/budget-nodes"
        limits = f"{PREFIX}/customers/{{customer_id}}/budget-limits/{{limit_id}}"
        return [
            web.get(nodes, self.tree), web.post(nodes, self.create_node),
            web.get(nodes + "/{node_id}", self.get_node), web.patch(nodes + "/{node_id}", self.update_node),
            web.delete(nodes + "/{node_id}", self.delete_node),
            web.post(nodes + "/{node_id}/limits", self.create_limit),
            web.patch(limits, self.update_limit), web.delete(limits, self.delete_limit),
            web.put(f"{PREFIX}/api-keys/{{key_id}}/budget-node", self.attach_key),
            web.get(f"{PREFIX}/customers/{{customer_id}}/budget-alerts", self.list_rules),
            web.get(f"{PREFIX}/customers/{{customer_id}}/budget-alert-events", self.fired),
            web.put(f"{PREFIX}/customers/{{customer_id}}/budget-alerts/{{rule_id}}", self.put_rule),
            web.delete(f"{PREFIX}/customers/{{customer_id}}/budget-alerts/{{rule_id}}", self.delete_rule),
        ]

    # ------------------------------------------------------------------ views

    async def view(self, mode: Mode, customer_id: str, node_ids: list[str] | None = None) -> dict[str, Any]:
        """The tree (or the given nodes) with each limit's use in its current window; also the portal's."""
        tree = await self._store.budget_tree(mode, customer_id)
        use = await self._store.budget_use(mode, customer_id, at_ms=self._guard.clock()) if tree.limits else {}
        wanted = node_ids if node_ids is not None else [n.id for n in tree.subtree(ROOT)]
        return {"customer_id": customer_id, "data": [_node_view(tree, tree.nodes[n], use) for n in wanted]}

    async def tree(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        return json_response(await self.view(mode, customer_id))

    async def get_node(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        node_id = request.match_info["node_id"]
        tree = await self._store.budget_tree(mode, customer_id)
        if node_id not in tree.nodes:
            raise NodeNotFound(node_id)
        return json_response((await self.view(mode, customer_id, [node_id]))["data"][0])

    # ------------------------------------------------------------------ nodes

    async def create_node(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        body = await self._admin.read_json(request)
        models = body.get("allowed_models")
        if body["id"] == ROOT:
            raise BadRequest("'root' is the customer's own node: it exists without being created.",
                             code="invalid_budget_node", param="id")
        node = Node(mode, customer_id, body["id"], body.get("parent_id", ROOT), body["kind"], body.get("name", ""),
                    tuple(models) if models is not None else None)
        saved, created = await self._store.put_budget_node(node)
        self._guard.invalidate(mode, customer_id)
        return json_response(saved.as_json(), status=201 if created else 200)

    async def update_node(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        body = await self._admin.read_json(request)
        node = await self._store.update_budget_node(mode, customer_id, request.match_info["node_id"], body)
        self._guard.invalidate(mode, customer_id)
        return json_response(node.as_json())

    async def delete_node(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        node_id = request.match_info["node_id"]
        if node_id == ROOT:
            tree = await self._store.budget_tree(mode, customer_id)
            if len(tree.nodes) > 1:
                raise BadRequest("The root can be deleted only once it has no child nodes.",
                                 code="node_has_children")
        if not await self._store.delete_budget_node(mode, customer_id, node_id):
            raise NodeNotFound(node_id)
        self._guard.invalidate(mode, customer_id)
        return json_response({"id": node_id, "deleted": True})

    # ------------------------------------------------------------------ limits

    async def create_limit(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        body = await self._admin.read_json(request)
        dimension = body["dimension"]
        asset = body.get("asset")
        if dimension == "spend":
            asset = asset or self._settings.pricing.asset
            if asset not in self._assets:
                raise BadRequest(f"Unknown asset {asset!r}.", code="unknown_asset", param="asset")
        elif asset is not None:
            raise BadRequest("Only spend limits name an asset.", code="invalid_request", param="asset")
        limit = Limit(mode, customer_id, body["id"], request.match_info["node_id"], dimension, body["amount"],
                      _window(body["window"]), asset)
        saved, created = await self._store.put_budget_limit(limit)
        self._guard.invalidate(mode, customer_id)
        return json_response(saved.as_json(), status=201 if created else 200)

    async def update_limit(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        body = await self._admin.read_json(request)
        limit = await self._store.update_budget_limit(mode, customer_id, request.match_info["limit_id"],
                                                      body["amount"])
        if limit is None:
            raise _no_limit(request.match_info["limit_id"])
        self._guard.invalidate(mode, customer_id)
        return json_response(limit.as_json())

    async def delete_limit(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        limit_id = request.match_info["limit_id"]
        if not await self._store.delete_budget_limit(mode, customer_id, limit_id):
            raise _no_limit(limit_id)
        self._guard.invalidate(mode, customer_id)
        return json_response({"id": limit_id, "deleted": True})

    # ------------------------------------------------------------------ keys

    async def attach_key(self, request: web.Request) -> web.Response:
        mode = self._admin.authenticate(request)
        key_id = request.match_info["key_id"]
        body = await self._admin.read_json(request)
        customer_id = await self._store.attach_budget_key(mode, key_id, body["node_id"])
        if customer_id is None:
            raise NotFound(f"No API key {key_id!r} in this mode.", code="not_found")
        self._guard.invalidate(mode, customer_id)
        return json_response({"key_id": key_id, "customer_id": customer_id, "node_id": body["node_id"]})


    # ------------------------------------------------------------------ alert rules

    def _need_alerts(self) -> BudgetAlerts:
        if self._alerts is None:
            raise NotFound("Budget alerts need the SQL wallet database.", code="not_found")
        return self._alerts

    async def list_rules(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        rules = await self._need_alerts().rules(mode, customer_id)
        return json_response({"customer_id": customer_id, "data": [rule.as_json() for rule in rules]})

    async def fired(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        fired = await self._store.fired_budget_alerts(mode, customer_id, limit=FIRED_SHOWN)
        return json_response({"customer_id": customer_id, "data": [alert.as_json() for alert in fired]})

    async def put_rule(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        alerts = self._need_alerts()
        body = await self._admin.read_json(request)
        kind, _, name = body["target"].partition(":")
        if kind == "limit":
            tree = await self._store.budget_tree(mode, customer_id)
            if not any(limit.id == name for limits in tree.limits.values() for limit in limits):
                raise _no_limit(name)
        elif name not in self._assets:
            raise BadRequest(f"Unknown asset {name!r}.", code="unknown_asset", param="target")
        thresholds = tuple(next(iter(th.items())) for th in body["thresholds"])
        if len(set(thresholds)) != len(thresholds):
            raise BadRequest("Each threshold may be given once.", param="thresholds")
        rule = await alerts.put_rule(Rule(mode, customer_id, request.match_info["rule_id"], body["target"],
                                          thresholds))
        return json_response(rule.as_json())

    async def delete_rule(self, request: web.Request) -> web.Response:
        mode, customer_id = await self._admin.customer(request)
        rule_id = request.match_info["rule_id"]
        if not await self._need_alerts().delete_rule(mode, customer_id, rule_id):
            raise NotFound(f"No budget alert {rule_id!r} for this customer.", code="not_found")
        return json_response({"id": rule_id, "deleted": True})


def _window(body: dict[str, Any]) -> Window:
    kind = body["kind"]
    length_s, buckets = body.get("length_s"), body.get("buckets")
    if kind in ("day", "week", "month"):
        if length_s is not None or buckets is not None:
            raise BadRequest(f"A {kind} window has no length_s or buckets.", param="window")
        return Window(kind)
    if length_s is None:
        raise BadRequest(f"A {kind} window needs length_s.", param="window")
    length_ms = length_s * 1000
    if kind == "fixed":
        if buckets is not None:
            raise BadRequest("Only rolling windows have buckets.", param="window")
        return Window(kind, length_ms)
    # By default the finest of at most DEFAULT_BUCKETS buckets that divide the window evenly (60 for most).
    buckets = buckets or next(b for b in range(DEFAULT_BUCKETS, 0, -1) if length_ms % b == 0)
    if length_ms % buckets:
        raise BadRequest(f"length_s * 1000 must be a multiple of buckets ({buckets}).", param="window")
    return Window(kind, length_ms, buckets)


def _no_limit(limit_id: str) -> NotFound:
    return NotFound(f"No budget limit {limit_id!r} for this customer.", code="unknown_budget_limit")


def _node_view(tree: Tree, node: Node, use: dict[str, int]) -> dict[str, Any]:
    limits = [{**limit.as_json(), "used": use.get(limit.id, 0),
               "remaining": max(0, limit.amount - use.get(limit.id, 0))} for limit in tree.limits.get(node.id, ())]
    keys = sorted(k for k, n in tree.key_nodes.items() if n == node.id)
    return {**node.as_json(), "path": "/".join(n.id for n in tree.path(node.id)), "limits": limits, "api_keys": keys}
