"""Approvals across a crash: `approvals serve` as a real subprocess, killed with SIGKILL and restarted.

The store is the only thing that survives, so every check here is about what the next gateway reads
from it: a pending request is still pending, a release cut short is never sent again, and a timeout
keeps running while no gateway is up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from approvals.config import sha256_hex
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, PROBE, TOKEN_A, WAIT, mcp_client
from tests.rawmcp import RawSession
from tests.test_cli import Served, serving

EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}
DEMO = ["python", "-m", "approvals.demo_server"]
PROBE_SERVER = ["python", str(PROBE)]
EMAIL_HELD = {
    "version": "1",
    "default": "deny",
    "tools": {"send_email": {"action": "require_approval"}, "get_time": {}},
}
BLOCK_HELD = {
    "version": "1",
    "default": "deny",
    "tools": {"block": {"action": "require_approval"}, "await_mark": {}},
}
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=WAIT)


def write_gateway(
    workdir: Path,
    policy: dict[str, Any],
    *,
    command: list[str] = DEMO,
    hold_seconds: float = 1,
) -> None:
    """gateway.toml and policy.json in `workdir`: upstream `demo`, grant agent-a (run by alice),
    reviewers alice and bob, the store in approvals.db and the demo's outbox in outbox.jsonl."""
    (workdir / "policy.json").write_text(json.dumps(policy))
    toml = f"""
[server]
host = "127.0.0.1"

[store]
path = "approvals.db"

[approvals]
hold_seconds = {hold_seconds}

[upstreams.demo]
command = {json.dumps(command)}
policy = "policy.json"
env = {{ APPROVALS_DEMO_OUTBOX = {json.dumps(str(workdir / "outbox.jsonl"))} }}

[[grants]]
name = "agent-a"
token_sha256 = "{sha256_hex(TOKEN_A)}"
owner = "alice"

[[reviewers]]
name = "alice"
token_sha256 = "{sha256_hex(ALICE_TOKEN)}"

[[reviewers]]
name = "bob"
token_sha256 = "{sha256_hex(BOB_TOKEN)}"
"""
    (workdir / "gateway.toml").write_text(toml)


def sent(workdir: Path) -> list[dict[str, Any]]:
    """What the demo upstream really sent (its outbox)."""
    outbox = workdir / "outbox.jsonl"
    if not outbox.exists():
        return []
    return [json.loads(line) for line in outbox.read_text().splitlines()]


async def api(base: str, method: str, path: str, token: str = BOB_TOKEN, body: Any = None) -> tuple[int, Any]:
    """One reviewer request to the JSON API: (HTTP status, JSON body)."""
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.request(
            method, f"{base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        return answer.status, await answer.json()


@dataclass
class Gateway:
    """A running `approvals serve` with a configured grant and reviewers."""

    served: Served

    @property
    def url(self) -> str:
        """The MCP URL of upstream `demo`."""
        return self.served.url

    @property
    def base(self) -> str:
        return self.url.rsplit("/mcp/", 1)[0]

    async def api(self, method: str, path: str, token: str = BOB_TOKEN, body: Any = None) -> tuple[int, Any]:
        return await api(self.base, method, path, token, body)

    async def events(self, approval_id: str | None = None) -> list[str]:
        """The audit log's event names (of one approval, or all), oldest first."""
        query = f"?approval_id={approval_id}" if approval_id else "?limit=1000"
        status, body = await self.api("GET", f"/api/audit{query}")
        assert status == 200, body
        return [event["event"] for event in body["events"]]

    async def kill_9(self) -> None:
        """SIGKILL: no shutdown code runs. Its stdio upstreams are orphaned; they are ended too."""
        upstreams = self.served.children()
        self.served.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.served.process.wait(), WAIT)
        for pid in upstreams:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _listening(line: str) -> bool:
    return "MCP URL for upstream 'demo'" in line  # the banner's last line without development tokens


@asynccontextmanager
async def gateway(workdir: Path) -> AsyncIterator[Gateway]:
    """`approvals serve --port 0` on `workdir`'s gateway.toml, once its banner is out; killed at the end."""
    async with serving(workdir, banner_end=_listening) as served:
        yield Gateway(served)


@asynccontextmanager
async def agent(url: str) -> AsyncIterator[tuple[Client, asyncio.Event]]:
    """An SDK client as agent-a, and an event set when the gateway starts answering a tools/call.

    A held call's SSE answer starts only once the call is attached to its approval, so the event
    says "held" without polling.
    """
    answering = asyncio.Event()

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "POST" and b'"tools/call"' in response.request.content:
            answering.set()

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {TOKEN_A}"},
        timeout=httpx2.Timeout(WAIT),
        event_hooks={"response": [on_response]},
    )
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client, answering


def approvals_meta(result: Any) -> dict[str, Any]:
    """`_meta.approvals` of an SDK CallToolResult."""
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


def text_of(result: Any) -> str:
    return result.content[0].text  # type: ignore[no-any-return]


async def raw_call(session: RawSession, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tools/call over a raw session: its result (the test fails on a JSON-RPC error)."""
    reply = await asyncio.wait_for(
        session.request("tools/call", {"name": tool, "arguments": arguments}), WAIT
    )
    assert "result" in reply.last, reply
    result: dict[str, Any] = reply.last["result"]
    return result


async def test_pending_approvals_survive_kill_9(tmp_path: Path) -> None:
    """A pending approval outlives SIGKILL; approved on the next gateway it is released once, and the
    agent's repeat call receives the real result."""
    loop = asyncio.get_running_loop()
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=1)
    async with gateway(tmp_path) as first:
        async with mcp_client(first.url) as client:
            pending = await client.call_tool("send_email", EMAIL)
        assert pending.is_error
        meta = approvals_meta(pending)
        assert meta["code"] == "approval_pending"
        approval_id = meta["approval_id"]
        await first.kill_9()
    write_gateway(tmp_path, EMAIL_HELD, hold_seconds=10)  # long enough to hold the repeat call
    started = loop.time()
    async with gateway(tmp_path) as second:
        banner_seconds = loop.time() - started
        status, body = await second.api("GET", "/api/approvals?status=pending")
        assert status == 200
        assert [(a["id"], a["arguments"]) for a in body["approvals"]] == [(approval_id, EMAIL)]
        async with agent(second.url) as (client, answering):
            repeat = asyncio.create_task(client.call_tool("send_email", EMAIL))
            await asyncio.wait_for(answering.wait(), WAIT)  # held on the recovered record
            approved_at = loop.time()
            status, body = await second.api(
                "POST", f"/api/approvals/{approval_id}/approve", body={"reason": "ok"}
            )
            assert (status, body["status"], body["decided_by"]) == (200, "approved", "bob")
            result = await asyncio.wait_for(repeat, WAIT)
            answer_seconds = loop.time() - approved_at
        assert not result.is_error, result
        assert text_of(result).startswith("queued message")
        status, body = await second.api("GET", f"/api/approvals/{approval_id}")
        assert body["status"] == "completed"
        assert await second.events(approval_id) == ["created", "approved", "released", "completed"]
    assert [{k: m[k] for k in EMAIL} for m in sent(tmp_path)] == [EMAIL]
    print(
        f"\nrestart: banner {banner_seconds * 1000:.0f} ms after start;"
        f" repeat call answered {answer_seconds * 1000:.0f} ms after approve"
    )


@asynccontextmanager
async def interrupted_release(workdir: Path) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway restarted after SIGKILL while an approved `block` call was running upstream.

    Yields the new gateway and the approval's id.
    """
    write_gateway(workdir, BLOCK_HELD, command=PROBE_SERVER, hold_seconds=1)
    async with gateway(workdir) as first, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        session = RawSession(http, first.url, token=TOKEN_A)
        await session.initialize()
        pending = await raw_call(session, "block", {"key": "k"})
        approval_id = pending["_meta"]["approvals"]["approval_id"]
        status, body = await first.api("POST", f"/api/approvals/{approval_id}/approve")
        assert (status, body["status"]) == (200, "approved")
        # The release goes through this client's session while it is open, so to the same probe
        # process: `started` means the call is running upstream (and `released` is stored).
        mark = await raw_call(session, "await_mark", {"key": "k", "mark": "started"})
        assert mark["content"][0]["text"] == "started"
        status, body = await first.api("GET", f"/api/approvals/{approval_id}")
        assert body["status"] == "released"
        await first.kill_9()
    async with gateway(workdir) as second:
        yield second, approval_id


async def test_release_interrupted_by_kill_9_is_never_repeated(tmp_path: Path) -> None:
    """A call released when the gateway was killed is failed as `interrupted` on restart, never sent again."""
    async with interrupted_release(tmp_path) as (second, approval_id):
        status, body = await second.api("GET", f"/api/approvals/{approval_id}")
        assert (status, body["status"], body["reason"]) == (200, "failed", "interrupted")
        assert await second.events(approval_id) == ["created", "approved", "released", "failed"]
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            session = RawSession(http, second.url, token=TOKEN_A)
            await session.initialize()
            repeat = await raw_call(session, "block", {"key": "k"})
        assert repeat["isError"] is True
        assert (await second.events()).count("released") == 1  # the tool was not called again


async def test_repeat_call_after_an_interrupted_release_is_told_it_was_interrupted(tmp_path: Path) -> None:
    """The agent's repeat call of an interrupted release gets `release_interrupted`, not a new request."""
    async with interrupted_release(tmp_path) as (second, approval_id):
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            session = RawSession(http, second.url, token=TOKEN_A)
            await session.initialize()
            repeat = await raw_call(session, "block", {"key": "k"})
        _, listed = await second.api("GET", "/api/approvals")
        assert [a["id"] for a in listed["approvals"]] == [approval_id]
        assert repeat["_meta"]["approvals"]["code"] == "release_interrupted"
        assert repeat["_meta"]["approvals"]["approval_id"] == approval_id


async def test_expiry_is_enforced_after_restart(tmp_path: Path) -> None:
    """A request's timeout runs on while the gateway is down: after it, approving is 409 `expired`."""
    policy = {
        **EMAIL_HELD,
        "tools": {"send_email": {"action": "require_approval", "approval": {"timeout": "2s"}}},
    }
    write_gateway(tmp_path, policy, hold_seconds=1)
    async with gateway(tmp_path) as first:
        async with mcp_client(first.url) as client:
            pending = await client.call_tool("send_email", EMAIL)
        assert approvals_meta(pending)["code"] == "approval_pending"
        approval_id = approvals_meta(pending)["approval_id"]
        await first.kill_9()
    write_gateway(tmp_path, policy, hold_seconds=10)
    async with gateway(tmp_path) as second:
        # The repeat call is held on the recovered record until the timeout expires it: no sleeping.
        async with mcp_client(second.url) as client:
            repeat = await client.call_tool("send_email", EMAIL)
        assert approvals_meta(repeat)["code"] == "approval_expired"
        assert approvals_meta(repeat)["approval_id"] == approval_id
        status, body = await second.api("POST", f"/api/approvals/{approval_id}/approve")
        assert (status, body["status"]) == (409, "expired")
        assert await second.events(approval_id) == ["created", "expired"]
    assert sent(tmp_path) == []
