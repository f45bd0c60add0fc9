"""The Slack channel: messages, signed clicks, the deny modal, escaping, retries, Socket Mode.

The end-to-end tests run the real gateway with a real MCP client on the demo upstream, and slack-bolt
against a local fake of the Slack Web API (tests/slack_fake.py) with correctly signed requests; the
block builders, being pure, are also tested on their own with generated hostile input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from approvals.channels import slack_blocks as blocks
from approvals.channels.slack import SLACK_CHANNEL, Retry, SlackChannel
from approvals.gatekeeper import Gatekeeper
from approvals.store.records import Approval
from tests.approvals_kit import HELD_POLICY, Held, Recorder
from tests.conftest import DEMO_COMMAND, TOKEN_A, WAIT, StartGateway, mcp_client, settings_for
from tests.rawmcp import RawSession
from tests.slack_fake import (
    APP_TOKEN,
    BOT_TOKEN,
    CHANNEL,
    SECRET,
    TEAM,
    Call,
    FakeSlack,
    block_actions,
    form,
    signed,
    view_submission,
)
from tests.test_store_approvals import make_approval

EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}
FAST = Retry(tries=4, timeout=5.0, backoff=0.25, max_wait=30.0)  # waits are recorded, not taken
HANG = Retry(tries=4, timeout=0.3, backoff=0.25, max_wait=30.0)  # a hung call times out quickly


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    slack = await FakeSlack().start()
    yield slack
    await slack.close()


class SlackHeld(Held):
    """A held-call gateway with the Slack channel, and what it waited instead of sleeping."""

    waits: list[float]
    gave_up: asyncio.Event  # set when an announcement failed for good (after its retries)

    @property
    def channel(self) -> SlackChannel:
        return self.gateway.app[SLACK_CHANNEL]

    async def click(self, payload: dict[str, Any], **sign: Any) -> int:
        """POST a signed interactivity request to /slack/events; the HTTP status."""
        body = form(payload)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.gateway.base}/slack/events", data=body, headers=signed(body, **sign)) as reply,
        ):
            return reply.status


async def start_slack(
    start_gateway: StartGateway,
    tmp_path: Path,
    fake: FakeSlack,
    policy: dict[str, Any] | None = None,
    retry: Retry = FAST,
    **slack: Any,
) -> SlackHeld:
    """The approvals kit's gateway (send_email held) with a [slack] section pointed at the fake."""
    outbox = tmp_path / "outbox.jsonl"
    (tmp_path / "policy.json").write_text(json.dumps(policy or HELD_POLICY))
    env = {
        **os.environ,
        "APPROVALS_DEMO_OUTBOX": str(outbox),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_APP_TOKEN": APP_TOKEN,
    }
    upstreams = {
        "demo": {
            "command": DEMO_COMMAND,
            "policy": "policy.json",
            "env": {"APPROVALS_DEMO_OUTBOX": str(outbox)},
        }
    }
    extra = {
        "approvals": {"hold_seconds": 10},
        "slack": {"channel": CHANNEL, "mode": "http", "api_url": fake.api_url, **slack},
    }
    gate = Gatekeeper(settings_for(tmp_path, upstreams, env, **extra))
    recorder = Recorder()
    gate.channel_list.append(recorder)
    running = await start_gateway(upstreams, gate=gate, env=env, **extra)
    held = SlackHeld(running, gate, recorder, outbox)
    held.waits = []

    async def no_wait(seconds: float) -> None:
        held.waits.append(seconds)  # the retry's wait is observed, not taken

    held.channel.api.retry = retry
    held.channel.api.sleep = no_wait
    held.gave_up = asyncio.Event()
    announce = held.channel.announce

    async def watched(approval: Approval, change: Any) -> None:
        try:
            await announce(approval, change)
        except Exception:
            held.gave_up.set()
            raise

    held.channel.announce = watched  # type: ignore[method-assign]
    return held


@contextlib.asynccontextmanager
async def held_call(
    held: Held, arguments: dict[str, Any] = EMAIL
) -> AsyncIterator[tuple[asyncio.Task[Any], Approval]]:
    """A send_email call held for approval by a real MCP client; yields its task and the approval."""
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", arguments))
        pending = await held.recorder.status("pending")
        try:
            yield call, pending
        finally:
            if not call.done():
                await held.api("POST", f"/api/approvals/{pending.id}/deny", body={"reason": "test over"})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call, WAIT)


def texts(value: Any) -> Iterator[str]:
    """Every "text" string anywhere in a Block Kit structure."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "text" and isinstance(item, str):
                yield item
            else:
                yield from texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item)


def everything(call: Call) -> str:
    """All text of a posted or updated message, fallback included."""
    return "\n".join([call.params.get("text", ""), *texts(call.params.get("blocks", []))])


def has_buttons(call: Call) -> bool:
    return any(b["type"] == "actions" for b in call.params["blocks"])


async def audit_events(held: Held, approval_id: str) -> list[str]:
    status, body = await held.api("GET", f"/api/audit?approval_id={approval_id}")
    assert status == 200
    return [e["event"] for e in body["events"]]


# ---- the message --------------------------------------------------------------------------------


async def test_request_is_posted_with_its_details_and_buttons(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """The post shows upstream, tool and description, agent, owner, arguments, rule, expiry, link, buttons."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert post.token == BOT_TOKEN
        assert post.params["channel"] == CHANNEL
        assert post.params["unfurl_links"] is False
        message = everything(post)
        for shown in ("agent-a", "alice", "`send_email`", "*demo*", '"to": "ops@example.com"', "*Expires*"):
            assert shown in message
        assert "Send an email" in message  # the tool's description as the upstream lists it
        assert f"`{pending.rule}`" in message
        url = held.gate.queue.url_of(pending.id)  # type: ignore[union-attr]
        assert f"<{url}|Open in the inbox>" in message
        header, *_, actions, footer = post.params["blocks"]
        assert header["type"] == "header"
        assert footer["type"] == "context"
        assert actions["type"] == "actions"
        approve, deny = actions["elements"]
        assert (approve["action_id"], approve["style"], approve["value"]) == (
            blocks.ACTION_APPROVE,
            "primary",
            pending.id,
        )
        assert (deny["action_id"], deny["style"], deny["value"]) == (blocks.ACTION_DENY, "danger", pending.id)
    assert fake.of("auth.test") == []  # authorize= gives bolt the token without asking Slack


async def test_approve_click_releases_the_call_and_updates_the_message(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Bob clicks Approve: the agent gets the tool's result, the buttons give way to who approved."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (call, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id)) == 200
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
        done = await held.recorder.status("completed", pending.id)
    assert (done.decided_by, done.decided_via) == ("bob", "slack")
    assert len(held.sent()) == 1
    [update] = await fake.wait_for("chat.update", lambda c: "completed" in everything(c))
    assert post.answer is not None
    assert (update.params["channel"], update.params["ts"]) == (CHANNEL, post.answer["ts"])
    assert not has_buttons(update)
    assert "Approved* by *bob* via Slack" in everything(update)
    assert fake.of("chat.postEphemeral") == []


async def test_deny_asks_for_a_reason_that_reaches_the_agent(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Deny opens a modal with the click's trigger_id; its reason goes to the agent and the message."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        payload = block_actions(blocks.ACTION_DENY, pending.id)
        assert await held.click(payload) == 200
        [opened] = await fake.wait_for("views.open")
        assert opened.params["trigger_id"] == payload["trigger_id"]
        view = opened.params["view"]
        assert view["callback_id"] == blocks.DENY_VIEW
        assert (await held.api("GET", f"/api/approvals/{pending.id}"))[1]["status"] == "pending"
        assert await held.click(view_submission(view, "  not on a Friday  ")) == 200
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert result.content[0].text.endswith("Reason: not on a Friday")
    assert held.sent() == []
    [update] = await fake.wait_for("chat.update", lambda c: "Denied" in everything(c))
    assert "*Reason:* not on a Friday" in everything(update)
    assert not has_buttons(update)


async def test_message_shows_expiry(start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack) -> None:
    """A request that times out has its buttons replaced by the expiry."""
    policy = {
        **HELD_POLICY,
        "tools": {"send_email": {"action": "require_approval", "approval": {"timeout": "0.5s"}}},
    }
    held = await start_slack(start_gateway, tmp_path, fake, policy)
    async with mcp_client(held.url()) as client:
        await client.call_tool("send_email", EMAIL)
    expired = await held.recorder.status("expired")
    [update] = await fake.wait_for("chat.update", lambda c: "Expired" in everything(c))
    assert "no decision before the timeout" in everything(update)
    assert not has_buttons(update)
    assert (await held.api("POST", f"/api/approvals/{expired.id}/approve"))[0] == 409


async def test_message_shows_cancellation(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """A request the client withdraws has its buttons replaced by the cancellation."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), token=TOKEN_A)
        await raw.initialize()
        call = {
            "jsonrpc": "2.0",
            "id": "c1",
            "method": "tools/call",
            "params": {"name": "send_email", "arguments": EMAIL},
        }
        reply = asyncio.create_task(raw.post(call))
        pending = await held.recorder.status("pending")
        await fake.wait_for("chat.postMessage")
        await raw.notify("notifications/cancelled", {"requestId": "c1", "reason": "changed my mind"})
        await held.recorder.status("cancelled", pending.id)
        await asyncio.wait_for(reply, WAIT)
    [update] = await fake.wait_for("chat.update", lambda c: "Cancelled" in everything(c))
    assert not has_buttons(update)


async def test_message_of_a_request_made_before_a_restart_is_updated(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """The message's channel and ts are stored: after a restart, a decision still edits the old message."""
    first = await start_slack(start_gateway, tmp_path, fake)
    async with mcp_client(first.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await first.recorder.status("pending")
        [post] = await fake.wait_for("chat.postMessage")
        await first.gateway.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call, WAIT)
    second = await start_slack(start_gateway, tmp_path, fake)
    status, _ = await second.api("POST", f"/api/approvals/{pending.id}/deny", body={"reason": "too late"})
    assert status == 200
    [update] = await fake.wait_for("chat.update", lambda c: "Denied" in everything(c))
    assert post.answer is not None
    assert (update.params["channel"], update.params["ts"]) == (CHANNEL, post.answer["ts"])
    assert "via the API" in everything(update)
    assert len(fake.of("chat.postMessage")) == 1


# ---- who may click ------------------------------------------------------------------------------


async def assert_still_pending(held: SlackHeld, approval_id: str) -> None:
    status, body = await held.api("GET", f"/api/approvals/{approval_id}")
    assert (status, body["status"], body["decided_by"]) == (200, "pending", None)
    assert await audit_events(held, approval_id) == ["created"]


async def test_badly_signed_clicks_are_401_and_decide_nothing(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Another secret, a timestamp outside 300 s, a body changed after signing, no signature: 401."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending), aiohttp.ClientSession() as http:
        await fake.wait_for("chat.postMessage")
        for action in (blocks.ACTION_APPROVE, blocks.ACTION_DENY):
            click = block_actions(action, pending.id)
            assert await held.click(click, secret="not-the-signing-secret") == 401
            assert await held.click(click, timestamp=int(time.time()) - 301) == 401
            assert await held.click(click, timestamp=int(time.time()) + 301) == 401
            honest = form(block_actions(action, "someone-elses-id"))
            for headers in (signed(honest), {"Content-Type": "application/x-www-form-urlencoded"}):
                async with http.post(
                    f"{held.gateway.base}/slack/events", data=form(click), headers=headers
                ) as r:
                    assert r.status == 401
        await assert_still_pending(held, pending.id)
    assert fake.of("chat.postEphemeral") == fake.of("views.open") == []


async def test_clicks_and_submissions_by_non_reviewers_get_an_ephemeral_refusal(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """A Slack user who is no reviewer is told so, privately, for either button and for a reused modal."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, user="U0MALLORY")) == 200
        assert await held.click(block_actions(blocks.ACTION_DENY, pending.id, user="U0MALLORY")) == 200
        view = blocks.deny_modal(pending, channel=CHANNEL)
        assert await held.click(view_submission(view, "no", user="U0MALLORY")) == 200
        told = await fake.wait_for("chat.postEphemeral", count=3)
        assert {(t.params["user"], t.params["channel"]) for t in told} == {("U0MALLORY", CHANNEL)}
        assert all("not one of them" in t.params["text"] for t in told)
        await assert_still_pending(held, pending.id)
    assert fake.of("views.open") == []


async def test_owner_cannot_decide_their_own_agents_call(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Alice runs agent-a: her Approve or Deny on its request gets an ephemeral refusal, and no modal."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, user="U0ALICE")) == 200
        assert await held.click(block_actions(blocks.ACTION_DENY, pending.id, user="U0ALICE")) == 200
        told = await fake.wait_for("chat.postEphemeral", count=2)
        assert [t.params["user"] for t in told] == ["U0ALICE", "U0ALICE"]
        assert all("You run agent agent-a" in t.params["text"] for t in told)
        await assert_still_pending(held, pending.id)
    assert fake.of("views.open") == []


async def test_reviewer_id_from_another_workspace_is_refused(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """With team_id set, a click from another workspace is refused even with a reviewer's user id."""
    held = await start_slack(start_gateway, tmp_path, fake, team_id=TEAM)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, team="T0OTHER")) == 200
        [told] = await fake.wait_for("chat.postEphemeral")
        assert told.params["user"] == "U0BOB"
        await assert_still_pending(held, pending.id)


async def test_click_is_acknowledged_before_slack_answers(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """The click's HTTP answer does not wait for the Slack calls the click leads to (3 s budget)."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        fake.fail("chat.postEphemeral", "hang")
        async with asyncio.timeout(3):
            assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, user="U0MALLORY")) == 200
        await fake.wait_for("chat.postEphemeral")
        await assert_still_pending(held, pending.id)


# ---- races --------------------------------------------------------------------------------------


async def test_double_click_tells_the_second_who_already_approved(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Two Approve clicks at once: one decision; the other click is told it was already approved by bob."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        click = block_actions(blocks.ACTION_APPROVE, pending.id)
        assert list(await asyncio.gather(held.click(click), held.click(click))) == [200, 200]
        [told] = await fake.wait_for("chat.postEphemeral")
        assert "already approved by bob via Slack" in told.params["text"]
        await asyncio.wait_for(call, WAIT)
        await held.recorder.status("completed", pending.id)
    assert (await audit_events(held, pending.id)).count("approved") == 1
    assert len(held.sent()) == 1


async def test_slack_and_the_api_deciding_at_once_one_wins_and_the_message_shows_it(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Approve in Slack and deny through the API together: exactly one decision, shown on the message."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        click = held.click(block_actions(blocks.ACTION_APPROVE, pending.id))
        deny = held.api("POST", f"/api/approvals/{pending.id}/deny", body={"reason": "race"})
        clicked, (api_status, _) = await asyncio.gather(click, deny)
        assert clicked == 200
        await asyncio.wait_for(call, WAIT)
        final = await held.recorder.wait_for(
            lambda a: a.id == pending.id and a.status in ("denied", "completed")
        )
    events = await audit_events(held, pending.id)
    assert events.count("approved") + events.count("denied") == 1
    if final.status == "denied":  # the API won; the click was told so
        assert api_status == 200
        winner = "Denied* by *bob* via the API"
        [told] = await fake.wait_for("chat.postEphemeral")
        assert "already denied by bob via the API" in told.params["text"]
    else:
        assert api_status == 409
        winner = "Approved* by *bob* via Slack"
    await fake.wait_for("chat.update", lambda c: winner in everything(c))
    last = fake.of("chat.update")[-1]
    assert winner in everything(last)
    assert not has_buttons(last)


# ---- escaping -----------------------------------------------------------------------------------

HOSTILE = {
    "to": "<!channel> <!here|here> <@U123> <#C999>",
    "subject": "<http://evil.example|click here for the quarterly report> & friends",
    "body": "```\n<!everyone>\n``` done `inline` &amp; &lt;!channel&gt;",
}
RAW_FORMS = ("<!channel>", "<!here", "<@U123>", "<#C999>", "<http://evil", "<!everyone>")


async def test_hostile_arguments_cannot_mention_link_or_break_out(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Mentions, disguised links, backtick fences and & in arguments reach Slack escaped, never raw."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held, HOSTILE) as (_, pending):
        [post] = await fake.wait_for("chat.postMessage")
        message = everything(post)
        for raw in RAW_FORMS:
            assert raw not in message
        assert "&lt;!channel&gt;" in message
        assert "&lt;http://evil.example|click here" in message
        assert "&amp; friends" in message
        assert "&amp;amp;" in message  # the sender's own entity text stays text
        [arguments] = [t for t in texts(post.params["blocks"]) if t.startswith("*Arguments*")]
        assert arguments.count("```") == 2  # only our own fences
        assert arguments.endswith("```")
        assert all(
            b.get("text", {}).get("verbatim", True) for b in post.params["blocks"] if b["type"] == "section"
        )
        assert await held.click(block_actions(blocks.ACTION_DENY, pending.id)) == 200
        [opened] = await fake.wait_for("views.open")
        assert await held.click(view_submission(opened.params["view"], "<!channel> no & <http://x|y>")) == 200
        await held.recorder.status("denied", pending.id)
        [update] = await fake.wait_for("chat.update", lambda c: "Denied" in everything(c))
    assert "*Reason:* &lt;!channel&gt; no &amp; &lt;http://x|y&gt;" in everything(update)
    for raw in RAW_FORMS:
        assert raw not in everything(update)


@given(st.text())
def test_escaped_text_has_no_markup(text: str) -> None:
    """Whatever the input, escaped text has no < > or backtick, and every & starts an entity."""
    escaped = blocks.escape(text)
    assert not {"<", ">", "`"} & set(escaped)
    assert escaped.count("&") == sum(escaped.count(e) for e in ("&amp;", "&lt;", "&gt;"))


@given(st.text(), st.integers(min_value=2, max_value=400))
def test_fit_stays_within_the_limit_and_never_cuts_an_entity(text: str, limit: int) -> None:
    """A cut text fits Slack's count (UTF-16 units) and ends on a whole entity."""
    cut = blocks.fit(blocks.escape(text), limit)
    assert blocks.text_length(cut) <= limit
    assert cut.count("&") == sum(cut.count(e) for e in ("&amp;", "&lt;", "&gt;"))


HUGE = st.text(alphabet=st.sampled_from('a<>&`"\\ 😀\n'), min_size=0, max_size=12_000)


@given(
    arguments=HUGE, description=HUGE, tool=HUGE, reason=HUGE, status=st.sampled_from(["pending", "denied"])
)
def test_any_message_stays_within_block_kit_limits(
    arguments: str, description: str, tool: str, reason: str, status: str
) -> None:
    """Huge, hostile values still give a message within Block Kit's limits, with the id as button value."""
    approval = make_approval(
        arguments_json=json.dumps({"text": arguments}),
        tool_json=json.dumps({"name": tool, "description": description}),
        tool=tool or "t",
        reason=reason or None,
        status=status,
        explanation=description,
    )
    message = blocks.approval_message(approval, url="https://gw.example/inbox/approvals/x", now=1.7e9)
    assert len(message.blocks) <= blocks.MAX_BLOCKS
    assert blocks.text_length(message.text) <= 4000
    for block in message.blocks:
        for text in texts(block):
            assert blocks.text_length(text) <= blocks.MAX_TEXT
            for raw in ("<!", "<@", "<#", "<http://evil"):
                assert raw not in text.replace("<!date^", "")
        if block["type"] == "header":
            assert blocks.text_length(block["text"]["text"]) <= 150
        for field in block.get("fields", []):
            assert blocks.text_length(field["text"]) <= 2000
        for element in block.get("elements", []):
            if element.get("type") == "button":
                assert blocks.text_length(element["text"]["text"]) <= 75
                assert element["value"] == approval.id
    [arguments_text] = [t for t in texts(message.blocks) if t.startswith("*Arguments*")]
    assert arguments_text.count("```") == 2
    if blocks.text_length(blocks.escape(json.dumps({"text": arguments}, indent=2))) > 2900:
        assert "See them in full in the inbox" in arguments_text


# ---- Slack failing ------------------------------------------------------------------------------


async def test_failed_post_is_retried_until_it_succeeds(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """An error, a 429 and a timeout are each retried, with backoff or Retry-After; then the post goes out."""
    fake.fail("chat.postMessage", "error", "ratelimited", "hang")
    held = await start_slack(start_gateway, tmp_path, fake, retry=HANG)
    async with held_call(held) as (_, pending):
        posts = await fake.wait_for("chat.postMessage", count=4)
        assert [p.answer is not None for p in posts] == [False, False, False, True]
        assert all(p.params == posts[0].params for p in posts)
        assert held.waits == [0.25, 7.0, 1.0]  # backoff doubles; Retry-After: 7 is taken as given
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id)) == 200
        await held.recorder.status("completed", pending.id)
    await fake.wait_for("chat.update", lambda c: "Approved" in everything(c))


async def test_slack_outage_leaves_the_request_pending_and_decidable(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Four failed tries, then the channel gives up: the request stays pending and the API decides it."""
    fake.retry_after = "600"  # longer than the cap: the wait is capped
    fake.fail("chat.postMessage", "hang", "ratelimited", "error", "error")
    held = await start_slack(start_gateway, tmp_path, fake, retry=HANG)
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage", count=4)
        await asyncio.wait_for(held.gave_up.wait(), WAIT)
        assert (await held.api("GET", f"/api/approvals/{pending.id}"))[1]["status"] == "pending"
        status, _ = await held.api("POST", f"/api/approvals/{pending.id}/approve")
        assert status == 200
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
        await held.recorder.status("completed", pending.id)
    assert held.waits == [0.25, 30.0, 1.0]
    assert len(fake.of("chat.postMessage")) == 4
    assert "notify_failed" in await audit_events(held, pending.id)
    assert fake.of("chat.update") == []  # nothing to edit: the inbox and the API had it all along


async def test_permanent_slack_error_is_not_retried(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """channel_not_found will not pass: one try, logged and audited, the request still pending."""
    fake.fail("chat.postMessage", "permanent")
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await asyncio.wait_for(held.gave_up.wait(), WAIT)
        assert (await held.api("GET", f"/api/approvals/{pending.id}"))[1]["status"] == "pending"
    assert len(fake.of("chat.postMessage")) == 1
    assert held.waits == []
    assert "notify_failed" in await audit_events(held, pending.id)


# ---- Socket Mode --------------------------------------------------------------------------------


async def test_socket_mode_click_is_acknowledged_and_decides(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """In Socket Mode the same handlers run: the envelope is acked and the click approves the call."""
    held = await start_slack(start_gateway, tmp_path, fake, mode="socket")
    await fake.wait_connected()
    [opened] = fake.of("apps.connections.open")
    assert opened.token == APP_TOKEN
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        envelope = {
            "envelope_id": "env-1",
            "type": "interactive",
            "accepts_response_payload": False,
            "payload": block_actions(blocks.ACTION_APPROVE, pending.id),
        }
        await fake.push(envelope)
        assert (await fake.wait_ack("env-1"))["envelope_id"] == "env-1"
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
        done = await held.recorder.status("completed", pending.id)
    assert (done.decided_by, done.decided_via) == ("bob", "slack")
    await fake.wait_for("chat.update", lambda c: "Approved* by *bob* via Slack" in everything(c))
    async with aiohttp.ClientSession() as http, http.post(f"{held.gateway.base}/slack/events") as reply:
        assert reply.status in (404, 405)  # no public route in Socket Mode


def test_request_back_for_review_shows_why_and_its_old_message_loses_its_buttons() -> None:
    """Back to pending (tool changed): the new post shows the note; the old message says where it went."""
    note = "the tool's definition changed upstream after the request; it needs a new look"
    approval = make_approval(note=note, version=3)
    again = blocks.approval_message(approval, url="https://gw.example/i", now=approval.created_at)
    assert any(b["type"] == "actions" for b in again.blocks)
    assert f"⚠️ {note}" in "\n".join(texts(again.blocks))
    old = blocks.superseded_message(approval, url="https://gw.example/i", now=approval.created_at)
    assert not any(b["type"] == "actions" for b in old.blocks)
    assert "Sent back for review" in "\n".join(texts(old.blocks))


def test_retry_waits_double_and_honour_retry_after_up_to_the_cap() -> None:
    """Backoff doubles per try; a Retry-After is taken as given, capped, and ignored when nonsense."""
    retry = Retry(tries=4, timeout=1.0, backoff=0.5, max_wait=30.0)
    assert [retry.wait(n) for n in (1, 2, 3, 4, 9)] == [0.5, 1.0, 2.0, 4.0, 30.0]
    assert retry.wait(2, retry_after=7.0) == 7.0
    assert retry.wait(2, retry_after=3600.0) == 30.0
    assert retry.wait(2, retry_after=-5.0) == 0.0
    assert retry.wait(2, retry_after=float("nan")) == 1.0


def test_manifest_creates_an_app_with_chat_write_and_the_events_url() -> None:
    """config/slack-manifest.yaml: one bot scope, interactivity on /slack/events, Socket Mode off."""
    yaml = pytest.importorskip("yaml")
    manifest = yaml.safe_load((Path(__file__).parent.parent / "config" / "slack-manifest.yaml").read_text())
    assert manifest["oauth_config"]["scopes"]["bot"] == ["chat:write"]
    interactivity = manifest["settings"]["interactivity"]
    assert interactivity["is_enabled"] is True
    assert interactivity["request_url"] == "https://YOUR-GATEWAY/slack/events"
    assert manifest["settings"]["socket_mode_enabled"] is False
