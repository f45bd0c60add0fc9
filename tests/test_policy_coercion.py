"""Conditions fail closed on values an upstream reads differently than they were sent (issue 11, item 2)."""

from __future__ import annotations

from typing import Any

import pytest

from approvals.policy import Decision, parse_policy

# The issue's transfer tool: refused above 1000, needs approval above 100.
TRANSFER = {
    "deny_if": [{"path": "args.amount", "op": "gt", "value": 1000}],
    "approval_if": [{"path": "args.amount", "op": "gt", "value": 100}],
}


def decide(rule: dict[str, Any], arguments: dict[str, Any]) -> Decision:
    """The decision on tool "t" under a policy whose only rule is `rule`."""
    return parse_policy({"version": "1", "tools": {"t": rule}}).evaluate("t", arguments)


def condition(field: str, path: str, op: str, value: object = None) -> dict[str, Any]:
    """A rule with one condition under `field` (require, deny_if or approval_if)."""
    cond: dict[str, Any] = {"path": path, "op": op}
    if op != "exists" or value is not None:
        cond["value"] = value
    return {field: [cond]}


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        ("5000", "deny_if"),
        (" 5000 ", "deny_if"),
        ("5e3", "deny_if"),
        ("500", "approval_required"),
        ("50", "allowed"),
        ("50.0", "allowed"),
        (5000, "deny_if"),
    ],
)
def test_numeric_strings_compare_as_numbers(amount: object, code: str) -> None:
    """ "5000" is judged as 5000 by gt, as pydantic will read it: no transfer past deny_if or approval_if."""
    assert decide(TRANSFER, {"amount": amount}).code == code


@pytest.mark.parametrize("amount", ["lots", "nan", "inf", "1" * 5000, True, [5000], {"v": 5000}, 10**400])
def test_values_that_cannot_be_compared_fail_closed_each_way(amount: object) -> None:
    """A value gt cannot judge denies under deny_if, holds under approval_if, fails a require."""
    assert decide(TRANSFER, {"amount": amount}).code == "deny_if"
    held = decide({"approval_if": TRANSFER["approval_if"]}, {"amount": amount})
    assert held.action == "require_approval"
    required = decide(condition("require", "args.amount", "lte", 1000), {"amount": amount})
    assert required.code == "requirement_failed"


@pytest.mark.parametrize(
    ("op", "value", "given", "fires"),
    [
        ("eq", 5000, "5000", True),
        ("neq", 5000, "5000", False),
        ("in", [1, 2], "2", True),
        ("not_in", [1, 2], "2", False),
        ("not_in", ["USD", "EUR"], 5, True),
        ("eq", False, "false", True),
        ("eq", False, "no", True),
        ("eq", False, 0, True),
        ("neq", True, "yes", False),
        ("eq", ["x"], '["x"]', True),
        ("neq", {"k": 1}, ' {"k": 1}', False),
        ("eq", None, "null", True),
        ("eq", "5000", 5000, False),  # no upstream reads a number as a string
    ],
)
def test_equality_reads_the_value_as_the_operand_type(
    op: str, value: object, given: object, fires: bool
) -> None:
    """eq/neq/in/not_in read a string as a number, boolean or JSON value when compared with one."""
    assert (decide(condition("deny_if", "args.a", op, value), {"a": given}).code == "deny_if") is fires


@pytest.mark.parametrize(
    "tags",
    [
        ["user", "admin"],
        '["user", "admin"]',
        '["user", "\\u0061dmin"]',  # escaped: the raw text does not contain "admin"
        ["user", '["admin"]'],
    ],
)
def test_contains_sees_lists_sent_as_json_strings(tags: object) -> None:
    """A list sent as a JSON string (which the SDK decodes) cannot slip past a contains rule."""
    rule = condition("deny_if", "args.tags", "contains", "admin")
    expected = "allowed" if tags == ["user", '["admin"]'] else "deny_if"  # a nested string is a string
    assert decide(rule, {"tags": tags}).code == expected


def test_regex_on_a_json_string_or_a_non_string_fails_closed() -> None:
    """regex cannot judge a decoded container or a number: deny_if fires and require fails."""
    deny = condition("deny_if", "args.sql", "regex", "DROP")
    assert decide(deny, {"sql": '["DR\\u004fP"]'}).code == "deny_if"
    assert decide(deny, {"sql": 7}).code == "deny_if"
    assert decide(deny, {"sql": "SELECT 1"}).code == "allowed"
    required = condition("require", "args.sql", "regex", "^SELECT")
    assert decide(required, {"sql": '["SELECT"]'}).code == "requirement_failed"
    assert decide(required, {"sql": "SELECT 1"}).code == "allowed"


def test_paths_walk_into_json_strings_too() -> None:
    """A field inside an object sent as a JSON string is judged; require also needs it as sent."""
    deny = condition("deny_if", "args.options.force", "eq", True)
    assert decide(deny, {"options": '{"force": true}'}).code == "deny_if"
    assert decide(deny, {"options": '{"force": false}'}).code == "allowed"
    required = condition("require", "args.options.mode", "exists")
    assert decide(required, {"options": '{"mode": 1}'}).code == "requirement_failed"
    assert decide(required, {"options": {"mode": 1}}).code == "allowed"


def test_null_is_both_given_and_left_out() -> None:
    """null fails `require exists` and fires deny_if exists / absent; a comparison reads it as absent."""
    required = decide(condition("require", "args.reason", "exists"), {"reason": None})
    assert (required.code, required.reason) == ("requirement_failed", "required argument args.reason is null")
    assert decide(condition("deny_if", "args.sudo", "exists"), {"sudo": None}).code == "deny_if"
    assert decide(condition("deny_if", "args.ack", "exists", False), {"ack": None}).code == "deny_if"
    assert decide(TRANSFER, {"amount": None}).code == "allowed"
    assert decide(condition("deny_if", "args.tags", "contains", "x"), {"tags": None}).code == "allowed"


def test_missing_values_still_only_fail_require() -> None:
    """A missing argument fires no deny_if (the upstream's default applies) and fails a require."""
    assert decide(TRANSFER, {}).code == "allowed"
    assert decide(condition("deny_if", "args.a", "neq", 1), {}).code == "allowed"
    assert decide(condition("require", "args.a", "neq", 1), {}).code == "requirement_failed"
