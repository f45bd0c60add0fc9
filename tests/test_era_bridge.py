"""Initialize-era clients in front of an upstream that speaks only 2026-07-28: the session bridged
request by request, input-required results turned into server→client requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import types
from mcp.shared.exceptions import MCPError

from approvals.proxy.keys import GATEWAY
from tests.conftest import TOKEN_A, WAIT, StartGateway, mcp_client
from tests.modern_kit import ASK_NAME, start_policed
from tests.modern_upstream import start_modern_only
from tests.rawmcp import RawSession

HELD = {"version": "1", "default": "allow", "tools": {"test_simple_text": {"action": "require_approval"}}}


@pytest.fixture
async def modern_url() -> AsyncIterator[str]:
    async with start_modern_only() as url:
        yield url


async def _elicit(context: Any, params: Any) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"name": "Ada"})


async def test_legacy_client_lists_and_calls(start_gateway: StartGateway, modern_url: str) -> None:
    """A 2025-11-25 client initializes, lists and calls; results come without 2026-only fields."""
    gw = await start_gateway({"up": {"url": modern_url}})
    async with mcp_client(gw.url("up"), mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        assert client.server_info is not None
        assert client.server_info.name == "conformance-upstream"
        tools = await client.list_tools()
        result = await client.call_tool("test_simple_text", {})
    assert "test_simple_text" in {tool.name for tool in tools.tools}
    assert result.content[0].text == "This is a simple text response for testing."  # type: ignore[union-attr]
    assert len(gw.app[GATEWAY].sessions) == 0  # the client's session ended with it


async def test_results_carry_no_2026_fields(start_gateway: StartGateway, modern_url: str) -> None:
    """On the wire, a bridged result has no resultType, caching hints or per-result server info."""
    gw = await start_gateway({"up": {"url": modern_url}})
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, gw.url("up"), TOKEN_A)
        initialized = await raw.initialize()
        listed = await raw.request("tools/list")
        called = await raw.request("tools/call", {"name": "test_simple_text", "arguments": {}})
    assert initialized["serverInfo"]["name"] == "conformance-upstream"
    assert "listChanged" not in initialized["capabilities"]["tools"]  # no listen stream to bridge it
    for reply in (listed, called):
        result = reply.last["result"]
        assert not {"resultType", "ttlMs", "cacheScope", "_meta"} & result.keys(), result


async def test_input_required_becomes_an_elicitation_request(
    start_gateway: StartGateway, modern_url: str
) -> None:
    """The upstream's InputRequiredResult reaches the client as elicitation/create; its answer completes."""
    gw = await start_gateway({"up": {"url": modern_url}})
    async with mcp_client(gw.url("up"), mode="legacy", elicitation_callback=_elicit) as client:
        result = await asyncio.wait_for(client.call_tool(ASK_NAME, {}), WAIT)
    assert result.content[0].text == "Hello, Ada!"  # type: ignore[union-attr]


async def test_input_the_client_cannot_give_is_a_clear_error(
    start_gateway: StartGateway, modern_url: str
) -> None:
    """A client without the sampling capability gets -32021 naming sampling, not a hang."""
    gw = await start_gateway({"up": {"url": modern_url}})
    async with mcp_client(gw.url("up"), mode="legacy") as client:
        with pytest.raises(MCPError) as raised:
            await asyncio.wait_for(client.call_tool("test_input_required_result_sampling", {}), WAIT)
    assert raised.value.code == -32021
    assert "sampling" in str(raised.value)


async def test_held_call_is_released_as_a_2026_request(
    start_gateway: StartGateway, tmp_path: Path, modern_url: str
) -> None:
    """A held call of a legacy client, approved, reaches the 2026-only upstream and its result the client."""
    policed = await start_policed(start_gateway, tmp_path, modern_url, HELD, approvals={"hold_seconds": 10})
    async with mcp_client(policed.url, mode="legacy") as client:
        running = asyncio.create_task(client.call_tool("test_simple_text", {}))
        pending = await policed.recorder.status("pending")
        await policed.decide(pending.id, "approve")
        result = await asyncio.wait_for(running, WAIT)
    assert not result.is_error
    assert result.content[0].text == "This is a simple text response for testing."  # type: ignore[union-attr]


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # setLevel: the era's own
async def test_log_level_becomes_each_requests_opt_in(start_gateway: StartGateway, modern_url: str) -> None:
    """logging/setLevel is answered by the bridge and its level sent with every later request, so the
    upstream's log messages reach the client as they would in its own era."""
    gw = await start_gateway({"up": {"url": modern_url}})
    logged: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.append(str(params.data))

    async with mcp_client(gw.url("up"), mode="legacy", logging_callback=on_log) as client:
        await client.set_logging_level("info")
        result = await asyncio.wait_for(client.call_tool("test_tool_with_logging", {}), WAIT)
    assert result.content[0].text == "Logging test completed"  # type: ignore[union-attr]
    assert logged == ["Tool execution started", "Tool processing data", "Tool execution completed"]
