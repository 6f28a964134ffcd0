"""The answer schemas are derived from Python types: each kind of field a handler serializes maps to the JSON
Schema of what ``json.dumps(asdict(...))`` writes for it.

Method: table-driven, one row per kind of type (grouped as scalars, optional and literal, containers, objects),
against :func:`metergate.admin.schemas.schema_of` and :func:`object_of`; no server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import pytest

from metergate.admin.schemas import DECIMAL, DecimalText, object_of, schema_of


@dataclass(frozen=True)
class Line:
    """A line of something."""

    name: str
    amount: int


class View(TypedDict, total=False):
    shown: DecimalText


@pytest.mark.parametrize(("tp", "expected"), [
    # scalars
    (str, {"type": "string"}), (int, {"type": "integer"}), (bool, {"type": "boolean"}), (Any, {}),
    # optional and literal: null is a value the answer carries, never an omitted field
    (int | None, {"type": ["integer", "null"]}),
    (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
    (Literal["a"] | None, {"type": ["string", "null"], "enum": ["a", None]}),
    # containers
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (tuple[str, ...], {"type": "array", "items": {"type": "string"}}),
    (dict[str, str], {"type": "object", "additionalProperties": {"type": "string"}}),
    (dict[str, Any], {"type": "object"}),
    # annotated: the keywords join the base type's
    (DecimalText, {"type": "string", **DECIMAL}),
])
def test_a_type_maps_to_the_schema_of_its_json(tp: Any, expected: dict[str, Any]) -> None:
    assert schema_of(tp) == expected


def test_a_dataclass_is_an_object_with_every_field_required_and_what_the_handler_adds() -> None:
    schema = object_of(Line, add={"amount_decimal": DECIMAL}, drop=("name",))
    assert schema == {"type": "object", "properties": {"amount": {"type": "integer"}, "amount_decimal": DECIMAL},
                      "required": ["amount", "amount_decimal"], "description": "A line of something."}
    assert schema_of(tuple[Line, ...])["items"]["required"] == ["name", "amount"]


def test_a_typeddict_requires_only_its_required_keys() -> None:
    assert object_of(View)["required"] == []


def test_a_type_json_cannot_carry_is_refused() -> None:
    @dataclass
    class Odd:
        when: set[int] = field(default_factory=set)

    with pytest.raises(TypeError):
        object_of(Odd)
