"""Release: rate limits at release, the tool-definition check, and what a held client sees meanwhile."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

import approvals.proxy.hold
from approvals.limits import RateLimiter
from tests.approvals_kit import HELD_POLICY, start_held
from tests.conftest import PROBE_COMMAND, WAIT, StartGateway, mcp_client

EMAIL = {"to": "ops@example.com", "subject": "s", "body": "b"}


async def test_burst_of_approvals_is_released_within_the_limit(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Six approvals at once under a 3-a-second limit: three go now, three wait for the next window."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.1})
    async with mcp_client(held.url()) as client:
        for n in range(6):
            await client.call_tool("send_email", {**EMAIL, "subject": f"n{n}"})
    pending = [a for _, a in held.recorder.seen if a.status == "pending"]
    assert len(pending) == 6
    # The limit arrives with a policy edit: releases are counted under the policy in force then.
    limited = {"action": "require_approval", "limits": [{"counter": "mail", "window": "second", "max": 3}]}
    (tmp_path / "policy.json").write_text(json.dumps({**HELD_POLICY, "tools": {"send_email": limited}}))
    await held.gate.policies.reload_async()
    started = held.gate.clock()
    for approval in pending:
        assert (await held.api("POST", f"/api/approvals/{approval.id}/approve"))[0] == 200
    done = [await held.recorder.status("completed", a.id) for a in pending]
    assert len(held.sent()) == 6
    released = sorted(a.released_at for a in done if a.released_at is not None)
    # At most three fit in the window the approvals came in; the others waited for a later one.
    assert sum(t >= math.floor(started) + 1 for t in released) >= 3
    limiter = held.gate.counters
    assert isinstance(limiter, RateLimiter)
    # No window ever held more than three (windows already past may have been dropped).
    assert all(count <= 3 for count in limiter.snapshot().values())


async def test_changed_tool_definition_sends_the_call_back_for_review(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An approval given under one definition of a tool does not release the call under another."""
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {"echo": {"action": "require_approval"}, "redefine_echo": {}},
    }
    held = await start_held(start_gateway, tmp_path, policy, command=PROBE_COMMAND)
    async with mcp_client(held.url()) as agent:
        call = asyncio.create_task(agent.call_tool("echo", {"text": "hello"}))
        pending = await held.recorder.status("pending")
        before = json.loads(pending.tool_json)["description"]
        # Same session, so the same upstream process (a stdio upstream runs one per client session).
        await agent.call_tool("redefine_echo", {"description": "Now also emails your boss."})
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 200
        back = await held.recorder.wait_for(lambda a: a.id == pending.id and a.status == "pending" and a.note)
        assert "definition changed" in (back.note or "")
        assert json.loads(back.tool_json)["description"] == "Now also emails your boss." != before
        assert not call.done()  # the agent is still waiting; nothing was sent
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 200
        result = await asyncio.wait_for(call, WAIT)
    assert result.content[0].text == "hello"  # type: ignore[union-attr]
    events = [
        e["event"] for e in (await held.api("GET", f"/api/audit?approval_id={pending.id}"))[1]["events"]
    ]
    assert events == ["created", "approved", "tool_changed", "approved", "released", "completed"]


async def test_held_call_sends_progress_and_is_answered_on_its_stream(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sent a progress token hears "Waiting for approval …" until the outcome comes."""
    monkeypatch.setattr(approvals.proxy.hold, "SIGN_OF_LIFE_SECONDS", 0.05)
    held = await start_held(start_gateway, tmp_path)
    messages: list[str] = []
    heard = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")
        heard.set()

    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL, progress_callback=on_progress))
        await asyncio.wait_for(heard.wait(), WAIT)
        pending = await held.recorder.status("pending")
        assert messages[0].startswith(f"Waiting for approval {pending.id[:8]}… — expires in ")
        await held.api("POST", f"/api/approvals/{pending.id}/approve")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error


async def test_approval_of_a_call_whose_session_is_gone_releases_through_the_gateway(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The reviewer approved the action, not a connection: the call goes out after the client left."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.1})
    async with mcp_client(held.url()) as client:
        first: Any = await client.call_tool("send_email", EMAIL)
    approval_id = first.model_dump(by_alias=True)["_meta"]["approvals"]["approval_id"]
    assert (await held.api("POST", f"/api/approvals/{approval_id}/approve"))[0] == 200
    done = await held.recorder.status("completed", approval_id)
    assert json.loads(done.result_json or "{}")["result"]["content"][0]["text"].startswith("queued message")
    assert len(held.sent()) == 1
