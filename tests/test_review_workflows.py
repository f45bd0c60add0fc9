"""Review workflows end to end: a real MCP client, the gateway, the demo upstream (its outbox is what
it really sent), decisions through the JSON API (and the inbox for step-up), the audit log.

Quorum and groups, approve-and-remember (uses, constraints, revocation, expiry on an injected
clock, deny-and-remember, rate limits, one agent only), edit before approve, escalation and
timeouts, step-up, batch decisions, and the session in which one remembered grant turns 50 prompts
into 1 (bench/remember_session.py, run in process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from approvals.core.model import sha256_of
from bench.remember_session import run_session
from tests.approvals_kit import Held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TOKEN_B, WAIT, StartGateway, mcp_client
from tests.inbox_kit import Reviewer
from tests.review_kit import (
    CAROL_TOKEN,
    DAVE_TOKEN,
    EMAIL,
    ERIN_TOKEN,
    NOW,
    Changes,
    audit_of,
    start_review,
)

SHORT_HOLD = {"hold_seconds": 0.5}  # a held call answers "pending" soon: the agent calls again later
EXACT_3 = {"for": "1h", "max_uses": 3}


def meta_of(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


def text_of(result: Any, index: int = 0) -> str:
    return result.content[index].text  # type: ignore[no-any-return]


def sent_fields(held: Held) -> list[dict[str, Any]]:
    """What the demo upstream sent (its outbox), without the ids and times it adds."""
    return [{k: m[k] for k in ("to", "subject", "body")} for m in held.sent()]


async def approve(held: Held, approval_id: str, token: str, **body: Any) -> tuple[int, Any]:
    return await held.api("POST", f"/api/approvals/{approval_id}/approve", token, body)


async def deny(held: Held, approval_id: str, token: str = CAROL_TOKEN, **body: Any) -> tuple[int, Any]:
    return await held.api("POST", f"/api/approvals/{approval_id}/deny", token, {"reason": "no", **body})


async def held_then_denied(held: Held, client: Any, arguments: dict[str, Any], grant: str = "agent-a") -> str:
    """A call that must be held: wait for its new request, deny it (carol, or alice for agent-b's),
    and return the request's id once the agent has the denial."""
    known = {a.id for _, a in held.recorder.seen}
    call = asyncio.create_task(client.call_tool("send_email", arguments))
    pending = await held.recorder.wait_for(lambda a: a.id not in known and a.status == "pending")
    assert pending.grant == grant
    assert (await deny(held, pending.id, ALICE_TOKEN if grant == "agent-b" else CAROL_TOKEN))[0] == 200
    result = await asyncio.wait_for(call, WAIT)
    assert meta_of(result)["code"] == "denied_by_reviewer"
    return pending.id


async def approved_with(
    held: Held, client: Any, asked: dict[str, Any], token: str, **body: Any
) -> tuple[Any, dict[str, Any]]:
    """A held call decided through the API with ``body`` while the agent waits: (its result, the
    API's answer)."""
    known = {a.id for _, a in held.recorder.seen}
    call = asyncio.create_task(client.call_tool("send_email", asked))
    pending = await held.recorder.wait_for(lambda a: a.id not in known and a.status == "pending")
    status, answer = await approve(held, pending.id, token, **body)
    assert status == 200, answer
    return await asyncio.wait_for(call, WAIT), answer


# ---- quorum -----------------------------------------------------------------------------------


async def test_a_quorum_of_two_is_met_by_two_reviewers_never_the_owner(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """alice (the owner) 403, bob counts (1 of 2, shown to the agent), bob again 409, carol releases once."""
    held = await start_review(start_gateway, tmp_path, {"quorum": 2}, approvals=SHORT_HOLD)
    async with mcp_client(held.url()) as client:
        first = await client.call_tool("send_email", EMAIL)
        approval_id = meta_of(first)["approval_id"]
        status, body = await approve(held, approval_id, ALICE_TOKEN)
        assert (status, body["kind"]) == (403, "own_agent")
        status, body = await approve(held, approval_id, BOB_TOKEN)
        assert (status, body["status"]) == (200, "pending")
        assert body["review"]["progress"] == "1 of 2 approvals, waiting for another reviewer"
        assert [v["by"] for v in body["review"]["votes"]] == ["bob"]
        status, body = await approve(held, approval_id, BOB_TOKEN)
        assert (status, body["kind"]) == (409, "already_voted")
        again = await client.call_tool("send_email", EMAIL)  # still waiting: says how far it got
        meta = meta_of(again)
        assert (meta["code"], meta["approval_id"]) == ("approval_pending", approval_id)
        assert meta["progress"] == "1 of 2 approvals, waiting for another reviewer"
        assert "1 of 2 approvals" in text_of(again)
        assert held.sent() == []
        status, body = await approve(held, approval_id, CAROL_TOKEN)
        assert (status, body["status"], body["decided_by"]) == (200, "approved", "carol")
        await held.recorder.status("completed", approval_id)
        done = await client.call_tool("send_email", EMAIL)
    assert not done.is_error
    assert text_of(done).startswith("queued message")
    assert sent_fields(held) == [EMAIL]
    events = [e["event"] for e in await audit_of(held, approval_id)]
    assert events == ["created", "voted", "approved", "released", "completed"]


async def test_two_approvals_at_once_release_once_and_a_denial_after_one_approval_denies(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """bob and carol together (from none, and after dave's vote): one release each; then bob approves
    and carol denies: denied, the agent told who, nothing sent."""
    held = await start_review(start_gateway, tmp_path, {"quorum": 2}, approvals=SHORT_HOLD)
    async with mcp_client(held.url()) as client:
        for n, first_vote in enumerate((None, DAVE_TOKEN)):
            email = {**EMAIL, "subject": f"together {n}"}
            approval_id = meta_of(await client.call_tool("send_email", email))["approval_id"]
            if first_vote is not None:
                assert (await approve(held, approval_id, first_vote))[0] == 200
            answers = await asyncio.gather(
                approve(held, approval_id, BOB_TOKEN), approve(held, approval_id, CAROL_TOKEN)
            )
            statuses = sorted((status, body.get("status") or body.get("kind")) for status, body in answers)
            if first_vote is None:
                assert statuses == [(200, "approved"), (200, "pending")]
            else:
                assert statuses[0] == (200, "approved")
                assert statuses[1] in ((409, "approved"), (409, "released"), (409, "completed")), statuses
            await held.recorder.status("completed", approval_id)
            assert (await client.call_tool("send_email", email)).is_error is False
        assert [m["subject"] for m in held.sent()] == ["together 0", "together 1"]
        denied_email = {**EMAIL, "subject": "denied"}
        approval_id = meta_of(await client.call_tool("send_email", denied_email))["approval_id"]
        assert (await approve(held, approval_id, BOB_TOKEN))[0] == 200
        status, body = await deny(held, approval_id, CAROL_TOKEN, reason="not this quarter")
        assert (status, body["status"], body["decided_by"]) == (200, "denied", "carol")
        answer = await client.call_tool("send_email", denied_email)
    assert answer.is_error
    assert (meta_of(answer)["code"], meta_of(answer)["decided_by"]) == ("denied_by_reviewer", "carol")
    assert text_of(answer) == "Denied by carol: the call to send_email was not made. Reason: not this quarter"
    assert len(held.sent()) == 2


async def test_a_quorum_from_two_groups_needs_one_reviewer_of_each(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """from [payments, security]: bob (payments) counts, carol (payments) is refused waiting for
    security, dave (security) completes it."""
    held = await start_review(start_gateway, tmp_path, {"from": ["payments", "security"]})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, BOB_TOKEN)
        assert (status, body["review"]["progress"]) == (
            200,
            "1 of 2 approvals, waiting for someone in security",
        )
        status, body = await approve(held, pending.id, CAROL_TOKEN)
        assert (status, body["kind"]) == (403, "not_eligible")
        assert "waiting for someone in security" in body["error"]
        status, body = await approve(held, pending.id, DAVE_TOKEN)
        assert (status, body["status"]) == (200, "approved")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert sent_fields(held) == [EMAIL]


# ---- step-up ----------------------------------------------------------------------------------


async def test_a_step_up_rule_refuses_the_api_and_takes_the_inbox(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """via [inbox]: approve through the API is 403 step_up; the same reviewer in the inbox approves it."""
    held = await start_review(start_gateway, tmp_path, {"via": ["inbox"]})
    async with (
        mcp_client(held.url()) as client,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, CAROL_TOKEN)
        assert (status, body["kind"]) == (403, "step_up")
        inbox = Reviewer(held.gateway.base, http)
        assert (await inbox.login(CAROL_TOKEN)).status == 303
        page = await inbox.decide(pending.id, "approve")
        assert page.status in (200, 303), page.text[:500]
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    _, record = await held.api("GET", f"/api/approvals/{pending.id}")
    assert (record["decided_by"], record["decided_via"]) == ("carol", "web")


# ---- approve and remember ---------------------------------------------------------------------


async def test_a_remembered_grant_allows_its_uses_then_holds_and_is_one_agent_s(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Approve with remember (3 uses, exact): 3 identical calls pass marked with the grant, the 4th is
    held; agent-b's identical call is held too."""
    held = await start_review(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client, mcp_client(held.url(), TOKEN_B) as other:
        first, answer = await approved_with(held, client, EMAIL, CAROL_TOKEN, remember=EXACT_3)
        assert not first.is_error
        # The kept result is marked delivered in the background: until then an identical call
        # would collect it (once) instead of using the grant.
        await held.gateway.service.settled()
        grant = answer["standing_grant"]
        assert (grant["effect"], grant["grant"], grant["max_uses"], grant["uses"]) == (
            "allow",
            "agent-a",
            3,
            0,
        )
        assert grant["id"].startswith("sg_")
        assert grant["source_approval"] == answer["id"]
        for use in (1, 2, 3):
            result = await client.call_tool("send_email", EMAIL)
            assert not result.is_error
            assert text_of(result).startswith("queued message")
            meta = meta_of(result)
            assert (meta["code"], meta["standing_grant"], meta["uses"], meta["max_uses"]) == (
                "allowed_by_standing_grant", grant["id"], use, 3,
            )  # fmt: skip
        await held_then_denied(held, client, EMAIL)
        await held_then_denied(held, other, EMAIL, grant="agent-b")
    assert sent_fields(held) == [EMAIL] * 4
    _, stored = await held.api("GET", f"/api/standing-grants/{grant['id']}")
    assert (stored["uses"], stored["state"]) == (3, "used_up")
    events = [(e["event"], e["actor"]) for e in await audit_of(held, grant["id"])]
    assert events == [("granted", "carol")] + [("used", "agent-a")] * 3


async def test_a_widened_grant_then_revoked_mid_way(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A prefix on `to`, any subject and body: ops-* calls pass, others are held; revoked after one
    use, the next matching call is held; revoking twice is 409."""
    held = await start_review(start_gateway, tmp_path)
    widened = {
        "for": "8h",
        "max_uses": 10,
        "constraints": [
            {"field": "to", "op": "prefix", "value": "ops-"},
            {"field": "subject", "op": "any"},
            {"field": "body", "op": "any"},
        ],
    }
    async with mcp_client(held.url()) as client:
        _, answer = await approved_with(held, client, EMAIL, CAROL_TOKEN, remember=widened)
        grant_id = answer["standing_grant"]["id"]
        assert answer["standing_grant"]["described"] == [
            'to starts with "ops-"',
            "subject: any value",
            "body: any value",
        ]
        ops = {"to": "ops-7@example.com", "subject": "Deploy", "body": "Tonight."}
        assert meta_of(await client.call_tool("send_email", ops))["code"] == "allowed_by_standing_grant"
        await held_then_denied(held, client, {**ops, "to": "ceo@example.com"})
        status, revoked = await held.api("POST", f"/api/standing-grants/{grant_id}/revoke", DAVE_TOKEN)
        assert (status, revoked["state"], revoked["revoked_by"], revoked["uses"]) == (
            200,
            "revoked",
            "dave",
            1,
        )
        await held_then_denied(held, client, ops)
        status, body = await held.api("POST", f"/api/standing-grants/{grant_id}/revoke", DAVE_TOKEN)
        assert (status, body["kind"]) == (409, "already_decided")
    assert [m["to"] for m in held.sent()] == [EMAIL["to"], "ops-7@example.com"]
    events = [e["event"] for e in await audit_of(held, grant_id)]
    assert events == ["granted", "used", "revoked"]


async def test_a_grant_expires_on_the_gateway_s_clock(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A one-hour grant (injected clock): used at +30 min, the call at +1 h is held."""
    now = [NOW]
    held = await start_review(start_gateway, tmp_path, clock=lambda: now[0])
    async with mcp_client(held.url()) as client:
        _, answer = await approved_with(held, client, EMAIL, CAROL_TOKEN, remember={"for": "1h"})
        assert answer["standing_grant"]["expires_at"] == NOW + 3600
        now[0] += 1800
        assert meta_of(await client.call_tool("send_email", EMAIL))["code"] == "allowed_by_standing_grant"
        now[0] += 1800
        await held_then_denied(held, client, EMAIL)
        _, listed = await held.api("GET", "/api/standing-grants?active=1")
        assert listed["standing_grants"] == []
        _, listed = await held.api("GET", "/api/standing-grants")
        assert [g["state"] for g in listed["standing_grants"]] == ["expired"]
    assert len(held.sent()) == 2


async def test_remember_is_refused_where_the_rule_says_remember_false(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """remember: false: approve-and-remember is 403 remember_refused and decides nothing; a plain
    approval works."""
    held = await start_review(start_gateway, tmp_path, {"remember": False})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, CAROL_TOKEN, remember={"for": "1h"})
        assert (status, body["kind"]) == (403, "remember_refused")
        _, record = await held.api("GET", f"/api/approvals/{pending.id}")
        assert record["status"] == "pending"
        assert record["review"]["may_remember"] is False
        assert (await approve(held, pending.id, CAROL_TOKEN))[0] == 200
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    _, listed = await held.api("GET", "/api/standing-grants")
    assert listed["standing_grants"] == []


async def test_deny_and_remember_refuses_matching_calls_with_the_grant_s_id(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Deny with remember (this recipient, any subject and body): a later matching call is refused at
    once naming the grant and the reason; the identical call still gets its own request's denial."""
    held = await start_review(start_gateway, tmp_path)
    to_ops = {
        "for": "1h",
        "constraints": [
            {"field": "to", "op": "eq", "value": EMAIL["to"]},
            {"field": "subject", "op": "any"},
            {"field": "body", "op": "any"},
        ],
    }
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await deny(held, pending.id, reason="no mail to ops today", remember=to_ops)
        assert (status, body["status"], body["standing_grant"]["effect"]) == (200, "denied", "deny")
        grant_id = body["standing_grant"]["id"]
        assert meta_of(await asyncio.wait_for(call, WAIT))["code"] == "denied_by_reviewer"
        again = await client.call_tool("send_email", {**EMAIL, "subject": "Still the numbers"})
        identical = await client.call_tool("send_email", EMAIL)
    assert again.is_error
    meta = meta_of(again)
    assert (meta["code"], meta["standing_grant"], meta["granted_by"]) == (
        "denied_by_standing_grant",
        grant_id,
        "carol",
    )
    assert "no mail to ops today" in text_of(again)
    assert (meta_of(identical)["code"], meta_of(identical)["approval_id"]) == (
        "denied_by_reviewer",
        pending.id,
    )
    assert held.sent() == []
    assert [e["event"] for e in await audit_of(held, grant_id)] == ["granted", "used"]


async def test_rate_limits_still_apply_to_calls_a_grant_allows(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """2 a minute (frozen clock): the approved call and one granted call; the third is rate limited and
    spends no use of the grant."""
    limits = [{"counter": "emails", "window": "minute", "max": 2, "scope": "grant"}]
    held = await start_review(start_gateway, tmp_path, clock=lambda: NOW, limits=limits)
    async with mcp_client(held.url()) as client:
        _, answer = await approved_with(
            held, client, EMAIL, CAROL_TOKEN, remember={"for": "1h", "max_uses": 10}
        )
        grant_id = answer["standing_grant"]["id"]
        assert meta_of(await client.call_tool("send_email", EMAIL))["code"] == "allowed_by_standing_grant"
        limited = await client.call_tool("send_email", EMAIL)
    assert (limited.is_error, meta_of(limited)["code"]) == (True, "rate_limited")
    _, stored = await held.api("GET", f"/api/standing-grants/{grant_id}")
    assert stored["uses"] == 1
    assert len(held.sent()) == 2


async def test_the_repeat_call_after_approve_and_remember_gets_the_kept_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The hold ran out, carol approves with remember, the agent calls again to collect the outcome:
    the kept result, and the email is sent once (not again under the new grant)."""
    held = await start_review(start_gateway, tmp_path, approvals=SHORT_HOLD)
    async with mcp_client(held.url()) as client:
        first = await client.call_tool("send_email", EMAIL)
        approval_id = meta_of(first)["approval_id"]
        assert (await approve(held, approval_id, CAROL_TOKEN, remember=EXACT_3))[0] == 200
        await held.recorder.status("completed", approval_id)
        collected = await client.call_tool("send_email", EMAIL)
    assert not collected.is_error
    assert len(held.sent()) == 1, "the approved call was sent twice"


# ---- edit before approve ----------------------------------------------------------------------

EDITED = {**EMAIL, "to": "team@example.com"}


async def test_an_edited_call_is_sent_once_with_the_edit_and_the_agent_told(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Approve with arguments: the upstream gets exactly the edit once; the held agent's result has the
    note and edited_by_reviewer with the diff; the audit log an "edited" event with both hashes."""
    held = await start_review(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client:
        result, answer = await approved_with(held, client, EMAIL, CAROL_TOKEN, arguments=EDITED)
    assert (answer["status"], answer["edited_arguments"], answer["arguments"]) == ("approved", EDITED, EMAIL)
    assert not result.is_error
    assert text_of(result).endswith("to team@example.com")
    assert "carol changed the arguments before approving" in text_of(result, -1)
    meta = meta_of(result)
    assert (meta["code"], meta["edited_by"], meta["approval_id"]) == (
        "edited_by_reviewer",
        "carol",
        answer["id"],
    )
    assert meta["changes"] == [{"path": "to", "before": '"ops-1@example.com"', "after": '"team@example.com"'}]
    assert sent_fields(held) == [EDITED]
    events = await audit_of(held, answer["id"])
    assert [e["event"] for e in events] == ["created", "approved", "edited", "released", "completed"]
    edited = next(e for e in events if e["event"] == "edited")
    detail = json.loads(edited["detail"])
    assert (detail["from_sha256"], detail["to_sha256"]) == (sha256_of(EMAIL), sha256_of(EDITED))
    assert edited["args_sha256"] == sha256_of(EDITED)


async def test_a_repeat_call_with_the_original_arguments_gets_the_edited_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The hold ran out, the call was approved edited: calling again as first asked returns the kept
    (edited) result, and nothing is sent a second time."""
    held = await start_review(start_gateway, tmp_path, approvals=SHORT_HOLD)
    async with mcp_client(held.url()) as client:
        approval_id = meta_of(await client.call_tool("send_email", EMAIL))["approval_id"]
        assert (await approve(held, approval_id, CAROL_TOKEN, arguments=EDITED))[0] == 200
        await held.recorder.status("completed", approval_id)
        again = await client.call_tool("send_email", EMAIL)
    assert not again.is_error
    assert text_of(again).endswith("to team@example.com")
    assert meta_of(again)["code"] == "edited_by_reviewer"
    assert sent_fields(held) == [EDITED]


async def test_under_a_quorum_an_edit_needs_a_second_look_at_the_edited_call(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Quorum 2: carol edits and approves (1 of 2); dave's approval naming nothing, or the arguments
    as first asked, is 409 changed; naming the edited hash it releases the edited call once."""
    held = await start_review(start_gateway, tmp_path, {"quorum": 2})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, CAROL_TOKEN, arguments=EDITED)
        assert (status, body["status"], body["edited_arguments"]) == (200, "pending", EDITED)
        assert body["review"]["progress"] == "1 of 2 approvals, waiting for another reviewer"
        for seen in ({}, {"seen_sha256": sha256_of(EMAIL)}):
            status, body = await approve(held, pending.id, DAVE_TOKEN, **seen)
            assert (status, body["kind"]) == (409, "changed")
        status, body = await approve(held, pending.id, DAVE_TOKEN, seen_sha256=sha256_of(EDITED))
        assert (status, body["status"], body["decided_by"]) == (200, "approved", "dave")
        result = await asyncio.wait_for(call, WAIT)
    assert meta_of(result)["code"] == "edited_by_reviewer"
    assert sent_fields(held) == [EDITED]


async def test_edits_the_schema_or_the_policy_refuse_are_refused(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An edit breaking the inputSchema is 400 naming the path, one the policy denies (deny_if) is 400;
    the call stays pending, unedited."""
    deny_if = [{"path": "args.to", "op": "contains", "value": "@evil.example"}]
    held = await start_review(start_gateway, tmp_path, deny_if=deny_if)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, CAROL_TOKEN, arguments={**EMAIL, "to": "ab"})
        assert (status, body["kind"]) == (400, "edit_refused")
        assert body["error"].startswith("args.to: ")
        status, body = await approve(
            held, pending.id, CAROL_TOKEN, arguments={**EMAIL, "to": "x@evil.example"}
        )
        assert (status, body["kind"]) == (400, "edit_refused")
        assert "the policy denies the edited call" in body["error"]
        _, record = await held.api("GET", f"/api/approvals/{pending.id}")
        assert record["status"] == "pending"
        assert "edited_arguments" not in record
        assert (await deny(held, pending.id))[0] == 200
        await asyncio.wait_for(call, WAIT)
    assert held.sent() == []


async def test_a_rule_with_edit_false_refuses_edits(start_gateway: StartGateway, tmp_path: Path) -> None:
    """edit: false: approve with arguments is 403 edit_refused; nothing decided."""
    held = await start_review(start_gateway, tmp_path, {"edit": False})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, CAROL_TOKEN, arguments=EDITED)
        assert (status, body["kind"]) == (403, "edit_refused")
        assert (await deny(held, pending.id))[0] == 200
        await asyncio.wait_for(call, WAIT)
    assert held.sent() == []


# ---- escalation and timeouts -------------------------------------------------------------------

ESCALATING = {
    "timeout": "30m",
    "escalate": [{"after": "10m", "to": ["oncall"]}],
    "reviewers": ["payments"],
    "on_timeout": "deny",
}


async def test_escalation_announces_to_oncall_who_may_then_decide(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Before 10 min erin (oncall) is 403 not_eligible; at 10 min the request is escalated (record,
    audit, feed) and erin's approval releases it."""
    now = [NOW]
    held = await start_review(start_gateway, tmp_path, ESCALATING, clock=lambda: now[0])
    changes = Changes.following(held.gateway.service.feed)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, body = await approve(held, pending.id, ERIN_TOKEN)
        assert (status, body["kind"]) == (403, "not_eligible")
        now[0] += 600
        await held.gateway.service.escalate_due()
        escalated = await changes.wait_for(lambda c: c.event == "escalated" and c.approval.id == pending.id)
        assert escalated.approval.escalated == 1
        _, record = await held.api("GET", f"/api/approvals/{pending.id}")
        assert record["review"]["escalated_to"] == ["oncall"]
        assert "escalated" in [e["event"] for e in await audit_of(held, pending.id)]
        status, body = await approve(held, pending.id, ERIN_TOKEN)
        assert (status, body["status"], body["decided_by"]) == (200, "approved", "erin")
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    assert sent_fields(held) == [EMAIL]


async def test_on_timeout_deny_denies_and_the_agent_is_told_no_one_decided(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """At 30 min undecided: denied, not expired; the agent gets denied_on_timeout."""
    now = [NOW]
    held = await start_review(start_gateway, tmp_path, ESCALATING, clock=lambda: now[0])
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        now[0] += 1800
        await held.gateway.service.expire_due()
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert meta_of(result)["code"] == "denied_on_timeout"
    assert "in time" in text_of(result)
    _, record = await held.api("GET", f"/api/approvals/{pending.id}")
    assert (record["status"], record["decided_by"]) == ("denied", None)
    assert held.sent() == []


async def test_without_on_timeout_an_undecided_call_expires(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The same rule without on_timeout: expired at 30 min, and the agent told it expired."""
    now = [NOW]
    rule = {k: v for k, v in ESCALATING.items() if k != "on_timeout"}
    held = await start_review(start_gateway, tmp_path, rule, clock=lambda: now[0])
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        now[0] += 1800
        await held.gateway.service.expire_due()
        result = await asyncio.wait_for(call, WAIT)
    assert meta_of(result)["code"] == "approval_expired"
    assert (await held.recorder.status("expired", pending.id)).decided_by is None


# ---- batch ------------------------------------------------------------------------------------


async def test_a_batch_of_fifty_with_five_decided_elsewhere(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """50 held calls; carol denies 5; bob approves all 50 in one request: 45 approved and sent, the 5
    reported 409 already_decided and left denied by carol."""
    held = await start_review(start_gateway, tmp_path, approvals={**SHORT_HOLD, "max_pending_per_grant": 60})
    emails = [{**EMAIL, "subject": f"batch {n}"} for n in range(50)]
    async with mcp_client(held.url()) as client:
        results = await asyncio.gather(*(client.call_tool("send_email", e) for e in emails))
    ids = [meta_of(r)["approval_id"] for r in results]
    assert len(set(ids)) == 50
    elsewhere = set(ids[4::10])
    for approval_id in elsewhere:
        assert (await deny(held, approval_id))[0] == 200
    status, body = await held.api(
        "POST", "/api/approvals/approve", body={"ids": ids, "reason": "end of quarter"}
    )
    assert status == 200
    outcomes = {r["id"]: r for r in body["results"]}
    assert [r["id"] for r in body["results"]] == ids
    for approval_id, outcome in outcomes.items():
        if approval_id in elsewhere:
            assert (outcome["ok"], outcome["kind"], outcome["http_status"]) == (False, "already_decided", 409)
        else:
            assert (outcome["ok"], outcome["status"]) == (True, "approved")
            assert outcome["approval"]["decided_by"] == "bob"
    for approval_id in ids:
        if approval_id not in elsewhere:
            await held.recorder.status("completed", approval_id)
    for approval_id in elsewhere:
        _, record = await held.api("GET", f"/api/approvals/{approval_id}")
        assert (record["status"], record["decided_by"]) == ("denied", "carol")
    sent = sorted(m["subject"] for m in held.sent())
    assert sent == sorted(e["subject"] for e, i in zip(emails, ids, strict=True) if i not in elsewhere)


# ---- one agent's session: 50 prompts become 1 ---------------------------------------------------


async def test_one_remembered_grant_turns_fifty_prompts_into_one(tmp_path: Path) -> None:
    """bench/remember_session.py in process: 50 calls, one approval request, 49 allowed by the grant,
    50 sent, and the audit log showing it (created, approved, granted, 49 used)."""
    report = await run_session(tmp_path, calls=50, echo=lambda _line: None)
    assert (report.prompts, report.allowed_by_grant, report.sent) == (1, 49, 50)
    assert report.ok
    events = [e["event"] for e in report.audit]
    assert events.count("created") == 1
    assert events.count("approved") == 1
    assert events.count("granted") == 1
    assert events.count("used") == 49
    used = [e for e in report.audit if e["event"] == "used"]
    assert {e["approval_id"] for e in used} == {report.grant_id}
    assert [json.loads(e["detail"])["uses"] for e in used] == list(range(1, 50))
