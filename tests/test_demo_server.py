"""End-to-end tests of the demo upstream, driven by the real MCP client over stdio."""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

from mcp import Client, StdioServerParameters
from mcp.client.client import ConnectMode
from mcp.types import CallToolResult, ImageContent, TextContent

EXPECTED_TOOLS = {"generate_image", "send_email", "delete_file", "get_time", "list_files"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVER_ARGS = ["-m", "approvals.demo_server"]


@asynccontextmanager
async def demo_client(tmp_path: Path, *, mode: ConnectMode = "auto", **env: str) -> AsyncIterator[Client]:
    """Spawn `python -m approvals.demo_server` with its outbox and sandbox under `tmp_path`."""
    server_env = {
        **os.environ,
        "APPROVALS_DEMO_OUTBOX": str(tmp_path / "outbox.jsonl"),
        "APPROVALS_DEMO_SANDBOX": str(tmp_path / "sandbox"),
        **env,
    }
    params = StdioServerParameters(command=sys.executable, args=SERVER_ARGS, env=server_env)
    async with Client(params, mode=mode) as client:
        yield client


def text_of(result: CallToolResult) -> str:
    """The concatenated text blocks of a tool result."""
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_lists_five_tools_with_schemas_and_descriptions(tmp_path: Path) -> None:
    """The server names itself, and lists exactly the five tools with typed input schemas."""
    async with demo_client(tmp_path) as client:
        assert client.server_info is not None
        assert client.server_info.name == "approvals-demo"
        assert client.instructions
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == EXPECTED_TOOLS
    for tool in tools.values():
        assert tool.description
        assert tool.input_schema["type"] == "object"
    image_props = tools["generate_image"].input_schema["properties"]
    assert image_props["prompt"]["type"] == "string"
    assert "512x512" in image_props["size"]["enum"]
    assert tools["generate_image"].input_schema["required"] == ["prompt"]
    assert set(tools["send_email"].input_schema["required"]) == {"to", "subject", "body"}
    assert tools["delete_file"].annotations is not None
    assert tools["delete_file"].annotations.destructive_hint is True


async def test_generate_image_returns_png_and_reports_progress(tmp_path: Path) -> None:
    """generate_image returns a valid PNG image block plus text, with progress to completion."""
    updates: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total))

    async with demo_client(tmp_path) as client:
        result = await client.call_tool(
            "generate_image", {"prompt": "a lighthouse", "size": "256x256"}, progress_callback=on_progress
        )
    assert not result.is_error
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    png = base64.b64decode(images[0].data)
    assert png.startswith(PNG_SIGNATURE)
    length, kind = struct.unpack(">I4s", png[8:16])
    assert (length, kind) == (13, b"IHDR")
    assert struct.unpack(">II", png[16:24]) == (64, 64)
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]
    assert png.endswith(b"IEND\xaeB`\x82")
    assert "256x256" in text_of(result)
    assert len(updates) >= 2
    assert updates[-1][0] == updates[-1][1]


async def test_generate_image_rejects_unknown_size(tmp_path: Path) -> None:
    """A size outside the allowed set is a tool error, not a crash."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("generate_image", {"prompt": "x", "size": "9999x9999"})
    assert result.is_error
    assert "size" in text_of(result)


async def test_send_email_appends_to_outbox(tmp_path: Path) -> None:
    """send_email queues the message as one JSONL record and reports its id."""
    async with demo_client(tmp_path) as client:
        message = {"to": "ada@example.com", "subject": "Hi", "body": "Hello"}
        result = await client.call_tool("send_email", message)
    assert not result.is_error
    lines = (tmp_path / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["to"], record["subject"], record["body"]) == ("ada@example.com", "Hi", "Hello")
    assert text_of(result) == f"queued message {record['id']} to ada@example.com"


async def test_send_email_rejects_invalid_recipient(tmp_path: Path) -> None:
    """A malformed address is a tool error and nothing reaches the outbox."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("send_email", {"to": "not an address", "subject": "s", "body": "b"})
    assert result.is_error
    assert "invalid recipient" in text_of(result)
    assert not (tmp_path / "outbox.jsonl").exists()


async def test_list_files_shows_seeded_sandbox(tmp_path: Path) -> None:
    """A sandbox directory that does not exist yet is created with sample files, which list_files shows."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("list_files", {})
    assert not result.is_error
    assert result.structured_content == {"result": ["drafts/todo.md", "notes.txt", "report.csv"]}


async def test_delete_file_removes_file_inside_sandbox(tmp_path: Path) -> None:
    """delete_file deletes a sandbox file and says so; list_files no longer shows it."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("delete_file", {"path": "drafts/todo.md"})
        listing = await client.call_tool("list_files", {})
    assert not result.is_error
    assert text_of(result) == "deleted drafts/todo.md"
    assert not (tmp_path / "sandbox" / "drafts" / "todo.md").exists()
    assert listing.structured_content == {"result": ["notes.txt", "report.csv"]}


async def test_delete_file_reports_missing_file(tmp_path: Path) -> None:
    """Deleting a file that is not there succeeds and says it did not exist."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("delete_file", {"path": "ghost.txt"})
    assert not result.is_error
    assert "did not exist" in text_of(result)


async def test_delete_file_refuses_paths_escaping_sandbox(tmp_path: Path) -> None:
    """Traversal, absolute paths, the sandbox root and symlinks out of it are all refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "link.txt").symlink_to(victim)
    async with demo_client(tmp_path) as client:
        results = [
            await client.call_tool("delete_file", {"path": path})
            for path in ("../victim.txt", str(victim), ".", "link.txt")
        ]
    for result in results:
        assert result.is_error
        assert "refused" in text_of(result)
    assert victim.read_text(encoding="utf-8") == "keep me"


async def test_get_time_returns_iso_time_in_zone(tmp_path: Path) -> None:
    """get_time returns an ISO 8601 timestamp carrying the zone's UTC offset."""
    async with demo_client(tmp_path) as client:
        default = await client.call_tool("get_time", {})
        kolkata = await client.call_tool("get_time", {"timezone": "Asia/Kolkata"})
    assert datetime.fromisoformat(text_of(default)).utcoffset() == timedelta(0)
    assert datetime.fromisoformat(text_of(kolkata)).utcoffset() == timedelta(hours=5, minutes=30)


async def test_get_time_unknown_zone_is_error(tmp_path: Path) -> None:
    """An unknown IANA zone is a tool error naming the zone."""
    async with demo_client(tmp_path) as client:
        result = await client.call_tool("get_time", {"timezone": "Mars/Olympus_Mons"})
    assert result.is_error
    assert "Mars/Olympus_Mons" in text_of(result)


async def test_handshake_era_client_is_served(tmp_path: Path) -> None:
    """A legacy initialize-handshake client negotiates a handshake-era version and can call tools."""
    async with demo_client(tmp_path, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        result = await client.call_tool("get_time", {})
    assert not result.is_error


async def test_auto_client_negotiates_modern_protocol_via_discover(tmp_path: Path) -> None:
    """The default auto client's server/discover probe is answered, so it speaks 2026-07-28."""
    async with demo_client(tmp_path) as client:
        assert client.protocol_version == "2026-07-28"


async def test_default_sandbox_is_temporary_and_removed_on_exit(tmp_path: Path) -> None:
    """Without APPROVALS_DEMO_SANDBOX the server seeds a temp sandbox and deletes it when it exits."""
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "APPROVALS_DEMO_SANDBOX"}
    env["TMPDIR"] = str(temp_root)
    params = StdioServerParameters(command=sys.executable, args=SERVER_ARGS, env=env)
    async with Client(params) as client:
        result = await client.call_tool("list_files", {})
        assert len(list(temp_root.glob("approvals-demo-sandbox-*"))) == 1
    assert result.structured_content == {"result": ["drafts/todo.md", "notes.txt", "report.csv"]}
    assert list(temp_root.iterdir()) == []
