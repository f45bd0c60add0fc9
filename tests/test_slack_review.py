"""Review workflows in Slack: group channels, eligibility, step-up, quorum, approve & remember,
escalation, edits and "show why" — end to end against the local fake with signed requests.

Each gateway runs the demo upstream behind a policy whose send_email rule has an ``approval``
object, with four reviewers in groups (alice owns agent-a, the MCP client's grant, so she never
counts). Clicks are signed on the gateway's clock; escalation is driven by an injected clock and
``service.escalate_due()``, never by waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, get_args

import pytest

from approvals.channels import slack_answers as answers
from approvals.channels import slack_blocks as blocks
from approvals.channels import slack_requests
from approvals.channels import slack_review as review
from approvals.config import Principal, sha256_hex
from approvals.core.deciding import ReviewState
from approvals.core.review import ReviewRule
from approvals.core.standing import exact_constraints
from approvals.errors import RefusalKind
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, WAIT, StartGateway, mcp_client
from tests.slack_fake import CHANNEL, Call, FakeSlack, block_actions, select_action
from tests.test_slack import EMAIL, SlackHeld, audit_events, everything, held_call, start_slack, texts
from tests.test_store_approvals import make_approval

PAYMENTS, SECURITY, ONCALL = "C0PAYMENTS", "C0SECURITY", "C0ONCALL"
GROUP_CHANNELS = {"payments": PAYMENTS, "security": SECURITY, "oncall": ONCALL}
REVIEWERS = [
    {"name": "alice", "token_sha256": sha256_hex(ALICE_TOKEN), "slack_user_id": "U0ALICE",
     "groups": ["payments"]},
    {"name": "bob", "token_sha256": sha256_hex(BOB_TOKEN), "slack_user_id": "U0BOB", "groups": ["payments"]},
    {"name": "carol", "token_sha256": sha256_hex("carol-token-0123456789abcdef"), "slack_user_id": "U0CAROL",
     "groups": ["security"]},
    {"name": "dave", "token_sha256": sha256_hex("dave-token-0123456789abcdef0"), "slack_user_id": "U0DAVE",
     "groups": ["oncall"]},
]  # fmt: skip


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    slack = await FakeSlack().start()
    yield slack
    await slack.close()


def held_policy(approval: dict[str, Any]) -> dict[str, Any]:
    send = {"action": "require_approval", "approval": approval}
    return {"version": "1", "default": "deny", "tools": {"send_email": send, "get_time": {}}}


async def start(
    start_gateway: StartGateway,
    tmp_path: Path,
    fake: FakeSlack,
    approval: dict[str, Any],
    clock: Callable[[], float] = time.time,
) -> SlackHeld:
    """test_slack's gateway, with the reviewers in groups and a Slack channel per group."""

    async def with_reviewers(*args: Any, **kwargs: Any) -> Any:
        return await start_gateway(*args, reviewers=REVIEWERS, **kwargs)

    policy = held_policy(approval)
    return await start_slack(
        with_reviewers, tmp_path, fake, policy, clock=clock, group_channels=GROUP_CHANNELS
    )


def reviewer(held: SlackHeld, name: str) -> Principal:
    return next(p for p in held.gateway.service.settings.reviewers if p.name == name)


def in_channel(channel: str, *shown: str) -> Callable[[Call], bool]:
    """A call in `channel` whose message shows every one of `shown`."""
    return lambda c: c.params.get("channel") == channel and all(s in everything(c) for s in shown)


def actions_of(call: Call) -> list[str]:
    """Every action id of a message: buttons, link buttons, selects (accessories too)."""
    found = []
    for block in call.params["blocks"]:
        for element in [*block.get("elements", []), *([block["accessory"]] if "accessory" in block else [])]:
            if "action_id" in element:
                found.append(element["action_id"])
    return found


async def told(fake: FakeSlack, user: str, count: int = 1) -> list[str]:
    """The texts of the first `count` ephemeral answers to `user`."""
    found = await fake.wait_for("chat.postEphemeral", lambda c: c.params["user"] == user, count=count)
    return [c.params["text"] for c in found]


# ---- where requests go, and who may decide them -------------------------------------------------


async def test_request_goes_to_the_channel_of_the_group_that_may_decide_it(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """reviewers = ["payments"]: posted in payments' channel only, its ref kept under "slack"."""
    held = await start(start_gateway, tmp_path, fake, {"reviewers": ["payments"]})
    async with held_call(held) as (_, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert post.params["channel"] == PAYMENTS
        assert "*Tool:* 🌐 open world" in everything(post)  # send_email's openWorldHint
        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, channel=PAYMENTS)) == 200
        await held.recorder.status("completed", pending.id)
        await fake.wait_for("chat.update", in_channel(PAYMENTS, "Approved* by *bob* via Slack"))
        ref = await held.gateway.service.store.message_ref(pending.id, "slack")
        assert ref is not None
        assert json.loads(ref)["channel"] == PAYMENTS
    assert len(fake.of("chat.postMessage")) == 1


async def test_reviewer_outside_the_groups_is_refused_with_who_may_decide(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Bob is in payments, the rule wants security: Approve and Deny get an ephemeral refusal naming
    carol; no modal opens and nothing is decided."""
    held = await start(start_gateway, tmp_path, fake, {"reviewers": ["security"]})
    async with held_call(held) as (_, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert post.params["channel"] == SECURITY
        for action in (blocks.ACTION_APPROVE, blocks.ACTION_DENY):
            assert await held.click(block_actions(action, pending.id, channel=SECURITY)) == 200
        for text in await told(fake, "U0BOB", count=2):
            assert text == (
                "You may not decide this request: only security may decide this call. "
                "Reviewers who may: carol."
            )
        assert fake.of("views.open") == []
        assert await audit_events(held, pending.id) == ["created"]


async def test_step_up_rule_shows_no_buttons_and_refuses_a_forged_click(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """via = ["inbox"]: the message links to the inbox and says why; an Approve click sent anyway is
    refused with the link, and a Deny opens no modal."""
    held = await start(start_gateway, tmp_path, fake, {"via": ["inbox"]})
    async with held_call(held) as (call, pending):
        [post] = await fake.wait_for("chat.postMessage")
        url = held.gateway.service.url_of(pending.id)
        assert actions_of(post) == [review.ACTION_OPEN_INBOX]
        [link] = [e for b in post.params["blocks"] for e in b.get("elements", []) if e.get("url")]
        assert (link["url"], link["text"]["text"]) == (url, "Decide in the inbox")
        assert "This rule accepts decisions only in the inbox" in everything(post)
        for action in (blocks.ACTION_APPROVE, blocks.ACTION_DENY):
            assert await held.click(block_actions(action, pending.id)) == 200
        for text in await told(fake, "U0BOB", count=2):
            assert text.startswith("Not decided: this call's rule accepts decisions only through the inbox")
            assert f"<{url}|Decide in the inbox>" in text
        assert fake.of("views.open") == []
        assert await audit_events(held, pending.id) == ["created"]
        bob = reviewer(held, "bob")
        await held.gateway.service.decide(
            pending.id, bob, approve=False, reason="in the inbox", channel="web"
        )
        await asyncio.wait_for(call, WAIT)


# ---- quorum -------------------------------------------------------------------------------------


async def test_quorum_of_two_counts_the_first_click_and_releases_on_the_second(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """One from payments and one from security: posted in both channels; bob's click is counted and
    shown everywhere, his second click is refused, carol's releases the call once."""
    held = await start(start_gateway, tmp_path, fake, {"quorum": 2, "from": ["payments", "security"]})
    async with held_call(held) as (call, pending):
        posts = await fake.wait_for("chat.postMessage", count=2)
        assert [p.params["channel"] for p in posts] == [PAYMENTS, SECURITY]
        for p in posts:
            assert "*Review:* 0 of 2 approvals, waiting for someone in payments or security" in everything(p)
        assert review.ACTION_REMEMBER not in actions_of(posts[0])  # no standing grants under a quorum

        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, channel=PAYMENTS)) == 200
        [counted] = await told(fake, "U0BOB")
        assert counted == "Counted: 1 of 2 approvals, waiting for someone in security."
        progress = ("1 of 2 approvals, waiting for someone in security", "*Approved so far:* *bob* via Slack")
        for channel in (PAYMENTS, SECURITY):
            await fake.wait_for("chat.update", in_channel(channel, *progress))
        store = held.gateway.service.store  # the second channel's message is kept under its own key
        assert await store.message_ref(pending.id, f"slack:{SECURITY}") is not None

        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, channel=PAYMENTS)) == 200
        again = (await told(fake, "U0BOB", count=2))[1]
        assert again == "You have approved this already; waiting for someone in security (1 of 2 approvals)."

        assert await held.click(block_actions(blocks.ACTION_APPROVE, pending.id, user="U0CAROL",
                                              channel=SECURITY)) == 200  # fmt: skip
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
        await held.recorder.status("completed", pending.id)
        done = ("Approved* by *carol* via Slack", "*Approvals:* *bob* via Slack, *carol* via Slack")
        for channel in (PAYMENTS, SECURITY):
            await fake.wait_for("chat.update", in_channel(channel, "completed", *done))
    events = await audit_events(held, pending.id)
    assert (events.count("voted"), events.count("approved"), events.count("released")) == (1, 1, 1)
    assert len(held.sent()) == 1
    assert [c.params["user"] for c in fake.of("chat.postEphemeral")] == ["U0BOB", "U0BOB"]


async def test_a_click_on_a_message_older_than_an_edit_is_refused(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Quorum 2: bob (payments) edits the call in the inbox's stead (the service) and approves it;
    carol clicks Approve on the message as first posted, whose value names the arguments it showed:
    refused privately, nothing counted. The updated message's button names the edit and is counted."""
    held = await start(start_gateway, tmp_path, fake, {"quorum": 2, "from": ["payments", "security"]})
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage", count=2)
        first = f"{pending.id}:{pending.release_sha256}"
        edited = {**pending.arguments, "subject": "edited by bob"}
        await held.gateway.service.decide(
            pending.id, reviewer(held, "bob"), approve=True, reason=None, channel="web", arguments=edited
        )
        carol = {"user": "U0CAROL", "channel": SECURITY}
        assert await held.click(block_actions(blocks.ACTION_APPROVE, first, **carol)) == 200
        [refused] = await told(fake, "U0CAROL")
        assert refused.startswith("Not decided: bob changed the arguments you were shown")
        record = await held.gateway.service.get(pending.id)
        assert record is not None
        assert record.status == "pending"
        assert [v.by for v in held.gateway.service.review_state(record).votes] == ["bob"]
        now = f"{pending.id}:{record.release_sha256}"
        assert await held.click(block_actions(blocks.ACTION_APPROVE, now, **carol)) == 200
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
    assert [m["subject"] for m in held.sent()] == ["edited by bob"]


# ---- approve and remember -----------------------------------------------------------------------


async def test_approve_and_remember_saves_an_exact_grant_that_lets_the_next_call_through(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """ "Approve & remember" for 1 hour: approved, a standing grant of exactly these arguments for 1 h
    without a use limit, named on the message and to bob; the same call again passes unasked."""
    held = await start(start_gateway, tmp_path, fake, {})
    service = held.gateway.service
    async with held_call(held) as (call, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert post.params["channel"] == CHANNEL  # an unrestricted rule: the main channel
        [select] = [
            b["accessory"] for b in post.params["blocks"] if b.get("block_id") == "approvals_remember"
        ]
        values = [o["value"] for o in select["options"]]
        shown = f"{pending.id}:{pending.release_sha256}"
        assert values == [f"{shown}:3600", f"{shown}:28800", f"{shown}:86400"]
        assert "To widen the constraints, use the inbox." in everything(post)
        [edit] = [b["accessory"] for b in post.params["blocks"] if b.get("accessory", {}).get("url")]
        assert (edit["action_id"], edit["url"]) == (
            review.ACTION_EDIT,
            f"{service.url_of(pending.id)}?edit=1#edit",
        )
        assert await held.click(select_action(review.ACTION_REMEMBER, values[0])) == 200
        assert not (await asyncio.wait_for(call, WAIT)).is_error
        await held.recorder.status("completed", pending.id)
    [grant] = await service.list_standing(grant="agent-a")
    assert (grant.effect, grant.tool, grant.source_approval) == ("allow", "send_email", pending.id)
    assert (grant.created_by, grant.created_via, grant.max_uses) == ("bob", "slack", None)
    assert grant.constraints == exact_constraints(EMAIL)
    assert grant.expires_at - grant.created_at == 3600
    [confirmed] = await told(fake, "U0BOB")
    assert confirmed.startswith(f"Approved and remembered for 1 h (grant `{grant.id}`)")
    await fake.wait_for(
        "chat.update", lambda c: f"and remembered for 1 h (grant `{grant.id}`" in everything(c)
    )
    async with mcp_client(held.url()) as client:
        assert not (await client.call_tool("send_email", EMAIL)).is_error  # no new request
    assert len(held.sent()) == 2
    assert len(fake.of("chat.postMessage")) == 1


def test_only_offered_remember_durations_are_read() -> None:
    """A select value names the approval and one of 1 h / 8 h / 24 h; anything else is no choice."""
    assert review.read_remember_choice("abc:3600") == ("abc", None, 3600.0)
    assert review.read_remember_choice(review.remember_choice("abc", 86400.0, "f00")) == (
        "abc",
        "f00",
        86400.0,
    )
    for forged in ("abc:999", "abc:3600.0", ":3600", "abc", "", "abc:-3600", "abc:604800"):
        assert review.read_remember_choice(forged) is None


# ---- escalation ---------------------------------------------------------------------------------


async def test_escalation_posts_to_the_oncall_channel_and_its_message_gets_the_outcome(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Undecided for 10 min: a new message with buttons in oncall's channel; dave (oncall) may now
    decide, and every message shows the outcome."""
    now = [time.time()]
    approval = {"reviewers": ["payments"], "timeout": "30m", "escalate": [{"after": "10m", "to": ["oncall"]}]}
    held = await start(start_gateway, tmp_path, fake, approval, clock=lambda: now[0])
    service = held.gateway.service
    async with held_call(held) as (call, pending):
        [post] = await fake.wait_for("chat.postMessage")
        assert post.params["channel"] == PAYMENTS
        dave = block_actions(blocks.ACTION_APPROVE, pending.id, user="U0DAVE", channel=ONCALL)
        assert await held.click(dave, timestamp=now[0]) == 200
        [refused] = await told(fake, "U0DAVE")
        assert refused.startswith("You may not decide this request: only payments may decide this call.")

        now[0] += 601
        await service.escalate_due()
        [escalated] = await fake.wait_for("chat.postMessage", in_channel(ONCALL))
        assert "Escalated to oncall: undecided for 10 min" in everything(escalated)
        assert escalated.params["text"].startswith(
            "Escalated to oncall: undecided for 10 min — agent-a wants"
        )
        assert {blocks.ACTION_APPROVE, blocks.ACTION_DENY} <= set(actions_of(escalated))
        await fake.wait_for("chat.update", in_channel(PAYMENTS, "⏫ *Escalated to* oncall"))

        assert await held.click(dave, timestamp=now[0]) == 200
        assert not (await asyncio.wait_for(call, WAIT)).is_error
        await held.recorder.status("completed", pending.id)
        approved = "Approved* by *dave* via Slack"
        await fake.wait_for("chat.update", in_channel(PAYMENTS, approved, "completed"))
        [update] = await fake.wait_for("chat.update", in_channel(ONCALL, approved, "completed"))
        assert await service.store.message_ref(pending.id, f"slack:escalated:1:{ONCALL}") is not None
    assert escalated.answer is not None
    assert update.params["ts"] == escalated.answer["ts"]
    assert "Escalated to oncall" in everything(update)  # the escalation post still says what it was
    assert len(fake.of("chat.postMessage")) == 2  # later refreshes never post the escalation again


# ---- edits, and what the message says once decided ------------------------------------------------


async def test_edited_approval_shows_the_changes_escaped(
    start_gateway: StartGateway, tmp_path: Path, fake: FakeSlack
) -> None:
    """Approved with changes in the inbox: the message says so and lists each change, escaped."""
    held = await start(start_gateway, tmp_path, fake, {})
    edited = {**EMAIL, "subject": "<!channel> Q3 `numbers`"}
    async with held_call(held) as (call, pending):
        await fake.wait_for("chat.postMessage")
        bob = reviewer(held, "bob")
        await held.gateway.service.decide(
            pending.id, bob, approve=True, reason=None, channel="web", arguments=edited
        )
        assert not (await asyncio.wait_for(call, WAIT)).is_error
        await held.recorder.status("completed", pending.id)
        [update] = await fake.wait_for("chat.update", lambda c: "completed" in everything(c))
    message = everything(update)
    assert "Approved with changes* by *bob* via the inbox" in message
    assert "*Changed by bob before approving:*" in message
    standin = blocks.BACKTICK_STANDIN  # a backtick would close the code span
    assert (
        f'• `subject`: `"Quarterly numbers"` → `"&lt;!channel&gt; Q3 {standin}numbers{standin}"`' in message
    )
    assert "*Arguments* (as edited by *bob*" in message
    assert "<!channel>" not in message
    assert held.sent()[0]["subject"] == edited["subject"]


def test_deny_on_timeout_reads_as_no_decision_in_time() -> None:
    """on_timeout = "deny": the gateway's denial is not shown as a reviewer's."""
    reason = "no decision within 10 min; this call's rule denies it then (on_timeout: deny)"
    denied = make_approval(status="denied", reason=reason, finished_at=1.7e9, decided_by=None)
    text = blocks.outcome_text(denied)
    assert text.startswith("⛔ *Denied: no decision in time* <!date^1700000000^")
    assert f"*Reason:* {reason}" in text
    assert "by *" not in text
    assert "by *" not in blocks.outcome_text(
        make_approval(status="denied", reason=reason, finished_at=1.7e9, decided_by="gateway")
    )


# ---- pure parts ---------------------------------------------------------------------------------


def test_every_refusal_kind_has_its_own_escaped_answer() -> None:
    """Each RefusalKind answers in words (mrkdwn-escaped); none falls through to a generic text."""
    approval = make_approval()
    where = answers.Refusing("https://gw.example/inbox/approvals/x", "1 of 2 approvals, waiting for carol",
                             ("carol",))  # fmt: skip
    said = {kind: answers.refusal(kind, "<!channel> nope", approval, where) for kind in get_args(RefusalKind)}
    assert len(set(said.values())) >= len(said) - 1  # already_decided and expired share theirs
    for kind, text in said.items():
        assert text, kind
        assert "<!channel>" not in text, kind
    assert said["already_voted"] == "You have approved this already; waiting for carol (1 of 2 approvals)."


@pytest.mark.parametrize("status", ["pending", "completed"])
def test_review_message_with_hostile_values_stays_within_block_kit_limits(status: str) -> None:
    """Huge hostile diff paths, values and group names: every text within its limit, nothing raw."""
    hostile = "<!channel> `x` & " * 400
    arguments = {f"{hostile}{n}": hostile for n in range(60)}
    approval = make_approval(
        status=status,
        arguments_json=json.dumps(arguments),
        edited_json=json.dumps({k: v + "!" for k, v in arguments.items()}),
        edited_by=hostile,
        decided_by="bob",
        decided_at=1.7e9,
    )
    rule = ReviewRule(reviewers=(hostile,), quorum=2, escalate=())
    state = ReviewState(
        rule, (), f"0 of 2 approvals, waiting for someone in {hostile}", (hostile,), True, True
    )
    message = review.request_message(approval, review.Review(state), url="https://gw.example/i", now=1.7e9)
    assert len(message.blocks) <= blocks.MAX_BLOCKS
    for text in texts(message.blocks):
        assert blocks.text_length(text) <= blocks.MAX_TEXT
        assert "<!channel>" not in text


def test_a_select_click_keeps_only_the_chosen_value_and_refuses_a_malformed_one() -> None:
    """The request check keeps selected_option.value (a string) for bolt; any other shape is a 400."""
    picked = select_action(review.ACTION_REMEMBER, "abc:3600")
    [action] = slack_requests.interaction(picked)["actions"]
    assert action["selected_option"] == {"value": "abc:3600"}
    options: tuple[object, ...] = (5, "abc:3600", {"value": 5}, {"text": "no value"}, [])
    for option in options:
        bad = select_action(review.ACTION_REMEMBER, "abc:3600")
        bad["actions"][0]["selected_option"] = option
        with pytest.raises(slack_requests.SlackRequestError) as refused:
            slack_requests.interaction(bad)
        assert refused.value.status == 400
        assert "actions[0].selected_option" in refused.value.message
