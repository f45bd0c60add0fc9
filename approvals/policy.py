"""Policy engine: validate a policy.json document once, then decide every tools/call.

Pure: no I/O, no clock, no logging. `parse_policy` checks the whole document, collecting every
issue with its path, and compiles globs, regexes and argument paths once, so `Policy.evaluate`
is a cached dict lookup plus the matched rule's conditions.

Per call (`Policy` says how the rule is found): hide / action deny > `require` fails >
`deny_if` holds > require_approval (the action, or an `approval_if` that holds) > allow.

Conditions fail closed. Upstreams coerce what they are sent (the MCP SDK decodes a JSON string
into a list, pydantic reads "5000" as 5000), so a condition is judged on every reading the
upstream may make of the value: compared with a number, a numeric string is that number (with a
boolean, "true"/"1"/"yes"… are that boolean; with an object or array, a JSON string is what it
decodes to); a string holding a JSON object or array is also judged as what it decodes to by
`contains` and `regex`, and on the way down a path; null is both given and not given. A reading
that cannot be judged (`gt` on a word, `regex` on a list, booleans are never numbers) may both
hold and fail. `deny_if` / `approval_if` fire when any reading may hold; `require` passes only
when no reading may fail. A path missing in every reading holds for no op but `exists`: `require`
fails on it (deny), `deny_if` / `approval_if` do not fire.

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

from approvals.core.review import DEFAULT_REVIEW, ReviewRule
from approvals.errors import ApprovalsError, Issue
from approvals.policy_approval import parse_approval

Window = Literal["second", "minute", "hour", "day"]
Scope = Literal["grant", "session", "global"]
WINDOW_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# No window is longer: the store keeps and reloads one day of counters (limits.py).
MAX_WINDOW_SECONDS = WINDOW_SECONDS["day"]
# The largest `max` and `increment_from` amount: counts are floats, exact up to 2**53.
MAX_COUNT = 2**53


@dataclass(frozen=True, slots=True)
class Limit:
    """One rate limit of a rule: at most `max` per `window` per `scope`, counted in `counter`."""

    counter: str
    window: Window | int  # a name, or a number of seconds no name spells (2 to MAX_WINDOW_SECONDS)
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
_RULE_FIELDS = (
    "action", "reason", "description", "require", "deny_if", "approval_if", "limits", "rate_limit",
    "approval",
)  # fmt: skip
_LIMIT_FIELDS = ("counter", "window", "max", "scope", "increment_from")
# The FAQ's shorthand `"rate_limit": {"max": 10, "window": 60}`: per session, counted under the tool key.
_RATE_LIMIT_FIELDS = ("max", "window")
_WINDOW_HINT = f"one of second, minute, hour, day or a whole number of seconds from 1 to {MAX_WINDOW_SECONDS}"
_SECONDS_WINDOWS: dict[int, Window] = {seconds: _WINDOWS[name] for name, seconds in WINDOW_SECONDS.items()}
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
    review: ReviewRule  # how a held call must be reviewed (the rule's `approval` object)

    @property
    def approval_timeout(self) -> float | None:
        """Seconds a held call waits for a decision; None = the gateway default."""
        return self.review.timeout


# A condition's verdict on one call: the bits of what it may do under the readings the upstream
# may make of the arguments. Both bits: the gateway cannot tell, so every caller fails closed.
_HOLDS = 1
_FAILS = 2
_EITHER = _HOLDS | _FAILS
_Judge = Callable[[object], int]


@dataclass(frozen=True, slots=True)
class _Condition:
    path: str
    text: str  # "args.amount gt 10000", as shown in reasons and explanations
    segments: tuple[str, ...]
    judge: _Judge  # verdict bits on a value that was found; never raises
    exists: bool | None  # for op "exists": whether the value must be present

    def check(self, arguments: Mapping[str, object]) -> tuple[int, bool, object]:
        """(verdict bits, found, value as given) for `arguments`."""
        found, value = _walk_objects(arguments, self.segments)
        if found is not None:  # the common case: one reading, no string on the way
            if self.exists is not None:
                return _presence(found, value, self.exists), found, value
            return (self.judge(value) if found else _FAILS), found, value
        readings = _readings(arguments, self.segments)
        verdict = 0
        for found, value in readings:
            if self.exists is not None:
                verdict |= _presence(found, value, self.exists)
            else:
                verdict |= self.judge(value) if found else _FAILS
        # Show the value found (a decoded reading's, when only that one reaches the path).
        found, value = next((reading for reading in readings if reading[0]), readings[0])
        return verdict, found, value


@dataclass(frozen=True, slots=True)
class _Rule:
    key: str
    action: Action
    reason: str | None
    require: tuple[_Condition, ...]
    deny_if: tuple[_Condition, ...]
    approval_if: tuple[_Condition, ...]
    limits: tuple[Limit, ...]  # all_tools limits first
    review: ReviewRule


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
            verdict, found, value = cond.check(arguments)
            if verdict & _FAILS:
                why = f"rule {rule.key}: require {cond.text} failed ({_shown(found, value)})"
                return _deny(
                    rule,
                    "requirement_failed",
                    rule.reason or _requirement_reason(cond, verdict, found, value),
                    why,
                )
        for cond in rule.deny_if:
            verdict, found, value = cond.check(arguments)
            if verdict & _HOLDS:
                why = f"rule {rule.key}: deny_if {cond.text} ({_shown(found, value)})"
                return _deny(rule, "deny_if", rule.reason or _holds_text(cond, verdict), why)
        if rule.action == "allow":
            for cond in rule.approval_if:
                verdict, found, value = cond.check(arguments)
                if verdict & _HOLDS:
                    why = f"rule {rule.key}: approval_if {cond.text} ({_shown(found, value)})"
                    code = "approval_required"
                    return Decision("require_approval", rule.key, code, None, why, rule.limits, rule.review)
        return entry.passed

    def may_need_approval(self, tool: str) -> bool:
        """Whether some call of `tool` may be held for a reviewer (its rule requires approval, or
        an approval_if condition may fire): such a tool is offered to clients as a task."""
        entry = self._lookup(tool)
        if isinstance(entry, Decision):
            return entry.action == "require_approval"
        return entry.rule.action == "require_approval" or bool(entry.rule.approval_if)

    def reviews(self) -> tuple[tuple[str, ReviewRule], ...]:
        """(path, rule) of every rule's `approval` object, for the checks against the reviewers."""
        rules = sorted([*self._exact.values(), *(r for _, r in self._globs)], key=lambda r: r.key)
        return tuple((f"{rule_path(r.key)}.approval", r.review) for r in rules if r.review != DEFAULT_REVIEW)

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
                return Decision(
                    "deny", "hide", "hidden", f"tool {name} is not available", why, (), DEFAULT_REVIEW
                )
        rule = self._exact.get(tool) or next((r for rx, r in self._globs if rx.match(tool)), self._default)
        conditional = bool(rule.require or rule.deny_if or rule.approval_if)
        if rule is self._default:
            why = f"no rule for tool {name}; default {rule.action}"
        else:
            why = f"rule {rule.key}: action {rule.action}" + (", conditions passed" if conditional else "")
        if rule.action == "deny":
            return _deny(rule, "denied", rule.reason or f"tool {name} is not allowed by policy", why)
        code = "allowed" if rule.action == "allow" else "approval_required"
        passed = Decision(rule.action, rule.key, code, None, why, rule.limits, rule.review)
        # Only a rule with conditions needs the arguments; any other outcome is fixed per name.
        return _Plan(rule, passed) if conditional else passed


def window_seconds(window: Window | int) -> int:
    """The length of a limit's window in seconds."""
    return window if isinstance(window, int) else WINDOW_SECONDS[window]


def window_text(window: Window | int) -> str:
    """A window as the agent reads it: "minute", or "90 s" for one no name spells."""
    return f"{window} s" if isinstance(window, int) else window


def rule_path(key: str) -> str:
    """Where the rule for tool key `key` is in the document, as issue paths name it."""
    return f"tools.{key}" if _PLAIN_KEY.fullmatch(key) else f"tools[{_quote(key)}]"


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
        return Policy(
            _Rule("default", default, None, (), (), (), base, DEFAULT_REVIEW), exact, globs, list(hide)
        )

    def rule(self, key: str, raw: object, base: tuple[Limit, ...]) -> _Rule | None:
        path = rule_path(key)
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
        if "rate_limit" in raw:
            shorthand = self.rate_limit(key, raw["rate_limit"], f"{path}.rate_limit")
            limits += (shorthand,) if shorthand is not None else ()
        review = parse_approval(self, raw.get("approval", {}), f"{path}.approval")
        reason = raw.get("reason")
        if action is None or not (reason is None or isinstance(reason, str)):
            return None
        return _Rule(key, action, reason, require, deny_if, approval_if, base + limits, review)

    def hide_entry(self, raw: object, path: str) -> str | None:
        if isinstance(raw, str) and raw:
            return raw
        self.fail(path, "must be a non-empty tool name or glob")
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
        judge = self.judge(op, raw["value"], f"{path}.value")
        if segments is None or judge is None:
            return None
        return _Condition(arg_path, f"{arg_path} {op} {_json(raw['value'])}", segments, judge, None)

    def judge(self, op: str, value: object, path: str) -> _Judge | None:
        """The verdict of `op` against `value`, applied to an argument value that was found."""
        if op in ("eq", "neq"):
            return _one_of((value,), negate=op == "neq")
        if op in ("in", "not_in"):
            if not isinstance(value, list):
                self.fail(path, f'must be a list for op "{op}"')
                return None
            return _one_of(tuple(value), negate=op == "not_in")
        if op in _COMPARE:
            if not _is_number(value) or not _finite(value):
                self.fail(path, f'must be a finite number for op "{op}" (got {_json(value)})')
                return None
            compare, bound = _COMPARE[op], value
            return lambda found: _compare(found, compare, bound)
        if op == "regex":
            if not isinstance(value, str):
                self.fail(path, 'must be a regular expression string for op "regex"')
                return None
            try:
                pattern = re.compile(value)
            except re.error as exc:
                self.fail(path, f"invalid regular expression: {exc}")
                return None
            return lambda found: _matches(found, pattern)
        return lambda found: _contains(found, value)

    def limit(self, raw: object, path: str) -> Limit | None:
        if not self.object(raw, path):
            return None
        self.fields(raw, path, _LIMIT_FIELDS)
        counter = self.required(raw, "counter", path)
        if counter is not _ABSENT and not (isinstance(counter, str) and _COUNTER_NAME.fullmatch(counter)):
            self.fail(f"{path}.counter", "must be a non-empty name of letters, digits and _ . : -")
            counter = _ABSENT
        window = self.window(self.required(raw, "window", path), f"{path}.window")
        maximum = self.maximum(self.required(raw, "max", path), f"{path}.max")
        scope = self.choice(raw.get("scope", "grant"), f"{path}.scope", _SCOPES)
        increment_from = raw.get("increment_from")
        if increment_from is not None and self.arg_path(increment_from, f"{path}.increment_from") is None:
            return None
        if counter is _ABSENT or window is None or maximum is _ABSENT or scope is None:
            return None
        self.share(counter, window, scope, path)
        return Limit(counter, window, maximum, scope, increment_from)

    def rate_limit(self, key: str, raw: object, path: str) -> Limit | None:
        """The FAQ's `{"max": 10, "window": 60}`: a per-session limit counted under the tool key."""
        if not self.object(raw, path, ' like {"max": 10, "window": 60}'):
            return None
        self.fields(raw, path, _RATE_LIMIT_FIELDS)
        window = self.window(self.required(raw, "window", path), f"{path}.window")
        maximum = self.maximum(self.required(raw, "max", path), f"{path}.max")
        if window is None or maximum is _ABSENT:
            return None
        self.share(key, window, "session", path)
        return Limit(key, window, maximum, "session")

    def window(self, value: object, path: str) -> Window | int | None:
        """A window name, or whole seconds (a number a name spells becomes that name)."""
        if isinstance(value, str) and value in _WINDOWS:
            return _WINDOWS[value]
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if _is_number(value) and whole and 1 <= value <= MAX_WINDOW_SECONDS:
            seconds = int(value)
            return _SECONDS_WINDOWS.get(seconds, seconds)
        if value is not _ABSENT:  # a missing field was reported already
            self.fail(path, f"must be {_WINDOW_HINT} (got {_json(value)})")
        return None

    def maximum(self, value: object, path: str) -> Any:
        if value is not _ABSENT and not (_is_number(value) and 0 < value <= MAX_COUNT):
            self.fail(path, f"must be a number greater than 0 and at most {MAX_COUNT} (got {_json(value)})")
            return _ABSENT
        return value

    def share(self, counter: str, window: Window | int, scope: str, path: str) -> None:
        """Record a counter's use: every rule naming it counts into one bucket, so they must agree."""
        first = self.counters.setdefault(counter, (str(window), scope, path))
        for field, mine, theirs in (("window", str(window), first[0]), ("scope", scope, first[1])):
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
        found, current = _step(current, segment)
        if not found:
            return False, None
    return True, current


def _step(current: object, segment: str) -> tuple[bool, object]:
    if isinstance(current, Mapping):
        return (True, current[segment]) if segment in current else (False, None)
    if isinstance(current, list | tuple) and segment.isascii() and segment.isdigit():
        index = int(segment)
        return (True, current[index]) if index < len(current) else (False, None)
    return False, None


def _walk_objects(arguments: object, segments: tuple[str, ...]) -> tuple[bool | None, object]:
    """_walk through objects only, the hot path; found None: a list or string is on the way."""
    current = arguments
    for segment in segments:
        if type(current) is not dict:
            return None, None
        if segment not in current:
            return False, None
        current = current[segment]
    return True, current


def _readings(arguments: object, segments: tuple[str, ...]) -> list[tuple[bool, object]]:
    """(found, value) of the path under every reading: as given first, then through each string on
    the way that holds a JSON object or array, as the upstream may decode it. A string has no
    fields as given, so each such string adds one reading: at most one per segment."""
    readings: list[tuple[bool, object]] = []
    current = arguments
    for position, segment in enumerate(segments):
        decoded = _decoded(current) if isinstance(current, str) else _ABSENT
        if decoded is not _ABSENT:
            readings.append((False, None))
            readings += _readings(decoded, segments[position:])
            return readings
        found, current = _step(current, segment)
        if not found:
            readings.append((False, None))
            return readings
    readings.append((True, current))
    return readings


def _presence(found: bool, value: object, expected: bool) -> int:
    if found and value is None:
        return _EITHER  # the upstream may read null as given, or as left out
    return _HOLDS if found == expected else _FAILS


def _one_of(options: tuple[object, ...], *, negate: bool) -> _Judge:
    """eq / in (neq / not_in with `negate`): the value, read as each option's type, equals one."""

    def judge(found: object) -> int:
        hit = any(_json_equal(_as_type_of(found, option), option) for option in options)
        return _HOLDS if hit != negate else _FAILS

    return judge


def _compare(found: object, compare: _Compare, bound: float) -> int:
    if found is None:
        return _FAILS  # null carries no number, as if left out
    number = _number(found) if isinstance(found, str) else found if _is_number(found) else None
    if number is None or not _finite(number):
        return _EITHER  # a word, a boolean, a container, NaN or infinity: cannot be compared
    return _HOLDS if compare(number, bound) else _FAILS


def _matches(found: object, pattern: re.Pattern[str]) -> int:
    if found is None:
        return _FAILS
    if not isinstance(found, str):
        return _EITHER  # a number or a container: the gateway cannot say what text it stands for
    verdict = _HOLDS if pattern.search(found) else _FAILS
    # A JSON array or object in a string may reach the tool decoded, escapes and all.
    return verdict if _decoded(found) is _ABSENT else _EITHER


def _contains(found: object, item: object) -> int:
    verdict = _contains_in(found, item)
    decoded = _decoded(found) if isinstance(found, str) else _ABSENT
    return verdict if decoded is _ABSENT else verdict | _contains_in(decoded, item)


def _contains_in(container: object, item: object) -> int:
    if container is None:
        return _FAILS  # null holds nothing, as if left out
    if isinstance(container, str | Mapping):
        hit = isinstance(item, str) and item in container
    elif isinstance(container, list | tuple):
        hit = any(_json_equal(_as_type_of(element, item), item) for element in container)
    else:
        return _EITHER  # a number or a boolean: nothing the gateway can look inside
    return _HOLDS if hit else _FAILS


# pydantic's lax mode reads these strings (any case) as booleans.
_BOOL_WORDS = {
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
}
_CONTAINER_START = re.compile(r"[ \t\n\r]*[\[{]")


def _as_type_of(found: object, target: object) -> object:
    """`found` as an upstream expecting `target`'s JSON type may read it (else `found` itself):
    "5000" as 5000, "yes" or 1 as true, '["a"]' as ["a"], "null" as null, true as 1."""
    if isinstance(found, str):
        read: object = _ABSENT
        if isinstance(target, bool):
            read = _BOOL_WORDS.get(found.strip().lower(), _ABSENT)
        elif _is_number(target):
            number = _number(found)
            read = _ABSENT if number is None else number
        elif isinstance(target, Mapping | list) or target is None:
            read = None if found.strip() == "null" else _decoded(found)
        return found if read is _ABSENT else read
    if isinstance(target, bool) and _is_number(found) and found in (0, 1):
        return bool(found)
    if _is_number(target) and isinstance(found, bool):
        return int(found)
    return found


def _number(text: str) -> int | float | None:
    """The number a numeric string stands for (an integer exactly), or None."""
    try:
        return int(text)
    except ValueError:  # not an integer, or longer than Python converts
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _decoded(text: str) -> object:
    """The JSON object or array `text` holds, else _ABSENT."""
    if not _CONTAINER_START.match(text):
        return _ABSENT
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an over-long integer, absurd nesting
        return _ABSENT
    return value if isinstance(value, dict | list) else _ABSENT


def _finite(number: int | float) -> bool:
    # math.isfinite converts an int to float, which overflows past 1e308; every int is finite.
    return isinstance(number, int) or math.isfinite(number)


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


def _glob_order(rule: _Rule) -> tuple[int, int, int, str]:
    literal, stars, singles = glob_specificity(rule.key)
    return -literal, stars, singles, rule.key


def _deny(rule: _Rule, code: str, reason: str, explanation: str) -> Decision:
    return Decision("deny", rule.key, code, reason, explanation, (), DEFAULT_REVIEW)


def _holds_text(cond: _Condition, verdict: int) -> str:
    if verdict & _FAILS:  # it may also not hold: say why the gateway would not take the chance
        return f"{cond.text} cannot be ruled out for the value given"
    return f"{cond.text} holds"


def _requirement_reason(cond: _Condition, verdict: int, found: bool, value: object) -> str:
    if not found:
        return f"required argument {cond.path} is missing"
    if value is None and cond.exists:
        return f"required argument {cond.path} is null"
    if cond.exists is False:
        return f"argument {cond.path} must not be given"
    if verdict & _HOLDS:
        return f"requirement {cond.text} cannot be confirmed for the value given"
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
