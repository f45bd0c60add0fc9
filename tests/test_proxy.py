"""The gateway as a transparent MCP proxy: real clients, real upstreams, nothing lost or mixed up."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import mcp.types as types
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import (
    DEMO_COMMAND,
    PROBE_COMMAND,
    TOKEN_A,
    WAIT,
    StartGateway,
    mcp_client,
    probe_http,
)
from tests.rawmcp import RawSession
from tests.upstreams import TIME_SERVER_COMMAND


def _without_id(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "id"}


async def test_sdk_client_in_auto_mode_connects_through_the_gateway(start_gateway: StartGateway) -> None:
    """mcp.Client's default auto mode speaks 2026-07-28 through the gateway and reaches the demo upstream."""
    gw = await start_gateway({"demo": {"command": DEMO_COMMAND}})
    async with mcp_client(gw.url("demo")) as client:
        assert client.protocol_version == "2026-07-28"
        assert client.server_info is not None
        assert client.server_info.name == "approvals-demo"
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} >= {"generate_image", "send_email", "delete_file", "get_time"}


async def test_stdio_upstream_answers_are_identical_to_a_direct_connection(
    start_gateway: StartGateway,
) -> None:
    """mcp-server-time over stdio: tools/list and tools/call through the gateway equal a direct session's."""
    gw = await start_gateway({"time": {"command": TIME_SERVER_COMMAND}})
    direct_params = StdioServerParameters(command=TIME_SERVER_COMMAND[0], args=TIME_SERVER_COMMAND[1:])
    args = {"source_timezone": "UTC", "time": "12:30", "target_timezone": "Asia/Tokyo"}
    async with Client(direct_params, mode="legacy") as direct, mcp_client(gw.url("time")) as proxied:
        assert (await proxied.list_tools()).model_dump() == (await direct.list_tools()).model_dump()
        via_gateway = await proxied.call_tool("convert_time", args)
        straight = await direct.call_tool("convert_time", args)
        assert via_gateway.model_dump() == straight.model_dump()
        assert not via_gateway.is_error


async def test_http_upstream_bytes_are_passed_through_unchanged(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """server-everything over Streamable HTTP: raw JSON answers via the gateway equal direct ones."""
    gw = await start_gateway({"everything": {"url": everything_url}})
    async with aiohttp.ClientSession() as http:
        direct = RawSession(http, everything_url)
        proxied = RawSession(http, gw.url("everything"), token=TOKEN_A)
        assert await proxied.initialize() == await direct.initialize()
        for method, params in [
            ("tools/list", {}),
            ("tools/call", {"name": "echo", "arguments": {"message": "héllo <b>&</b>"}}),
            ("tools/call", {"name": "get-sum", "arguments": {"a": 2, "b": 40}}),
            ("prompts/list", {}),
            ("ping", None),
        ]:
            a, b = await proxied.request(method, params), await direct.request(method, params)
            # Answers only: server-everything may put unrelated messages (its roots/list request, a
            # log line) on whichever stream is open, and the gateway routes those to the GET stream.
            assert _without_id(a.last) == _without_id(b.last), method
            assert a.last["id"] == proxied._next


async def test_progress_notifications_reach_the_client(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """Progress from trigger-long-running-operation arrives at the client, in order, then the result."""
    gw = await start_gateway({"everything": {"url": everything_url}})
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with mcp_client(gw.url("everything")) as client:
        result = await client.call_tool(
            "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
        )
    assert seen == [1, 2, 3]
    assert "completed" in result.content[0].text  # type: ignore[union-attr]


async def test_sampling_request_reaches_the_client_and_its_answer_the_server(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """A server→client sampling request is routed to the right client; its answer goes back up."""
    gw = await start_gateway({"everything": {"url": everything_url}})
    asked: list[str] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="a sampled reply"),
            model="test-model",
        )

    async with mcp_client(gw.url("everything"), mode="legacy", sampling_callback=sample) as client:
        result = await client.call_tool("trigger-sampling-request", {"prompt": "write a haiku"})
    assert asked
    assert "write a haiku" in asked[0]
    assert "a sampled reply" in str(result.model_dump())


async def test_elicitation_request_reaches_the_client_and_its_answer_the_server(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """A server→client elicitation request reaches the client; the accepted content reaches the server."""
    gw = await start_gateway({"everything": {"url": everything_url}})

    async def elicit(context: Any, params: Any) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace"})

    async with mcp_client(gw.url("everything"), mode="legacy", elicitation_callback=elicit) as client:
        result = await client.call_tool("trigger-elicitation-request", {})
    assert "Ada Lovelace" in str(result.model_dump())


async def test_roots_request_from_a_stdio_upstream_reaches_the_client(start_gateway: StartGateway) -> None:
    """A stdio upstream's roots/list request is answered by the client that made the call."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})

    async def roots(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///home/agent/project")])  # type: ignore[arg-type]

    async with mcp_client(gw.url("probe"), mode="legacy", list_roots_callback=roots) as client:
        result = await client.call_tool("ask_roots", {})
    assert "file:///home/agent/project" in str(result.model_dump())


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_cancellation_reaches_the_upstream(start_gateway: StartGateway, transport: str) -> None:
    """notifications/cancelled from the client reaches the upstream under the upstream's request id."""
    async with probe_http() as probe_url:
        upstream = {"command": PROBE_COMMAND} if transport == "stdio" else {"url": probe_url}
        gw = await start_gateway({"probe": upstream})
        async with aiohttp.ClientSession() as http:
            raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
            await raw.initialize()
            block_call = {"name": "block", "arguments": {"key": "k"}}
            block_id = "block-1"
            blocked = asyncio.create_task(
                raw.post({"jsonrpc": "2.0", "id": block_id, "method": "tools/call", "params": block_call})
            )
            started = await raw.request(
                "tools/call", {"name": "await_mark", "arguments": {"key": "k", "mark": "started"}}
            )
            assert "started" in str(started.last)
            await raw.notify(
                "notifications/cancelled", {"requestId": block_id, "reason": "user pressed stop"}
            )
            cancelled = await raw.request(
                "tools/call", {"name": "await_mark", "arguments": {"key": "k", "mark": "cancelled"}}
            )
            assert "cancelled" in str(cancelled.last)
            # The cancelled request's own POST ends without an answer, as the spec says.
            reply = await asyncio.wait_for(blocked, WAIT)
            assert all("result" not in m for m in reply.messages)
