"""The OpenAPI paths of the budget admin API (:mod:`metergate.budgets.admin`), merged by
:mod:`metergate.admin.openapi`; :mod:`metergate.admin.validation` enforces them before any handler runs. The
answer schemas are those of :meth:`Node.as_json`, :meth:`Limit.as_json`, :meth:`Window.as_json` and
:meth:`Rule.as_json`, and of the views :mod:`metergate.budgets.admin` builds around them."""

from __future__ import annotations

from typing import Any

from metergate.admin.schemas import INTEGER, MS, Schema, data_of, envelope, nullable, ref
from metergate.budgets.model import DIMENSIONS, KINDS, MAX_AMOUNT, MAX_MODELS, NodeKind
from metergate.budgets.windows import KINDS as WINDOW_KINDS
from metergate.budgets.windows import MAX_BUCKETS, MAX_LENGTH_MS

_STRING: Schema = {"type": "string"}

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"}
_NODE_ID = {**_ID, "x-error-code": "invalid_budget_node"}
_MODELS = {"type": ["array", "null"], "maxItems": MAX_MODELS,
           "items": {"type": "string", "minLength": 1, "maxLength": 128},
           "description": "model names or fnmatch patterns (gpt-4o*) the node's subtree may use; null: any"}
_WINDOW = {"type": "object", "additionalProperties": False, "required": ["kind"], "properties": {
    "kind": {"type": "string", "enum": list(WINDOW_KINDS),
             "description": "day, week (from Monday), month: UTC calendar periods; fixed: epoch-aligned windows "
                            "of length_s; rolling: the last length_s, counted in buckets"},
    "length_s": {"type": "integer", "minimum": 1, "maximum": MAX_LENGTH_MS // 1000},
    "buckets": {"type": "integer", "minimum": 1, "maximum": MAX_BUCKETS,
                "description": "rolling windows: how many buckets (granularity length_s / buckets; default: 60, or the "
                               "most up to 60 that divide the window's milliseconds evenly)"}}}


def budget_schemas() -> dict[str, Schema]:
    """The components the budget answers refer to: a node, a limit (with its window) and an alert rule."""
    kinds: tuple[NodeKind, ...] = ("customer", *KINDS)  # "customer": the root
    window = envelope({"kind": {"type": "string", "enum": list(WINDOW_KINDS)},
                       "length_s": {**INTEGER, "description": "fixed and rolling windows"},
                       "buckets": {**INTEGER, "description": "rolling windows"}}, "length_s", "buckets",
                      description="A limit's window (Window.as_json).")
    limit = envelope({"id": _STRING, "node_id": _STRING, "dimension": {"type": "string", "enum": list(DIMENSIONS)},
                      "amount": {**INTEGER, "description": "requests, tokens, or the asset's smallest unit (spend)"},
                      "window": ref("BudgetWindow"), "asset": {**nullable(_STRING), "description": "spend only"},
                      "version": INTEGER},
                     description="A budget limit (Limit.as_json); version rises with every change of the amount.")
    node = envelope({"id": _STRING, "parent_id": {**nullable(_STRING), "description": "null only for the root"},
                     "kind": {"type": "string", "enum": list(kinds)}, "name": _STRING,
                     "allowed_models": {"type": ["array", "null"], "items": _STRING,
                                        "description": "null: any model"},
                     "created_at_ms": MS}, description="A budget node (Node.as_json).")
    limit_use = {**limit, "properties": {**limit["properties"], "used": INTEGER, "remaining": INTEGER},
                 "required": [*limit["required"], "used", "remaining"],
                 "description": "A limit with its use in the current window."}
    node_view = {**node, "properties": {**node["properties"], "path": {**_STRING, "description": "root/.../id"},
                                        "limits": {"type": "array", "items": ref("BudgetLimitUse")},
                                        "api_keys": {"type": "array", "items": _STRING}},
                 "required": [*node["required"], "path", "limits", "api_keys"],
                 "description": "A budget node with its path, its limits and their use, and the keys attached."}
    threshold = {"oneOf": [envelope({"percent": INTEGER}), envelope({"amount": INTEGER})]}
    rule = envelope({"id": _STRING, "target": {**_STRING, "description": "limit:<limit id> or balance:<asset>"},
                     "thresholds": {"type": "array", "items": threshold}},
                    description="A budget alert rule (Rule.as_json).")
    fired = envelope({"customer_id": _STRING, "rule_id": _STRING,
                      "target": {**_STRING, "description": "the rule's target: limit:<limit id> or balance:<asset>"},
                      "threshold": {**_STRING, "description": "percent:<p> or amount:<n>"},
                      "period_start_ms": {**MS, "description": "the fixed window's period it fired in; 0 for a "
                                                               "rolling window or a balance"},
                      "fired_at_ms": MS, "recovered_at_ms": nullable(MS),
                      "active": {"type": "boolean", "description": "not recovered yet"}},
                     description="A crossing of an alert threshold (budget.threshold.crossed), and its recovery.")
    return {"BudgetWindow": window, "BudgetLimit": limit, "BudgetLimitUse": limit_use, "BudgetNode": node,
            "BudgetNodeView": node_view, "BudgetAlertRule": rule, "FiredBudgetAlert": fired}


def _answers() -> dict[str, Schema]:
    deleted = envelope({"id": _STRING, "deleted": {"type": "boolean", "const": True}})
    return {
        "tree": data_of(ref("BudgetNodeView"), customer_id=_STRING),
        "rules": data_of(ref("BudgetAlertRule"), customer_id=_STRING),
        "fired": data_of(ref("FiredBudgetAlert"), customer_id=_STRING),
        "deleted": deleted,
        "attached": envelope({"key_id": _STRING, "customer_id": _STRING, "node_id": nullable(_STRING)}),
    }


def _strict(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def _op(summary: str, answer: Schema, *, params: tuple[str, ...], body: dict[str, Any] | None = None,
        created: bool = False) -> dict[str, Any]:
    """An operation; ``created``: a create by id, 201 when new and 200 with what exists when it is the same."""
    ok = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"name": p, "in": "path", "required": True, "schema": _ID} for p in params],
        "responses": {**({"201": ok} if created else {}), "200": ok,
                      "default": {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def budget_paths() -> dict[str, Any]:
    shape = _answers()
    customers = "/admin/v1/customers/{customer_id}"
    c, cn, cl = ("customer_id",), ("customer_id", "node_id"), ("customer_id", "limit_id")
    node = _strict({"id": _NODE_ID, "parent_id": _NODE_ID, "kind": {"type": "string", "enum": list(KINDS)},
                    "name": {"type": "string", "maxLength": 256}, "allowed_models": _MODELS}, "id", "kind")
    node_changes = _strict({"name": {"type": "string", "maxLength": 256}, "allowed_models": _MODELS})
    limit = _strict({"id": _ID, "dimension": {"type": "string", "enum": list(DIMENSIONS)},
                     "amount": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT,
                                "x-error-code": "invalid_amount",
                                "description": "requests, tokens, or the asset's smallest unit (spend)"},
                     "window": _WINDOW,
                     "asset": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_-]{0,31}$"}},
                    "id", "dimension", "amount", "window")
    amount = _strict({"amount": limit["properties"]["amount"]}, "amount")
    attach = _strict({"node_id": {"anyOf": [_NODE_ID, {"type": "null"}]}}, "node_id")
    cr = ("customer_id", "rule_id")
    threshold = {"oneOf": [_strict({"percent": {"type": "integer", "minimum": 1, "maximum": 100}}, "percent"),
                           _strict({"amount": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT}}, "amount")],
                 "x-alternatives-message": "each threshold is {\"percent\": 1-100} or {\"amount\": n}."}
    rule = _strict({"target": {"type": "string", "pattern": r"^(limit|balance):[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$",
                               "description": "limit:<limit id> or balance:<asset>"},
                    "thresholds": {"type": "array", "minItems": 1, "maxItems": 10, "items": threshold}},
                   "target", "thresholds")
    return {
        f"{customers}/budget-alerts": {"get": _op("The customer's budget alert rules", shape["rules"], params=c)},
        f"{customers}/budget-alert-events": {"get": _op(
            "The customer's alert thresholds that fired: when, and whether they have recovered (active first)",
            shape["fired"], params=c)},
        f"{customers}/budget-alerts/{{rule_id}}": {
            "put": _op("Set an alert rule: thresholds on a node limit's use or a balance, each firing once per "
                       "period (webhooks budget.threshold.crossed / .recovered)", ref("BudgetAlertRule"), params=cr,
                       body=rule),
            "delete": _op("Delete an alert rule", shape["deleted"], params=cr),
        },
        f"{customers}/budget-nodes": {
            "get": _op("The customer's budget tree: nodes, limits, use in the current windows", shape["tree"],
                       params=c),
            "post": _op("Create a budget node (idempotent by id: the same node again answers 200)",
                        ref("BudgetNode"), params=c, body=node, created=True),
        },
        f"{customers}/budget-nodes/{{node_id}}": {
            "get": _op("A budget node with its limits and their use", ref("BudgetNodeView"), params=cn),
            "patch": _op("Rename a node or change the models its subtree may use", ref("BudgetNode"), params=cn,
                         body=node_changes),
            "delete": _op("Delete a leaf node, its limits and its keys' attachments", shape["deleted"],
                          params=cn),
        },
        f"{customers}/budget-nodes/{{node_id}}/limits": {
            "post": _op("Add a limit to a node (idempotent by id)", ref("BudgetLimit"), params=cn, body=limit,
                        created=True),
        },
        f"{customers}/budget-limits/{{limit_id}}": {
            "patch": _op("Change a limit's amount", ref("BudgetLimit"), params=cl, body=amount),
            "delete": _op("Delete a limit", shape["deleted"], params=cl),
        },
        "/admin/v1/api-keys/{key_id}/budget-node": {
            "put": _op("Attach a proxy key to a budget node of its customer (null: detach)", shape["attached"],
                       params=("key_id",), body=attach),
        },
    }
