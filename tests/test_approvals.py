"""The approval life cycle through the gateway: a real MCP client, the demo upstream, the JSON API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.approvals_kit import HELD_POLICY, start_held
from tests.conftest import ALICE_TOKEN, TOKEN_A, TOKEN_B, WAIT, StartGateway, mcp_client
from tests.rawmcp import RawSession

EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}


def _meta(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


def _text(result: Any) -> str:
    return result.content[0].text  # type: ignore[no-any-return]


async def test_approved_call_is_released_with_exactly_the_stored_arguments(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A held call, approved through the API, reaches the upstream once and its result reaches the agent."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        assert (pending.tool, pending.grant, pending.owner) == ("send_email", "agent-a", "alice")
        assert pending.tool_sha256  # bound to the definition the upstream listed
        status, body = await held.api("POST", f"/api/approvals/{pending.id}/approve", body={"reason": "fine"})
        assert status == 200
        assert body["status"] == "approved"
        assert body["decided_by"] == "bob"
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert _text(result).startswith("queued message")
    assert [{k: m[k] for k in EMAIL} for m in held.sent()] == [EMAIL]
    done = await held.recorder.status("completed", pending.id)
    assert done.result_json is not None
    events = [
        e["event"] for e in (await held.api("GET", f"/api/audit?approval_id={pending.id}"))[1]["events"]
    ]
    assert events == ["created", "approved", "released", "completed"]


async def test_denied_call_reaches_the_agent_with_the_reviewer_and_reason(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Deny with a reason: the agent is told who denied it and why; the upstream never sees the call."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, _ = await held.api(
            "POST", f"/api/approvals/{pending.id}/deny", body={"reason": "not this week"}
        )
        assert status == 200
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert _text(result) == "Denied by bob: the call to send_email was not made. Reason: not this week"
    assert _meta(result)["code"] == "denied_by_reviewer"
    assert held.sent() == []


async def test_unanswered_request_expires_and_a_late_approval_is_refused(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Past the rule's timeout the call is answered as expired, never released; approving then is 409."""
    policy = {
        **HELD_POLICY,
        "tools": {"send_email": {"action": "require_approval", "approval": {"timeout": "0.5s"}}},
    }
    held = await start_held(start_gateway, tmp_path, policy)
    async with mcp_client(held.url()) as client:
        result = await client.call_tool("send_email", EMAIL)
    assert _meta(result)["code"] == "approval_expired"
    expired = await held.recorder.status("expired")
    status, body = await held.api("POST", f"/api/approvals/{expired.id}/approve")
    assert status == 409
    assert body["status"] == "expired"
    assert held.sent() == []


async def test_client_cancellation_withdraws_the_request(start_gateway: StartGateway, tmp_path: Path) -> None:
    """notifications/cancelled for a held call cancels its approval; the upstream never sees it."""
    held = await start_held(start_gateway, tmp_path)
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), token=TOKEN_A)
        await raw.initialize()
        call = {
            "jsonrpc": "2.0",
            "id": "held-1",
            "method": "tools/call",
            "params": {"name": "send_email", "arguments": EMAIL},
        }
        reply = asyncio.create_task(raw.post(call))
        pending = await held.recorder.status("pending")
        await raw.notify(
            "notifications/cancelled", {"requestId": "held-1", "reason": "user changed their mind"}
        )
        cancelled = await held.recorder.status("cancelled", pending.id)
        assert cancelled.reason == "the client cancelled the request"
        answer = await asyncio.wait_for(reply, WAIT)
    assert all("result" not in m for m in answer.messages)  # a cancelled request gets no answer
    assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 409


async def test_session_end_cancels_a_held_call(start_gateway: StartGateway, tmp_path: Path) -> None:
    """DELETE of the session while its call is held cancels the approval."""
    held = await start_held(start_gateway, tmp_path)
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), token=TOKEN_A)
        await raw.initialize()
        reply = asyncio.create_task(raw.request("tools/call", {"name": "send_email", "arguments": EMAIL}))
        pending = await held.recorder.status("pending")
        async with http.delete(raw.url, headers=raw.headers()) as response:
            assert response.status == 200
        cancelled = await held.recorder.status("cancelled", pending.id)
        assert cancelled.reason == "the client's session ended"
        await asyncio.wait_for(reply, WAIT)


async def test_hold_runs_out_then_approval_releases_and_the_repeat_call_gets_the_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Pending answer when the hold ends; approval releases at once; the repeat call gets the result, once."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.3})
    async with mcp_client(held.url()) as client:
        first = await client.call_tool("send_email", EMAIL)
        meta = _meta(first)
        assert first.is_error
        assert meta["code"] == "approval_pending"
        assert meta["approval_id"] in _text(first)
        assert "call send_email again later with exactly the same arguments" in _text(first)
        assert (await held.api("POST", f"/api/approvals/{meta['approval_id']}/approve"))[0] == 200
        await held.recorder.status("completed", meta["approval_id"])
        assert len(held.sent()) == 1  # released without waiting for the agent
        again = await client.call_tool("send_email", EMAIL)
        assert not again.is_error
        assert _text(again).startswith("queued message")
        third = await client.call_tool("send_email", EMAIL)  # the kept result was handed out: a new request
        assert _meta(third)["code"] == "approval_pending"
        assert _meta(third)["approval_id"] != meta["approval_id"]
    assert len(held.sent()) == 1


async def test_repeat_calls_while_pending_attach_to_one_request(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Three identical calls from one grant make one approval; approving it sends one call upstream."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url()) as one, mcp_client(held.url()) as two:
        calls = [asyncio.create_task(c.call_tool("send_email", EMAIL)) for c in (one, two, one)]
        pending = await held.recorder.status("pending")
        _, body = await held.api("GET", "/api/approvals?status=pending")
        assert [a["id"] for a in body["approvals"]] == [pending.id]
        await held.api("POST", f"/api/approvals/{pending.id}/approve")
        results = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
    assert all(not r.is_error for r in results)
    assert len({_text(r) for r in results}) == 1
    assert len(held.sent()) == 1


async def test_fifty_concurrent_conflicting_decisions_have_exactly_one_winner(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """50 approve/deny requests at once: one 200, 49 times 409 naming the winner; one decision audited."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.1})
    async with mcp_client(held.url()) as client:
        await client.call_tool("send_email", EMAIL)
    pending = await held.recorder.status("pending")
    paths = [f"/api/approvals/{pending.id}/{'approve' if i % 2 else 'deny'}" for i in range(50)]
    answers = await asyncio.gather(*(held.api("POST", p, body={"reason": "race"}) for p in paths))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [409] * 49
    winner = next(body for status, body in answers if status == 200)
    assert all(
        body["decided_by"] == "bob" and body["status"] in ("approved", "released", "completed", "denied")
        for status, body in answers
        if status == 409
    )
    events = (await held.api("GET", f"/api/audit?approval_id={pending.id}"))[1]["events"]
    assert [e["event"] for e in events if e["event"] in ("approved", "denied")] == [winner["status"]]
    if winner["status"] == "approved":
        await held.recorder.status("completed", pending.id)
        assert len(held.sent()) == 1
    else:
        assert held.sent() == []


async def test_reviewers_are_checked(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Self-approval 403, an agent's token 403, no token 401, unknown id 404; nothing decided."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.1})
    async with mcp_client(held.url()) as client:
        await client.call_tool("send_email", EMAIL)
    pending = await held.recorder.status("pending")
    path = f"/api/approvals/{pending.id}/approve"
    status, body = await held.api("POST", path, token=ALICE_TOKEN)  # alice runs agent-a
    assert status == 403
    assert "own" in body["error"]
    assert (await held.api("POST", path, token=TOKEN_B))[0] == 403
    assert (await held.api("POST", path, token="no-such-token-anywhere"))[0] == 401
    assert (await held.api("POST", "/api/approvals/0000/approve"))[0] == 404
    status, body = await held.api("GET", f"/api/approvals/{pending.id}")
    assert body["status"] == "pending"


async def test_max_pending_per_grant_refuses_more(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Beyond max_pending_per_grant a call is refused with a clear reason, not queued."""
    held = await start_held(
        start_gateway, tmp_path, approvals={"hold_seconds": 0.1, "max_pending_per_grant": 2}
    )
    async with mcp_client(held.url()) as client:
        for n in range(2):
            assert _meta(await client.call_tool("send_email", {**EMAIL, "subject": f"n{n}"}))["code"] == (
                "approval_pending"
            )
        third = await client.call_tool("send_email", {**EMAIL, "subject": "n3"})
    assert _meta(third)["code"] == "too_many_pending"
    assert "2 calls waiting" in _text(third)


async def test_api_lists_with_filters_and_pages(start_gateway: StartGateway, tmp_path: Path) -> None:
    """GET /api/approvals filters by status and tool, newest first, paged; bad filters are 400."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.1})
    async with mcp_client(held.url()) as client:
        for n in range(3):
            await client.call_tool("send_email", {**EMAIL, "subject": f"n{n}"})
    _, body = await held.api("GET", "/api/approvals?status=pending&tool=send_email&limit=2")
    assert [a["arguments"]["subject"] for a in body["approvals"]] == ["n2", "n1"]
    _, body = await held.api("GET", "/api/approvals?status=pending&limit=2&offset=2")
    assert [a["arguments"]["subject"] for a in body["approvals"]] == ["n0"]
    assert (await held.api("GET", "/api/approvals?status=maybe"))[0] == 400
    assert (await held.api("GET", "/api/approvals?limit=x"))[0] == 400
    assert (await held.api("GET", "/api/approvals?tool=get_time"))[1]["approvals"] == []
