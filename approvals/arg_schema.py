"""A call's arguments checked against its tool's `inputSchema`, before the policy's verdict is acted on.

Upstreams coerce what they are sent (pydantic's lax mode reads "5000" as 5000 for an integer
field). Strict JSON Schema validation refuses such a call instead, so no value reaches the upstream
in a form other than the one the policy judged.

Validators are compiled once per schema (keyed by its canonical sha256) and once per definition
object the catalog holds, so an allowed call pays two dict lookups plus the validation itself. A
schema that is itself invalid, or that fails while validating (an unresolvable `$ref`), is skipped
and logged once: the policy still applies, and the upstream still validates.

Most tools' schemas are an object of typed fields (`{"type": "object", "properties": {"text":
{"type": "string"}}, "required": [...]}`). For those a fast check runs first; it only ever
*accepts* arguments jsonschema would accept too, and anything else — a mismatch, or a schema with
any other keyword — goes to jsonschema, which decides and names the problem. (jsonschema took
7.8 µs per call on such a schema; the fast check takes well under one.)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from jsonschema import exceptions, validators

from approvals.core.model import sha256_of

log = logging.getLogger(__name__)

MAX_SCHEMAS = 1024  # compiled validators kept; upstreams list a bounded number of tools
MESSAGE_CHARS = 200  # jsonschema's messages quote the value, which may be large


class Validator(Protocol):
    """What is used of a jsonschema validator (the package ships no type hints)."""

    def is_valid(self, instance: object) -> bool: ...

    def iter_errors(self, instance: object) -> Iterator[Any]: ...


@dataclass(frozen=True, slots=True)
class ArgumentProblem:
    """Where the arguments break the schema ("args.amount") and how."""

    path: str
    message: str


# What the fast check knows of a field's "type": the Python values jsonschema accepts for it.
_FAST_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
# Keywords that do not change what a schema accepts (annotations), beside the ones checked.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment"})


@dataclass(frozen=True, slots=True)
class _Simple:
    """An object schema of typed fields, checked without jsonschema."""

    fields: Mapping[str, Callable[[object], bool]]
    required: frozenset[str]

    def accepts(self, arguments: Mapping[str, object]) -> bool:
        if not self.required <= arguments.keys():
            return False
        fields = self.fields
        return all(key not in fields or fields[key](value) for key, value in arguments.items())


def _simple(schema: Mapping[str, Any]) -> _Simple | None:
    """The fast check for `schema`, or None when it has anything the fast check does not know."""
    if schema.get("type") != "object" or not set(schema) <= {
        "type",
        "properties",
        "required",
        "additionalProperties",
        *_ANNOTATIONS,
    }:
        return None
    if schema.get("additionalProperties", True) is not True:
        return None
    properties, required = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        return None
    if not all(isinstance(name, str) for name in required):
        return None
    fields: dict[str, Callable[[object], bool]] = {}
    for name, field_schema in properties.items():
        if not isinstance(field_schema, dict) or not set(field_schema) <= {"type", *_ANNOTATIONS}:
            return None
        kind = field_schema.get("type")
        check = _FAST_TYPES.get(kind) if isinstance(kind, str) else None  # ["string", "null"]: no
        if check is None:
            return None
        fields[name] = check
    return _Simple(fields, frozenset(required))


class ToolSchema:
    """One tool's compiled inputSchema; `validator` is None when the schema cannot be used."""

    def __init__(self, sha: str, validator: Validator | None, simple: _Simple | None = None) -> None:
        self.sha = sha
        self.validator = validator
        self._simple = simple

    def problem(self, arguments: Mapping[str, object]) -> ArgumentProblem | None:
        """The most relevant way `arguments` break the schema, or None when they match."""
        validator = self.validator
        if validator is None:
            return None
        if self._simple is not None and self._simple.accepts(arguments):
            return None
        try:
            if validator.is_valid(arguments):
                return None
            error = exceptions.best_match(validator.iter_errors(arguments))
        except Exception as exc:  # an unresolvable $ref, recursion too deep: the schema is unusable
            log.warning("inputSchema %s cannot be used, arguments go unchecked: %s", self.sha[:12], exc)
            self.validator = None
            return None
        if error is None:
            return None
        message = error.message
        if len(message) > MESSAGE_CHARS:
            message = message[: MESSAGE_CHARS - 1] + "…"
        return ArgumentProblem(
            "".join(f".{part}" for part in error.absolute_path).join(("args", "")), message
        )


class SchemaCache:
    """Compiled schemas by canonical sha256, so a definition listed again is not compiled again."""

    def __init__(self) -> None:
        self._compiled: dict[str, ToolSchema] = {}

    def compile(self, schema: object) -> ToolSchema:
        """`schema` compiled on first sight; one that is not a valid JSON Schema checks nothing."""
        if not isinstance(schema, dict):
            return _UNCHECKED  # no schema (or not an object): the upstream validates alone
        sha = sha256_of(schema)
        found = self._compiled.get(sha)
        if found is None:
            if len(self._compiled) >= MAX_SCHEMAS:
                self._compiled.clear()
            validator = _compile(schema, sha)
            simple = _simple(schema) if validator is not None else None
            found = self._compiled[sha] = ToolSchema(sha, validator, simple)
        return found


def _compile(schema: dict[str, Any], sha: str) -> Validator | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown "$schema" warns, then falls back to the default
            cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        cls.check_schema(schema)
        compiled: Validator = cls(schema)
        return compiled
    except Exception as exc:  # SchemaError, or whatever else the schema's oddities raise
        log.warning("inputSchema %s is invalid, arguments go unchecked: %s", sha[:12], exc)
        return None


_UNCHECKED = ToolSchema("", None)
