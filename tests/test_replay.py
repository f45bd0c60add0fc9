"""`approvals policy replay`: a seeded history of held calls judged under candidate policies, with
every count worked out by hand beside the history."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

from approvals import cli_policy
from approvals.core.model import Approval, Status, new_approval_id, sha256_of
from approvals.policy import load_policy
from approvals.replay import replay, reviewer_verdict
from tests.test_store_approvals import NOW, make_approval, open_store

HOUR = 3600.0
DAY = 86400.0
EMAIL_TOOL = {
    "name": "send_email",
    "inputSchema": {"type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]},
}

# (upstream, tool, arguments, grant, seconds before NOW, what became of it: (status, decided_by))
# Every call was held by the current policy; hour windows are aligned to the epoch, and NOW - 5 h
# is 800 s into its hour, so the four images below fall in one window.
HISTORY: list[tuple[str, str, dict[str, Any], str, float, tuple[Status, str | None]]] = [
    ("demo", "send_email", {"to": "a@other.com"}, "agent-a", 3 * DAY, ("completed", "alice")),
    ("demo", "send_email", {"to": "b@other.com"}, "agent-a", 2 * DAY, ("approved", "alice")),
    ("demo", "send_email", {"to": "c@other.com"}, "agent-b", 1 * DAY, ("denied", "bob")),
    ("demo", "send_email", {"to": "d@other.com"}, "agent-b", 1 * HOUR, ("expired", None)),
    ("demo", "generate_image", {"prompt": "cat"}, "agent-a", 5 * HOUR, ("approved", "bob")),
    ("demo", "generate_image", {"prompt": "dog"}, "agent-a", 5 * HOUR - 60, ("denied", "bob")),
    ("demo", "generate_image", {"prompt": "owl"}, "agent-a", 5 * HOUR - 120, ("approved", "bob")),
    ("demo", "generate_image", {"prompt": "fox"}, "agent-b", 5 * HOUR - 180, ("pending", None)),
    ("demo", "delete_file", {"path": "/tmp/x"}, "agent-a", 2 * HOUR, ("approved", "alice")),
    ("demo", "delete_file", {"path": "/etc/passwd"}, "agent-a", 10 * DAY, ("approved", "alice")),  # > 7d
    ("other", "send_email", {"to": "e@other.com"}, "agent-a", 1 * HOUR, ("approved", "alice")),
]
HELD_ALL = {t: {"action": "require_approval"} for t in ("send_email", "generate_image", "delete_file")}


def _policy(**tools: Any) -> dict[str, Any]:
    return {"version": "1", "default": "deny", "tools": {**HELD_ALL, **tools}}


# send_email passes unless it goes to c@other.com: 3 of demo's 4 would flip (approved 2: a and b;
# d expired unanswered), c stays held. Images and the delete stay held.
LOOSER = _policy(send_email={"approval_if": [{"path": "args.to", "op": "eq", "value": "c@other.com"}]})
# Two images an hour per agent: agent-a's third (owl) is refused; agent-b's fox is alone.
LIMITED = _policy(
    generate_image={
        "action": "require_approval",
        "limits": [{"counter": "images", "window": "hour", "max": 2, "scope": "grant"}],
    }
)
STRICTER = _policy(delete_file={"action": "deny", "reason": "no deletes"})


def _record(upstream: str, tool: str, arguments: dict[str, Any], grant: str, ago: float) -> Approval:
    definition = EMAIL_TOOL if tool == "send_email" else {"name": tool, "inputSchema": {"type": "object"}}
    return make_approval(
        id=new_approval_id(),
        upstream=upstream,
        tool=tool,
        arguments_json=json.dumps(arguments),
        args_sha256=sha256_of(arguments),
        tool_json=json.dumps(definition),
        tool_sha256=sha256_of(definition),
        grant=grant,
        rule=tool,
        created_at=NOW - ago,
        expires_at=NOW - ago + 600,
    )


async def _seed(kind: str, path: Path, postgres_url: str = "") -> dict[str, str]:
    """The history in a fresh store ("sqlite" at ``path``, or "postgres" emptied); the id of each
    record by its first argument value."""
    store = await open_store(kind, path, postgres_url)
    ids = {}
    try:
        for upstream, tool, arguments, grant, ago, (status, who) in HISTORY:
            approval = _record(upstream, tool, arguments, grant, ago)
            await store.create_approval(approval, actor=grant, channel="mcp")
            ids[next(iter(arguments.values()))] = approval.id
            steps: list[Status] = {
                "completed": ["approved", "released", "completed"],
                "approved": ["approved"],
            }.get(status, [] if status == "pending" else [status])
            current: Status = "pending"
            for step in steps:
                fields = {"decided_by": who, "decided_via": "web"} if step in ("approved", "denied") else {}
                moved = await store.transition(
                    approval.id, from_={current}, to=step, actor=who or "gateway", channel="web", **fields
                )
                assert moved is not None
                current = step
    finally:
        await store.close()
    return ids


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(gateway.toml over the seeded history, record ids by their first argument)."""
    path = tmp_path / "approvals.db"
    ids = asyncio.run(_seed("sqlite", path))
    config = tmp_path / "gateway.toml"
    demo = 'command = ["python", "-m", "approvals.demo_server"]'
    config.write_text(f'[store]\npath = "{path}"\n\n[upstreams.demo]\n{demo}\n\n[upstreams.other]\n{demo}\n')
    return config, ids


def _replay(config: Path, candidate: dict[str, Any] | str, *extra: str) -> tuple[int, str]:
    policy = config.parent / "candidate.json"
    policy.write_text(candidate if isinstance(candidate, str) else json.dumps(candidate))
    argv = ["policy", "replay", "--policy", str(policy), "--config", str(config), *extra]
    out = io.StringIO()
    return cli_policy.main(argv, out, clock=lambda: NOW), out.getvalue()


def _counts(report: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    keys = ("allowed", "held", "denied", "rate_limited", "invalid")
    return {f"{t['upstream']}/{t['tool']}": tuple(t[k] for k in keys) for t in report["tools"]}


def test_a_looser_rule_lists_the_flips_with_what_reviewers_decided(
    history: tuple[Path, dict[str, str]],
) -> None:
    """Three of demo's four emails would pass unasked; the flips name them and how they were decided."""
    config, ids = history
    status, out = _replay(config, LOOSER, "--upstream", "demo", "--format", "json")
    assert status == 0
    report = json.loads(out)
    assert report["calls"] == 9  # demo's ten records, less the one from ten days ago
    #                                             allowed held denied limited invalid
    assert _counts(report) == {
        "demo/delete_file": (0, 1, 0, 0, 0),
        "demo/generate_image": (0, 4, 0, 0, 0),
        "demo/send_email": (3, 1, 0, 0, 0),
    }
    assert report["totals"] == {"allowed": 3, "held": 6, "denied": 0, "rate_limited": 0, "invalid": 0}
    flips = report["flips"]
    assert [f["id"] for f in flips] == [ids["a@other.com"], ids["b@other.com"], ids["d@other.com"]]
    assert [(f["then"], f["decided_by"]) for f in flips] == [
        ("approved", "alice"),
        ("approved", "alice"),
        ("expired", None),
    ]
    assert flips[0]["arguments"] == 'to: "a@other.com"'
    assert report["flip_verdicts"] == [
        {"upstream": "demo", "tool": "send_email", "would_pass": 3, "then": {"approved": 2, "expired": 1}}
    ]
    assert "Only calls the gateway held for review are recorded" in report["note"]


def test_the_text_report_says_what_is_not_recorded_and_counts_every_upstream(
    history: tuple[Path, dict[str, str]],
) -> None:
    """Without --upstream every upstream's calls are judged; the text has the table and the verdict line."""
    config, ids = history
    status, out = _replay(config, LOOSER)
    assert status == 0
    assert "Replayed 10 held call(s) of every upstream" in out
    assert "Only calls the gateway held for review are recorded" in out
    rows = {
        tuple(line.split()[:2]): line.split()[2:]
        for line in out.splitlines()
        if line[:5] in ("demo ", "other")
    }
    #                               CALLS ALLOWED HELD DENIED RATE-LIMITED
    assert rows[("demo", "send_email")] == ["4", "3", "1", "0", "0"]
    assert rows[("other", "send_email")] == ["1", "1", "0", "0", "0"]
    assert "demo/send_email: reviewers approved 2 of 3 that would now pass unasked (1 expired)" in out
    assert "other/send_email: reviewers approved 1 of 1 that would now pass unasked" in out
    assert ids["e@other.com"][:12] in out
    assert "approved by alice" in out


def test_the_same_history_on_postgresql_gives_the_same_report(
    history: tuple[Path, dict[str, str]], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from PostgreSQL (APPROVALS_DATABASE_URL, as a deployment names it): the same counts."""
    config, _ = history
    on_sqlite = json.loads(_replay(config, LOOSER, "--format", "json")[1])
    ids = asyncio.run(_seed("postgres", config.parent / "unused.db", postgres_url))
    monkeypatch.setenv("APPROVALS_DATABASE_URL", postgres_url)
    status, out = _replay(config, LOOSER, "--format", "json")
    assert status == 0
    on_postgres = json.loads(out)
    emails = ("a@other.com", "b@other.com", "d@other.com", "e@other.com")  # d and e: the same second
    assert {f["id"] for f in on_postgres["flips"]} == {ids[a] for a in emails}
    for report in (on_sqlite, on_postgres):
        del report["flips"]  # the same calls, under other ids
    assert on_postgres == on_sqlite


def test_a_new_limit_refuses_the_calls_past_it_in_arrival_order(history: tuple[Path, dict[str, str]]) -> None:
    """Two images an hour per agent: agent-a's third is rate-limited, agent-b's one is held."""
    config, _ = history
    status, out = _replay(config, LIMITED, "--upstream", "demo", "--format", "json")
    assert status == 0
    report = json.loads(out)
    assert _counts(report)["demo/generate_image"] == (0, 3, 0, 1, 0)
    assert report["flips"] == []


def test_a_deny_rule_counts_the_calls_it_would_refuse(history: tuple[Path, dict[str, str]]) -> None:
    """A candidate that denies deletes: the delete within the window is denied, nothing flips."""
    config, _ = history
    status, out = _replay(config, STRICTER, "--upstream", "demo", "--since", "7d", "--format", "json")
    assert status == 0
    report = json.loads(out)
    assert _counts(report) == {
        "demo/delete_file": (0, 0, 1, 0, 0),
        "demo/generate_image": (0, 4, 0, 0, 0),
        "demo/send_email": (0, 4, 0, 0, 0),
    }
    # --since reaches further back: the ten-day-old delete is judged too.
    status, out = _replay(config, STRICTER, "--upstream", "demo", "--since", "11d", "--format", "json")
    assert _counts(json.loads(out))["demo/delete_file"] == (0, 0, 2, 0, 0)


def test_a_bad_candidate_exits_2_naming_the_path_of_each_problem(
    history: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid candidate is refused before anything is read, with every problem's path."""
    config, _ = history
    bad = _policy(
        send_email={"limits": [{"counter": "c", "window": "fortnight", "max": 1, "scope": "grant"}]}
    )
    assert _replay(config, bad) == (cli_policy.EXIT_TROUBLE, "")
    assert "tools.send_email.limits[0].window" in capsys.readouterr().err
    assert _replay(config, '{"version": "1",')[0] == cli_policy.EXIT_TROUBLE
    assert "invalid JSON at line 1" in capsys.readouterr().err


def test_bad_since_unknown_upstream_or_no_history_exit_2(
    history: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each names what is wrong; a missing SQLite file is not created by the reading."""
    config, _ = history
    assert _replay(config, LOOSER, "--since", "seq:4")[0] == cli_policy.EXIT_TROUBLE
    assert "--since" in capsys.readouterr().err
    assert _replay(config, LOOSER, "--upstream", "nope")[0] == cli_policy.EXIT_TROUBLE
    assert "'nope' is not an upstream" in capsys.readouterr().err
    missing = config.parent / "none.db"
    config.write_text(f'[store]\npath = "{missing}"\n\n[upstreams.demo]\ncommand = ["python"]\n')
    assert _replay(config, LOOSER)[0] == cli_policy.EXIT_TROUBLE
    assert "no history at" in capsys.readouterr().err
    assert not missing.exists()


def test_arguments_the_stored_schema_refuses_are_invalid_not_allowed() -> None:
    """Judged against the definition stored with the record, as the gateway checks a call."""
    wrong = _record("demo", "send_email", {"to": 5}, "agent-a", HOUR)
    judged = replay([wrong], load_policy(json.dumps(_policy(send_email={})))).judged
    assert [(j.outcome, j.why) for j in judged] == [("invalid", "args.to: 5 is not of type 'string'")]


def test_a_call_approved_then_lapsed_counts_as_approved() -> None:
    """Expired with a decider: a reviewer said yes before it lapsed waiting for a limit window."""
    base = _record("demo", "send_email", {"to": "x@other.com"}, "agent-a", HOUR)
    assert reviewer_verdict(dataclasses.replace(base, status="expired", decided_by="bob")) == "approved"
    assert reviewer_verdict(dataclasses.replace(base, status="expired")) == "expired"
    assert reviewer_verdict(dataclasses.replace(base, status="failed", decided_by="bob")) == "approved"


def test_the_text_lists_refused_flips_first_and_points_to_json_past_its_limit(
    history: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every email allowed: bob's denial of c would now pass unasked, so it heads the list; past
    the text's limit the rest are counted, and the JSON has them all."""
    config, ids = history
    monkeypatch.setattr(cli_policy, "MAX_LISTED", 2)
    status, out = _replay(config, _policy(send_email={}))
    assert status == 0
    assert (
        "demo/send_email: reviewers approved 2 of 4 that would now pass unasked (1 denied, 1 expired)" in out
    )
    listed = out[out.index("ID  ") :].splitlines()[1:]
    assert listed[0].startswith(ids["c@other.com"][:12])
    assert "denied by bob" in listed[0]
    assert listed[2] == "… and 3 more (--format json lists every one)"
    assert len(json.loads(_replay(config, _policy(send_email={}), "--format", "json")[1])["flips"]) == 5
