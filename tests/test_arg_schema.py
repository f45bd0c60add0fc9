"""The fast check of simple argument schemas never accepts what jsonschema refuses, and a schema
it does not know always goes to jsonschema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from approvals.arg_schema import SchemaCache, _simple

TYPES = ["string", "integer", "number", "boolean", "null"]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
names = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def simple_schemas(draw: st.DrawFn) -> dict[str, Any]:
    properties = draw(st.dictionaries(names, st.sampled_from(TYPES).map(lambda t: {"type": t}), max_size=4))
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if draw(st.booleans()):
        schema["required"] = draw(st.lists(names, max_size=3, unique=True))
    if draw(st.booleans()):
        schema["description"] = "annotations change nothing"
    return schema


@settings(max_examples=400, deadline=None)
@given(simple_schemas(), st.dictionaries(names, values, max_size=4))
def test_the_fast_check_accepts_only_what_jsonschema_accepts(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    """Whenever the fast check accepts, jsonschema agrees (it may defer more than it needs to)."""
    fast = _simple(schema)
    assert fast is not None
    if fast.accepts(arguments):
        assert Draft202012Validator(schema).is_valid(arguments)


def test_schemas_with_other_keywords_are_left_to_jsonschema() -> None:
    """Any keyword that constrains values (or a type list, or closed objects) means no fast check."""
    for schema in (
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
        {"type": "object", "properties": {"s": {"type": ["string", "null"]}}},
        {"type": "object", "properties": {"s": {"type": "string"}}, "additionalProperties": False},
        {"type": "object", "properties": {"s": {"$ref": "#/$defs/x"}}},
        {"type": "object", "properties": {"s": {"type": "string"}}, "required": "s"},
        {"type": "array"},
    ):
        assert _simple(schema) is None


def test_the_cache_still_names_the_problem_the_fast_check_passes_on() -> None:
    """A mismatch on a simple schema is still judged, and named, by jsonschema."""
    tool = SchemaCache().compile(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )
    assert tool.problem({"n": 5}) is None
    assert tool.problem({"n": 5.0}) is None  # jsonschema's integer: the fast check defers, it accepts
    problem = tool.problem({"n": "5"})
    assert problem is not None
    assert problem.path == "args.n"
    missing = tool.problem({})
    assert missing is not None


class Refusing:
    """A validator that must not be reached."""

    def is_valid(self, instance: object) -> bool:
        raise AssertionError("jsonschema ran where the fast check should have answered")

    def iter_errors(self, instance: object) -> Iterator[Any]:
        raise AssertionError("jsonschema ran where the fast check should have answered")


def test_matching_arguments_on_a_simple_schema_never_reach_jsonschema() -> None:
    """The bench's `echo` schema: an allowed call is answered by the fast check alone (the cost
    itself is measured by bench/, not here)."""
    tool = SchemaCache().compile({"type": "object", "properties": {"text": {"type": "string"}}})
    tool.validator = Refusing()
    assert tool.problem({"text": "hi"}) is None
