"""`approvals list | approve | deny` as a reviewer runs them: real subprocesses against a real gateway.

The gateway is `approvals serve` with a configured grant (agent-a, run by alice) and reviewers alice
and bob; the commands get the gateway's URL and the reviewer's token from APPROVALS_URL and
APPROVALS_TOKEN, as a reviewer's shell would.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import ALICE_TOKEN, BOB_TOKEN, WAIT, mcp_client
from tests.test_cli import _environment, run_cli
from tests.test_restart import (
    EMAIL,
    EMAIL_HELD,
    Gateway,
    agent,
    approvals_meta,
    gateway,
    sent,
    text_of,
    write_gateway,
)


def as_bob(gw: Gateway | str) -> dict[str, str]:
    """The environment of reviewer bob's shell, pointed at `gw` (a gateway or a URL)."""
    return {"APPROVALS_URL": gw.base if isinstance(gw, Gateway) else gw, "APPROVALS_TOKEN": BOB_TOKEN}


def assert_refused(outcome: tuple[int, str, str], *fragments: str) -> None:
    """Exit 1, nothing on stdout, and one line `error: …` on stderr (containing each fragment)."""
    status, out, err = outcome
    assert (status, out) == (1, ""), (out, err)
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err  # one line: no traceback, no log noise
    for fragment in fragments:
        assert fragment in err, err


def table(out: str) -> list[list[str]]:
    """`approvals list` output as rows of cells (columns are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line) for line in out.splitlines()]


async def pending_id(gw: Gateway) -> str:
    """The id of the only pending approval."""
    status, body = await gw.api("GET", "/api/approvals?status=pending")
    assert status == 200
    (approval,) = body["approvals"]
    approval_id: str = approval["id"]
    return approval_id


async def test_list_shows_pending_calls_in_a_table(tmp_path: Path) -> None:
    """`approvals list` prints the pending calls as a table; `--status all` adds the decided ones."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=1)
    short = {"to": "a@example.com", "subject": "hi", "body": "x"}
    async with gateway(tmp_path) as gw:
        async with mcp_client(gw.url) as client:  # both held at once: one hold's wait, not two
            answers = await asyncio.gather(
                client.call_tool("send_email", short), client.call_tool("send_email", EMAIL)
            )
        first, second = (approvals_meta(answer)["approval_id"] for answer in answers)
        status, _ = await gw.api("POST", f"/api/approvals/{second}/deny", body={"reason": "no"})
        assert status == 200
        status, out, err = await run_cli(tmp_path, "list", env=as_bob(gw))
        assert status == 0, err
        header, *rows = table(out)
        assert header == [
            "ID", "STATUS", "UPSTREAM", "TOOL", "AGENT", "AGE", "EXPIRES IN", "APPROVALS", "ARGUMENTS"
        ]  # fmt: skip
        summary = 'to: "a@example.com", subject: "hi", body: "x"'  # as the inbox's list shows it
        assert [row[:5] + row[7:] for row in rows] == [
            [first, "pending", "demo", "send_email", "agent-a", "-", summary]
        ]
        status, out, err = await run_cli(tmp_path, "list", "--status", "all", env=as_bob(gw))
        assert status == 0, err
        rows_by_id = {row[0]: row for row in table(out)[1:]}
        assert {key: row[1] for key, row in rows_by_id.items()} == {first: "pending", second: "denied"}
        assert rows_by_id[second][8].endswith("…")  # long arguments are shortened to fit a line
        status, out, _ = await run_cli(tmp_path, "list", "--status", "expired", env=as_bob(gw))
        assert (status, out) == (0, "no approvals\n")
        elsewhere = as_bob("http://127.0.0.1:9")  # --url wins over APPROVALS_URL
        status, out, err = await run_cli(tmp_path, "list", "--url", gw.base, env=elsewhere)
        assert (status, table(out)[1][0]) == (0, first), err


async def test_approve_releases_the_held_call(tmp_path: Path) -> None:
    """`approvals approve ID --reason ok` prints who approved it; the held agent gets the tool's result."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=10)
    async with gateway(tmp_path) as gw, agent(gw.url) as (client, answering):
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        await asyncio.wait_for(answering.wait(), WAIT)
        approval_id = await pending_id(gw)
        status, out, err = await run_cli(tmp_path, "approve", approval_id, "--reason", "ok", env=as_bob(gw))
        assert (status, out, err) == (0, f"{approval_id}: approved by bob (ok)\n", "")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert text_of(result).startswith("queued message")
    assert len(sent(tmp_path)) == 1


async def test_deny_tells_the_agent_the_reason(tmp_path: Path) -> None:
    """`approvals deny ID --reason …` prints who denied it; the held agent is told the reason."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=10)
    async with gateway(tmp_path) as gw, agent(gw.url) as (client, answering):
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        await asyncio.wait_for(answering.wait(), WAIT)
        approval_id = await pending_id(gw)
        status, out, err = await run_cli(
            tmp_path, "deny", approval_id, "--reason", "too risky", env=as_bob(gw)
        )
        assert (status, out, err) == (0, f"{approval_id}: denied by bob (too risky)\n", "")
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert approvals_meta(result)["code"] == "denied_by_reviewer"
    assert "too risky" in text_of(result)
    assert sent(tmp_path) == []


async def test_refusals_exit_1_with_a_one_line_error(tmp_path: Path) -> None:
    """A wrong token (401), self-approval (403), an unknown id (404) and a second decision (409, naming
    who decided) each exit 1 with one `error:` line; only the valid decision takes effect."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=1)
    async with gateway(tmp_path) as gw:
        async with mcp_client(gw.url) as client:
            approval_id = approvals_meta(await client.call_tool("send_email", EMAIL))["approval_id"]
        wrong = {**as_bob(gw), "APPROVALS_TOKEN": "not-a-reviewer-token-0123456789"}
        assert_refused(await run_cli(tmp_path, "list", env=wrong), "401")
        alice = {**as_bob(gw), "APPROVALS_TOKEN": ALICE_TOKEN}  # alice runs agent-a
        assert_refused(await run_cli(tmp_path, "approve", approval_id, env=alice), "403", "own")
        assert_refused(await run_cli(tmp_path, "approve", "no-such-id", env=as_bob(gw)), "no-such-id")
        status, body = await gw.api("GET", f"/api/approvals/{approval_id}")
        assert (status, body["status"]) == (200, "pending")
        assert (await run_cli(tmp_path, "approve", approval_id, env=as_bob(gw)))[0] == 0
        twice = await run_cli(tmp_path, "deny", approval_id, "--reason", "late", env=as_bob(gw))
        assert_refused(twice, "409", "already", "by bob")
        assert (await gw.events(approval_id)).count("denied") == 0


async def test_approve_never_sends_another_decision_whatever_the_id(tmp_path: Path) -> None:
    """An id with URL syntax in it is one path segment: `approve` can never deny (it is a 404)."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=1)
    async with gateway(tmp_path) as gw:
        async with mcp_client(gw.url) as client:
            approval_id = approvals_meta(await client.call_tool("send_email", EMAIL))["approval_id"]
        outcome = await run_cli(tmp_path, "approve", f"{approval_id}/deny?", env=as_bob(gw))
        status, body = await gw.api("GET", f"/api/approvals/{approval_id}")
        assert (status, body["status"]) == (200, "pending")
        assert_refused(outcome, "404")


async def test_without_a_token_the_command_says_what_to_set(tmp_path: Path) -> None:
    """No APPROVALS_TOKEN: exit 1 with one line naming the variable, before any request is made."""
    outcome = await run_cli(tmp_path, "list", env={"APPROVALS_URL": "http://127.0.0.1:9"})
    assert_refused(outcome, "APPROVALS_TOKEN")


async def test_a_gateway_that_is_not_running_cannot_be_reached(tmp_path: Path) -> None:
    """Nothing listening at the URL: exit 1 with one line saying the gateway cannot be reached."""
    with socket.socket() as reserved:  # bound but not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{reserved.getsockname()[1]}"
        for command in (["list"], ["approve", "some-id"], ["deny", "some-id", "--reason", "no"]):
            assert_refused(await run_cli(tmp_path, *command, env=as_bob(url)), "cannot reach", url)


async def test_deny_without_a_reason_is_a_usage_error(tmp_path: Path) -> None:
    """`approvals deny ID` without --reason exits 2 (argparse usage) and decides nothing."""
    status, out, err = await run_cli(tmp_path, "deny", "some-id", env=as_bob("http://127.0.0.1:9"))
    assert (status, out) == (2, "")
    assert "--reason" in err
    assert "Traceback" not in err


async def held(gw: Gateway, *subjects: str) -> list[str]:
    """Ids of held send_email calls, one per subject, made at once (one hold's wait, not many)."""
    async with mcp_client(gw.url) as client:
        answers = await asyncio.gather(
            *(client.call_tool("send_email", {**EMAIL, "subject": subject}) for subject in subjects)
        )
    return [approvals_meta(answer)["approval_id"] for answer in answers]


async def test_approve_accepts_a_unique_prefix_of_the_id(tmp_path: Path) -> None:
    """`approvals approve 8ae0cd` (the start of an id, as progress messages show it) approves that call."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=0.2)
    async with gateway(tmp_path) as gw:
        (approval_id,) = await held(gw, "one")
        status, out, err = await run_cli(tmp_path, "approve", approval_id[:6].upper(), env=as_bob(gw))
        assert (status, out, err) == (0, f"{approval_id}: approved by bob\n", "")
        assert (await gw.api("GET", f"/api/approvals/{approval_id}"))[1]["status"] != "pending"


async def test_an_ambiguous_prefix_decides_nothing_and_exits_2(tmp_path: Path) -> None:
    """A prefix of several ids exits 2 naming each of them, and none of them is decided."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=0.2)
    async with gateway(tmp_path) as gw:
        ids = await held(gw, *(f"n{i}" for i in range(17)))  # 17 ids: two share a first hex digit
        prefix, _ = Counter(approval_id[0] for approval_id in ids).most_common(1)[0]
        sharing = [approval_id for approval_id in ids if approval_id.startswith(prefix)]
        status, out, err = await run_cli(tmp_path, "deny", prefix, "--reason", "no", env=as_bob(gw))
        assert (status, out) == (2, ""), err
        assert all(approval_id in err for approval_id in sharing), err
        status, body = await gw.api("GET", "/api/approvals?status=pending&limit=100")
        assert sorted(a["id"] for a in body["approvals"]) == sorted(ids)


async def test_list_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`approvals list | head` (a reader that left): exit 141 as SIGPIPE would, nothing on stderr."""
    write_gateway(tmp_path, EMAIL_HELD)
    async with gateway(tmp_path) as gw:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader has gone before the first line is written
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "approvals",
                "list",
                cwd=tmp_path,
                env={**_environment(), **as_bob(gw)},
                stdout=write_end,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            os.close(write_end)
        _, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert (process.returncode, err.decode()) == (141, "")


async def test_list_marks_hidden_characters(tmp_path: Path) -> None:
    """A right-to-left override in the arguments is listed as a visible marker, never raw."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=0.2)
    async with gateway(tmp_path) as gw:
        await held(gw, "invoice_\u202egnp.exe")
        status, out, err = await run_cli(tmp_path, "list", env=as_bob(gw))
    assert status == 0, err
    assert "invoice_⟦U+202E⟧gnp.exe" in table(out)[1][8]
    assert "\u202e" not in out


async def test_list_status_names_all_among_its_values(tmp_path: Path) -> None:
    """`--status bogus` is a usage error (exit 2) whose list of valid values includes `all`."""
    status, out, err = await run_cli(tmp_path, "list", "--status", "bogus", env=as_bob("http://127.0.0.1:9"))
    assert (status, out) == (2, "")
    assert "'pending'" in err
    assert "'all'" in err


async def test_pending_results_link_to_the_port_served(tmp_path: Path) -> None:
    """Without public_url, `serve --port 0` links agents to the port it bound, not the config's 8080."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=0.2)
    async with gateway(tmp_path) as gw, mcp_client(gw.url) as client:
        meta = approvals_meta(await client.call_tool("send_email", EMAIL))
    assert meta["code"] == "approval_pending"
    assert meta["url"] == f"{gw.base}/inbox/approvals/{meta['approval_id']}"
    assert not gw.base.endswith(":8080")


async def test_serve_says_when_public_url_is_not_the_address_served(tmp_path: Path) -> None:
    """A public_url set in the config is what results link to; the banner says it differs from the port."""
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=0.2)
    config = tmp_path / "gateway.toml"
    public_url = "http://127.0.0.1:8080"
    config.write_text(config.read_text().replace("[server]\n", f'[server]\npublic_url = "{public_url}"\n', 1))
    async with gateway(tmp_path) as gw:
        async with mcp_client(gw.url) as client:
            meta = approvals_meta(await client.call_tool("send_email", EMAIL))
        notes = [line for line in gw.served.banner if "public_url" in line]
    assert meta["url"] == f"{public_url}/inbox/approvals/{meta['approval_id']}"
    assert len(notes) == 1
    assert public_url in notes[0]
