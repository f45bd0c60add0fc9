"""Real MCP servers used as upstreams by the test suite.

* ``start_everything()`` runs ``@modelcontextprotocol/server-everything`` (Node, pinned in
  ``tests/node/package.json``) in Streamable HTTP mode on 127.0.0.1 and yields its ``/mcp`` URL.
* ``TIME_SERVER_COMMAND`` / ``MODELSCOPE_COMMAND`` are stdio commands for the Python servers
  installed from the ``test`` extra.

server-everything has no host option and reports the port it was *asked* for, not the one it got
(``PORT=0`` logs "listening on port 0"). A tiny ES module preloaded with ``node --import`` therefore
pins its listener to 127.0.0.1 with an OS-assigned port and prints the real address once the socket
is listening; that line is the readiness signal, so no port race and no sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from mcp import StdioServerParameters

NODE_DIR = Path(__file__).resolve().parent / "node"
EVERYTHING_PACKAGE = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything"
EVERYTHING_ENTRY = EVERYTHING_PACKAGE / "dist" / "index.js"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
READY_MARKER = "APPROVALS-TEST-UPSTREAM listening "

TIME_SERVER_COMMAND: list[str] = [sys.executable, "-m", "mcp_server_time", "--local-timezone=UTC"]
"""mcp-server-time over stdio (tools ``get_current_time``, ``convert_time``)."""

MODELSCOPE_COMMAND: list[str] = [sys.executable, "-m", "modelscope_mcp_server"]
"""modelscope-mcp-server over stdio (its default transport). Lists tools offline; ``generate_image``
without ``MODELSCOPE_API_TOKEN`` fails at once with JSON-RPC -32602. It reads ``.env`` from its cwd."""

MODELSCOPE_OFFLINE_ENV: dict[str, str] = {
    "MODELSCOPE_MAIN_DOMAIN": "http://127.0.0.1:1",
    "MODELSCOPE_API_INFERENCE_DOMAIN": "http://127.0.0.1:1",
}
"""Extra env for MODELSCOPE_COMMAND: any tool that does call the ModelScope API (the search_* tools,
or generate_image given a token) fails in well under a second with connection refused on loopback."""


def stdio_server(
    command: list[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> StdioServerParameters:
    """``StdioServerParameters`` for a command above; env is merged over the SDK's safe defaults."""
    return StdioServerParameters(command=command[0], args=command[1:], cwd=cwd, env=env)


# Preloaded into node: the first TCP listen() on a bare port is redirected to 127.0.0.1 with the
# OS-assigned port, and the bound address is printed to stderr once it is listening.
_LISTEN_SHIM = f"""
import net from "node:net";
const listen = net.Server.prototype.listen;
let patched = false;
net.Server.prototype.listen = function (...args) {{
  if (patched || !(typeof args[0] === "number" || typeof args[0] === "string")) {{
    return listen.apply(this, args);
  }}
  patched = true;
  const callback = args.find((arg) => typeof arg === "function");
  this.once("listening", () => {{
    const address = this.address();
    process.stderr.write("{READY_MARKER}" + address.address + " " + address.port + "\\n");
  }});
  return callback === undefined
    ? listen.call(this, {{ host: "127.0.0.1", port: 0 }})
    : listen.call(this, {{ host: "127.0.0.1", port: 0 }}, callback);
}};
"""
_LISTEN_SHIM_URL = "data:text/javascript;base64," + base64.b64encode(_LISTEN_SHIM.encode()).decode()


class UpstreamStartError(RuntimeError):
    """A test upstream could not be started."""


def everything_command(node: str = "node") -> list[str]:
    """The argv that starts server-everything in Streamable HTTP mode on 127.0.0.1:<random>."""
    return [node, "--import", _LISTEN_SHIM_URL, str(EVERYTHING_ENTRY), "streamableHttp"]


def _require_everything() -> str:
    if not EVERYTHING_ENTRY.is_file():
        raise UpstreamStartError(
            f"{EVERYTHING_ENTRY} not found: run `make test` (npm ci --prefix tests/node) first"
        )
    node = shutil.which("node")
    if node is None:
        raise UpstreamStartError("`node` is not on PATH; server-everything needs Node.js 20+")
    return node


async def _wait_ready(stdout: asyncio.StreamReader, output: collections.deque[str]) -> int:
    """Read merged stdout/stderr until the listen line; return the port (0 if the process ended)."""
    while True:
        raw = await stdout.readline()
        if not raw:
            return 0
        line = raw.decode(errors="replace").rstrip("\n")
        output.append(line)
        if line.startswith(READY_MARKER):
            return int(line.rsplit(" ", 1)[1])


async def _drain(stdout: asyncio.StreamReader, output: collections.deque[str]) -> None:
    """Keep reading so the server never blocks on a full pipe (it logs every request)."""
    while raw := await stdout.readline():
        output.append(raw.decode(errors="replace").rstrip("\n"))


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if process.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            continue
        return


@contextlib.asynccontextmanager
async def start_everything() -> AsyncIterator[str]:
    """Start a fresh server-everything and yield its Streamable HTTP URL (``http://127.0.0.1:N/mcp``)."""
    node = _require_everything()
    # A minimal environment: the `get-env` tool echoes it back, and gzip-file-as-resource must never
    # fetch from the internet (its default argument is a GitHub URL); data: URIs still work.
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    env["GZIP_ALLOWED_DOMAINS"] = "127.0.0.1,localhost"
    process = await asyncio.create_subprocess_exec(
        *everything_command(node),
        cwd=NODE_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    output: collections.deque[str] = collections.deque(maxlen=200)
    drain: asyncio.Task[None] | None = None
    try:
        try:
            port = await asyncio.wait_for(_wait_ready(process.stdout, output), READY_TIMEOUT)
        except TimeoutError:
            port = 0
        if port == 0:
            await _stop(process)
            captured = "\n".join(output) or "<no output>"
            raise UpstreamStartError(
                f"server-everything did not become ready within {READY_TIMEOUT:.0f}s "
                f"(exit code {process.returncode}); output:\n{captured}"
            )
        drain = asyncio.create_task(_drain(process.stdout, output))
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await _stop(process)
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
