"""JSON Schemas of what the admin API answers, derived from the types its handlers serialize.

A handler answers ``asdict(value)`` of a frozen dataclass (:mod:`metergate.wallet.models` and its neighbours),
sometimes with a few computed fields beside it (``amount_decimal``, ``free``), or a view declared as a
``TypedDict`` that mypy holds the handler's dict literal to (:class:`metergate.admin.views.BalanceView`,
:class:`metergate.wallet.holds.HoldView`). This module reads those same types, so a field added to a
dataclass, renamed or made nullable changes the published document with it: the shape is written once.

Every field a handler always sends is ``required``; ``Optional`` fields are ``["...", "null"]``, not
omitted. The published schemas leave ``additionalProperties`` open (a client generated from the document keeps
working when a field is added); the conformance test closes them (tests/admin/test_schemathesis.py), so an
answer with a field the document does not name fails there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

Schema = dict[str, Any]

INTEGER: Schema = {"type": "integer"}
MS: Schema = {"type": "integer", "description": "epoch milliseconds"}
DECIMAL: Schema = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
                   "description": "exact decimal in the asset's major unit"}


@dataclasses.dataclass(frozen=True)
class Keywords:
    """Schema keywords for an ``Annotated`` type (a tuple of pairs: ``Annotated`` needs its metadata hashable)."""

    items: tuple[tuple[str, str], ...]


# A view's field that is a decimal string (``available_decimal: DecimalText``): the schema says which strings.
DecimalText = Annotated[str, Keywords(tuple(DECIMAL.items()))]
_SIMPLE = {str: "string", int: "integer", bool: "boolean", float: "number", type(None): "null"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    kinds = schema.get("type")
    out = {**schema, "type": [*(kinds if isinstance(kinds, list) else [kinds]), "null"]}
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


def schema_of(tp: Any) -> Schema:
    """The JSON Schema of a Python type as ``json.dumps(asdict(...))`` writes it."""
    if tp is Any or tp is object:
        return {}
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return {**schema_of(args[0]), **{k: v for extra in args[1:] if isinstance(extra, Keywords)
                                         for k, v in extra.items}}
    if origin is Literal:
        kinds = sorted({_SIMPLE[type(a)] for a in args})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        inner = schema_of(present[0]) if len(present) == 1 else {"anyOf": [schema_of(a) for a in present]}
        return nullable(inner) if len(present) < len(args) else inner
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        return {"type": "array", **({"items": schema_of(items[0])} if items else {})}
    if origin is dict or tp is dict:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", **({"additionalProperties": schema_of(value)} if value is not Any else {})}
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        return object_of(tp)
    raise TypeError(f"no JSON Schema for {tp!r}")


def object_of(cls: type, *, add: dict[str, Schema] | None = None, drop: tuple[str, ...] = (),
              description: str | None = None) -> Schema:
    """The object ``asdict`` makes of the dataclass ``cls`` (or the ``TypedDict`` ``cls``), every field
    required; ``add`` names what the handler puts beside it, ``drop`` what it leaves out."""
    hints = get_type_hints(cls, include_extras=True)
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        required = set(names)
    else:
        names = list(hints)
        required = set(cls.__required_keys__)  # type: ignore[attr-defined]
    properties = {name: schema_of(hints[name]) for name in names if name not in drop}
    properties.update(add or {})
    schema: Schema = {"type": "object", "properties": properties,
                      "required": [n for n in properties if n in required or n in (add or {})]}
    doc = description or (cls.__doc__ or "").strip().split("\n\n")[0]
    if doc and not doc.startswith(cls.__name__ + "("):  # a dataclass's generated signature says nothing
        schema["description"] = " ".join(doc.split())
    return schema


def envelope(properties: dict[str, Schema], *optional: str, description: str | None = None) -> Schema:
    """An answer object written by hand around components: every property required but ``optional``."""
    schema: Schema = {"type": "object", "properties": properties,
                      "required": [n for n in properties if n not in optional]}
    if description:
        schema["description"] = description
    return schema


def data_of(item: Schema, **more: Schema) -> Schema:
    """``{"data": [item, ...]}`` (and ``more`` beside it)."""
    return envelope({"data": {"type": "array", "items": item}, **more})


def page_of(item: Schema, cursor: Schema) -> Schema:
    """A page: ``data`` and the ``next_cursor`` to send for the next one (``null`` on the last page)."""
    return data_of(item, next_cursor=nullable(cursor))
