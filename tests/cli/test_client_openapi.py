"""The Python client against the admin API's OpenAPI document, so that the two cannot drift apart.

Method: every call of :mod:`metergate_client.calls` is built once with sample arguments (a call added there
without a sample here fails :func:`test_every_call_has_a_sample`). For each, the document (the one the server
publishes, built in process) must have an operation at the call's method and path; every query parameter
must be one the operation declares, and fit its schema; a body must be declared and pass the server's own
request validator (:func:`metergate.admin.validation.validate`), a missing body must not be required.
Then the call's parser reads an answer generated from the operation's success schema, twice (every field
present; then only the required ones, nullable ones null), through dicts that record each field the parser
reads: a field the schema does not name, or one read as always present (``j["x"]``) that the schema does not
require, is drift; the typed model that comes out must have the types its annotations say (a ``Decimal``
where the schema's decimal string was, never a float).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

import metergate_client.models as models
from metergate.admin import validation
from metergate.admin.openapi import document
from metergate_client import calls
from metergate_client.calls import Call

DOC = document()
PREFIX = "/admin/v1"



def _names(schema: Any) -> set[str]:
    if isinstance(schema, list):
        return {n for s in schema for n in _names(s)}
    if not isinstance(schema, dict):
        return set()
    return set(schema.get("properties", {})) | {n for v in schema.values() for n in _names(v)}


NAMED = _names(DOC["components"]["schemas"]) | _names(DOC["paths"])  # every field any schema names
RULES = [{"id": "r", "match": {"type": "request"}, "asset": "USD", "rates": {"input_tokens": "1"}}]

SAMPLES: dict[str, Callable[[], Call[Any]]] = {
    # customers, keys, money
    "create_customer": lambda: calls.create_customer("acme", "Acme"),
    "list_customers": lambda: calls.list_customers(10, "acme"),
    "get_customer": lambda: calls.get_customer("acme"),
    "balances": lambda: calls.balances("acme"),
    "credit": lambda: calls.credit("acme", "12.50", asset="USD", idempotency_key="inv-1", memo="m"),
    "issue_key": lambda: calls.issue_key("acme"),
    "revoke_key": lambda: calls.revoke_key("key_1"),
    "ledger": lambda: calls.ledger("acme", 10, "42"),
    "usage": lambda: calls.usage("acme", 10, "42"),
    "portal_link": lambda: calls.portal_link("acme", "view_topup"),
    "dashboard_link": lambda: calls.dashboard_link(),
    "assets": lambda: calls.assets(),
    "list_keys": lambda: calls.list_keys("acme"),
    # grants
    "list_grants": lambda: calls.list_grants("acme", asset="USD", limit=10, cursor="7"),
    "create_grant": lambda: calls.create_grant("acme", "5", asset="USD", purpose="trial", priority=2,
                                               effective_at_ms=1, expires_at_ms=4_102_444_800_000, memo="m",
                                               idempotency_key="trial-1"),
    "void_grant": lambda: calls.void_grant("gr_1"),
    # holds
    "create_hold": lambda: calls.create_hold("acme", "3", asset="GPU_SECONDS", ttl_s=60, idempotency_key="k",
                                             hold_id="job-1"),
    "get_hold": lambda: calls.get_hold("hd_1"),
    "heartbeat": lambda: calls.heartbeat("hd_1", used="1.5", next_amount="3", ttl_s=60),
    "capture": lambda: calls.capture("hd_1", "2", final=True),
    "extend_hold": lambda: calls.extend_hold("hd_1", "2", ttl_s=60),
    "void_hold": lambda: calls.void_hold("hd_1"),
    "list_holds": lambda: calls.list_holds("acme", 10),
    # prices and events
    "quote": lambda: calls.quote("acme", model="gpt-4o-mini", usage={"input_tokens": 900}, feature="search",
                                 route="/openai", attributes={"plan": "pro"}, cost_usd="0.001", version="v1"),
    "send_events": lambda: calls.send_events([{"id": "e1", "customer_id": "acme", "type": "api.call",
                                               "quantity": "1"}]),
    "validate_prices": lambda: calls.validate_prices(RULES),
    "create_price_version": lambda: calls.create_price_version(RULES, note="n", idempotency_key="prices-1"),
    "list_price_versions": lambda: calls.list_price_versions(10, "42"),
    "get_price_version": lambda: calls.get_price_version("pv_1"),
    "simulate_price_version": lambda: calls.simulate_price_version("pv_1", "2026-01-01", 4_102_444_800_000),
    "simulate_prices": lambda: calls.simulate_prices(RULES, "2026-01-01", "2026-02-01"),
    "publish_price_version": lambda: calls.publish_price_version("pv_1", effective_at=4_102_444_800_000),
    # budgets
    "budget_tree": lambda: calls.budget_tree("acme"),
    "get_budget_node": lambda: calls.get_budget_node("acme", "agent-7"),
    "create_budget_node": lambda: calls.create_budget_node("acme", "agent-7", "agent", parent_id="search",
                                                           name="Agent 7", allowed_models=["gpt-4o*"]),
    "update_budget_node": lambda: calls.update_budget_node("acme", "agent-7", name="A7", allowed_models=None),
    "delete_budget_node": lambda: calls.delete_budget_node("acme", "agent-7"),
    "create_budget_limit": lambda: calls.create_budget_limit("acme", "search", "search-spend", dimension="spend",
                                                             amount=5_000_000, window="rolling:1h/60", asset="USD"),
    "update_budget_limit": lambda: calls.update_budget_limit("acme", "search-spend", 6_000_000),
    "delete_budget_limit": lambda: calls.delete_budget_limit("acme", "search-spend"),
    "attach_key": lambda: calls.attach_key("key_1", "agent-7"),
    "list_budget_alerts": lambda: calls.list_budget_alerts("acme"),
    "set_budget_alert": lambda: calls.set_budget_alert("acme", "search-80", "limit:search-spend", percents=[80],
                                                       amounts=[4_000_000]),
    "delete_budget_alert": lambda: calls.delete_budget_alert("acme", "search-80"),
    "list_fired_budget_alerts": lambda: calls.list_fired_budget_alerts("acme"),
}


def test_every_call_has_a_sample() -> None:
    built = {name for name, fn in inspect.getmembers(calls, inspect.isfunction)
             if fn.__module__ == calls.__name__ and inspect.signature(fn).return_annotation.startswith("Call[")}
    assert built == set(SAMPLES)


# ---------------------------------------------------------------------- the document's side


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def operation(call: Call[Any]) -> dict[str, Any]:
    for template, item in DOC["paths"].items():
        pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, PREFIX + call.path.split("?")[0]):
            assert call.method.lower() in item, f"{call.method} {template} is not in the document"
            op: dict[str, Any] = item[call.method.lower()]
            return op
    raise AssertionError(f"no operation in the document for {call.path}")


def answer_schema(op: dict[str, Any]) -> dict[str, Any]:
    # A create replayed under its idempotency key answers 200 with what the first call's 201 did: one schema.
    [ok, *others] = [r for status, r in sorted(op["responses"].items()) if status.startswith("2")]
    assert all(other == ok for other in others), "a call's success answers must share one schema"
    return resolve(ok["content"]["application/json"]["schema"])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_call_is_an_operation_of_the_document_and_its_request_fits(name: str) -> None:
    call = SAMPLES[name]()
    op = operation(call)
    declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
    for param, value in call.params.items():
        assert param in declared, f"{name}: query parameter {param!r} is not declared"
        validation._query_value(declared[param].get("schema", {}), value, param)
    body = op.get("requestBody")
    if call.json is None:
        assert body is None or not body["required"], f"{name}: the operation requires a body"
    else:
        assert body is not None, f"{name}: sends a body to an operation that takes none"
        validation.validate(body["content"]["application/json"]["schema"], call.json)


# ---------------------------------------------------------------------- the answer's side


class Read(dict[str, Any]):
    """An answer object that records the fields its reader asks for, and how."""

    def __init__(self, schema: dict[str, Any], where: str, drift: list[str], values: dict[str, Any]) -> None:
        super().__init__(values)
        self.schema, self.where, self.drift = schema, where, drift

    def _ask(self, key: str, always: bool) -> None:
        properties = self.schema.get("properties", {})
        open_map = isinstance(self.schema.get("additionalProperties"), dict)
        if key not in properties and not open_map and (always or key not in NAMED):
            # A model may read a field of another operation's answer with .get (Customer.balances, only in
            # GET /customers/{id}); a field no answer names at all is a misspelling.
            self.drift.append(f"{self.where}.{key}: read, but not in the schema")
        elif always and key in properties and key not in self.schema.get("required", []):
            self.drift.append(f"{self.where}.{key}: read as always present, but the schema does not require it")

    def __getitem__(self, key: str) -> Any:
        self._ask(key, always=True)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._ask(key, always=False)
        return super().get(key, default)


def instance(schema: dict[str, Any], where: str, drift: list[str], *, full: bool) -> Any:
    """A value of ``schema``: ``full`` with every property and non-null values, else the least it allows."""
    schema = resolve(schema)
    if "anyOf" in schema:
        options = [resolve(s) for s in schema["anyOf"]]
        if not full and any(o.get("type") == "null" for o in options):
            return None
        return instance(next(o for o in options if o.get("type") != "null"), where, drift, full=full)
    if "const" in schema:
        return schema["const"]
    kinds = schema.get("type", "object")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "null" in kinds and not full:
        return None
    if "enum" in schema:
        return next(v for v in schema["enum"] if v is not None)
    kind = next(k for k in kinds if k != "null")
    if kind == "object":
        names = schema.get("properties", {}) if full else schema.get("required", [])
        values = {n: instance(schema["properties"][n], f"{where}.{n}", drift, full=full) for n in names}
        return Read(schema, where, drift, values)
    if kind == "array":
        return [instance(schema.get("items", {}), f"{where}[]", drift, full=full)] if full else []
    if kind == "string":
        return "1.5" if "pattern" in schema and "[0-9]" in schema["pattern"] else "text"
    return {"integer": 7, "number": 7, "boolean": True}[kind]


def fits(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, typing.TypeVar):
        return True
    return isinstance(value, origin or hint)


def typed(value: Any, where: str) -> list[str]:
    """What in a parsed model does not have the type its annotation names."""
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in typed(v, f"{where}[{i}]")]
    if not dataclasses.is_dataclass(value):
        return []
    hints = get_type_hints(type(value), vars(models))
    wrong = []
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if not fits(item, hints[f.name]):
            wrong.append(f"{where}.{f.name}: {item!r} is not {hints[f.name]}")
        wrong += typed(item, f"{where}.{f.name}")
    return wrong


@pytest.mark.parametrize("full", [True, False], ids=["every-field", "required-only"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_typed_model_reads_what_the_answer_schema_promises(name: str, full: bool) -> None:
    call = SAMPLES[name]()
    schema = answer_schema(operation(call))
    drift: list[str] = []
    parsed = call.parse(instance(schema, name, drift, full=full))
    assert not drift, drift
    assert not typed(parsed, name)
    assert not any(isinstance(v, float) for v in vars_of(parsed)), "a float in a model"


def vars_of(value: Any) -> list[Any]:
    if dataclasses.is_dataclass(value):
        found = [getattr(value, f.name) for f in dataclasses.fields(value)]
        return found + [x for v in found for x in vars_of(v)]
    if isinstance(value, list):
        return [x for v in value for x in vars_of(v)]
    return []


def test_a_decimal_field_of_the_answers_is_a_decimal_string_in_the_schema() -> None:
    """The models read money as ``Decimal(j["..._decimal"])``: the schema must promise a decimal string there
    (a JSON number would reach a generated client as a float)."""
    for name in ("Balance", "LedgerEntry", "UsageRecord", "Grant", "Quote"):
        for prop, sub in DOC["components"]["schemas"][name]["properties"].items():
            if prop.endswith("_decimal"):
                assert sub["type"] == "string", (name, prop)
                assert re.match(sub["pattern"], "12.500000") and not re.match(sub["pattern"], "1e5"), (name, prop)
