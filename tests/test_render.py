"""One wording of an approval for people (approvals.core.render), and the channels that use it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from approvals import outcomes, review_client
from approvals.channels import slack_blocks
from approvals.core import render
from approvals.core.model import Approval
from approvals.web import inbox_format
from tests.approvals_kit import start_held
from tests.conftest import StartGateway, mcp_client

NOW = 1_800_000_000.0
ARGS = {"to": "ops@example.com", "subject": "Numbers"}


def approval(**fields: Any) -> Approval:
    """A pending send_email of agent-a, asked ten minutes before NOW, expiring in 15 more."""
    base = Approval(
        id="8ae0cd12" + "0" * 24,
        upstream="demo",
        tool="send_email",
        arguments_json=json.dumps(ARGS),
        args_sha256="",
        tool_json="",
        tool_sha256="",
        grant="agent-a",
        owner="alice",
        session_id="s",
        rule="tools.send_email",
        explanation="",
        status="pending",
        created_at=NOW - 600,
        expires_at=NOW + 900,
    )
    return dataclasses.replace(base, **fields)


def kept(response: dict[str, Any]) -> str:
    return json.dumps(response)


# ---- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(23, "23 s"), (0.5, "0.5 s"), (90, "1.5 min"), (600, "10 min"), (7200, "2 h"), (129600, "1.5 d")],
)
def test_duration_states_a_configured_length_to_one_decimal(seconds: float, text: str) -> None:
    """A set length reads in its largest unit with one decimal at most: 90 s is "1.5 min", not "1 min"."""
    assert render.duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(-5, "0 s"), (59.9, "59 s"), (119, "1 min"), (7199, "1 h"), (3 * 86400, "3 d")]
)
def test_span_counts_whole_units_rounded_down(seconds: float, text: str) -> None:
    """A counted time never overstates what is left, and is never negative."""
    assert render.span(seconds) == text


def test_ago_time_left_and_expires_in_read_from_the_given_now() -> None:
    """Relative times depend only on the `now` passed in: "just now", "3 min ago", "9 min left"."""
    assert render.ago(NOW - 2, NOW) == "just now"
    assert render.ago(NOW - 180, NOW) == "3 min ago"
    assert render.time_left(NOW + 540, NOW) == "9 min left"
    assert render.time_left(NOW - 1, NOW) == "expiring"
    assert render.expires_in(NOW + 540, NOW) == "in 9 min"
    assert render.expires_in(NOW, NOW) == "now"


def test_every_channel_counts_time_the_same_way() -> None:
    """The agent, the inbox and the CLI say the same time left for one approval at one `now`."""
    pending = approval(expires_at=NOW + 899.7)
    assert outcomes.waiting_status(pending, NOW).endswith("expires in 14 min")
    assert "expires in 14 min)" in outcomes.pending_result(pending, NOW, "u")["content"][0]["text"]
    assert inbox_format.time_left(pending, NOW) == "14 min left"
    row = {**json.loads(json.dumps(dataclasses.asdict(pending))), "arguments": ARGS}
    assert review_client.render_table([row], NOW).splitlines()[1].split()[5:9] == ["10", "min", "14", "min"]


# ---- who decided -------------------------------------------------------------------------------


def test_decision_text_names_the_reviewer_and_the_channel_in_words() -> None:
    """ "Denied by bob via Slack"; a channel the gateway does not know is shown as is, marked."""
    denied = approval(status="denied", decided_by="bob", decided_via="slack")
    assert render.decision_text(denied) == "Denied by bob via Slack"
    assert render.decision_text(dataclasses.replace(denied, status="completed", decided_via="api")) == (
        "Approved by bob via the API"
    )
    assert render.decision_text(approval(status="expired")) == "Expired"
    assert render.channel_name("pager\u202e") == "pager⟦U+202E⟧"


def test_already_decided_says_what_was_decided_by_whom_and_where() -> None:
    """A late decision is told the first one; any state after approval reads "approved"."""
    sent = approval(status="released", decided_by="bob", decided_via="web")
    assert render.already_decided(sent) == "This request was already approved by bob via the inbox."
    assert render.already_decided(approval(status="expired")) == (
        "This request has already expired without a decision."
    )
    assert slack_blocks.already_decided(sent) == render.already_decided(sent)


def test_reason_error_names_the_limit_only_past_it() -> None:
    """A reason up to MAX_REASON_CHARS is fine; one character more is refused, naming the limit."""
    assert render.reason_error("x" * render.MAX_REASON_CHARS) is None
    error = render.reason_error("x" * (render.MAX_REASON_CHARS + 1))
    assert error is not None
    assert str(render.MAX_REASON_CHARS) in error


def test_slack_modal_and_inbox_form_take_the_same_reason_limit() -> None:
    """The Slack deny modal's max_length and the inbox form's limit are the one MAX_REASON_CHARS."""
    from approvals.web import inbox_views

    modal = slack_blocks.deny_modal(approval(), channel="C1")
    assert modal["blocks"][1]["element"]["max_length"] == render.MAX_REASON_CHARS
    assert inbox_views.MAX_REASON == render.MAX_REASON_CHARS


# ---- outcomes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"status": "approved"}, "approved, waiting to be sent"),
        ({"status": "released"}, "sent, waiting for the upstream's answer"),
        ({"status": "completed", "result_json": kept({"result": {"content": []}})}, "completed"),
        (
            {"status": "completed", "result_json": kept({"result": {"content": [], "isError": True}})},
            "completed: the tool reported an error",
        ),
        ({"status": "completed"}, "completed (result no longer kept)"),
        (
            {"status": "failed", "result_json": kept({"error": {"code": -32000, "message": "boom\nnow"}})},
            "failed: boom now",
        ),
        (
            {"status": "failed", "reason": "timeout", "result_json": kept({"result": {"isError": True}})},
            "failed: no answer from the upstream in time",
        ),
        (
            {"status": "failed", "reason": "interrupted"},
            "failed: the gateway stopped before the upstream answered",
        ),
        ({"status": "failed"}, "failed (result no longer kept)"),
        ({"status": "denied"}, ""),
    ],
)
def test_outcome_says_what_became_of_the_call(fields: dict[str, Any], text: str) -> None:
    """Each way a released call can end has its own words (timeout and interrupted not as bare codes)."""
    assert render.outcome(approval(**fields)) == text


def test_slack_and_the_inbox_show_the_same_outcome() -> None:
    """The Slack message of a finished call carries the inbox's outcome, in the same words."""
    timed_out = approval(status="failed", reason="timeout", decided_by="bob", decided_via="slack")
    message = slack_blocks.approval_message(timed_out, url="https://x", now=NOW)
    text = json.dumps(message.blocks)
    assert "*Outcome:* failed: no answer from the upstream in time" in text
    assert inbox_format.outcome(timed_out) == render.outcome(timed_out)


def test_agent_is_not_told_an_approved_call_expired_without_a_decision() -> None:
    """Approved, then expired waiting under a rate limit: the agent hears it was approved, not ignored."""
    lapsed = approval(status="expired", decided_by="bob", reason="approved, but expired waiting for room")
    text = outcomes.final_outcome(lapsed)["result"]["content"][0]["text"]
    assert "was approved by bob but expired before it could be sent" in text
    assert "without a decision" not in text
    never = outcomes.final_outcome(approval(status="expired"))["result"]["content"][0]["text"]
    assert "expired without a decision" in never


# ---- summaries and hidden characters ---------------------------------------------------------


def test_summary_is_one_marked_line_cut_with_an_ellipsis() -> None:
    """Arguments read `key: "value"` on one line; hidden characters are marked; long ones end in …."""
    assert render.summary(ARGS) == 'to: "ops@example.com", subject: "Numbers"'
    assert render.summary({"file": "a\u202eb\nc"}) == 'file: "a⟦U+202E⟧b c"'
    assert render.summary({}) == "(no arguments)"
    long = render.summary({"body": "x" * 200}, 60)
    assert len(long) == 60
    assert long.endswith("…")


def test_summary_never_cuts_a_marker_in_half() -> None:
    """A cut that would fall inside ⟦U+202E⟧ drops the whole marker instead."""
    text = render.summary({"n": "x" * 50 + "\u202e" + "y" * 20}, 60)
    assert text == 'n: "' + "x" * 50 + "…"


def test_cli_table_uses_the_shared_summary() -> None:
    """`approvals list` shows the arguments as the inbox's list does, marked and cut with …."""
    row = {**json.loads(json.dumps(dataclasses.asdict(approval()))), "arguments": {"f": "a\u202eb"}}
    line = review_client.render_table([row], NOW).splitlines()[1]
    assert line.endswith('f: "a⟦U+202E⟧b"')


# ---- the limit, as the API enforces it ---------------------------------------------------------


async def test_api_refuses_a_reason_over_the_limit(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A decision whose reason is longer than MAX_REASON_CHARS is a 400 naming the limit, not cut."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", ARGS | {"body": "hi"}))
        pending = await held.recorder.status("pending")
        path = f"/api/approvals/{pending.id}/deny"
        status, body = await held.api("POST", path, body={"reason": "x" * (render.MAX_REASON_CHARS + 1)})
        assert status == 400
        assert str(render.MAX_REASON_CHARS) in body["error"]
        status, _ = await held.api("POST", path, body={"reason": "x" * render.MAX_REASON_CHARS})
        assert status == 200
        await call
