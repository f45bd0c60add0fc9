"""The Slack channel: messages, signed clicks, the deny modal, escaping, retries, Socket Mode.

The end-to-end tests run the real gateway with a real MCP client on the demo upstream, and slack-bolt
against a local fake of the Slack Web API (tests/slack_fake.py) with correctly signed requests; the
block builders, being pure, are also tested on their own with generated hostile input.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from approvals.channels import slack_blocks as blocks
from approvals.channels import slack_requests
from approvals.channels.slack import SLACK_CHANNEL, Retry, SlackChannel
from approvals.core.model import Approval
from tests.approvals_kit import HELD_POLICY, Held, Recorder
from tests.conftest import DEMO_COMMAND, TOKEN_A, WAIT, StartGateway, mcp_client
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
        return await self.post(form(payload), signed(form(payload), **sign))

    async def post(self, body: str | bytes | io.BytesIO, headers: dict[str, str]) -> int:
        """POST `body` with `headers` to /slack/events; the HTTP status."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.gateway.base}/slack/events", data=body, headers=headers) as reply,
        ):
            return reply.status

    async def raw(self, headers: list[bytes], body: bytes) -> int:
        """POST to /slack/events with exactly these header bytes (no client re-encodes them); the status."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gateway.server.port)
        try:
            lines = [b"POST /slack/events HTTP/1.1", b"Host: 127.0.0.1", *headers]
            lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            answer = await asyncio.wait_for(reader.read(), WAIT)
        finally:
            writer.close()
        return int(answer.split(b" ", 2)[1])


async def start_slack(
    start_gateway: StartGateway,
    tmp_path: Path,
    fake: FakeSlack,
    policy: dict[str, Any] | None = None,
    retry: Retry = FAST,
    clock: Callable[[], float] = time.time,
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
    running = await start_gateway(upstreams, env=env, clock=clock, **extra)
    held = SlackHeld(running, running.gatekeeper, Recorder.following(running.service.feed), outbox)
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
        url = held.gateway.service.url_of(pending.id)
        assert f"<{url}|Open in the inbox>" in message
        header, *_, actions, footer = post.params["blocks"]
        assert header["type"] == "header"
        assert footer["type"] == "context"
        assert actions["type"] == "actions"
        approve, deny = actions["elements"]
        assert (approve["action_id"], approve["style"], approve["value"]) == (
            blocks.ACTION_APPROVE,
            "primary",
            f"{pending.id}:{pending.release_sha256}",  # the arguments the message shows
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


FORM = "application/x-www-form-urlencoded"
ARABIC_STAMP = ("\u0661\u0667" + "\u0660" * 8).encode()  # 1700000000 in digits int() reads, Slack never sends
JUNK: tuple[bytes, ...] = (
    b"",
    b"\xff\xfe\x00garbage",  # not UTF-8
    b"payload=%7B",  # a form whose JSON is cut off
    b"payload=" + b"%5B" * 5000,  # deeply nested
    b"{not json",
    b"a=1&a=2&payload",
)


async def test_unsigned_or_unreadably_signed_requests_are_401_before_anything_is_parsed(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Junk bodies, timestamps that are no Unix time or far off, non-ASCII signatures: all 401."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        click = form(block_actions(blocks.ACTION_APPROVE, pending.id)).encode()
        good = signed(click)
        for body in (*JUNK, click):
            assert await held.post(body, {"Content-Type": FORM}) == 401
        for stamp in (b"abc", b"", b"-1", b"1e9", b"0", b"99999999999999999999", ARABIC_STAMP):
            headers = [b"X-Slack-Request-Timestamp: " + stamp, b"X-Slack-Signature: v0=00"]
            assert await held.raw([b"Content-Type: " + FORM.encode(), *headers], click) == 401
        far = int(time.time()) + 10**9
        assert await held.post(click, signed(click, timestamp=far)) == 401
        assert await held.post(click, signed(click, timestamp=-far)) == 401
        stamp = good["X-Slack-Request-Timestamp"].encode()
        for signature in ("v0=é".encode(), b"v0=\xff\xfe", good["X-Slack-Signature"].encode() + "é".encode()):
            headers = [b"X-Slack-Request-Timestamp: " + stamp, b"X-Slack-Signature: " + signature]
            assert await held.raw([b"Content-Type: " + FORM.encode(), *headers], click) == 401
        await assert_still_pending(held, pending.id)


async def test_signature_window_is_300_seconds_on_the_gateways_clock(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Signed 300 s either side of the gateway's (injected) clock passes; 301 s or the real time: 401."""
    now = 1_000_000_000.0  # far from the real time: a check on time.time() would refuse all of these
    held = await start_slack(start_gateway, tmp_path, fake, clock=lambda: now)
    click = block_actions(blocks.ACTION_APPROVE, "no-such-approval")
    assert await held.click(click, timestamp=now - 300) == 200
    assert await held.click(click, timestamp=now + 300) == 200
    assert await held.click(click, timestamp=now - 301) == 401
    assert await held.click(click, timestamp=now + 301) == 401
    assert await held.click(click) == 401  # signed now, by the wall clock
    told = await fake.wait_for("chat.postEphemeral", count=2)  # the two accepted: no such approval
    assert len(told) == 2


def _payload(**changes: Any) -> str:
    click = block_actions(blocks.ACTION_APPROVE, "a")
    return json.dumps({**click, **changes})


MALFORMED: tuple[bytes, ...] = (
    b"\xff\xfe\x00garbage",
    b"payload=%7B",
    b"payload=" + b"%5B" * 100_000,  # nested beyond the gateway's JSON depth (and the parser's)
    b"payload=" + quote('{"type": "block_actions", "n": 1e400}').encode(),  # not a double
    b"a=1&b=2",
    b"payload=%7B%7D&payload=%7B%7D",
    b"=&&=",
    *(
        urlencode({"payload": p}).encode()
        for p in (
            "[1]",
            '"text"',
            "null",
            "{}",
            '{"type": "block_actions"}',
            _payload(actions=[]),
            _payload(actions=[1]),
            _payload(actions=[{"value": "a"}]),
            _payload(user=5),
            _payload(user={"team_id": TEAM}),
            _payload(team="T0TEAM"),
            _payload(user={"id": "U0BOB", "team_id": 5}),
            _payload(channel=[]),
            _payload(trigger_id={}),
            _payload(type="shortcut"),
            json.dumps({"type": "view_submission", "user": {"id": "U0BOB"}}),
            json.dumps({"type": "view_submission", "user": {"id": "U0BOB"}, "view": {"callback_id": "x"}}),
        )
    ),
)


async def test_signed_malformed_requests_are_4xx_and_decide_nothing(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Correctly signed garbage: not a form, not JSON, not an object, fields missing or mistyped: 400."""
    held = await start_slack(start_gateway, tmp_path, fake)
    async with held_call(held) as (_, pending):
        await fake.wait_for("chat.postMessage")
        for body in MALFORMED:
            assert await held.post(body, signed(body)) == 400, body[:80]
        click = form(block_actions(blocks.ACTION_APPROVE, pending.id))
        json_headers = {**signed(click), "Content-Type": "application/json"}
        assert await held.post(click, json_headers) == 415
        await assert_still_pending(held, pending.id)
    assert fake.of("chat.postEphemeral") == fake.of("views.open") == []


PAYLOAD_KEYS = (
    *("type", "user", "team", "enterprise", "channel", "view", "actions", "authorizations", "event"),
    *("id", "team_id", "enterprise_id", "action_id", "callback_id", "message", "response_urls", "state"),
)
PAYLOAD_LEAVES: tuple[object, ...] = (None, True, 1, 1.5, "", "block_actions", "view_submission", "modal")
PAYLOAD_LEAVES += (TEAM, "U0BOB", blocks.ACTION_APPROVE, blocks.ACTION_DENY, blocks.DENY_VIEW)


def _json(rng: random.Random, depth: int = 0) -> Any:
    """Random JSON over the keys and values Slack payloads use."""
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice(PAYLOAD_LEAVES)
    if roll < 0.6:
        return [_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(PAYLOAD_KEYS): _json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _payload_like(rng: random.Random) -> Any:
    """Random JSON; every other one a click or submission with its required parts, and noise around."""
    if rng.random() < 0.5:
        return _json(rng)
    noise, part = _json(rng, 2), _json(rng, 2)
    noise, part = (x if isinstance(x, dict) else {} for x in (noise, part))
    body = {**noise, "user": {**part, "id": "U0BOB"}}
    if rng.random() < 0.5:
        return {**body, "type": "block_actions", "actions": [{**part, "action_id": blocks.ACTION_APPROVE}]}
    return {
        **body,
        "type": "view_submission",
        "view": {**part, "type": "modal", "callback_id": blocks.DENY_VIEW},
    }


async def test_any_signed_payload_is_400_or_handled_without_a_500(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Seeded random payloads, correctly signed: 400 from the check, or taken by bolt; never a 500."""
    held = await start_slack(start_gateway, tmp_path, fake)
    rng = random.Random(11)
    handled = 0
    for _ in range(400):
        payload = _payload_like(rng)
        try:
            slack_requests.interaction(payload)
        except slack_requests.SlackRequestError:
            expected = {400}
        else:
            expected, handled = {200, 404}, handled + 1  # 404: bolt has no handler (an unknown action)
        body = form(payload)
        assert await held.post(body, signed(body)) in expected, payload
    assert handled > 50  # the shaped half reaches bolt


async def test_oversized_or_encoded_bodies_are_refused_unread(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Over the Slack body bound: 413, whether its length is declared or not; a gzip body: 415."""
    held = await start_slack(start_gateway, tmp_path, fake)
    big = b"payload=" + b"a" * slack_requests.MAX_BODY_BYTES
    assert await held.post(io.BytesIO(big), signed(big)) == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(9):
            yield b"a" * (slack_requests.MAX_BODY_BYTES // 8)

    async with aiohttp.ClientSession() as http:
        streamed = http.post(
            f"{held.gateway.base}/slack/events", data=chunks(), headers={"Content-Type": FORM}
        )
        async with streamed as reply:
            assert reply.status == 413
    body = gzip.compress(form(block_actions(blocks.ACTION_APPROVE, "a")).encode())
    assert await held.post(body, {**signed(body), "Content-Encoding": "gzip"}) == 415


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


async def test_click_naming_another_workspace_anywhere_is_refused(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """With team_id set, our team.id is not enough: the user's team, the modal's and the org must agree."""
    held = await start_slack(start_gateway, tmp_path, fake, team_id=TEAM)
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        ours = block_actions(blocks.ACTION_APPROVE, pending.id)
        theirs = {**ours["user"], "team_id": "T0OTHER"}
        refused = (
            {**ours, "user": theirs},  # team.id is ours, the user is another workspace's
            {**ours, "user": theirs, "team": None},
            {**ours, "user": {"id": "U0BOB"}, "team": None},  # no workspace named at all
            {**ours, "enterprise": {"id": "E0ONE"}, "user": {**ours["user"], "enterprise_id": "E0TWO"}},
        )
        for n, click in enumerate(refused, start=1):
            assert await held.click(click) == 200
            told = await fake.wait_for("chat.postEphemeral", count=n)
            assert told[-1].params["user"] == "U0BOB"
        view = blocks.deny_modal(pending, channel=CHANNEL)
        submitted = view_submission(view, "no")
        submitted["view"]["team_id"] = "T0OTHER"
        assert await held.click(submitted) == 200
        await fake.wait_for("chat.postEphemeral", count=len(refused) + 1)
        await assert_still_pending(held, pending.id)
        assert await held.click(ours) == 200  # the same reviewer from our workspace decides
        assert not (await asyncio.wait_for(call, WAIT)).is_error


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
                assert element["value"].partition(":")[0] == approval.id
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


async def test_socket_mode_acks_and_drops_malformed_envelopes_and_keeps_working(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Malformed payloads over Socket Mode are acked and decide nothing; the next good click still decides."""
    held = await start_slack(start_gateway, tmp_path, fake, mode="socket")
    socket = await fake.wait_connected()
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        await socket.send_str("not json")
        await fake.push({"envelope_id": "env-list", "type": "interactive", "payload": [1]})
        bad: tuple[dict[str, Any], ...] = (
            {},
            {"type": "block_actions", "actions": []},
            {**block_actions(blocks.ACTION_APPROVE, pending.id), "user": 5},
            {**block_actions(blocks.ACTION_APPROVE, pending.id), "team": "T0TEAM"},
            {**block_actions(blocks.ACTION_APPROVE, pending.id), "user": {"id": "U0BOB", "team_id": 5}},
            {**block_actions(blocks.ACTION_APPROVE, pending.id), "actions": [{"value": pending.id}]},
        )
        for n, payload in enumerate(bad):
            await fake.push({"envelope_id": f"env-bad-{n}", "type": "interactive", "payload": payload})
            await fake.wait_ack(f"env-bad-{n}")
        await assert_still_pending(held, pending.id)
        good = {
            "envelope_id": "env-good",
            "type": "interactive",
            "payload": block_actions(blocks.ACTION_APPROVE, pending.id),
        }
        await fake.push(good)
        await fake.wait_ack("env-good")
        assert not (await asyncio.wait_for(call, WAIT)).is_error
        await held.recorder.status("completed", pending.id)
    assert fake.of("chat.postEphemeral") == []


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
