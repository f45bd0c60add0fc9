"""FastMCP's proxy in front of the bench upstream, with ONE connected, reused upstream client.

Runs in its own virtualenv (bench/.venvs/fastmcp, made by bench/run.py). Passing a connected
`Client` to `create_proxy` makes FastMCP reuse that one upstream session for every request; its
command-line proxy would open a new upstream session per call, which would be unfair to it.

    python bench/fastmcp_proxy.py UPSTREAM_URL   prints `listening <port>` when ready
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from fastmcp import Client
from fastmcp.server import create_proxy


async def main(upstream: str) -> None:
    logging.disable(logging.INFO)  # no per-request logging: it would be measured as proxy cost
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    client = Client(upstream)
    async with client:
        proxy = create_proxy(client, name="bench-fastmcp-proxy")
        print(f"listening {listener.getsockname()[1]}", flush=True)
        await proxy.run_http_async(
            show_banner=False,
            host="127.0.0.1",
            log_level="warning",
            path="/mcp",
            sockets=[listener],
            uvicorn_config={"access_log": False},
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
