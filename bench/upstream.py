"""A fast Streamable HTTP MCP upstream for the benchmark: answers from precomputed JSON.

Tools: `echo` (allowed by the bench policy) and `approve_echo` (held for approval). It is cheap on
purpose — aiohttp's low-level server, no router, no SDK — so what the benchmark measures is the
proxy in front of it. It also counts every `tools/call` it receives and notes when each
`approve_echo` call (argument `n`) arrived, for the held-call and decision-latency figures:

    GET /stats           {"calls": N, "held": M}
    GET /stats/received  {"received": {"<n>": <time.time() of arrival>, …}}
    POST /stats/reset

Run: `python bench/upstream.py` prints `listening <port>` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
import time
from typing import Any

from aiohttp import web

PROTOCOL_VERSION = "2025-06-18"
SESSION_ID = "bench-upstream-session"
TOOLS = [
    {
        "name": "echo",
        "description": "Answers with a fixed text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
    {
        "name": "approve_echo",
        "description": "Answers with a fixed text; the bench policy holds it for approval.",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    },
]


def _result(result: dict[str, Any]) -> bytes:
    return json.dumps(result, separators=(",", ":")).encode()


INITIALIZE = _result(
    {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "bench-upstream", "version": "1"},
    }
)
TOOLS_LIST = _result({"tools": TOOLS})
CALL_RESULT = _result({"content": [{"type": "text", "text": "echo"}], "isError": False})
EMPTY = _result({})
JSON_HEADERS = {"Content-Type": "application/json", "Mcp-Session-Id": SESSION_ID}


class Upstream:
    def __init__(self) -> None:
        self.calls = 0
        self.received: dict[str, float] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/mcp":
            if request.method == "POST":
                return self.post(await request.read())
            if request.method == "DELETE":
                return web.Response(status=200)
            return web.Response(status=405)  # no standalone GET stream: the spec allows that
        if path == "/stats":
            if request.method == "POST":
                self.calls, self.received = 0, {}
                return web.Response(status=204)
            return web.json_response({"calls": self.calls, "held": len(self.received)})
        if path == "/stats/received":
            return web.json_response({"received": self.received})
        return web.Response(status=404)

    def post(self, body: bytes) -> web.Response:
        message = json.loads(body)
        if "id" not in message or "method" not in message:
            return web.Response(status=202)  # notifications and responses
        method = message["method"]
        if method == "tools/call":
            self.calls += 1
            params = message["params"]
            if params["name"] == "approve_echo":
                self.received[str(params["arguments"].get("n"))] = time.time()
            result = CALL_RESULT
        elif method == "tools/list":
            result = TOOLS_LIST
        elif method == "initialize":
            result = INITIALIZE
        else:
            result = EMPTY
        answer = (
            b'{"jsonrpc":"2.0","id":' + json.dumps(message["id"]).encode() + b',"result":' + result + b"}"
        )
        return web.Response(body=answer, headers=JSON_HEADERS)


def raise_fd_limit() -> None:
    """Thousands of held calls mean thousands of sockets: take the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(port: int) -> None:
    raise_fd_limit()
    upstream = Upstream()
    server = web.Server(upstream.handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"listening {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args().port))
    sys.exit(0)
