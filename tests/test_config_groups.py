"""gateway.toml: reviewers' groups, Slack's channel per group, and what is refused about either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from approvals.config import Settings, parse_settings, sha256_hex
from approvals.errors import ConfigError

SLACK_ENV = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": "signing-secret"}


def data_with(reviewers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Parsed TOML: one upstream, one grant, these reviewers (tokens filled in), and `extra` tables."""
    entries = [{"token_sha256": sha256_hex(f"{r['name']}-token-0123456789abcdef"), **r} for r in reviewers]
    grant = {"name": "agent", "token_sha256": sha256_hex("agent-token-0123456789abcdef")}
    return {"upstreams": {"demo": {"command": ["x"]}}, "grants": [grant], "reviewers": entries, **extra}


def settings(data: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    return parse_settings(data, Path("/nowhere/gateway.toml"), env or {})


def issues(data: dict[str, Any], env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        settings(data, env)
    return [(i.path, i.message) for i in caught.value.issues]


def test_reviewers_groups_are_read_in_order() -> None:
    """`groups = [...]` on a reviewer becomes Principal.groups; no groups is an empty tuple."""
    loaded = settings(data_with([{"name": "alice", "groups": ["payments", "oncall"]}, {"name": "bob"}]))
    assert [(r.name, r.groups) for r in loaded.reviewers] == [("alice", ("payments", "oncall")), ("bob", ())]
    assert loaded.grants[0].groups == ()


@pytest.mark.parametrize(
    ("groups", "path", "message"),
    [
        ("payments", "reviewers[1].groups", 'must be a list of group names (got "payments")'),
        (
            ["pay ments"],
            "reviewers[1].groups[0]",
            'must be a group name of letters, digits and _ . - (got "pay ments")',
        ),
        ([""], "reviewers[1].groups[0]", 'must be a group name of letters, digits and _ . - (got "")'),
        (["ok", 5], "reviewers[1].groups[1]", "must be a group name of letters, digits and _ . - (got 5)"),
        (["a", "b", "a"], "reviewers[1].groups[2]", '"a" is listed twice'),
    ],
)
def test_bad_groups_are_reported_at_their_path(groups: object, path: str, message: str) -> None:
    """Each kind of bad `groups` value: one issue at its exact path."""
    data = data_with([{"name": "alice", "groups": ["ok"]}, {"name": "bob", "groups": groups}])
    assert issues(data) == [(path, message)]


def test_grants_have_no_groups() -> None:
    """`groups` on a grant is refused with a word on why, not as an unknown setting."""
    data = data_with([{"name": "alice"}])
    data["grants"][0]["groups"] = ["payments"]
    assert issues(data) == [
        ("grants[0].groups", "only [[reviewers]] have groups (a grant is an agent; it decides nothing)")
    ]


def test_slack_group_channels_are_read() -> None:
    """[slack] group_channels maps reviewer groups to channel IDs; left out, it is empty."""
    reviewers = [{"name": "alice", "groups": ["payments", "oncall"]}]
    channels = {"payments": "C0PAYMENTS", "oncall": "C0ONCALL"}
    loaded = settings(data_with(reviewers, slack={"channel": "C0ALL", "group_channels": channels}), SLACK_ENV)
    assert loaded.slack is not None
    assert dict(loaded.slack.group_channels) == channels
    plain = settings(data_with(reviewers, slack={"channel": "C0ALL"}), SLACK_ENV)
    assert plain.slack is not None
    assert dict(plain.slack.group_channels) == {}


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        (
            {"paymnts": "C0PAYMENTS"},
            [
                (
                    "slack.group_channels.paymnts",
                    'no [[reviewers]] entry is in group "paymnts" (groups: oncall, payments)',
                )
            ],
        ),
        ({"payments": ""}, [("slack.group_channels.payments", "must be a non-empty channel ID (C0...)")]),
        ({"payments": 5}, [("slack.group_channels.payments", "must be a non-empty channel ID (C0...)")]),
        (
            "C0PAYMENTS",
            [("slack.group_channels", 'must be a table like { payments = "C0PAYMENTS" }, not a string')],
        ),
    ],
)
def test_bad_group_channels_are_reported_at_their_path(
    channels: object, expected: list[tuple[str, str]]
) -> None:
    """A channel for a group no reviewer is in, an empty channel, or not a table: each at its path."""
    reviewers = [{"name": "alice", "groups": ["payments"]}, {"name": "bob", "groups": ["oncall"]}]
    data = data_with(reviewers, slack={"channel": "C0ALL", "group_channels": channels})
    assert issues(data, SLACK_ENV) == expected


def test_group_channels_without_reviewers_name_no_group() -> None:
    """With no [[reviewers]] (the development reviewer is in no group), every group channel is refused."""
    data = data_with([], slack={"channel": "C0ALL", "group_channels": {"ops": "C0OPS"}})
    assert issues(data, SLACK_ENV) == [
        ("slack.group_channels.ops", 'no [[reviewers]] entry is in group "ops" (groups: none)')
    ]
