"""Release of a call to an upstream tool with taskSupport "required": sent as a task and followed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.core import upstream_tasks
from approvals.core.model import ToolCall
from approvals.jsonrpc import INTERNAL_ERROR, JsonObject
from approvals.proxy.keys import GATEWAY
from tests.approvals_kit import Recorder
from tests.conftest import BOB_TOKEN, TOKEN_A, WAIT, StartGateway, settings_for
from tests.rawmcp import RawSession
from tests.test_core_service import BOB, HELD, UPSTREAM, node

RESEARCH = "simulate-research-query"  # server-everything's tool with taskSupport "required"
SEND: JsonObject = {
    "name": "send",
    "inputSchema": {"type": "object"},
    "execution": {"taskSupport": "required"},
}
TASK = {"taskId": "t-1", "status": "working", "createdAt": "2026-01-01T00:00:00Z", "ttl": 1000}
GARBAGE: list[Any] = [
    {},
    {"task": "t-1"},
    {"task": {"status": "working"}},
    {"task": {"taskId": 7, "status": "working"}},
    {"task": {"taskId": "", "status": "working"}},
    {"task": {"taskId": "t-1", "status": "sleeping"}},
    [],
    "done",
]


class TaskUpstream:
    """Lists `send` as task-required; answers tools/call with `created` and tasks/result with a
    result (or never, when `answer` is unset); records every request."""

    def __init__(self, created: Any, answer: bool = True) -> None:
        self.created = created
        self.answer = answer
        self.requests: list[tuple[str, JsonObject]] = []
        self.cancelled = asyncio.Event()

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": 1, "result": {"tools": [SEND]}}
        self.requests.append((method, params))
        if method == "tools/call":
            return {"jsonrpc": "2.0", "id": 2, "result": self.created}
        if method == "tasks/cancel":
            self.cancelled.set()
            return {"jsonrpc": "2.0", "id": 3, "result": {**TASK, "status": "cancelled"}}
        if not self.answer:
            await asyncio.Event().wait()  # an upstream that never finishes the task
        meta = {"io.modelcontextprotocol/related-task": {"taskId": "t-1"}, "kept": 1}
        return {
            "jsonrpc": "2.0",
            "id": 4,
            "result": {"content": [{"type": "text", "text": "sent"}], "_meta": meta},
        }


async def release(tmp_path: Path, upstream: TaskUpstream, call_timeout: float = 300.0) -> JsonObject:
    """Hold one call of `send`, approve it, and return what the held call is answered with."""
    settings = settings_for(tmp_path, {UPSTREAM: {"command": ["true"], "call_timeout": call_timeout}})
    async with node(settings, upstream) as n:  # type: ignore[arg-type]
        admission = await n.service.admit(ToolCall(UPSTREAM, "agent-a", "s-1", "send", {"n": 1}), HELD)
        assert admission.hold is not None
        waiting = asyncio.create_task(admission.hold.wait(WAIT))
        await n.service.decide(admission.hold.approval_id, BOB, approve=True, reason=None, channel="api")
        outcome = await asyncio.wait_for(waiting, WAIT)
        admission.hold.close()
        await n.service.settled()
        stored = await n.service.get(admission.hold.approval_id)
    assert outcome is not None
    assert stored is not None
    return {"outcome": outcome, "status": stored.status}


@pytest.mark.parametrize("created", GARBAGE)
def test_malformed_create_task_result_is_a_json_rpc_error(created: Any) -> None:
    """A CreateTaskResult without a usable task is read as a JSON-RPC error, never an exception."""
    read = upstream_tasks.read_created("up", {"jsonrpc": "2.0", "id": 1, "result": created})
    assert isinstance(read, dict)
    assert read["error"]["code"] == INTERNAL_ERROR


@pytest.mark.parametrize("created", GARBAGE)
async def test_release_with_a_malformed_create_task_result_fails_without_following(
    tmp_path: Path, created: Any
) -> None:
    """An upstream answering the task call with garbage ends the release failed, sent once, not followed."""
    upstream = TaskUpstream(created)
    got = await release(tmp_path, upstream)
    assert got["status"] == "failed"
    assert got["outcome"]["error"]["code"] == INTERNAL_ERROR
    assert [m for m, _ in upstream.requests] == ["tools/call"]


async def test_task_required_tool_is_released_as_a_task_and_answered_as_a_plain_call(tmp_path: Path) -> None:
    """The release asks for a task, follows it with tasks/result, and keeps the plain tool result."""
    upstream = TaskUpstream({"task": TASK})
    got = await release(tmp_path, upstream)
    assert got["status"] == "completed"
    assert got["outcome"]["result"]["content"][0]["text"] == "sent"
    assert got["outcome"]["result"]["_meta"] == {"kept": 1}  # the upstream's task id is not the agent's
    (call, sent), (follow, asked) = upstream.requests
    assert (call, follow) == ("tools/call", "tasks/result")
    assert sent["task"]["ttl"] == 300_000
    assert sent["arguments"] == {"n": 1}
    assert asked == {"taskId": "t-1"}


async def test_task_not_finished_within_call_timeout_is_cancelled_upstream(tmp_path: Path) -> None:
    """A followed task still running at the call timeout ends the release failed and is cancelled."""
    upstream = TaskUpstream({"task": TASK}, answer=False)
    got = await release(tmp_path, upstream, call_timeout=0.2)
    await asyncio.wait_for(upstream.cancelled.wait(), WAIT)
    assert got["status"] == "failed"
    assert got["outcome"]["result"]["_meta"]["approvals"]["code"] == "upstream_timeout"
    assert [m for m, _ in upstream.requests] == ["tools/call", "tasks/result", "tasks/cancel"]


async def test_held_call_of_a_task_required_upstream_tool_gets_its_result(
    start_gateway: StartGateway, tmp_path: Path, everything_url: str
) -> None:
    """Through a gateway on server-everything: a held call of its task-required tool, approved, gets
    the tool's result, and the upstream ran exactly one task for it."""
    policy = {"version": "1", "default": "allow", "tools": {RESEARCH: {"action": "require_approval"}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    gateway = await start_gateway({"everything": {"url": everything_url, "policy": "policy.json"}})
    recorder = Recorder.following(gateway.service.feed)
    async with aiohttp.ClientSession() as http:
        session = RawSession(http, gateway.url("everything"), TOKEN_A)
        await session.initialize()
        params = {"name": RESEARCH, "arguments": {"topic": "gateways"}}
        call = asyncio.create_task(session.request("tools/call", params))
        pending = await recorder.status("pending")
        approve = f"{gateway.base}/api/approvals/{pending.id}/approve"
        async with http.post(approve, headers={"Authorization": f"Bearer {BOB_TOKEN}"}) as response:
            assert response.status == 200
        answer = (await asyncio.wait_for(call, WAIT)).last
        tasks = await gateway.app[GATEWAY].call(
            "everything", "tasks/list", {}, prefer_session=pending.session_id
        )
    assert "Research Report: gateways" in answer["result"]["content"][0]["text"]
    assert not answer["result"].get("isError")
    assert [t["status"] for t in tasks["result"]["tasks"]] == ["completed"]
    assert (await recorder.status("completed", pending.id)).id == pending.id
