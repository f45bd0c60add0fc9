"""The policy engine: the seed and DESIGN policies, rule lookup, conditions, validation."""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from approvals.errors import ApprovalsError
from approvals.policy import (
    Decision,
    Limit,
    Policy,
    PolicyError,
    glob_specificity,
    load_policy,
    parse_policy,
    resolve_path,
)

# Verbatim from seed-policylayer-generate_image.txt.
SEED_POLICY = """{
  "version": "1",
  "default": "deny",
  "tools": {
    "generate_image": {
      "limits": [
        {
          "counter": "generate_image_rate",
          "window": "minute",
          "max": 10,
          "scope": "grant"
        }
      ]
    }
  }
}"""

# Verbatim from DESIGN.md, section "Policy".
DESIGN_POLICY = """{
  "version": "1",
  "default": "deny",
  "hide": ["delete_account"],
  "all_tools": {"limits": [{"counter": "all_calls", "window": "minute", "max": 120, "scope": "grant"}]},
  "tools": {
    "generate_image": {
      "action": "require_approval",
      "approval": {"timeout": "10m"},
      "limits": [{"counter": "generate_image_rate", "window": "minute", "max": 10, "scope": "grant"}]
    },
    "list_*": {},
    "create_refund": {
      "require": [{"path": "args.reason", "op": "exists"}],
      "deny_if": [{"path": "args.amount", "op": "gt", "value": 10000}],
      "approval_if": [{"path": "args.amount", "op": "gt", "value": 500}]
    },
    "drop_table": {"action": "deny", "reason": "Schema changes go through a migration."}
  }
}"""

LOTS_REASON = "args.amount gt 10000 cannot be ruled out for the value given"
ALL_CALLS = Limit("all_calls", "minute", 120, "grant")


def policy(tools: dict[str, Any], **top: Any) -> Policy:
    """A policy with `tools` and the given top-level fields."""
    return parse_policy({"version": "1", "tools": tools, **top})


def issues(data: object) -> dict[str, str]:
    """The issues parse_policy reports for `data`, as path -> message."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    return {issue.path: issue.message for issue in caught.value.errors}


def rule_issues(rule: object) -> dict[str, str]:
    """The issues of a policy whose only tool "x" has `rule`."""
    return issues({"version": "1", "tools": {"x": rule}})


def deny_if(condition: dict[str, Any], arguments: dict[str, Any]) -> bool:
    """Whether `condition` holds for `arguments`, seen through a deny_if rule."""
    decision = policy({"t": {"deny_if": [condition]}}).evaluate("t", arguments)
    return decision.code == "deny_if"


def require(condition: dict[str, Any], arguments: dict[str, Any]) -> Decision:
    """The decision of a rule that requires `condition`."""
    return policy({"t": {"require": [condition]}}).evaluate("t", arguments)


# --- the seed and DESIGN policies ------------------------------------------------------------


def test_seed_policy_allows_generate_image_with_its_rate_limit() -> None:
    """The seed's policy allows generate_image, rate-capped at 10 a minute per grant."""
    decision = load_policy(SEED_POLICY).evaluate("generate_image", {"prompt": "a cat"})
    assert decision.action == "allow"
    assert decision.code == "allowed"
    assert decision.rule == "generate_image"
    assert decision.limits == (Limit("generate_image_rate", "minute", 10, "grant"),)
    assert decision.approval_timeout is None


@pytest.mark.parametrize("tool", ["list_models", "generate_video", "Generate_image", ""])
def test_seed_policy_denies_every_other_tool(tool: str) -> None:
    """Under the seed's default deny, any tool without a rule is denied with a readable reason."""
    decision = load_policy(SEED_POLICY).evaluate(tool, {})
    assert (decision.action, decision.code, decision.rule) == ("deny", "denied", "default")
    assert decision.reason == f"tool {json.dumps(tool)} is not allowed by policy"
    assert decision.limits == ()


def test_design_generate_image_needs_approval_with_its_timeout() -> None:
    """generate_image needs approval, expires after 10 minutes, and carries both limits."""
    decision = load_policy(DESIGN_POLICY).evaluate("generate_image", {"prompt": "x"})
    assert (decision.action, decision.code) == ("require_approval", "approval_required")
    assert decision.approval_timeout == 600.0
    assert decision.limits == (ALL_CALLS, Limit("generate_image_rate", "minute", 10, "grant"))


def test_design_list_glob_allows_with_the_all_tools_limit() -> None:
    """Any list_* tool is allowed by the empty rule, under the all_tools limit only."""
    decision = load_policy(DESIGN_POLICY).evaluate("list_orders", {})
    assert (decision.action, decision.rule) == ("allow", "list_*")
    assert decision.limits == (ALL_CALLS,)


@pytest.mark.parametrize(
    ("arguments", "action", "code", "reason"),
    [
        ({"reason": "damaged", "amount": 20}, "allow", "allowed", None),
        ({"reason": "damaged", "amount": 500}, "allow", "allowed", None),
        ({"reason": "damaged", "amount": 750}, "require_approval", "approval_required", None),
        ({"reason": "damaged", "amount": 20000}, "deny", "deny_if", "args.amount gt 10000 holds"),
        ({"amount": 20}, "deny", "requirement_failed", "required argument args.reason is missing"),
        ({"reason": "damaged", "amount": "5000"}, "require_approval", "approval_required", None),
        ({"reason": "damaged", "amount": "lots"}, "deny", "deny_if", LOTS_REASON),
    ],
)
def test_design_create_refund_conditions(
    arguments: dict[str, Any], action: str, code: str, reason: str | None
) -> None:
    """create_refund needs a reason, is refused above 10000 and needs approval above 500."""
    decision = load_policy(DESIGN_POLICY).evaluate("create_refund", arguments)
    assert (decision.action, decision.code, decision.reason) == (action, code, reason)
    assert decision.rule == "create_refund"


def test_design_approval_if_explains_the_value_to_reviewers() -> None:
    """The explanation names the rule, the condition and the value that triggered it."""
    decision = load_policy(DESIGN_POLICY).evaluate("create_refund", {"reason": "x", "amount": 750})
    assert decision.explanation == "rule create_refund: approval_if args.amount gt 500 (value 750)"


def test_design_drop_table_is_denied_with_the_rule_reason() -> None:
    """A deny rule's reason reaches the agent verbatim."""
    decision = load_policy(DESIGN_POLICY).evaluate("drop_table", {"table": "users"})
    assert (decision.action, decision.code) == ("deny", "denied")
    assert decision.reason == "Schema changes go through a migration."


def test_design_hidden_tool_is_denied_and_hidden() -> None:
    """delete_account is left out of tools/list and denied on call."""
    loaded = load_policy(DESIGN_POLICY)
    decision = loaded.evaluate("delete_account", {})
    assert (decision.action, decision.code, decision.rule) == ("deny", "hidden", "hide")
    assert loaded.is_hidden("delete_account")
    assert not loaded.is_hidden("list_orders")
    assert not loaded.is_hidden("unknown_tool")


# --- defaults and precedence -----------------------------------------------------------------


def test_missing_default_fails_closed() -> None:
    """A policy without `default` denies tools it does not list."""
    assert policy({}).evaluate("anything", {}).action == "deny"


@pytest.mark.parametrize(
    ("default", "code"), [("allow", "allowed"), ("require_approval", "approval_required")]
)
def test_default_applies_to_unlisted_tools_with_all_tools_limits(default: str, code: str) -> None:
    """`default` decides unlisted tools, which still carry the all_tools limits."""
    limits = {"limits": [{"counter": "all", "window": "second", "max": 5}]}
    decision = policy({}, default=default, all_tools=limits).evaluate("anything", {})
    assert (decision.action, decision.code, decision.rule) == (default, code, "default")
    assert decision.limits == (Limit("all", "second", 5, "grant"),)
    assert decision.approval_timeout is None


def test_hide_beats_an_allow_rule() -> None:
    """A hidden tool is denied even when a rule allows it."""
    decision = policy({"x": {}}, hide=["x"]).evaluate("x", {})
    assert decision.code == "hidden"


def test_action_deny_beats_conditions() -> None:
    """A deny rule denies even when its approval_if holds and its requirements are met."""
    rule = {
        "action": "deny",
        "require": [{"path": "args.a", "op": "exists"}],
        "approval_if": [{"path": "args.a", "op": "eq", "value": 1}],
    }
    decision = policy({"x": rule}).evaluate("x", {"a": 1})
    assert (decision.code, decision.reason) == ("denied", 'tool "x" is not allowed by policy')


def test_failed_requirement_beats_require_approval() -> None:
    """A call that misses a requirement is denied, not queued for approval."""
    rule = {"action": "require_approval", "require": [{"path": "args.a", "op": "exists"}]}
    decision = policy({"x": rule}).evaluate("x", {})
    assert decision.code == "requirement_failed"


def test_deny_if_beats_approval_if() -> None:
    """When deny_if and approval_if both hold, the call is denied."""
    rule = {
        "deny_if": [{"path": "args.a", "op": "gt", "value": 1}],
        "approval_if": [{"path": "args.a", "op": "gt", "value": 0}],
    }
    assert policy({"x": rule}).evaluate("x", {"a": 5}).code == "deny_if"


def test_approval_if_on_a_require_approval_rule_still_needs_approval() -> None:
    """approval_if never lowers a require_approval rule to allow."""
    rule = {"action": "require_approval", "approval_if": [{"path": "args.a", "op": "eq", "value": 1}]}
    assert policy({"x": rule}).evaluate("x", {"a": 2}).action == "require_approval"


def test_rule_reason_is_used_for_condition_denials() -> None:
    """A rule's reason is what the agent reads when deny_if or require denies the call."""
    rule = {
        "reason": "Refunds need a reason and stay under 100.",
        "require": [{"path": "args.reason", "op": "exists"}],
        "deny_if": [{"path": "args.amount", "op": "gte", "value": 100}],
    }
    loaded = policy({"refund": rule})
    assert loaded.evaluate("refund", {}).reason == rule["reason"]
    assert loaded.evaluate("refund", {"reason": "x", "amount": 100}).reason == rule["reason"]


def test_reason_on_an_allow_rule_is_accepted() -> None:
    """`reason` on a rule that allows is valid and does not change the decision."""
    assert policy({"x": {"reason": "why not"}}).evaluate("x", {}).action == "allow"


# --- rule lookup -------------------------------------------------------------------------------


def test_exact_name_beats_any_glob() -> None:
    """An exact key wins over globs that also match, however specific."""
    loaded = policy({"list_*": {"action": "deny"}, "list_users": {}, "list_user?": {"action": "deny"}})
    assert loaded.evaluate("list_users", {}).rule == "list_users"
    assert loaded.evaluate("list_orders", {}).rule == "list_*"


@pytest.mark.parametrize(
    ("tool", "rule"),
    [
        ("list_users", "list_user*"),  # more literal characters
        ("list_orders", "list_*"),
        ("other", "*"),
        ("abc", "a?c"),  # a?c vs ab?: same counts, key order decides
        ("axcz", "a?cz"),  # a?cz vs a*c*: same literals, fewer `*`
        ("get_a", "get_[ab]"),  # get_[ab] vs get_*: same literals, a class is narrower than `*`
    ],
)
def test_most_specific_glob_wins(tool: str, rule: str) -> None:
    """Among matching globs: most literals, then fewest `*`, then fewest `?`/`[...]`, then key order."""
    keys = ["*", "list_*", "list_user*", "ab?", "a?c", "a*c*", "a?cz", "get_[ab]", "get_*"]
    loaded = policy({key: {} for key in keys})
    assert loaded.evaluate(tool, {}).rule == rule


def test_globs_are_case_sensitive() -> None:
    """A glob matches case-sensitively, like tool names."""
    loaded = policy({"List_*": {}})
    assert loaded.evaluate("list_users", {}).rule == "default"
    assert loaded.evaluate("List_users", {}).rule == "List_*"


@pytest.mark.parametrize(
    ("key", "specificity"),
    [
        ("abc", (3, 0, 0)),
        ("a*", (1, 1, 0)),
        ("a**b*", (2, 2, 0)),
        ("a?[bc]", (1, 0, 2)),
        ("[!]a]*", (0, 1, 1)),
        ("a[", (2, 0, 0)),
        ("[!]", (3, 0, 0)),
    ],
)
def test_glob_specificity_counts_literals_and_wildcards(key: str, specificity: tuple[int, int, int]) -> None:
    """Specificity counts literal characters and wildcard tokens as fnmatch reads them."""
    assert glob_specificity(key) == specificity


def test_hide_star_hides_everything() -> None:
    """hide ["*"] hides and denies every tool, listed or not."""
    loaded = policy({"x": {}}, default="allow", hide=["*"])
    for tool in ("x", "y", ""):
        assert loaded.is_hidden(tool)
        assert loaded.evaluate(tool, {}).code == "hidden"


def test_hide_globs_hide_matching_tools_only() -> None:
    """A hide glob hides the tools it matches and nothing else."""
    loaded = policy({}, default="allow", hide=["admin_*"])
    assert loaded.is_hidden("admin_reset")
    assert not loaded.is_hidden("user_admin_reset")
    assert loaded.evaluate("user_admin_reset", {}).action == "allow"


def test_many_distinct_tool_names_keep_deciding_correctly() -> None:
    """Past the lookup cache's size, decisions stay the same."""
    loaded = policy({"t_1*": {"action": "deny"}}, default="allow")
    for _ in range(2):
        for i in range(5000):
            expected = "deny" if str(i).startswith("1") else "allow"
            assert loaded.evaluate(f"t_{i}", {}).action == expected


# --- conditions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "value", "arguments", "holds"),
    [
        ("eq", 1, {"a": 1}, True),
        ("eq", 1, {"a": 1.0}, True),
        ("eq", 1, {"a": True}, True),  # read as the upstream would: true is 1 to an integer field
        ("eq", "1", {"a": 1}, False),
        ("eq", None, {"a": None}, True),
        ("eq", {"x": [1, 2]}, {"a": {"x": [1, 2]}}, True),
        ("eq", [1], {"a": [True]}, False),
        ("eq", 1, {}, False),
        ("neq", 1, {"a": 2}, True),
        ("neq", 1, {"a": 1}, False),
        ("neq", 1, {}, False),  # missing never holds
        ("in", ["x", "y"], {"a": "y"}, True),
        ("in", [1], {"a": True}, True),
        ("in", ["x"], {}, False),
        ("not_in", ["x", "y"], {"a": "z"}, True),
        ("not_in", ["x", "y"], {"a": "x"}, False),
        ("not_in", ["x"], {}, False),
        ("lt", 10, {"a": 9.5}, True),
        ("lt", 10, {"a": 10}, False),
        ("lte", 10, {"a": 10}, True),
        ("gt", 10, {"a": 11}, True),
        ("gt", 10, {"a": 10}, False),
        ("gte", 10, {"a": 10}, True),
        ("gt", 0, {"a": "5"}, True),  # a numeric string is its number
        ("gt", 0, {"a": True}, True),  # booleans are not numbers: cannot be judged, fails closed
        ("gt", 0, {"a": None}, False),  # null is as if left out
        ("gt", 0, {"a": [1]}, True),  # cannot be judged
        ("lt", 0, {}, False),
        ("regex", "^ab", {"a": "abc"}, True),
        ("regex", "bc", {"a": "abc"}, True),  # search, not match
        ("regex", "^b", {"a": "abc"}, False),
        ("regex", "1", {"a": 1}, True),  # cannot be judged
        ("contains", "ell", {"a": "hello"}, True),
        ("contains", 2, {"a": [1, 2]}, True),
        ("contains", True, {"a": [1]}, True),  # 1 is true to a boolean field
        ("contains", "k", {"a": {"k": 1}}, True),
        ("contains", "v", {"a": {"k": "v"}}, False),
        ("contains", 1, {"a": "123"}, False),
        ("contains", 1, {"a": 1}, True),  # cannot be judged
        ("contains", "x", {}, False),
    ],
)
def test_condition_ops(op: str, value: object, arguments: dict[str, Any], holds: bool) -> None:
    """Each op's truth: missing paths never hold, values that cannot be judged fail closed."""
    assert deny_if({"path": "args.a", "op": op, "value": value}, arguments) is holds


@pytest.mark.parametrize(
    ("condition", "arguments", "holds"),
    [
        ({"path": "args.a", "op": "exists"}, {"a": None}, True),
        ({"path": "args.a", "op": "exists"}, {}, False),
        ({"path": "args.a", "op": "exists", "value": True}, {"a": 0}, True),
        ({"path": "args.a", "op": "exists", "value": False}, {}, True),
        ({"path": "args.a", "op": "exists", "value": False}, {"a": 1}, False),
    ],
)
def test_exists_sees_presence_and_absence(
    condition: dict[str, Any], arguments: dict[str, Any], holds: bool
) -> None:
    """exists holds when the path is present (null counts); exists false when it is absent."""
    assert deny_if(condition, arguments) is holds


@pytest.mark.parametrize(
    ("path", "arguments", "expected"),
    [
        ("args", {"a": 1}, (True, {"a": 1})),
        ("args.a.b", {"a": {"b": 2}}, (True, 2)),
        ("args.items.1.id", {"items": [{"id": 1}, {"id": 2}]}, (True, 2)),
        ("args.items.2", {"items": [1, 2]}, (False, None)),
        ("args.items.-1", {"items": [1, 2]}, (False, None)),
        ("args.items.x", {"items": [1, 2]}, (False, None)),
        ("args.a.0", {"a": {"0": "zero"}}, (True, "zero")),
        ("args.a.b", {"a": "text"}, (False, None)),
        ("args.a", {}, (False, None)),
    ],
)
def test_resolve_path_walks_objects_and_lists(
    path: str, arguments: dict[str, Any], expected: tuple[bool, object]
) -> None:
    """Dotted segments walk objects by key and lists by decimal index."""
    assert resolve_path(arguments, path) == expected


def test_resolve_path_rejects_paths_outside_args() -> None:
    """A path not under "args" is a caller bug and raises ValueError."""
    with pytest.raises(ValueError, match="not an argument path"):
        resolve_path({}, "amount")


def test_require_fails_closed_on_a_missing_value() -> None:
    """A requirement on a missing value denies the call, naming the argument."""
    decision = require({"path": "args.amount", "op": "lte", "value": 100}, {})
    assert (decision.action, decision.code) == ("deny", "requirement_failed")
    assert decision.reason == "required argument args.amount is missing"


def test_require_fails_closed_on_a_type_mismatch() -> None:
    """A requirement that cannot compare the value's type denies the call."""
    decision = require({"path": "args.amount", "op": "lte", "value": 100}, {"amount": "five"})
    assert decision.code == "requirement_failed"
    assert decision.reason == "requirement args.amount lte 100 cannot be confirmed for the value given"
    assert decision.explanation == 'rule t: require args.amount lte 100 failed (value "five")'


def test_require_exists_false_denies_a_given_argument() -> None:
    """A requirement that an argument is absent denies a call that gives it."""
    decision = require({"path": "args.sudo", "op": "exists", "value": False}, {"sudo": True})
    assert decision.reason == "argument args.sudo must not be given"


def test_require_passes_when_every_requirement_holds() -> None:
    """All requirements holding lets the rule's action through."""
    rule = {"require": [{"path": "args.a", "op": "exists"}, {"path": "args.b", "op": "regex", "value": "^x"}]}
    loaded = policy({"t": rule})
    assert loaded.evaluate("t", {"a": 1, "b": "xy"}).action == "allow"
    assert loaded.evaluate("t", {"a": 1, "b": "yx"}).code == "requirement_failed"


def test_increment_from_is_carried_on_the_limit() -> None:
    """A limit's increment_from path reaches the decision for the limits module."""
    limit = {
        "counter": "spend",
        "window": "day",
        "max": 1000,
        "scope": "global",
        "increment_from": "args.amount",
    }
    decision = policy({"t": {"limits": [limit]}}).evaluate("t", {"amount": 5})
    assert decision.limits == (Limit("spend", "day", 1000, "global", "args.amount"),)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path", "phrase"),
    [
        ([], "tools.x", "must be an object"),
        ({"action": "block"}, "tools.x.action", "must be one of allow, deny, require_approval"),
        ({"reason": 5}, "tools.x.reason", "must be a string"),
        ({"description": []}, "tools.x.description", "must be a string"),
        ({"limts": []}, "tools.x.limts", 'unknown field (did you mean "limits"?)'),
        ({"zzz": 1}, "tools.x.zzz", "unknown field (expected one of action, reason"),
        ({"require": {}}, "tools.x.require", "must be a list of conditions"),
        ({"approval_if": ["x"]}, "tools.x.approval_if[0]", "must be an object"),
        ({"limits": {}}, "tools.x.limits", "must be a list of limits"),
        ({"limits": [5]}, "tools.x.limits[0]", "must be an object"),
        ({"approval": []}, "tools.x.approval", "must be an object"),
        ({"approval": {"timeout": "soon"}}, "tools.x.approval.timeout", 'must be a duration like "30s"'),
        ({"approval": {"timeout": 0}}, "tools.x.approval.timeout", "greater than 0"),
        ({"approval": {"timout": "1m"}}, "tools.x.approval.timout", 'did you mean "timeout"?'),
    ],
)
def test_rule_validation_errors_name_path_and_problem(rule: object, path: str, phrase: str) -> None:
    """Each invalid rule field is reported at its path with what is expected there."""
    found = rule_issues(rule)
    assert path in found, found
    assert phrase in found[path]


@pytest.mark.parametrize(
    ("condition", "field", "phrase"),
    [
        ({"op": "exists"}, "path", "missing required field"),
        ({"path": "amount", "op": "exists"}, "path", 'must be "args" or a path under it'),
        ({"path": "args..a", "op": "exists"}, "path", 'must be "args" or a path under it'),
        ({"path": 3, "op": "exists"}, "path", 'must be "args" or a path under it'),
        ({"path": "args.a"}, "op", "missing required field"),
        ({"path": "args.a", "op": "like"}, "op", "must be one of eq, neq, in, not_in, lt, lte, gt, gte"),
        ({"path": "args.a", "op": "gt"}, "value", 'missing required field (op "gt" compares with a value)'),
        ({"path": "args.a", "op": "eq"}, "value", "missing required field"),
        ({"path": "args.a", "op": "in", "value": "x"}, "value", 'must be a list for op "in"'),
        ({"path": "args.a", "op": "not_in", "value": {}}, "value", 'must be a list for op "not_in"'),
        ({"path": "args.a", "op": "gt", "value": "1"}, "value", 'must be a finite number for op "gt"'),
        ({"path": "args.a", "op": "lte", "value": True}, "value", "must be a finite number"),
        ({"path": "args.a", "op": "regex", "value": "("}, "value", "invalid regular expression: missing )"),
        ({"path": "args.a", "op": "regex", "value": 1}, "value", "must be a regular expression string"),
        ({"path": "args.a", "op": "exists", "value": "yes"}, "value", "must be true or false"),
        ({"path": "args.a", "op": "eq", "vaule": 1}, "vaule", 'unknown field (did you mean "value"?)'),
    ],
)
def test_condition_validation_errors_name_path_and_problem(
    condition: dict[str, Any], field: str, phrase: str
) -> None:
    """Each invalid condition field is reported at its path with what is expected there."""
    found = rule_issues({"deny_if": [{"path": "args.ok", "op": "exists"}, condition]})
    path = f"tools.x.deny_if[1].{field}"
    assert path in found, found
    assert phrase in found[path]


@pytest.mark.parametrize(
    ("change", "field", "phrase"),
    [
        ({"counter": None}, "counter", "missing required field"),
        ({"counter": ""}, "counter", "must be a non-empty name"),
        ({"counter": "a b"}, "counter", "must be a non-empty name"),
        ({"window": None}, "window", "missing required field"),
        ({"window": "week"}, "window", "must be one of second, minute, hour, day"),
        ({"window": "fortnight"}, "window", "must be one of second, minute, hour, day or a whole number"),
        ({"window": 0}, "window", "a whole number of seconds from 1 to 86400"),
        ({"window": -1}, "window", "a whole number of seconds from 1 to 86400"),
        ({"window": 1.5}, "window", "a whole number of seconds from 1 to 86400"),
        ({"window": 86401}, "window", "a whole number of seconds from 1 to 86400"),
        ({"window": True}, "window", "a whole number of seconds from 1 to 86400"),
        ({"max": 10**400}, "max", "must be a number greater than 0"),
        ({"max": None}, "max", "missing required field"),
        ({"max": 0}, "max", "must be a number greater than 0"),
        ({"max": -1}, "max", "must be a number greater than 0"),
        ({"max": "10"}, "max", "must be a number greater than 0"),
        ({"max": True}, "max", "must be a number greater than 0"),
        ({"scope": "user"}, "scope", "must be one of grant, session, global"),
        ({"increment_from": "amount"}, "increment_from", 'must be "args" or a path under it'),
        ({"windw": "hour"}, "windw", 'unknown field (did you mean "window"?)'),
    ],
)
def test_limit_validation_errors_name_path_and_problem(
    change: dict[str, Any], field: str, phrase: str
) -> None:
    """Each invalid limit field is reported at its path with what is expected there."""
    limit = {"counter": "c", "window": "minute", "max": 1, **change}
    found = rule_issues({"limits": [{key: value for key, value in limit.items() if value is not None}]})
    path = f"tools.x.limits[0].{field}"
    assert path in found, found
    assert phrase in found[path]


@pytest.mark.parametrize(
    ("data", "path", "phrase"),
    [
        ([], "(root)", "must be an object"),
        ({"tools": {}}, "version", "missing required field"),
        ({"version": 1}, "version", 'must be the string "1"'),
        ({"version": "1.0"}, "version", 'must be the string "1"'),
        ({"version": "1", "default": "maybe"}, "default", "must be one of allow, deny, require_approval"),
        ({"version": "1", "hide": "x"}, "hide", "must be a list"),
        ({"version": "1", "hide": ["", 3]}, "hide[1]", "non-empty tool name or glob"),
        ({"version": "1", "all_tools": []}, "all_tools", "must be an object"),
        ({"version": "1", "all_tools": {"limit": []}}, "all_tools.limit", 'did you mean "limits"?'),
        (
            {"version": "1", "all_tools": {"limits": [{"counter": "c"}]}},
            "all_tools.limits[0].window",
            "missing",
        ),
        ({"version": "1", "tools": []}, "tools", "must be an object"),
        ({"version": "1", "tools": {"": {}}}, 'tools[""]', "must not be empty"),
        ({"version": "1", "tools": {"a.b": []}}, 'tools["a.b"]', "must be an object"),
        ({"version": "1", "tool": {}}, "tool", 'unknown field (did you mean "tools"?)'),
    ],
)
def test_top_level_validation_errors_name_path_and_problem(data: object, path: str, phrase: str) -> None:
    """Each invalid top-level field is reported at its path with what is expected there."""
    found = issues(data)
    assert path in found, found
    assert phrase in found[path]


def test_shared_counter_must_agree_on_window_and_scope() -> None:
    """Rules naming the same counter share it, so a different window or scope is an error."""
    found = issues(
        {
            "version": "1",
            "all_tools": {"limits": [{"counter": "c", "window": "minute", "max": 100}]},
            "tools": {
                "a": {"limits": [{"counter": "c", "window": "hour", "max": 5}]},
                "b": {"limits": [{"counter": "c", "window": "minute", "max": 5, "scope": "global"}]},
                "ok": {"limits": [{"counter": "c", "window": "minute", "max": 7, "scope": "grant"}]},
            },
        }
    )
    assert set(found) == {"tools.a.limits[0].window", "tools.b.limits[0].scope"}
    assert 'counter "c" has window minute at all_tools.limits[0]' in found["tools.a.limits[0].window"]
    assert 'counter "c" has scope grant at all_tools.limits[0]' in found["tools.b.limits[0].scope"]


def test_every_error_is_collected_at_once() -> None:
    """One parse reports every problem, and str() lists each as "path: message"."""
    data = {
        "version": 2,
        "default": "nope",
        "tools": {
            "a": {"action": "maybe", "limts": []},
            "b": {"limits": [{"counter": "", "window": "week", "max": 0}]},
        },
    }
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    paths = [issue.path for issue in caught.value.errors]
    assert paths == [
        "version",
        "default",
        "tools.a.limts",
        "tools.a.action",
        "tools.b.limits[0].counter",
        "tools.b.limits[0].window",
        "tools.b.limits[0].max",
    ]
    lines = str(caught.value).splitlines()
    assert lines == [f"{issue.path}: {issue.message}" for issue in caught.value.errors]


def test_policy_error_belongs_to_the_gateway_exception_tree() -> None:
    """PolicyError is an ApprovalsError, so the one error mapper handles it."""
    with pytest.raises(ApprovalsError):
        parse_policy({})


def test_json_syntax_error_names_line_and_column() -> None:
    """A JSON syntax error is reported against the source with its line and column."""
    with pytest.raises(PolicyError) as caught:
        load_policy('{"version": "1",\n  "tools": {,}}', source="config/policy.json")
    (issue,) = caught.value.errors
    assert issue.path == "config/policy.json"
    assert "invalid JSON at line 2 column 13" in issue.message


def test_duplicate_keys_are_refused() -> None:
    """A tool listed twice is an error, not a silent override of the first rule."""
    with pytest.raises(PolicyError, match='duplicate key "drop_table"'):
        load_policy('{"version": "1", "tools": {"drop_table": {"action": "deny"}, "drop_table": {}}}')


# --- properties --------------------------------------------------------------------------------

KEYS = st.text(alphabet="ab_*?[]!", min_size=1, max_size=5)
NAMES = st.text(alphabet="ab_*?[]", max_size=5)


def more_specific_or_equal(left: str, right: str) -> bool:
    """Whether glob `left` is at least as specific as glob `right`."""
    left_literal, left_stars, left_singles = glob_specificity(left)
    right_literal, right_stars, right_singles = glob_specificity(right)
    return (left_literal, -left_stars, -left_singles) >= (right_literal, -right_stars, -right_singles)


@given(keys=st.lists(KEYS, max_size=8, unique=True), name=NAMES)
def test_lookup_prefers_exact_then_most_specific_glob_then_default(keys: list[str], name: str) -> None:
    """The chosen rule is the exact key, else a most specific matching glob, else default."""
    chosen = policy({key: {} for key in keys}).evaluate(name, {}).rule
    exact = [key for key in keys if glob_specificity(key)[1:] == (0, 0)]
    matching = [key for key in keys if key not in exact and fnmatch.fnmatchcase(name, key)]
    if name in exact:
        assert chosen == name
    elif matching:
        assert chosen in matching
        assert all(more_specific_or_equal(chosen, other) for other in matching)
    else:
        assert chosen == "default"


@given(key=st.text(alphabet="ab*?[]!-", max_size=8))
def test_keys_without_wildcards_are_literal_to_fnmatch(key: str) -> None:
    """A key glob_specificity sees no wildcard in is one fnmatch matches only literally."""
    literal = fnmatch.translate(key) == rf"(?s:{re.escape(key)})\Z"
    assert literal is (glob_specificity(key)[1:] == (0, 0))


SEGMENTS = ["a", "b", "0", "1"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4) | st.sampled_from(SEGMENTS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(SEGMENTS), inner, max_size=3),
    max_leaves=10,
)
arguments_strategy = st.dictionaries(st.sampled_from(SEGMENTS), json_values, max_size=3)
paths = st.lists(st.sampled_from(SEGMENTS), max_size=3).map(lambda parts: ".".join(["args", *parts]))


@given(arguments=arguments_strategy, path=paths, value=json_values, data=st.data())
def test_conditions_never_raise_and_negations_agree(
    arguments: dict[str, Any], path: str, value: object, data: st.DataObject
) -> None:
    """Every op decides any JSON-like arguments; where the path exists eq or neq fires (and in or
    not_in), never neither; with no JSON text on the way, a missing path holds for no op."""
    found, actual = resolve_path(arguments, path)
    if found and data.draw(st.booleans()):
        value = actual  # make equality hits common
    listed = [value, *data.draw(st.lists(json_values, max_size=2))]
    number = data.draw(st.integers() | st.floats(allow_nan=False, allow_infinity=False))
    conditions = {
        "eq": value, "neq": value, "in": listed, "not_in": listed, "lt": number, "lte": number,
        "gt": number, "gte": number, "regex": "a|0", "contains": value,
    }  # fmt: skip
    tools = {op: {"approval_if": [{"path": path, "op": op, "value": v}]} for op, v in conditions.items()}
    tools["exists"] = {"approval_if": [{"path": path, "op": "exists"}]}
    loaded = policy(tools)
    holds = {op: loaded.evaluate(op, arguments).action == "require_approval" for op in tools}
    if found:
        assert holds["exists"]
        assert holds["neq"] or holds["eq"]
        assert holds["not_in"] or holds["in"]
    elif "[" not in json.dumps(arguments) and "{" not in json.dumps(arguments)[1:]:
        assert not any(holds.values())  # a missing value holds for no op but exists
