"""`approvals approve | deny | list | standing` with the review workflows, as a reviewer runs them:
real subprocesses against a real `approvals serve` (see test_review_cli.py): several ids at once,
edit before approve, approve and remember, quorum progress, standing grants, and usage errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from approvals.cli import main
from approvals.config import sha256_hex
from tests.conftest import BOB_TOKEN
from tests.review_kit import CAROL_TOKEN
from tests.test_cli import run_cli
from tests.test_restart import EMAIL, EMAIL_HELD, Gateway, gateway, write_gateway
from tests.test_review_cli import as_bob, held, table

UNREACHABLE = "http://127.0.0.1:9"  # usage errors exit before any request


def with_carol(workdir: Path, approval: dict[str, Any] | None = None) -> None:
    """write_gateway's gateway (send_email held, under `approval`), and a third reviewer, carol."""
    policy = json.loads(json.dumps(EMAIL_HELD))
    if approval is not None:
        policy["tools"]["send_email"]["approval"] = approval
    write_gateway(workdir, policy, hold_seconds=0.2)
    config = workdir / "gateway.toml"
    carol = f'\n[[reviewers]]\nname = "carol"\ntoken_sha256 = "{sha256_hex(CAROL_TOKEN)}"\n'
    config.write_text(config.read_text() + carol)


async def status_of(gw: Gateway, approval_id: str) -> str:
    status, body = await gw.api("GET", f"/api/approvals/{approval_id}")
    assert status == 200, body
    return str(body["status"])


async def test_several_ids_are_decided_each_on_its_own(tmp_path: Path) -> None:
    """`approve A B C` (prefixes): one line per id; one decided elsewhere is reported on stderr, exit 1."""
    with_carol(tmp_path)
    async with gateway(tmp_path) as gw:
        first, second, third = await held(gw, "one", "two", "three")
        assert (await gw.api("POST", f"/api/approvals/{second}/deny", body={"reason": "no"}))[0] == 200
        prefixes = [approval_id[:10] for approval_id in (first, second, third)]
        status, out, err = await run_cli(tmp_path, "approve", *prefixes, "--reason", "ok", env=as_bob(gw))
        assert status == 1, (out, err)
        assert out.splitlines() == [f"{first}: approved by bob (ok)", f"{third}: approved by bob (ok)"]
        (line,) = err.splitlines()
        assert line.startswith(f"error: {second}: 409: "), err
        assert "denied by bob" in line
        assert [await status_of(gw, i) for i in (first, second, third)] != ["pending"] * 3
        assert await status_of(gw, second) == "denied"
        status, out, err = await run_cli(tmp_path, "deny", first, third, "--reason", "late", env=as_bob(gw))
        assert (status, out, err.count("error: ")) == (1, "", 2), (out, err)


async def test_approve_with_edited_arguments(tmp_path: Path) -> None:
    """`--arguments JSON` (or `--arguments-file`) approves the call as edited and prints what changed."""
    with_carol(tmp_path)
    async with gateway(tmp_path) as gw:
        first, second = await held(gw, "one", "two")
        edited = {**EMAIL, "subject": "edited"}
        status, out, err = await run_cli(
            tmp_path, "approve", first, "--arguments", json.dumps(edited), env=as_bob(gw)
        )
        assert (status, err) == (0, ""), err
        assert out.splitlines() == [
            f"{first}: approved by bob",
            '  arguments changed by bob: subject: "one" → "edited"',
        ]
        _, record = await gw.api("GET", f"/api/approvals/{first}")
        assert record["edited_arguments"] == edited
        (tmp_path / "edit.json").write_text(json.dumps({**EMAIL, "subject": "from a file"}))
        status, out, err = await run_cli(
            tmp_path, "approve", second[:8], "--arguments-file", "edit.json", env=as_bob(gw)
        )
        assert (status, err) == (0, ""), err
        assert out.splitlines()[1] == '  arguments changed by bob: subject: "two" → "from a file"'


async def test_approve_and_remember_then_list_show_export_and_revoke(tmp_path: Path) -> None:
    """`--remember 1h --max-uses 5 --constraint …` prints the grant saved; `standing list | show |
    export | revoke` (by prefix) work on it; revoking twice exits 1."""
    with_carol(tmp_path)
    async with gateway(tmp_path) as gw:
        (approval_id,) = await held(gw, "one")
        status, out, err = await run_cli(
            tmp_path, "approve", approval_id, "--remember", "1h", "--max-uses", "5",
            "--constraint", "to=prefix:ops", "--constraint", "subject=any", "--constraint", "body=any",
            env=as_bob(gw),
        )  # fmt: skip
        assert (status, err) == (0, ""), err
        decided, remembered, matches = out.splitlines()
        assert decided == f"{approval_id}: approved by bob"
        found = re.fullmatch(
            r"remembered as (sg_[0-9a-f]{32}) until \S+ \S+ UTC \(at most 5 uses\)", remembered
        )
        assert found, remembered
        grant_id = found[1]
        assert matches == '  for calls where to starts with "ops"; subject: any value; body: any value'

        status, out, err = await run_cli(tmp_path, "standing", "list", env=as_bob(gw))
        assert status == 0, err
        header, row = table(out)
        assert header[:7] == ["ID", "EFFECT", "AGENT", "UPSTREAM", "TOOL", "STATE", "USES"]
        assert row[:7] == [grant_id, "allow", "agent-a", "demo", "send_email", "active", "0/5"]

        short = grant_id[3:9]  # `sg_` may be left out
        status, out, err = await run_cli(tmp_path, "standing", "show", short, env=as_bob(gw))
        assert status == 0, err
        assert f"id:       {grant_id}" in out.splitlines()
        assert 'matches:  to starts with "ops"' in out.splitlines()

        status, out, err = await run_cli(tmp_path, "standing", "export", grant_id[:9], env=as_bob(gw))
        assert status == 0, err
        assert json.loads(out)["tools"]["send_email"]["action"] == "allow"

        status, out, err = await run_cli(tmp_path, "standing", "revoke", grant_id, env=as_bob(gw))
        assert (status, out, err) == (0, f"{grant_id}: revoked by bob\n", "")
        status, out, err = await run_cli(tmp_path, "standing", "revoke", grant_id, env=as_bob(gw))
        assert (status, out) == (1, "")
        assert err.startswith("error: 409: "), err
        assert "already revoked" in err, err

        status, out, _ = await run_cli(tmp_path, "standing", "list", env=as_bob(gw))
        assert (status, out) == (0, "no active standing grants (--all lists every one)\n")
        status, out, _ = await run_cli(tmp_path, "standing", "list", "--all", env=as_bob(gw))
        assert [row[5] for row in table(out)[1:]] == ["revoked"]
        status, _, err = await run_cli(tmp_path, "standing", "show", "ffff", env=as_bob(gw))
        assert status == 1
        assert "no standing grant has an id starting with 'ffff'" in err


async def test_quorum_progress_is_printed_and_listed(tmp_path: Path) -> None:
    """Quorum 2: the first approval prints its progress and `list` shows 1/2; the second approves."""
    with_carol(tmp_path, {"quorum": 2})
    async with gateway(tmp_path) as gw:
        (approval_id,) = await held(gw, "one")
        status, out, err = await run_cli(tmp_path, "approve", approval_id, env=as_bob(gw))
        assert (status, err) == (0, ""), err
        assert out == f"{approval_id}: approved (1 of 2 approvals, waiting for another reviewer)\n"
        status, out, err = await run_cli(tmp_path, "list", env=as_bob(gw))
        assert status == 0, err
        header, row = table(out)
        assert row[header.index("APPROVALS")] == "1/2"
        carol = {**as_bob(gw), "APPROVALS_TOKEN": CAROL_TOKEN}
        status, out, err = await run_cli(tmp_path, "approve", approval_id, env=carol)
        assert (status, out, err) == (0, f"{approval_id}: approved by carol\n", "")


async def test_an_edited_call_is_approved_only_naming_the_arguments_checked(tmp_path: Path) -> None:
    """Quorum 2: bob edits and approves; carol's plain `approve ID` is refused with the edited
    arguments' hash to check (and `list` shows the edit); `--seen SHA` approves exactly those."""
    with_carol(tmp_path, {"quorum": 2})
    async with gateway(tmp_path) as gw:
        (approval_id,) = await held(gw, "one")
        edited = {**EMAIL, "subject": "edited"}
        status, out, err = await run_cli(
            tmp_path, "approve", approval_id, "--arguments", json.dumps(edited), env=as_bob(gw)
        )
        assert (status, err) == (0, ""), err
        carol = {**as_bob(gw), "APPROVALS_TOKEN": CAROL_TOKEN}
        status, out, err = await run_cli(tmp_path, "list", env=carol)
        header, row = table(out)
        assert row[header.index("ARGUMENTS")].startswith("(edited) ")
        status, out, err = await run_cli(tmp_path, "approve", approval_id, env=carol)
        assert status == 1
        _, record = await gw.api("GET", f"/api/approvals/{approval_id}")
        assert f"seen_sha256 {record['release_sha256']}" in err
        assert await status_of(gw, approval_id) == "pending"
        status, out, err = await run_cli(
            tmp_path, "approve", approval_id, "--seen", record["release_sha256"], env=carol
        )
        assert (status, err) == (0, "")
        assert out.splitlines() == [
            f"{approval_id}: approved by carol",
            '  arguments changed by bob: subject: "one" → "edited"',
        ]
        status, out, err = await run_cli(tmp_path, "approve", approval_id, "--seen", "nothex", env=carol)
        assert status == 2
        assert "--seen: must be 64 hex digits" in err


async def test_deny_and_remember(tmp_path: Path) -> None:
    """`deny ID --reason R --remember 8h` prints the deny grant it saved."""
    with_carol(tmp_path)
    async with gateway(tmp_path) as gw:
        (approval_id,) = await held(gw, "one")
        status, out, err = await run_cli(
            tmp_path, "deny", approval_id, "--reason", "never", "--remember", "8h", env=as_bob(gw)
        )
        assert (status, err) == (0, ""), err
        lines = out.splitlines()
        assert lines[0] == f"{approval_id}: denied by bob (never)"
        assert lines[1].startswith("remembered as sg_")
        assert lines[1].endswith(": matching calls are denied")


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--remember", "1h", "--constraint", "to"], "argument --constraint: 'to': must be FIELD=OP:VALUE"),
        (["--remember", "1h", "--constraint", "to=like:x"], "OP must be one of eq, in, prefix, range, any"),
        (["--remember", "1h", "--constraint", "to=prefix"], "prefix needs a value"),
        (["--remember", "1h", "--constraint", "to=prefix:"], "value: must be a non-empty string"),
        (["--remember", "1h", "--constraint", "n=range:5"], "a range is MIN..MAX"),
        (["--remember", "1h", "--constraint", "n=range:a..5"], "'a' is not a number"),
        (["--remember", "1h", "--constraint", "n=range:5..1"], "min must not be greater than max"),
        (["--remember", "1h", "--constraint", "r=in:[eu]"], "in's value must be JSON"),
        (["--remember", "1h", "--constraint", "r=in:[]"], "non-empty list"),
        (["--remember", "1h", "--constraint", "cc=any:x"], "any takes no value"),
        (["--remember", "1h", "--constraint", "x=eq:1", "--constraint", "x=any"], "'x' is constrained twice"),
        (["--remember", "soon"], "argument --remember: must be a duration"),
        (["--remember", "8d"], "argument --remember: must be from 1 min to 7 d"),
        (["--remember", "1h", "--max-uses", "0"], "argument --max-uses"),
        (["--max-uses", "3"], "--max-uses and --constraint go with --remember"),
        (["--constraint", "cc=any"], "--max-uses and --constraint go with --remember"),
        (["--arguments", "[1]"], "argument --arguments: must be a JSON object"),
        (["--arguments", "{"], "argument --arguments: not JSON"),
        (["--arguments-file", "missing.json"], "argument --arguments-file: cannot read missing.json"),
        (["--arguments", "{}", "--arguments-file", "x"], "not allowed with argument"),
        (["second-id", "--arguments", "{}"], "--arguments goes with one id (got 2)"),
        (["second-id", "--remember", "1h"], "--remember goes with one id (got 2)"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    arguments: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Each bad option or combination exits 2 (a usage error) with a message naming it, before any request."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPROVALS_URL", UNREACHABLE)
    monkeypatch.setenv("APPROVALS_TOKEN", BOB_TOKEN)
    with pytest.raises(SystemExit) as exited:
        main(["approve", "some-id", *arguments])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, ""), err
    assert fragment in err, err


async def test_bad_constraint_syntax_exits_2_from_the_shell(tmp_path: Path) -> None:
    """The same as a reviewer's shell sees it: exit 2, the option named, no traceback."""
    status, out, err = await run_cli(
        tmp_path, "deny", "some-id", "--reason", "no", "--remember", "1h",
        "--constraint", "amount=between:1,5", env=as_bob(UNREACHABLE),
    )  # fmt: skip
    assert (status, out) == (2, ""), err
    assert "argument --constraint: 'amount=between:1,5': OP must be one of" in err
    assert "Traceback" not in err
