"""MCP Tasks (2025-11-25) for held calls: the approval is the task, through a real gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import approvals.proxy.tasks
from approvals.core.model import Approval
from approvals.jsonrpc import INVALID_PARAMS
from approvals.proxy.sse import read_events
from approvals.proxy.tasks import task_of
from tests.approvals_kit import HELD_POLICY, Held, start_held
from tests.conftest import TOKEN_A, TOKEN_B, WAIT, StartGateway
from tests.rawmcp import ACCEPT, RawSession

EMAIL = {"to": "ops@example.com", "subject": "s", "body": "b"}
NODE_CLIENT = Path(__file__).parent / "node" / "tasks_client_v1.mjs"


@asynccontextmanager
async def raw(held: Held, token: str = TOKEN_A) -> AsyncIterator[RawSession]:
    async with aiohttp.ClientSession() as http:
        session = RawSession(http, held.url(), token)
        await session.initialize({"tasks": {}})
        yield session


def email(n: int = 0) -> dict[str, Any]:
    return {**EMAIL, "subject": f"s{n}"}


async def task_call(session: RawSession, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task-augmented send_email; the CreateTaskResult's task."""
    params = {"name": "send_email", "arguments": arguments or EMAIL, "task": {"ttl": 60000}}
    reply = await session.request("tools/call", params)
    assert reply.status == 200
    task: dict[str, Any] = reply.last["result"]["task"]
    return task


async def error_code(session: RawSession, method: str, params: dict[str, Any]) -> int:
    reply = await session.request(method, params)
    assert reply.status == 200
    assert "result" not in reply.last, reply.last
    code: int = reply.last["error"]["code"]
    return code


async def test_initialize_advertises_tasks_next_to_the_upstreams_capabilities(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """initialize answers with capabilities.tasks (tools/call, list, cancel) and keeps the upstream's."""
    held = await start_held(start_gateway, tmp_path)
    async with aiohttp.ClientSession() as http:
        capabilities = (await RawSession(http, held.url(), TOKEN_A).initialize())["capabilities"]
    assert capabilities["tasks"] == {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
    assert "tools" in capabilities


async def test_tools_that_may_need_approval_offer_tasks(start_gateway: StartGateway, tmp_path: Path) -> None:
    """tools/list marks tools that may be held (require_approval, approval_if) taskSupport optional."""
    rules: dict[str, Any] = {**HELD_POLICY["tools"]}  # type: ignore[dict-item]
    rules["list_files"] = {"approval_if": [{"path": "args.x", "op": "exists"}]}
    policy = {**HELD_POLICY, "tools": rules}
    held = await start_held(start_gateway, tmp_path, policy)
    async with raw(held) as session:
        tools = {t["name"]: t for t in (await session.request("tools/list")).last["result"]["tools"]}
    assert tools["send_email"]["execution"]["taskSupport"] == "optional"
    assert tools["list_files"]["execution"]["taskSupport"] == "optional"
    assert tools["get_time"].get("execution", {}).get("taskSupport") in (None, "forbidden")


async def test_held_task_call_is_answered_at_once_with_the_approval_as_task(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A held call sent as a task gets a working task whose id is the pending approval's."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        task = await task_call(session)
        pending = await held.recorder.status("pending")
        got = (await session.request("tasks/get", {"taskId": task["taskId"]})).last["result"]
    assert task["taskId"] == pending.id
    assert task["status"] == got["status"] == "working"
    assert pending.id in task["statusMessage"]
    assert {"createdAt", "lastUpdatedAt", "ttl", "pollInterval"} <= task.keys()
    assert held.sent() == []


async def test_task_result_waits_for_the_approval_and_returns_the_tool_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """tasks/result blocks until the reviewer approves, then returns what tools/call would have."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        task = await task_call(session)
        result = asyncio.create_task(session.request("tasks/result", {"taskId": task["taskId"]}))
        await held.recorder.status("pending")
        assert not result.done()
        assert (await held.api("POST", f"/api/approvals/{task['taskId']}/approve"))[0] == 200
        answer = (await asyncio.wait_for(result, WAIT)).last["result"]
        got = (await session.request("tasks/get", {"taskId": task["taskId"]})).last["result"]
    assert answer["isError"] is False
    assert "queued message" in answer["content"][0]["text"]
    assert answer["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}
    assert got["status"] == "completed"
    assert len(held.sent()) == 1
    await held.gateway.service.settled()
    stored = await held.gateway.service.get(task["taskId"])
    assert stored is not None
    assert stored.result_delivered


async def test_denied_task_completes_with_the_denial_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A denied task is completed, and its result is the isError answer a held call gets."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        task = await task_call(session)
        body = {"reason": "no"}
        assert (await held.api("POST", f"/api/approvals/{task['taskId']}/deny", body=body))[0] == 200
        got = (await session.request("tasks/get", {"taskId": task["taskId"]})).last["result"]
        answer = (await session.request("tasks/result", {"taskId": task["taskId"]})).last["result"]
    assert got["status"] == "completed"
    assert answer["isError"] is True
    assert answer["_meta"]["approvals"]["code"] == "denied_by_reviewer"
    assert held.sent() == []


async def test_cancelled_task_withdraws_the_approval_and_has_no_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """tasks/cancel cancels the pending approval; its result and a second cancel are -32602."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        task = await task_call(session)
        cancelled = (await session.request("tasks/cancel", {"taskId": task["taskId"]})).last["result"]
        assert cancelled["status"] == "cancelled"
        await held.recorder.status("cancelled", task["taskId"])
        assert await error_code(session, "tasks/result", {"taskId": task["taskId"]}) == INVALID_PARAMS
        assert await error_code(session, "tasks/cancel", {"taskId": task["taskId"]}) == INVALID_PARAMS
    assert (await held.api("POST", f"/api/approvals/{task['taskId']}/approve"))[0] == 409


async def test_task_list_shows_only_the_grants_tasks_newest_first_in_pages(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tasks/list pages through the calling grant's tasks, newest first; a bad cursor is -32602."""
    monkeypatch.setattr(approvals.proxy.tasks, "PAGE_SIZE", 1)
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as a, raw(held, TOKEN_B) as b:
        first = await task_call(a, email(1))
        await held.recorder.status("pending", first["taskId"])
        second = await task_call(a, email(2))
        theirs = await task_call(b, email(3))
        page = (await a.request("tasks/list")).last["result"]
        rest = (await a.request("tasks/list", {"cursor": page["nextCursor"]})).last["result"]
        b_page = (await b.request("tasks/list")).last["result"]
        assert await error_code(a, "tasks/list", {"cursor": "not-ours"}) == INVALID_PARAMS
    assert [t["taskId"] for t in page["tasks"] + rest["tasks"]] == [second["taskId"], first["taskId"]]
    assert "nextCursor" not in rest
    assert [t["taskId"] for t in b_page["tasks"]] == [theirs["taskId"]]


async def test_bad_task_requests_get_clear_errors_and_never_leak(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Garbage task params, unknown ids and another grant's task id are all -32602, nothing shown."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as a, raw(held, TOKEN_B) as b:
        task = await task_call(a)
        bad: object
        for bad in (5, "soon", [], {"ttl": -1}, {"ttl": "1"}):
            params: dict[str, Any] = {"name": "send_email", "arguments": email(9), "task": bad}
            assert await error_code(a, "tools/call", params) == INVALID_PARAMS
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            ids: list[dict[str, Any]] = [
                {},
                {"taskId": 7},
                {"taskId": ""},
                {"taskId": "x" * 300},
                {"taskId": "no"},
            ]
            for wrong in ids:
                assert await error_code(a, method, wrong) == INVALID_PARAMS
            assert await error_code(b, method, {"taskId": task["taskId"]}) == INVALID_PARAMS
        still = (await a.request("tasks/get", {"taskId": task["taskId"]})).last["result"]
    assert still["status"] == "working"  # b's cancel did not reach it
    assert [a.id for _, a in held.recorder.seen if a.status == "pending"] == [task["taskId"]]


async def test_allowed_call_with_a_task_passes_through(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A task-augmented call the policy allows goes to the upstream as sent (no task is made here)."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        params = {"name": "get_time", "arguments": {}, "task": {"ttl": 1000}}
        answer = (await session.request("tools/call", params)).last["result"]
    assert "content" in answer
    assert "task" not in answer
    assert held.recorder.seen == []


async def test_decision_is_sent_as_a_task_status_notification(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The session's GET stream hears notifications/tasks/status when the reviewer decides."""
    held = await start_held(start_gateway, tmp_path)
    async with raw(held) as session:
        headers = {**session.headers(), "Accept": ACCEPT}
        async with session.http.get(held.url(), headers=headers) as stream:
            task = await task_call(session)
            assert (await held.api("POST", f"/api/approvals/{task['taskId']}/deny"))[0] == 200
            async with asyncio.timeout(WAIT):
                async for event in read_events(stream.content):
                    notice = json.loads(event.data)
                    if notice.get("method") == "notifications/tasks/status":
                        break
    assert notice["params"]["taskId"] == task["taskId"]
    assert notice["params"]["status"] == "completed"


def test_upstream_error_makes_a_failed_task() -> None:
    """A released call the upstream answered with a JSON-RPC error is a failed task."""
    error = json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "boom"}})
    base = Approval(
        id="a" * 32, upstream="demo", tool="t", arguments_json="{}", args_sha256="", tool_json="",
        tool_sha256="", grant="g", owner=None, session_id="s", rule="t", explanation="",
        status="failed", created_at=1.0, expires_at=2.0, finished_at=3.0, result_json=error,
    )  # fmt: skip
    assert task_of(base, 3.0)["status"] == "failed"


# ---- the TypeScript SDK v1 ---------------------------------------------------------------------


@asynccontextmanager
async def node_process(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Node client script running with its stdout piped (one JSON line per step), killed at the end."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@asynccontextmanager
async def node_client(held: Held) -> AsyncIterator[asyncio.subprocess.Process]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    async with node_process(node, str(NODE_CLIENT), held.url(), TOKEN_A) as process:
        yield process


async def next_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), WAIT)
    assert line, "the client ended early"
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def past_client_timeout(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """The client's task lines until it has polled for longer than its 2 s request timeout."""
    while (line := await next_line(process))["type"] != "taskStatus" or line["elapsedMs"] <= 2500:
        assert line["type"] in ("tools", "taskCreated", "taskStatus"), line
    return line


async def test_sdk_v1_task_approved_after_the_client_timeout_gets_the_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """SDK v1 callToolStream: a held call approved after the client's timeout still gets its result."""
    held = await start_held(start_gateway, tmp_path)
    async with node_client(held) as client:
        status = await past_client_timeout(client)
        assert status["status"] == "working"
        pending = await held.recorder.status("pending", status["taskId"])
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 200
        while (line := await next_line(client))["type"] == "taskStatus":
            pass
        assert await asyncio.wait_for(client.wait(), WAIT) == 0
    assert line["type"] == "result"
    assert line["result"]["isError"] is False
    assert len(held.sent()) == 1


async def test_sdk_v1_denied_task_gets_the_error_result(start_gateway: StartGateway, tmp_path: Path) -> None:
    """SDK v1 callToolStream: a denied held call ends with the isError denial result."""
    held = await start_held(start_gateway, tmp_path)
    async with node_client(held) as client:
        status = await past_client_timeout(client)
        assert (await held.api("POST", f"/api/approvals/{status['taskId']}/deny"))[0] == 200
        while (line := await next_line(client))["type"] == "taskStatus":
            pass
    assert line["type"] == "result"
    assert line["result"]["isError"] is True
    assert line["result"]["_meta"]["approvals"]["code"] == "denied_by_reviewer"


async def test_upstream_tasks_pass_through_next_to_the_gateways(
    start_gateway: StartGateway, tmp_path: Path, everything_url: str
) -> None:
    """An upstream's own tasks (taskSupport "required" kept) are created and read at the upstream."""
    policy = {"version": "1", "default": "allow", "tools": {"echo": {"action": "require_approval"}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    gateway = await start_gateway({"everything": {"url": everything_url, "policy": "policy.json"}})
    async with aiohttp.ClientSession() as http:
        session = RawSession(http, gateway.url("everything"), TOKEN_A)
        capabilities = (await session.initialize({"tasks": {}}))["capabilities"]
        listed = (await session.request("tools/list")).last["result"]["tools"]
        support = {t["name"]: t.get("execution", {}).get("taskSupport") for t in listed}
        research = {"name": "simulate-research-query", "arguments": {"topic": "x"}, "task": {"ttl": 60000}}
        theirs = (await session.request("tools/call", research)).last["result"]["task"]
        got = (await session.request("tasks/get", {"taskId": theirs["taskId"]})).last["result"]
        held = {"name": "echo", "arguments": {"message": "hi"}, "task": {}}
        ours = (await session.request("tools/call", held)).last["result"]["task"]
        mine = [t["taskId"] for t in (await session.request("tasks/list")).last["result"]["tasks"]]
    assert capabilities["tasks"]["requests"]["tools"]["call"] == {}
    assert support["simulate-research-query"] == "required"
    assert support["echo"] == "optional"
    assert got["taskId"] == theirs["taskId"]
    assert await gateway.service.get(theirs["taskId"]) is None
    assert mine == [ours["taskId"]]
