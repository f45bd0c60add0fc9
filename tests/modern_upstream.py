"""Upstreams of one protocol era: tests/conformance_upstream.py's server (which serves both) behind a
filter that refuses the other era.

    python tests/modern_upstream.py [modern|legacy]   # Streamable HTTP on 127.0.0.1, "LISTENING <port>"

The `mcp` SDK's MCPServer serves both eras on one endpoint and has no option to drop one, so the
filter does it. `modern` (2026-07-28 only, what a server built for that revision alone does): a
POST without a 2026-07-28 `MCP-Protocol-Version` header (an `initialize`, anything of a session)
gets 400 with -32022 and the versions served; GET and DELETE (session streams) get 405.
`legacy` (initialize era only, what servers before 2026 do): a 2026-07-28 request gets 400.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

MODERN = "2026-07-28"
SCRIPT = Path(__file__).resolve()
READY_TIMEOUT = 30.0


class OneEra:
    """ASGI middleware: only requests of one era reach the app."""

    def __init__(self, app: ASGIApp, era: str) -> None:
        self.app = app
        self.era = era

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        modern = headers.get("mcp-protocol-version") == MODERN
        if self.era == "legacy" and modern:
            error = {"code": -32600, "message": "this server speaks only the initialize era"}
            await _answer(send, 400, {"jsonrpc": "2.0", "id": None, "error": error}, {})
        elif self.era == "legacy":
            await self.app(scope, receive, send)
        elif scope["method"] != "POST":
            await _answer(send, 405, None, {"Allow": "POST"})
        elif not modern:
            body = {
                "jsonrpc": "2.0",
                "id": None,
                "error": {
                    "code": -32022,
                    "message": f"this server speaks only MCP {MODERN} (no initialize)",
                    "data": {"supported": [MODERN], "requested": headers.get("mcp-protocol-version")},
                },
            }
            await _answer(send, 400, body, {})
        else:
            await self.app(scope, receive, send)


async def _answer(send: Send, status: int, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if body is not None:
        raw.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


@asynccontextmanager
async def start_modern_only() -> AsyncIterator[str]:
    """The 2026-07-28-only upstream in a child process; yields its /mcp URL."""
    async with start_one_era("modern") as url:
        yield url


@asynccontextmanager
async def start_one_era(era: str) -> AsyncIterator[str]:
    """The upstream of `era` ("modern" or "legacy") in a child process; yields its /mcp URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), era, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
        assert line.startswith(b"LISTENING "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.kill()
        await process.wait()


async def _serve_http(era: str) -> None:
    import uvicorn

    sys.path.insert(0, str(SCRIPT.parent))  # run as a script: the fixtures' server is beside it
    from conformance_upstream import server
    from mcp.server.lowlevel.server import NotificationOptions

    @server.tool()
    def matrix_echo(message: str) -> str:
        """Echo the message (the tool tests/test_client_matrix.py holds on this upstream)."""
        return message

    if era == "legacy":
        # Its trigger tools do announce list changes on the session's stream: say so, as an
        # initialize-era server that sends them does (the SDK's default declares none).
        lowlevel = server._lowlevel_server
        options = NotificationOptions(prompts_changed=True, tools_changed=True)
        default = lowlevel.create_initialization_options
        lowlevel.create_initialization_options = lambda *a, **k: default(options)  # type: ignore[method-assign]

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(OneEra(server.streamable_http_app(), era), log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(_serve_http(sys.argv[1] if len(sys.argv) > 1 else "modern"))
