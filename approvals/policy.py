"""Policy engine: validate a policy.json document once, then decide every tools/call.

Pure: no I/O, no clock, no logging. `parse_policy` checks the whole document, collecting every
issue with its path, and compiles globs, regexes and argument paths once, so `Policy.evaluate`
is a cached dict lookup plus the matched rule's conditions.

Per call (`Policy` says how the rule is found): hide / action deny > `require` fails >
`deny_if` holds > require_approval (the action, or an `approval_if` that holds) > allow.
A condition on a missing path or on a value of the wrong type for its op (`gt` on a string;
booleans are never numbers) does not hold, and only `exists` sees absence: so `require` fails
closed (deny) while `deny_if` / `approval_if` just do not fire.

Errors: `PolicyError` (an `ApprovalsError`) holding every `PolicyIssue`; nothing else on purpose.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, TypeVar

from approvals.durations import parse_duration
from approvals.errors import ApprovalsError, Issue

Window = Literal["second", "minute", "hour", "day"]
Scope = Literal["grant", "session", "global"]
WINDOW_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class Limit:
    """One rate limit of a rule: at most `max` per `window` per `scope`, counted in `counter`."""

    counter: str
    window: Window
    max: float
    scope: Scope
    increment_from: str | None = None  # a path such as "args.amount"; None counts 1 per call


Action = Literal["allow", "deny", "require_approval"]
_T = TypeVar("_T")
_ACTIONS: dict[str, Action] = {"allow": "allow", "deny": "deny", "require_approval": "require_approval"}
_WINDOWS: dict[str, Window] = {"second": "second", "minute": "minute", "hour": "hour", "day": "day"}
_SCOPES: dict[str, Scope] = {"grant": "grant", "session": "session", "global": "global"}
_Compare = Callable[[float, float], bool]
_COMPARE: dict[str, _Compare] = {"lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge}
_OP_NAMES = ("eq", "neq", "in", "not_in", "lt", "lte", "gt", "gte", "regex", "contains", "exists")
_OPS = {op: op for op in _OP_NAMES}
_TOP_FIELDS = ("version", "default", "hide", "all_tools", "tools")
_RULE_FIELDS = ("action", "reason", "description", "require", "deny_if", "approval_if", "limits", "approval")
_LIMIT_FIELDS = ("counter", "window", "max", "scope", "increment_from")
# fnmatch's wildcard tokens; the possessive "!?+" and "\]?+" copy its scan, which never gives
# back a "!" or a leading "]" it has taken into a bracket class.
_GLOB_TOKEN = re.compile(r"\*+|\?|\[!?+\]?+[^\]]*\]")
_COUNTER_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_PLAIN_KEY = re.compile(r"[^.\s\"]+")  # tool keys that need no quoting inside an issue path
_CACHE_MAX = 4096  # agents may send any tool name, so the per-name cache must stay bounded
_ABSENT: Any = object()  # a field that is not in the document (distinct from JSON null)


class PolicyError(ApprovalsError):
    """The policy is invalid. `errors` holds every issue found; str() lists them one per line."""

    def __init__(self, errors: Iterable[PolicyIssue]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(f"{issue.path}: {issue.message}" for issue in self.errors))


# One problem in a policy: where it is (`tools.x.limits[0].max`) and what is expected. The same
# type as a config problem, so `approvals check` reports both without converting.
PolicyIssue = Issue


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one call, with the words for the agent and for a reviewer."""

    action: Action
    rule: str  # the matched tool key, "default" or "hide"
    code: str  # allowed | approval_required | denied | hidden | requirement_failed | deny_if
    reason: str | None  # for deny: what the agent is told
    explanation: str  # why, for reviewers and the audit log
    limits: tuple[Limit, ...]  # all_tools limits then the rule's own; empty when denied
    approval_timeout: float | None  # seconds; None = the gateway default


@dataclass(frozen=True, slots=True)
class _Condition:
    path: str
    text: str  # "args.amount gt 10000", as shown in reasons and explanations
    segments: tuple[str, ...]
    test: Callable[[object], bool]  # applied to a value that was found; never raises
    exists: bool | None  # for op "exists": whether the value must be present

    def check(self, arguments: Mapping[str, object]) -> tuple[bool, bool, object]:
        """(holds, found, value) for `arguments`."""
        found, value = _walk(arguments, self.segments)
        if self.exists is not None:
            return found == self.exists, found, value
        return found and self.test(value), found, value


@dataclass(frozen=True, slots=True)
class _Rule:
    key: str
    action: Action
    reason: str | None
    require: tuple[_Condition, ...]
    deny_if: tuple[_Condition, ...]
    approval_if: tuple[_Condition, ...]
    limits: tuple[Limit, ...]  # all_tools limits first
    timeout: float | None


@dataclass(frozen=True, slots=True)
class _Plan:
    """A rule whose outcome depends on the arguments, and its outcome when no condition fires."""

    rule: _Rule
    passed: Decision


class Policy:
    """A validated, compiled policy; build it with `parse_policy` or `load_policy`.

    The rule for a tool name, first match wins:

    1. any `hide` entry matches → denied ("hidden");
    2. the tool key equal to the name;
    3. the most specific matching glob: the most literal (non-wildcard) characters, then the
       fewest `*`, then the fewest `?` / `[...]`, then the key that sorts first (see
       `glob_specificity`; so `get_[ab]` beats `get_*`, and `a?c` beats `a*c`);
    4. `default`.
    """

    def __init__(self, default: _Rule, exact: dict[str, _Rule], globs: list[_Rule], hide: list[str]) -> None:
        self._default = default
        self._exact = exact
        # Sorted once, most specific first, so the first glob that matches is the winner.
        self._globs = [(re.compile(fnmatch.translate(r.key)), r) for r in sorted(globs, key=_glob_order)]
        self._hide = [(re.compile(fnmatch.translate(p)), p) for p in hide]
        self._cache: dict[str, Decision | _Plan] = {}

    def evaluate(self, tool: str, arguments: Mapping[str, object]) -> Decision:
        """Decide a call of `tool` with `arguments`. Never raises for JSON-like arguments."""
        entry = self._lookup(tool)
        if isinstance(entry, Decision):
            return entry
        rule = entry.rule
        for cond in rule.require:
            holds, found, value = cond.check(arguments)
            if not holds:
                why = f"rule {rule.key}: require {cond.text} failed ({_shown(found, value)})"
                return _deny(rule, "requirement_failed", rule.reason or _requirement_reason(cond, found), why)
        for cond in rule.deny_if:
            holds, found, value = cond.check(arguments)
            if holds:
                why = f"rule {rule.key}: deny_if {cond.text} ({_shown(found, value)})"
                return _deny(rule, "deny_if", rule.reason or f"{cond.text} holds", why)
        if rule.action == "allow":
            for cond in rule.approval_if:
                holds, found, value = cond.check(arguments)
                if holds:
                    why = f"rule {rule.key}: approval_if {cond.text} ({_shown(found, value)})"
                    code = "approval_required"
                    return Decision("require_approval", rule.key, code, None, why, rule.limits, rule.timeout)
        return entry.passed

    def is_hidden(self, tool: str) -> bool:
        """Whether `tool` must be left out of tools/list (it is also denied on call)."""
        entry = self._lookup(tool)
        return isinstance(entry, Decision) and entry.code == "hidden"

    def _lookup(self, tool: str) -> Decision | _Plan:
        entry = self._cache.get(tool)
        if entry is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            entry = self._cache[tool] = self._resolve(tool)
        return entry

    def _resolve(self, tool: str) -> Decision | _Plan:
        name = _quote(tool)
        for regex, pattern in self._hide:
            if regex.match(tool):
                why = f"tool {name} matches hide entry {_quote(pattern)}"
                return Decision("deny", "hide", "hidden", f"tool {name} is not available", why, (), None)
        rule = self._exact.get(tool) or next((r for rx, r in self._globs if rx.match(tool)), self._default)
        conditional = bool(rule.require or rule.deny_if or rule.approval_if)
        if rule is self._default:
            why = f"no rule for tool {name}; default {rule.action}"
        else:
            why = f"rule {rule.key}: action {rule.action}" + (", conditions passed" if conditional else "")
        if rule.action == "deny":
            return _deny(rule, "denied", rule.reason or f"tool {name} is not allowed by policy", why)
        code = "allowed" if rule.action == "allow" else "approval_required"
        passed = Decision(rule.action, rule.key, code, None, why, rule.limits, rule.timeout)
        # Only a rule with conditions needs the arguments; any other outcome is fixed per name.
        return _Plan(rule, passed) if conditional else passed


def glob_specificity(key: str) -> tuple[int, int, int]:
    """(literal characters, `*` wildcards, one-character wildcards) of a tool key.

    Tokens are read as fnmatch.translate reads them: a run of `*` is one `*` wildcard; `?` and a
    closed bracket class `[...]` are one-character wildcards; an unclosed `[` is a literal. A
    key with no wildcard is an exact name.
    """
    tokens = _GLOB_TOKEN.findall(key)
    stars = sum(token[0] == "*" for token in tokens)
    return len(key) - sum(map(len, tokens)), stars, len(tokens) - stars


def resolve_path(arguments: Mapping[str, object], path: str) -> tuple[bool, object]:
    """(found, value) of `path` ("args", "args.a.b", "args.items.0") in a call's arguments.

    Segments walk objects by key and lists by decimal index. Raises ValueError for a path that
    is not "args" or under it (validated policies never hold one, so that is a caller bug).
    """
    segments = _split_path(path)
    if segments is None:
        raise ValueError(f"not an argument path: {path!r}")
    return _walk(arguments, segments)


def parse_policy(data: object) -> Policy:
    """Validate a decoded policy document and compile it. Raises PolicyError with every issue."""
    parser = _Parser()
    policy = parser.policy(data)
    if parser.issues or policy is None:
        raise PolicyError(parser.issues)
    return policy


def load_policy(text: str, source: str = "policy.json") -> Policy:
    """Decode policy JSON and parse it; a syntax error names its line and column."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # bad syntax, a duplicate key, absurd nesting
        message = str(exc)
        if isinstance(exc, json.JSONDecodeError):
            message = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise PolicyError([PolicyIssue(source, message)]) from None
    return parse_policy(data)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of two equal keys, so a second "drop_table" rule would silently
    # replace the first; refuse the document instead.
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {_quote(duplicate)}: a key may appear once per object")
    return dict(pairs)


class _Parser:
    """One validation pass: every method records issues with their paths and returns what it
    could compile (None when it could not). Counters are shared by every rule of the policy."""

    def __init__(self) -> None:
        self.issues: list[PolicyIssue] = []
        self.counters: dict[str, tuple[str, str, str]] = {}  # name -> (window, scope, first path)

    def fail(self, path: str, message: str) -> None:
        self.issues.append(PolicyIssue(path, message))

    def policy(self, data: object) -> Policy | None:
        if not self.object(data, "(root)"):
            return None
        self.fields(data, "", _TOP_FIELDS)
        version = self.required(data, "version", "")
        if version is not _ABSENT and version != "1":
            self.fail("version", f'must be the string "1" (got {_json(version)})')
        default = self.choice(data.get("default", "deny"), "default", _ACTIONS)
        hide = self.each(data.get("hide", []), "hide", "tool names or globs", self.hide_entry)
        base: tuple[Limit, ...] = ()
        all_tools = data.get("all_tools", {})
        if self.object(all_tools, "all_tools"):
            self.fields(all_tools, "all_tools", ("limits",))
            base = self.each(all_tools.get("limits", []), "all_tools.limits", "limits", self.limit)
        tools = data.get("tools", {})
        valid = self.object(tools, "tools")
        rules = [self.rule(str(key), raw, base) for key, raw in tools.items()] if valid else []
        if default is None:
            return None
        exact = {r.key: r for r in rules if r is not None and not _GLOB_TOKEN.search(r.key)}
        globs = [r for r in rules if r is not None and r.key not in exact]
        return Policy(_Rule("default", default, None, (), (), (), base, None), exact, globs, list(hide))

    def rule(self, key: str, raw: object, base: tuple[Limit, ...]) -> _Rule | None:
        path = f"tools.{key}" if _PLAIN_KEY.fullmatch(key) else f"tools[{_quote(key)}]"
        if not key:
            self.fail(path, "tool name must not be empty")
            return None
        if not self.object(raw, path, " (use {} to allow the tool)"):
            return None
        self.fields(raw, path, _RULE_FIELDS)
        action = self.choice(raw.get("action", "allow"), f"{path}.action", _ACTIONS)
        for field in ("reason", "description"):
            if not isinstance(raw.get(field, ""), str):
                self.fail(f"{path}.{field}", "must be a string")
        require, deny_if, approval_if = (
            self.each(raw.get(field, []), f"{path}.{field}", "conditions", self.condition)
            for field in ("require", "deny_if", "approval_if")
        )
        limits = self.each(raw.get("limits", []), f"{path}.limits", "limits", self.limit)
        timeout = self.approval(raw.get("approval", {}), f"{path}.approval")
        reason = raw.get("reason")
        if action is None or not (reason is None or isinstance(reason, str)):
            return None
        return _Rule(key, action, reason, require, deny_if, approval_if, base + limits, timeout)

    def hide_entry(self, raw: object, path: str) -> str | None:
        if isinstance(raw, str) and raw:
            return raw
        self.fail(path, "must be a non-empty tool name or glob")
        return None

    def approval(self, raw: object, path: str) -> float | None:
        if not self.object(raw, path):
            return None
        self.fields(raw, path, ("timeout",))
        try:
            return parse_duration(raw["timeout"]) if "timeout" in raw else None
        except ValueError as exc:
            self.fail(f"{path}.timeout", str(exc))
            return None

    def condition(self, raw: object, path: str) -> _Condition | None:
        if not self.object(raw, path, ' like {"path": "args.x", "op": "exists"}'):
            return None
        self.fields(raw, path, ("path", "op", "value"))
        arg_path = self.required(raw, "path", path)
        segments = self.arg_path(arg_path, f"{path}.path")
        op = self.choice(self.required(raw, "op", path), f"{path}.op", _OPS)
        if op == "exists":
            expected = raw.get("value", True)
            if not isinstance(expected, bool):
                self.fail(f"{path}.value", 'must be true or false for op "exists" (or left out)')
            elif segments is not None:
                text = f"{arg_path} exists" if expected else f"{arg_path} is absent"
                return _Condition(arg_path, text, segments, bool, expected)
            return None
        if op is None:
            return None
        if "value" not in raw:
            self.fail(f"{path}.value", f'missing required field (op "{op}" compares with a value)')
            return None
        test = self.test(op, raw["value"], f"{path}.value")
        if segments is None or test is None:
            return None
        return _Condition(arg_path, f"{arg_path} {op} {_json(raw['value'])}", segments, test, None)

    def test(self, op: str, value: object, path: str) -> Callable[[object], bool] | None:
        """The predicate for `op` against `value`, applied to an argument value that was found."""
        if op in ("eq", "neq"):
            negate = op == "neq"
            return lambda found: _json_equal(found, value) != negate
        if op in ("in", "not_in"):
            if not isinstance(value, list):
                self.fail(path, f'must be a list for op "{op}"')
                return None
            options, negate = tuple(value), op == "not_in"
            return lambda found: any(_json_equal(found, option) for option in options) != negate
        if op in _COMPARE:
            if not _is_number(value) or not math.isfinite(value):
                self.fail(path, f'must be a finite number for op "{op}" (got {_json(value)})')
                return None
            compare, bound = _COMPARE[op], value
            return lambda found: _is_number(found) and compare(found, bound)
        if op == "regex":
            if not isinstance(value, str):
                self.fail(path, 'must be a regular expression string for op "regex"')
                return None
            try:
                pattern = re.compile(value)
            except re.error as exc:
                self.fail(path, f"invalid regular expression: {exc}")
                return None
            return lambda found: isinstance(found, str) and pattern.search(found) is not None
        return lambda found: _contains(found, value)

    def limit(self, raw: object, path: str) -> Limit | None:
        if not self.object(raw, path):
            return None
        self.fields(raw, path, _LIMIT_FIELDS)
        counter = self.required(raw, "counter", path)
        if counter is not _ABSENT and not (isinstance(counter, str) and _COUNTER_NAME.fullmatch(counter)):
            self.fail(f"{path}.counter", "must be a non-empty name of letters, digits and _ . : -")
            counter = _ABSENT
        window = self.choice(self.required(raw, "window", path), f"{path}.window", _WINDOWS)
        maximum = self.required(raw, "max", path)
        if maximum is not _ABSENT and not (_is_number(maximum) and math.isfinite(maximum) and maximum > 0):
            self.fail(f"{path}.max", f"must be a number greater than 0 (got {_json(maximum)})")
            maximum = _ABSENT
        scope = self.choice(raw.get("scope", "grant"), f"{path}.scope", _SCOPES)
        increment_from = raw.get("increment_from")
        if increment_from is not None and self.arg_path(increment_from, f"{path}.increment_from") is None:
            return None
        if counter is _ABSENT or window is None or maximum is _ABSENT or scope is None:
            return None
        self.share(counter, window, scope, path)
        return Limit(counter, window, maximum, scope, increment_from)

    def share(self, counter: str, window: str, scope: str, path: str) -> None:
        """Record a counter's use: every rule naming it counts into one bucket, so they must agree."""
        first = self.counters.setdefault(counter, (window, scope, path))
        for field, mine, theirs in (("window", window, first[0]), ("scope", scope, first[1])):
            if mine != theirs:
                agree = "rules that share a counter must agree on window and scope"
                self.fail(
                    f"{path}.{field}", f'counter "{counter}" has {field} {theirs} at {first[2]}; {agree}'
                )

    def arg_path(self, value: object, path: str) -> tuple[str, ...] | None:
        segments = _split_path(value) if isinstance(value, str) else None
        if segments is None and value is not _ABSENT:
            self.fail(path, f'must be "args" or a path under it like "args.amount" (got {_json(value)})')
        return segments

    def each(
        self, raw: object, path: str, what: str, parse: Callable[[object, str], _T | None]
    ) -> tuple[_T, ...]:
        if not isinstance(raw, list):
            self.fail(path, f"must be a list of {what}")
            return ()
        parsed = (parse(item, f"{path}[{i}]") for i, item in enumerate(raw))
        return tuple(item for item in parsed if item is not None)

    def fields(self, raw: Mapping[Any, object], path: str, known: tuple[str, ...]) -> None:
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f'did you mean "{close[0]}"?' if close else f"expected one of {', '.join(known)}"
                self.fail(f"{path}.{key}" if path else str(key), f"unknown field ({hint})")

    def required(self, raw: Mapping[str, object], field: str, path: str) -> Any:
        if field in raw:
            return raw[field]
        self.fail(f"{path}.{field}" if path else field, "missing required field")
        return _ABSENT

    def choice(self, value: object, path: str, options: Mapping[str, _T]) -> _T | None:
        if isinstance(value, str) and value in options:
            return options[value]
        if value is not _ABSENT:  # a missing field was reported already
            self.fail(path, f"must be one of {', '.join(options)} (got {_json(value)})")
        return None

    def object(self, value: object, path: str, hint: str = "") -> TypeGuard[dict[str, Any]]:
        if isinstance(value, dict):
            return True
        self.fail(path, f"must be an object{hint}")
        return False


# --- evaluation helpers: total functions over JSON-like values, they never raise -------------


@functools.lru_cache(maxsize=256)
def _split_path(path: str) -> tuple[str, ...] | None:
    head, *rest = path.split(".")
    return tuple(rest) if head == "args" and all(rest) else None


def _walk(arguments: object, segments: tuple[str, ...]) -> tuple[bool, object]:
    current = arguments
    for segment in segments:
        if isinstance(current, Mapping):
            if segment not in current:
                return False, None
            current = current[segment]
        elif isinstance(current, list | tuple) and segment.isascii() and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return False, None
            current = current[index]
        else:
            return False, None
    return True, current


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_equal(left: object, right: object) -> bool:
    """Equality as JSON means it: true is not 1, 1 equals 1.0, containers compare by content."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if _is_number(left) and _is_number(right):
        return left == right
    if isinstance(left, str) or isinstance(right, str):
        return isinstance(left, str) and isinstance(right, str) and left == right
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    return left is None and right is None


def _contains(container: object, item: object) -> bool:
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    if isinstance(container, Mapping):
        return isinstance(item, str) and item in container
    if isinstance(container, list | tuple):
        return any(_json_equal(element, item) for element in container)
    return False


def _glob_order(rule: _Rule) -> tuple[int, int, int, str]:
    literal, stars, singles = glob_specificity(rule.key)
    return -literal, stars, singles, rule.key


def _deny(rule: _Rule, code: str, reason: str, explanation: str) -> Decision:
    return Decision("deny", rule.key, code, reason, explanation, (), None)


def _requirement_reason(cond: _Condition, found: bool) -> str:
    if not found:
        return f"required argument {cond.path} is missing"
    if cond.exists is False:
        return f"argument {cond.path} must not be given"
    return f"requirement {cond.text} does not hold"


def _shown(found: bool, value: object) -> str:
    return f"value {_json(value)}" if found else "missing"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json(value: object, limit: int = 80) -> str:
    """`value` as JSON for messages, cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):  # non-string keys, cycles, deep nesting
        text = f"<{type(value).__name__}>"  # repr could fail the same way
    return text if len(text) <= limit else text[: limit - 1] + "…"
