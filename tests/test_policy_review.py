"""A policy rule's `approval` object: every field parsed into a ReviewRule, each mistake reported at
its path, and the groups and quorum checked against the config's reviewers by `approvals check`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from approvals.config import Settings, load_settings, sha256_hex
from approvals.core.review import DEFAULT_REVIEW, Escalation, ReviewRule
from approvals.errors import ConfigError
from approvals.policy import PolicyError, parse_policy
from approvals.policy_files import PolicyBook, check_policies
from tests.conftest import WAIT

FULL = {
    "timeout": "30m",
    "reviewers": ["payments"],
    "quorum": 3,
    "from": ["payments", "security"],
    "via": ["inbox", "api"],
    "remember": False,
    "edit": False,
    "escalate": [{"after": "10m", "to": ["oncall"]}, {"after": 1200, "to": ["oncall", "leads"]}],
    "on_timeout": "deny",
}
FULL_RULE = ReviewRule(
    timeout=1800.0,
    reviewers=("payments",),
    quorum=3,
    from_groups=("payments", "security"),
    via=("inbox", "api"),
    remember=False,
    edit=False,
    escalate=(Escalation(600.0, ("oncall",)), Escalation(1200.0, ("oncall", "leads"))),
    on_timeout="deny",
)


def rule_of(approval: object, action: str = "require_approval") -> ReviewRule:
    """The ReviewRule a call of tool x is held under with this `approval` object."""
    policy = parse_policy({"version": "1", "tools": {"x": {"action": action, "approval": approval}}})
    return policy.evaluate("x", {}).review


def issues_of(approval: object) -> dict[str, str]:
    """path → message of every issue the `approval` object of rule x has."""
    with pytest.raises(PolicyError) as caught:
        parse_policy({"version": "1", "tools": {"x": {"action": "require_approval", "approval": approval}}})
    return {issue.path: issue.message for issue in caught.value.errors}


# --- parsing ------------------------------------------------------------------------------------


def test_every_field_is_parsed_into_the_review_rule() -> None:
    """A rule using every field is held under the ReviewRule those fields spell."""
    assert rule_of(FULL) == FULL_RULE


@pytest.mark.parametrize(
    ("approval", "expected"),
    [
        ({}, DEFAULT_REVIEW),
        ({"timeout": "10m"}, ReviewRule(timeout=600.0)),
        ({"reviewers": ["a.b", "c_d-1"]}, ReviewRule(reviewers=("a.b", "c_d-1"))),
        ({"quorum": 20}, ReviewRule(quorum=20)),
        ({"from": ["a", "b"]}, ReviewRule(quorum=2, from_groups=("a", "b"))),  # quorum defaults to len(from)
        ({"from": ["a"], "quorum": 3}, ReviewRule(quorum=3, from_groups=("a",))),
        ({"from": []}, DEFAULT_REVIEW),
        ({"via": ["slack"]}, ReviewRule(via=("slack",))),
        ({"remember": True, "quorum": 2}, ReviewRule(quorum=2)),  # allowed, just never offered
        ({"escalate": []}, DEFAULT_REVIEW),
        (
            {"escalate": [{"after": "1h", "to": ["oncall"]}]},
            ReviewRule(escalate=(Escalation(3600.0, ("oncall",)),)),
        ),
        ({"on_timeout": "expire"}, DEFAULT_REVIEW),
    ],
)
def test_each_field_alone(approval: dict[str, Any], expected: ReviewRule) -> None:
    """Each field sets its part of the rule and leaves the rest at the defaults."""
    assert rule_of(approval) == expected


def test_remember_under_a_quorum_is_allowed_but_never_offered() -> None:
    """`remember: true` with a quorum is valid; the rule simply never offers a standing grant."""
    rule = rule_of({"remember": True, "quorum": 2})
    assert rule.remember
    assert not rule.may_remember


@pytest.mark.parametrize("approval", [FULL, {}, {"from": ["a", "b"], "via": ["slack"]}, {"timeout": 90}])
def test_parsed_rules_round_trip_through_their_stored_form(approval: dict[str, Any]) -> None:
    """ReviewRule.to_json / from_json give back the parsed rule (what an approval keeps)."""
    rule = rule_of(approval)
    assert ReviewRule.from_json(rule.to_json()) == rule


def test_deny_and_hide_keep_the_default_review() -> None:
    """A deny rule's `approval` is validated but a denied call carries no review, as with `timeout`."""
    assert rule_of({"quorum": 2}, action="deny") == DEFAULT_REVIEW
    with pytest.raises(PolicyError) as caught:
        parse_policy({"version": "1", "tools": {"x": {"action": "deny", "approval": {"quorum": 0}}}})
    assert [i.path for i in caught.value.errors] == ["tools.x.approval.quorum"]
    hidden = parse_policy({"version": "1", "hide": ["x"], "tools": {"x": {"approval": {"quorum": 2}}}})
    assert hidden.evaluate("x", {}).review == DEFAULT_REVIEW


def test_conditional_approval_carries_the_rule() -> None:
    """A call held by `approval_if` is reviewed under the rule's `approval` object."""
    tools = {"x": {"approval_if": [{"path": "args.a", "op": "exists"}], "approval": {"quorum": 2}}}
    policy = parse_policy({"version": "1", "tools": tools})
    assert policy.evaluate("x", {"a": 1}).review == ReviewRule(quorum=2)
    assert policy.evaluate("x", {}).review == ReviewRule(quorum=2)  # allowed: the rule rides along, unused


# --- validation ---------------------------------------------------------------------------------

P = "tools.x.approval"
NAME_HINT = "must be a group name of letters, digits and _ . -"


@pytest.mark.parametrize(
    ("approval", "path", "message"),
    [
        ({"quorom": 2}, f"{P}.quorom", 'unknown field (did you mean "quorum"?)'),
        ({"zzz": 1}, f"{P}.zzz", "unknown field (expected one of timeout, reviewers, quorum, from, via,"),
        (
            {"timeout": "soon"},
            f"{P}.timeout",
            'must be a duration like "30s", "15m", "2h" or "1d" (got "soon")',
        ),
        ({"reviewers": []}, f"{P}.reviewers", "must be a non-empty list of group names (got [])"),
        (
            {"reviewers": "payments"},
            f"{P}.reviewers",
            'must be a non-empty list of group names (got "payments")',
        ),
        ({"reviewers": ["ok", "pay ments"]}, f"{P}.reviewers[1]", f'{NAME_HINT} (got "pay ments")'),
        ({"reviewers": [""]}, f"{P}.reviewers[0]", f'{NAME_HINT} (got "")'),
        ({"reviewers": [3]}, f"{P}.reviewers[0]", f"{NAME_HINT} (got 3)"),
        ({"reviewers": ["a", "b", "a"]}, f"{P}.reviewers[2]", '"a" is listed twice'),
        ({"quorum": 0}, f"{P}.quorum", "must be a whole number from 1 to 20 (got 0)"),
        ({"quorum": 21}, f"{P}.quorum", "must be a whole number from 1 to 20 (got 21)"),
        ({"quorum": True}, f"{P}.quorum", "must be a whole number from 1 to 20 (got true)"),
        ({"quorum": 2.0}, f"{P}.quorum", "must be a whole number from 1 to 20 (got 2.0)"),
        ({"quorum": "2"}, f"{P}.quorum", 'must be a whole number from 1 to 20 (got "2")'),
        ({"from": "a"}, f"{P}.from", 'must be a list of group names (got "a")'),
        ({"from": ["a", "a"]}, f"{P}.from[1]", '"a" is listed twice'),
        ({"from": ["a", "b/c"]}, f"{P}.from[1]", f'{NAME_HINT} (got "b/c")'),
        (
            {"from": ["a", "b", "c"], "quorum": 2},
            f"{P}.quorum",
            'must be at least 3: one approval from each group in "from"',
        ),
        ({"via": []}, f"{P}.via", "must be a non-empty list of inbox, slack, api (got [])"),
        ({"via": "inbox"}, f"{P}.via", 'must be a non-empty list of inbox, slack, api (got "inbox")'),
        ({"via": ["inbox", "email"]}, f"{P}.via[1]", 'must be one of inbox, slack, api (got "email")'),
        ({"via": ["api", "api"]}, f"{P}.via[1]", '"api" is listed twice'),
        ({"remember": "no"}, f"{P}.remember", 'must be true or false (got "no")'),
        ({"edit": 0}, f"{P}.edit", "must be true or false (got 0)"),
        ({"on_timeout": "wait"}, f"{P}.on_timeout", 'must be one of deny, expire (got "wait")'),
        ({"on_timeout": None}, f"{P}.on_timeout", "must be one of deny, expire (got null)"),
        (
            {"escalate": {}},
            f"{P}.escalate",
            'must be a list of steps like {"after": "10m", "to": ["oncall"]}',
        ),
        (
            {"escalate": ["10m"]},
            f"{P}.escalate[0]",
            'must be an object like {"after": "10m", "to": ["oncall"]}',
        ),
        ({"escalate": [{"to": ["a"]}]}, f"{P}.escalate[0].after", "missing required field"),
        ({"escalate": [{"after": "1m"}]}, f"{P}.escalate[0].to", "missing required field"),
        (
            {"escalate": [{"after": "1m", "to": []}]},
            f"{P}.escalate[0].to",
            "must be a non-empty list of group",
        ),
        ({"escalate": [{"after": "1m", "to": ["a a"]}]}, f"{P}.escalate[0].to[0]", NAME_HINT),
        ({"escalate": [{"after": "x", "to": ["a"]}]}, f"{P}.escalate[0].after", "must be a duration like"),
        (
            {"escalate": [{"after": "1m", "to": ["a"], "too": 1}]},
            f"{P}.escalate[0].too",
            'unknown field (did you mean "to"?)',
        ),
        (
            {"escalate": [{"after": "10m", "to": ["a"]}, {"after": 600, "to": ["b"]}]},
            f"{P}.escalate[1].after",
            f'must be later than {P}.escalate[0].after ("10m")',
        ),
        (
            {"timeout": "30m", "escalate": [{"after": "30m", "to": ["a"]}]},
            f"{P}.escalate[0].after",
            'must be shorter than the rule\'s timeout ("30m")',
        ),
    ],
)
def test_each_invalid_value_is_reported_at_its_path(
    approval: dict[str, Any], path: str, message: str
) -> None:
    """Every kind of invalid value of every field: one issue, at its exact path, saying what is expected."""
    found = issues_of(approval)
    assert list(found) == [path], found
    assert found[path].startswith(message), found[path]


def test_steps_are_compared_with_the_latest_valid_one() -> None:
    """Steps out of order are each reported against the latest earlier step, not a refused one."""
    steps = [{"after": "10m", "to": ["a"]}, {"after": "5m", "to": ["b"]}, {"after": "7m", "to": ["c"]}]
    found = issues_of({"escalate": steps})
    assert list(found) == [f"{P}.escalate[1].after", f"{P}.escalate[2].after"]
    assert all('escalate[0].after ("10m")' in message for message in found.values())


def test_every_problem_is_reported_at_once() -> None:
    """Several bad fields in one object: each is reported, none hides another."""
    found = issues_of({"reviewers": [], "quorum": 0, "via": ["x"], "on_timeout": 1, "edit": None})
    assert sorted(found) == [f"{P}.{f}" for f in ("edit", "on_timeout", "quorum", "reviewers")] + [
        f"{P}.via[0]"
    ]


def test_rules_keyed_by_glob_or_odd_names_use_the_policy_paths() -> None:
    """The approval path of a rule with an odd key is quoted as the rest of the policy's paths are."""
    with pytest.raises(PolicyError) as caught:
        parse_policy({"version": "1", "tools": {"a b": {"approval": {"quorum": 0}}}})
    assert [i.path for i in caught.value.errors] == ['tools["a b"].approval.quorum']
    policy = parse_policy({"version": "1", "tools": {"get_*": {"approval": {"quorum": 2}}, "y": {}}})
    assert policy.reviews() == (("tools.get_*.approval", ReviewRule(quorum=2)),)


# --- checks against the config's reviewers ------------------------------------------------------

TOKENS = {name: f"{name}-reviewer-token-0123456789" for name in ("alice", "bob", "carol", "dave")}


def gateway_toml(reviewers: dict[str, list[str]], *, owner: str | None = None, extra: str = "") -> str:
    """A gateway.toml with upstream demo (policy.json beside it) and these reviewers and groups."""
    lines = [
        '[upstreams.demo]\ncommand = ["python", "-m", "approvals.demo_server"]\npolicy = "policy.json"\n'
    ]
    if owner is not None:
        digest = sha256_hex("agent-token-0123456789abcdef")
        lines.append(f'[[grants]]\nname = "agent"\ntoken_sha256 = "{digest}"\nowner = "{owner}"\n')
    for name, groups in reviewers.items():
        digest = sha256_hex(TOKENS[name])
        lines.append(
            f'[[reviewers]]\nname = "{name}"\ntoken_sha256 = "{digest}"\ngroups = {json.dumps(groups)}\n'
        )
    return "\n".join(lines) + extra


def write(directory: Path, reviewers: dict[str, list[str]], tools: dict[str, Any], **kw: Any) -> Path:
    (directory / "policy.json").write_text(json.dumps({"version": "1", "default": "allow", "tools": tools}))
    config = directory / "gateway.toml"
    config.write_text(gateway_toml(reviewers, **kw))
    return config


def cross_issues(
    directory: Path, reviewers: dict[str, list[str]], tools: dict[str, Any], **kw: Any
) -> list[str]:
    """The issues check_policies reports, each as `path: message` with the file name cut off."""
    settings = load_settings(write(directory, reviewers, tools, **kw), env={})
    try:
        check_policies(settings)
    except ConfigError as exc:
        prefix = f"{directory / 'policy.json'}: "
        return [str(issue).removeprefix(prefix) for issue in exc.issues]
    return []


KNOWN = " (groups: oncall, payments, security)"  # the groups TEAM's reviewers are in
TEAM = {"alice": ["payments", "oncall"], "bob": ["payments"], "carol": ["security"]}
REFUND = "tools.create_refund.approval"


def test_groups_and_quorum_that_reviewers_can_meet_pass(tmp_path: Path) -> None:
    """Every group named is some reviewer's, and enough of them may decide: no issue."""
    tools = {
        "create_refund": {"action": "require_approval", "approval": {"reviewers": ["payments"], "quorum": 2}},
        "drop": {
            "approval": {"from": ["payments", "security"], "escalate": [{"after": "1m", "to": ["oncall"]}]}
        },
        "any": {"approval": {"quorum": 3}},
    }
    assert cross_issues(tmp_path, TEAM, tools) == []


@pytest.mark.parametrize(
    ("approval", "expected"),
    [
        (
            {"reviewers": ["paymnts"]},
            [f'{REFUND}.reviewers[0]: no [[reviewers]] entry is in group "paymnts"{KNOWN}'],
        ),
        (
            {"from": ["payments", "legal"]},
            [f'{REFUND}.from[1]: no [[reviewers]] entry is in group "legal"{KNOWN}'],
        ),
        (
            {"escalate": [{"after": "1m", "to": ["oncall"]}, {"after": "2m", "to": ["oncall", "cto"]}]},
            [f'{REFUND}.escalate[1].to[1]: no [[reviewers]] entry is in group "cto"{KNOWN}'],
        ),
        (
            {"reviewers": ["payments"], "quorum": 3},
            [f"{REFUND}.quorum: 3 approvals needed but only 2 reviewers may decide"],
        ),
        (
            {"reviewers": ["security"], "quorum": 2},
            [f"{REFUND}.quorum: 2 approvals needed but only 1 reviewer may decide"],
        ),
        ({"quorum": 4}, [f"{REFUND}.quorum: 4 approvals needed but only 3 reviewers may decide"]),
        (
            {"reviewers": ["security"], "quorum": 2, "escalate": [{"after": "1m", "to": ["payments"]}]},
            [],  # escalation lets payments decide too, in the end
        ),
    ],
)
def test_groups_nobody_is_in_and_quorums_nobody_can_meet_are_reported(
    tmp_path: Path, approval: dict[str, Any], expected: list[str]
) -> None:
    """A group no reviewer is in, or a quorum larger than the reviewers who may decide, is an error
    at its path, with the groups that exist."""
    assert cross_issues(tmp_path, TEAM, {"create_refund": {"approval": approval}}) == expected


def test_the_owner_of_every_agent_does_not_count_toward_a_quorum(tmp_path: Path) -> None:
    """When one reviewer owns every agent, they can never approve, so the quorum counts without them."""
    tools = {"create_refund": {"approval": {"reviewers": ["payments"], "quorum": 2}}}
    assert cross_issues(tmp_path, TEAM, tools, owner="carol") == []
    assert cross_issues(tmp_path, TEAM, tools, owner="bob") == [
        f"{REFUND}.quorum: 2 approvals needed but only 1 reviewer may decide"
        " (bob owns every agent, and an owner never approves their agent's calls)"
    ]


def test_escalation_after_the_default_timeout_and_slack_only_without_slack(tmp_path: Path) -> None:
    """A step after the gateway's default timeout, and `via: ["slack"]` with no [slack], are errors."""
    tools = {
        "create_refund": {"approval": {"via": ["slack"], "escalate": [{"after": "20m", "to": ["oncall"]}]}}
    }
    assert cross_issues(tmp_path, TEAM, tools) == [
        f"{REFUND}.escalate[0].after: must be shorter than the approval timeout (15 min, [approvals] timeout"
        " in the config); or give the rule a longer timeout",
        f"{REFUND}.via: decisions only through Slack, but the config has no [slack]",
    ]
    tools = {
        "create_refund": {"approval": {"timeout": "1h", "escalate": [{"after": "20m", "to": ["oncall"]}]}}
    }
    assert cross_issues(tmp_path, TEAM, tools) == []


def test_without_reviewers_the_development_reviewer_counts_once(tmp_path: Path) -> None:
    """No [[reviewers]]: serve makes one development reviewer in no group; a policy naming no group
    and needing one approval passes, groups and larger quorums are reported."""
    assert cross_issues(tmp_path, {}, {"x": {"approval": {"timeout": "5m", "on_timeout": "deny"}}}) == []
    assert cross_issues(tmp_path, {}, {"x": {"approval": {"reviewers": ["ops"]}}}) == [
        'tools.x.approval.reviewers[0]: no [[reviewers]] entry is in group "ops" (groups: none)'
    ]
    assert cross_issues(tmp_path, {}, {"x": {"approval": {"quorum": 2}}}) == [
        "tools.x.approval.quorum: 2 approvals needed but only 1 reviewer may decide (no [[reviewers]] are"
        " configured: `approvals serve` makes one development reviewer)"
    ]


async def test_a_reload_that_names_an_unknown_group_keeps_the_old_policy(tmp_path: Path) -> None:
    """A policy edit naming a group nobody is in is refused like any invalid edit: the old one stays."""
    settings: Settings = load_settings(
        write(tmp_path, TEAM, {"x": {"approval": {"reviewers": ["oncall"]}}}), env={}
    )
    book = PolicyBook.load(settings)
    old = book["demo"]
    policy = {"version": "1", "tools": {"x": {"approval": {"reviewers": ["oncal"]}}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    book.reload()
    assert book["demo"] is old
    assert book.errors["demo"] == [
        f'tools.x.approval.reviewers[0]: no [[reviewers]] entry is in group "oncal"{KNOWN}'
    ]


# --- `approvals check` as users run it -----------------------------------------------------------


async def run_check(cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPROVALS_", "SLACK_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "approvals", "check", "--config", "gateway.toml", cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_reports_field_and_cross_check_errors_and_exits_1(tmp_path: Path) -> None:
    """`approvals check` lists a bad field and a group nobody is in, each with file and path, exit 1."""
    tools = {
        "create_refund": {"action": "require_approval", "approval": {"reviewers": ["paymnts"]}},
        "send": {"approval": {"quorom": 2}},
    }
    write(tmp_path, TEAM, tools)
    status, out, err = await run_check(tmp_path)
    policy = (tmp_path / "policy.json").resolve()
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        "error: policy files: 1 error(s)",
        f'  {policy}: tools.send.approval.quorom: unknown field (did you mean "quorum"?)',
    ]
    tools["send"] = {"approval": {"quorum": 3, "reviewers": ["payments"]}}
    write(tmp_path, TEAM, tools)
    status, out, err = await run_check(tmp_path)
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        "error: policy files: 2 error(s)",
        f'  {policy}: {REFUND}.reviewers[0]: no [[reviewers]] entry is in group "paymnts"{KNOWN}',
        f"  {policy}: tools.send.approval.quorum: 3 approvals needed but only 2 reviewers may decide",
    ]
    tools["create_refund"]["approval"] = {"reviewers": ["payments"]}
    tools["send"] = {"approval": {"quorum": 2, "reviewers": ["payments"]}}
    write(tmp_path, TEAM, tools)
    status, out, err = await run_check(tmp_path)
    assert (status, "OK" in out) == (0, True), err
