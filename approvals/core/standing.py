"""Standing grants: "approve (or deny) and remember" — pure, no I/O.

A reviewer who approves a held call may save a standing grant with it: for this agent (the
``[[grants]]`` credential), this upstream and tool, calls whose arguments match the grant's
constraints are allowed without asking anyone, for a time and at most a number of uses. "Deny and
remember" refuses matching calls the same way.

Matching is strict and fails closed: every top-level argument of the call must be named by a
constraint, and every constraint must hold on the value as given — a number is a JSON number (a
numeric string does not fall in a range), a prefix applies to strings only. A call that does not
match is judged by the policy as if no grant existed.

Constraints, each on one top-level argument ``field``:

    eq      the value, exactly (canonical JSON equality; objects and lists compared whole)
    in      one of the listed values, exactly
    prefix  a string starting with the given string
    range   a number with ``min <= value <= max`` (either bound may be None)
    any     any value, or the field left out
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, get_args

from approvals.core.model import canonical_json

__all__ = [
    "CONSTRAINT_OPS",
    "MAX_USES_LIMIT",
    "REMEMBER_CHOICES",
    "REMEMBER_MAX_SECONDS",
    "REMEMBER_MIN_SECONDS",
    "Constraint",
    "ConstraintOp",
    "Effect",
    "RememberRequest",
    "StandingGrant",
    "constraints_from_json",
    "constraints_to_json",
    "exact_constraints",
    "new_standing_id",
    "parse_constraints",
]

ConstraintOp: TypeAlias = Literal["eq", "in", "prefix", "range", "any"]
CONSTRAINT_OPS: tuple[ConstraintOp, ...] = get_args(ConstraintOp)
Effect: TypeAlias = Literal["allow", "deny"]
MAX_CONSTRAINTS = 64
MAX_IN_VALUES = 100
ID_PREFIX = "sg_"  # standing grant ids share the audit log with approval ids; the prefix tells them apart


def new_standing_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Constraint:
    field: str
    op: ConstraintOp
    value: Any = None  # eq: a JSON value; in: a list; prefix: a string; range: [min, max]

    def holds(self, arguments: Mapping[str, object]) -> bool:
        if self.field not in arguments:
            return self.op == "any"
        given = arguments[self.field]
        if self.op == "any":
            return True
        if self.op == "eq":
            return canonical_json(given) == canonical_json(self.value)
        if self.op == "in":
            text = canonical_json(given)
            return any(text == canonical_json(v) for v in self.value)
        if self.op == "prefix":
            return isinstance(given, str) and given.startswith(self.value)
        low, high = self.value
        return _is_number(given) and (low is None or given >= low) and (high is None or given <= high)

    def describe(self) -> str:
        """ "to starts with "ops-"", for reviewers (plain text: callers escape it)."""
        if self.op == "eq":
            return f"{self.field} = {canonical_json(self.value)}"
        if self.op == "in":
            return f"{self.field} is one of {', '.join(canonical_json(v) for v in self.value)}"
        if self.op == "prefix":
            return f"{self.field} starts with {canonical_json(self.value)}"
        if self.op == "range":
            low, high = self.value
            if low is not None and high is not None:
                return f"{low} ≤ {self.field} ≤ {high}"
            return f"{self.field} ≥ {low}" if low is not None else f"{self.field} ≤ {high}"
        return f"{self.field}: any value"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "op": self.op}
        if self.op != "any":
            out["value"] = list(self.value) if self.op in ("in", "range") else self.value
        return out

    def as_policy_conditions(self) -> list[dict[str, Any]]:
        """The policy ``approval_if`` conditions that fire when this constraint does NOT hold."""
        path = f"args.{self.field}"
        if self.op == "eq":
            return [{"path": path, "op": "neq", "value": self.value}]
        if self.op == "in":
            return [{"path": path, "op": "not_in", "value": list(self.value)}]
        if self.op == "prefix":
            return [{"path": path, "op": "regex", "value": f"^(?!{re.escape(self.value)})"}]
        if self.op == "range":
            low, high = self.value
            out = []
            if low is not None:
                out.append({"path": path, "op": "lt", "value": low})
            if high is not None:
                out.append({"path": path, "op": "gt", "value": high})
            return out
        return []


def exact_constraints(arguments: Mapping[str, object]) -> tuple[Constraint, ...]:
    """One ``eq`` per top-level argument: the approved call, exactly."""
    return tuple(Constraint(name, "eq", value) for name, value in sorted(arguments.items()))


def parse_constraints(raw: object, path: str = "constraints") -> tuple[Constraint, ...] | str:
    """Constraints from untrusted JSON (a reviewer's form or API body), or what is wrong and where."""
    if not isinstance(raw, list):
        return f"{path}: must be a list of constraints"
    if len(raw) > MAX_CONSTRAINTS:
        return f"{path}: at most {MAX_CONSTRAINTS} constraints"
    found: list[Constraint] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            return f'{where}: must be an object like {{"field": "to", "op": "eq", "value": "x"}}'
        unknown = sorted(set(item) - {"field", "op", "value"})
        if unknown:
            return f"{where}: unknown field {unknown[0]!r}"
        name, op, value = item.get("field"), item.get("op"), item.get("value")
        if not isinstance(name, str) or not name:
            return f"{where}.field: must be the name of an argument"
        if name in seen:
            return f"{where}.field: {name!r} is constrained twice"
        seen.add(name)
        if op not in CONSTRAINT_OPS:
            return f"{where}.op: must be one of {', '.join(CONSTRAINT_OPS)}"
        problem = _value_problem(op, value, "value" in item)
        if problem:
            return f"{where}.value: {problem}"
        if op in ("in", "range") and isinstance(value, list):
            value = tuple(value)
        found.append(Constraint(name, op, value if op != "any" else None))
    return tuple(found)


def _value_problem(op: str, value: object, given: bool) -> str | None:
    if op == "any":
        return None
    if not given:
        return f'missing (op "{op}" needs a value)'
    if op == "in":
        if not isinstance(value, list) or not value:
            return "must be a non-empty list of values"
        if len(value) > MAX_IN_VALUES:
            return f"at most {MAX_IN_VALUES} values"
    elif op == "prefix":
        if not isinstance(value, str) or not value:
            return "must be a non-empty string"
    elif op == "range":
        if not (isinstance(value, list) and len(value) == 2):
            return "must be [min, max] (either may be null)"
        if not all(v is None or _is_number(v) for v in value) or value == [None, None]:
            return "min and max must be numbers (at most one null)"
        if value[0] is not None and value[1] is not None and value[0] > value[1]:
            return "min must not be greater than max"
    return None


def constraints_to_json(constraints: Iterable[Constraint]) -> str:
    return json.dumps([c.as_json() for c in constraints], sort_keys=True, separators=(",", ":"))


def constraints_from_json(text: str) -> tuple[Constraint, ...]:
    parsed = parse_constraints(json.loads(text))
    if isinstance(parsed, str):  # only ever written by parse_constraints' own output
        raise ValueError(f"stored constraints are invalid: {parsed}")
    return parsed


@dataclass(frozen=True, slots=True)
class StandingGrant:
    """A reviewer's remembered decision for one agent's calls of one tool."""

    id: str
    effect: Effect
    upstream: str
    tool: str
    grant: str  # the agent's [[grants]] name
    constraints_json: str
    rule: str  # the policy rule the approved call was held under
    reason: str | None  # deny: what the agent is told; allow: the reviewer's note
    created_by: str
    created_via: str
    created_at: float
    expires_at: float
    max_uses: int | None  # None: unlimited within the time
    uses: int = 0
    source_approval: str = ""
    revoked_at: float | None = None
    revoked_by: str | None = None
    _parsed: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def constraints(self) -> tuple[Constraint, ...]:
        if "c" not in self._parsed:
            self._parsed["c"] = constraints_from_json(self.constraints_json)
        return self._parsed["c"]  # type: ignore[no-any-return]

    def matches(self, arguments: Mapping[str, object]) -> bool:
        """Every argument is constrained and every constraint holds (see the module docstring)."""
        named = {c.field for c in self.constraints}
        return all(name in named for name in arguments) and all(c.holds(arguments) for c in self.constraints)

    def state(self, now: float) -> Literal["active", "revoked", "expired", "used_up"]:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used_up"
        return "active"

    def as_policy_rule(self) -> dict[str, Any]:
        """The policy.json rule it amounts to, for the tool — with what a policy cannot say.

        A policy has no per-agent scope, expiry or use count; those are listed under ``notes``.
        """
        notes = [
            f"a policy rule applies to every agent, not only {self.grant}",
            "a policy rule does not expire and has no use count",
        ]
        if self.effect == "deny":
            rule: dict[str, Any] = {"action": "deny", "reason": self.reason or "denied by a reviewer"}
            notes.append("the deny applies to every call of the tool; the constraints are not kept")
            return {"tools": {self.tool: rule}, "notes": notes}
        conditions = [cond for c in self.constraints for cond in c.as_policy_conditions()]
        rule = {"action": "allow", "approval_if": conditions} if conditions else {"action": "allow"}
        notes.append("arguments the grant does not name still match the rule")
        return {"tools": {self.tool: rule}, "notes": notes}


# What a reviewer may choose for a standing grant's life (the inbox and Slack offer these; the API
# and CLI accept any duration from a minute to a week).
REMEMBER_CHOICES: tuple[tuple[str, float], ...] = (
    ("1 hour", 3600.0),
    ("8 hours", 28800.0),
    ("24 hours", 86400.0),
)
REMEMBER_MIN_SECONDS = 60.0
REMEMBER_MAX_SECONDS = 7 * 86400.0
MAX_USES_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class RememberRequest:
    """ "Approve (or deny) and remember": for how long, how many uses, and which later calls.

    ``constraints`` None means the approved call's arguments exactly (after any edit).
    """

    seconds: float
    max_uses: int | None = None
    constraints: tuple[Constraint, ...] | None = None
