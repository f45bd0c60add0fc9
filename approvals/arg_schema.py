"""A call's arguments checked against its tool's `inputSchema`, before the policy's verdict is acted on.

Upstreams coerce what they are sent (pydantic's lax mode reads "5000" as 5000 for an integer
field). Strict JSON Schema validation refuses such a call instead, so no value reaches the upstream
in a form other than the one the policy judged.

Validators are compiled once per schema (keyed by its canonical sha256) and once per definition
object the catalog holds, so an allowed call pays two dict lookups plus the validation itself. A
schema that is itself invalid, or that fails while validating (an unresolvable `$ref`), is skipped
and logged once: the policy still applies, and the upstream still validates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
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


class ToolSchema:
    """One tool's compiled inputSchema; `validator` is None when the schema cannot be used."""

    def __init__(self, sha: str, validator: Validator | None) -> None:
        self.sha = sha
        self.validator = validator

    def problem(self, arguments: Mapping[str, object]) -> ArgumentProblem | None:
        """The most relevant way `arguments` break the schema, or None when they match."""
        validator = self.validator
        if validator is None:
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
            found = self._compiled[sha] = ToolSchema(sha, _compile(schema, sha))
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
