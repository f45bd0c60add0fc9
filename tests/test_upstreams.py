"""The real upstream servers start and answer the real ``mcp`` SDK client directly (no gateway)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, TextContent

from tests import upstreams
from tests.upstreams import (
    MODELSCOPE_COMMAND,
    MODELSCOPE_OFFLINE_ENV,
    TIME_SERVER_COMMAND,
    UpstreamStartError,
    start_everything,
    stdio_server,
)


@pytest.fixture
async def everything_url() -> AsyncIterator[str]:
    async with start_everything() as url:
        yield url


async def test_everything_serves_mcp_on_loopback(everything_url: str) -> None:
    """server-everything is reachable at a 127.0.0.1 /mcp URL and lists its tools."""
    assert everything_url.startswith("http://127.0.0.1:")
    assert everything_url.endswith("/mcp")
    async with Client(everything_url) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("echo", {"message": "hi"})
    assert {"echo", "get-sum", "trigger-long-running-operation", "toggle-simulated-logging"} <= tools
    assert result.content == [TextContent(type="text", text="Echo: hi")]


async def test_everything_sends_progress(everything_url: str) -> None:
    """trigger-long-running-operation reports one progress notification per step."""
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with Client(everything_url) as client:
        result = await client.call_tool(
            "trigger-long-running-operation", {"duration": 0.2, "steps": 2}, progress_callback=on_progress
        )
    assert not result.is_error
    assert seen == [(1, 2), (2, 2)]


async def test_everything_instances_are_independent() -> None:
    """Two concurrent start_everything() calls get different ports."""
    async with start_everything() as first, start_everything() as second:
        assert first != second


async def test_everything_missing_node_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without tests/node/node_modules the helper says how to install it."""
    monkeypatch.setattr(upstreams, "EVERYTHING_ENTRY", tmp_path / "missing" / "index.js")
    with pytest.raises(UpstreamStartError, match=r"npm ci --prefix tests/node"):
        async with start_everything():
            pass


async def test_everything_reports_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that dies before listening is reported with its exit code and output."""

    def crashing(node: str = "node") -> list[str]:
        return [node, "-e", "console.error('boom'); process.exit(3)"]

    monkeypatch.setattr(upstreams, "everything_command", crashing)
    with pytest.raises(UpstreamStartError, match=r"(?s)exit code 3.*boom"):
        async with start_everything():
            pass


async def test_time_server_get_current_time() -> None:
    """mcp-server-time over stdio answers get_current_time for UTC."""
    async with Client(stdio_server(TIME_SERVER_COMMAND)) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("get_current_time", {"timezone": "UTC"})
    assert tools == {"get_current_time", "convert_time"}
    assert not result.is_error
    assert result.structured_content is not None
    assert result.structured_content["timezone"] == "UTC"


async def test_modelscope_offline(tmp_path: Path) -> None:
    """modelscope-mcp-server lists tools offline and rejects generate_image fast without a token."""
    # cwd: it reads .env from there.
    params = stdio_server(MODELSCOPE_COMMAND, cwd=tmp_path, env=MODELSCOPE_OFFLINE_ENV)
    async with Client(params) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        started = time.monotonic()
        with pytest.raises(MCPError, match="API token is not set") as error:
            await client.call_tool("generate_image", {"prompt": "a cat"})
        elapsed = time.monotonic() - started
    assert {"generate_image", "search_models", "get_current_user"} <= tools
    assert error.value.code == INVALID_PARAMS
    assert elapsed < 5
