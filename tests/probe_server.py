"""A real MCP server (the SDK's MCPServer) with tools that let tests observe the gateway from upstream.

    python tests/probe_server.py            # stdio
    python tests/probe_server.py --http     # Streamable HTTP on 127.0.0.1, prints "LISTENING <port>"

`block` runs until it is cancelled and `await_mark` waits for it to start or to be cancelled, so
a test can see, without polling, that a client's cancellation reached the upstream; `headers`
returns the HTTP headers the upstream received (credential checks); `redefine_echo` changes a
tool's definition; `exit_now` kills the process mid-call; `ask_roots` asks the client for its
roots (a server-to-client request).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

server: MCPServer[Any] = MCPServer("probe")


@server.tool()
async def echo(text: str) -> str:
    """Return the text."""
    return text


_events: dict[str, asyncio.Event] = {}


def _event(name: str) -> asyncio.Event:
    return _events.setdefault(name, asyncio.Event())


@server.tool()
async def block(key: str) -> str:
    """Block until cancelled, marking `key` started, then cancelled."""
    _event(f"{key}:started").set()
    try:
        await asyncio.Event().wait()
    finally:
        _event(f"{key}:cancelled").set()
    return "unreachable"


@server.tool()
async def await_mark(key: str, mark: str) -> str:
    """Wait (up to 20 s) until `block(key)` reached `mark` ("started" or "cancelled")."""
    try:
        await asyncio.wait_for(_event(f"{key}:{mark}").wait(), 20)
    except TimeoutError:
        return "timeout"
    return mark


@server.tool()
async def redefine_echo(description: str) -> str:
    """Replace the echo tool's definition (same behaviour, new description), as a server update would."""
    server.remove_tool("echo")
    server.add_tool(echo, name="echo", description=description)
    return "redefined"


@server.tool()
async def exit_now(code: int = 3) -> str:
    """Exit the server process at once, mid-call."""
    os._exit(code)


@server.tool()
async def headers(ctx: Context) -> dict[str, str]:
    """The HTTP request headers this call arrived with (empty on stdio)."""
    return dict(ctx.headers or {})


@server.tool()
async def ask_roots(ctx: Context) -> list[str]:
    """Ask the client for its roots and return their URIs."""
    result = await ctx.session.list_roots()
    return [str(root.uri) for root in result.roots]


async def _serve_http() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    if "--http" in sys.argv:
        asyncio.run(_serve_http())
    else:
        server.run()
