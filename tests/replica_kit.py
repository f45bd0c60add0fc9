"""Parts for tests of several replicas: `approvals serve` processes on one PostgreSQL database, an
upstream that counts every call it receives, HAProxy in front, and the database's own view.

Everything runs on 127.0.0.1; the gateways are real processes started as an operator starts them,
so a replica can be killed with SIGKILL. Waits are on output lines and on the database's NOTIFY
events, each bounded by WAIT.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from approvals.config import Settings, sha256_hex
from approvals.proxy.affinity import ROUTER, SessionRouter
from approvals.web.app import create_app
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, POSTGRES_ADMIN_URL, TOKEN_A, WAIT

REPO = Path(__file__).resolve().parent.parent
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CONFIG = REPO / "docs" / "haproxy.cfg"
REPLICA_HEADER = "X-Approvals-Replica"  # added by the tests' HAProxy: which server answered
HELD_TOOL = "send_email"
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"echo": {}, HELD_TOOL: {"action": "require_approval"}},
}
TOOLS = [
    {"name": "echo", "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}},
    {"name": HELD_TOOL, "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
]


def _answer(request_id: object, result: dict[str, Any]) -> web.Response:
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result})


class CountingUpstream:
    """A Streamable HTTP MCP upstream (JSON answers) that counts every `send_email` it receives,
    per argument `n`: a count of 2 is a double release. `delay` holds each call that long."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received: collections.Counter[int] = collections.Counter()
        self._runner: web.ServerRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.ServerRunner(web.Server(self._handle), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/mcp"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(status=405 if request.method == "GET" else 200)
        message = json.loads(await request.read())
        if "id" not in message or "method" not in message:
            return web.Response(status=202)
        method, request_id = message["method"], message["id"]
        if method == "initialize":
            info = {"name": "counting-upstream", "version": "1"}
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": info}
            return _answer(request_id, result)
        if method == "tools/list":
            return _answer(request_id, {"tools": TOOLS})
        if method == "tools/call":
            params = message["params"]
            if params["name"] == HELD_TOOL:
                n = int(params["arguments"]["n"])
                self.received[n] += 1
                if self.delay:
                    await asyncio.sleep(self.delay)  # the upstream's own work, not a wait in a test
                return _answer(request_id, {"content": [{"type": "text", "text": f"sent {n}"}]})
            return _answer(request_id, {"content": [{"type": "text", "text": "echo"}]})
        return _answer(request_id, {})


def write_config(directory: Path, database_url: str, upstream_url: str, **server: Any) -> Path:
    """A gateway.toml for replicas sharing `database_url`, in front of `upstream_url`; `server`
    adds to [server] (TOML values given as Python strings and numbers)."""
    (directory / "policy.json").write_text(json.dumps(POLICY))
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in server.items())
    text = f"""
[server]
host = "127.0.0.1"
port = 0
max_sessions = 10000
max_sessions_per_grant = 10000
{extra}
[store]
path = "data/approvals.db"
url = "{database_url}"

[approvals]
hold_seconds = 60
timeout = "1h"
max_pending_per_grant = 100000

[upstreams.demo]
url = "{upstream_url}"
policy = "policy.json"

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
    config = directory / "gateway.toml"
    config.write_text(text)
    return config


def gateway_environment() -> dict[str, str]:
    """This environment without settings of the test run's own, plus one inbox key for all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPROVALS_", "SLACK_"))}
    return {**env, "APPROVALS_SESSION_SECRET": "replica-tests-session-secret-0123456789abcdef"}


class Output:
    """The lines a process printed (stdout and stderr), and a wait for one to come."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Condition()

    async def add(self, line: str) -> None:
        async with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    async def wait_for(self, text: str, times: int = 1) -> None:
        """Until `times` lines contain `text` (bounded by WAIT)."""
        try:
            async with asyncio.timeout(WAIT), self._changed:
                await self._changed.wait_for(lambda: sum(text in line for line in self.lines) >= times)
        except TimeoutError:
            raise AssertionError(f"no {times} lines with {text!r} in: {self.lines[-20:]}") from None


@dataclass
class Replica:
    """A running `approvals serve` (perhaps a supervisor of --workers) and what it printed."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    output: Output
    _drains: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mcp_url(self) -> str:
        return f"{self.base}/mcp/demo"

    def kill(self) -> None:
        """SIGKILL: no shutdown, no clean-up, as a crashed machine would leave it."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.process.wait(), WAIT)
        await asyncio.gather(*self._drains, return_exceptions=True)
        return status


async def _collect(stream: asyncio.StreamReader, into: Output) -> None:
    async for line in stream:
        await into.add(line.decode(errors="replace").rstrip("\n"))


async def start_replica(name: str, config: Path, *args: str) -> Replica:
    """`approvals serve --config CONFIG --port 0 ARGS`, once it prints the address it listens on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "approvals", "serve", "--config", str(config), "--port", "0", *args,
        cwd=config.parent,
        env=gateway_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    output = Output()
    drain_errors = asyncio.create_task(_collect(process.stderr, output))
    try:
        while True:
            line = (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode()
            assert line, f"replica {name} stopped before listening: {output.lines[-20:]}"
            await output.add(line.rstrip("\n"))
            if line.startswith("approvals gateway listening on"):
                break
    except BaseException:
        process.kill()
        await process.wait()
        raise
    replica = Replica(name, process, int(line.rsplit(":", 1)[1]), output)
    replica._drains = [drain_errors, asyncio.create_task(_collect(process.stdout, output))]
    return replica


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free now (HAProxy cannot bind port 0 and say which it got)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def haproxy_config(port: int, servers: dict[str, int]) -> str:
    """docs/haproxy.cfg with its `bind` on 127.0.0.1:`port` and `servers` in place of its own,
    and a header naming the server that answered (for the tests)."""
    text = HAPROXY_CONFIG.read_text()
    text, binds = re.subn(r"(?m)^(\s*)bind \S+", rf"\1bind 127.0.0.1:{port}", text)
    lines = [line for line in text.splitlines() if not re.match(r"\s*server \S+ \S+", line)]
    lines += [f"    server {name} 127.0.0.1:{server_port}" for name, server_port in servers.items()]
    lines += [f"    http-response set-header {REPLICA_HEADER} %s"]
    assert binds == 1, "docs/haproxy.cfg has one bind line"
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def haproxy(directory: Path, servers: dict[str, int]) -> AsyncIterator[str]:
    """HAProxy (master-worker, foreground) on docs/haproxy.cfg; yields its URL once it has loaded."""
    (port,) = free_ports(1)
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, servers))
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-W", "-db", "-f", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    seen = Output()
    drain: asyncio.Task[None] | None = None
    try:
        while "Loading success." not in (seen.lines[-1] if seen.lines else ""):
            line = (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode()
            assert line, f"haproxy stopped: {seen.lines}"
            await seen.add(line)
        drain = asyncio.create_task(_collect(process.stdout, seen))
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGUSR1)  # soft stop
        try:
            await asyncio.wait_for(process.wait(), WAIT)
        except TimeoutError:
            process.kill()
            await process.wait()
        if drain is not None:
            drain.cancel()


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A database of this test's own (every replica of the test shares it), dropped at the end."""
    name = f"approvals_replicas_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


class Events:
    """The store's NOTIFY events ("id:version:event"), counted, so a test waits for "300 created"
    without asking the API again and again."""

    def __init__(self) -> None:
        self.count: collections.Counter[str] = collections.Counter()
        self.latest: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self._conn: asyncpg.Connection | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def following(cls, database_url: str) -> AsyncIterator[Events]:
        events = cls()
        events._conn = await asyncpg.connect(database_url)
        await events._conn.add_listener("approvals", events._heard)
        try:
            yield events
        finally:
            await events._conn.close()

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        approval_id, _version, event = payload.rsplit(":", 2)
        self.count[event] += 1
        self.latest[approval_id] = event
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, check: Callable[[Events], bool], what: str, timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: check(self))
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; events so far: {dict(self.count)}") from None


async def statuses(database_url: str) -> dict[str, tuple[str, str | None, int]]:
    """Every approval: (status, reason, its `n` argument), read from the database itself."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, status, reason, arguments_json FROM approvals")
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["reason"], int(json.loads(r["arguments_json"])["n"])) for r in rows}


async def audit_counts(database_url: str, event: str) -> collections.Counter[str]:
    """How many times each approval has `event` in the audit log."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT approval_id FROM audit WHERE event = $1", event)
    finally:
        await conn.close()
    return collections.Counter(r["approval_id"] for r in rows)


async def decide(http: aiohttp.ClientSession, base: str, approval_id: str, verb: str = "approve") -> int:
    """A reviewer's decision through a replica's API; the HTTP status."""
    async with http.post(
        f"{base}/api/approvals/{approval_id}/{verb}",
        json={"reason": "replica test"},
        headers={"Authorization": f"Bearer {BOB_TOKEN}"},
    ) as response:
        await response.read()
        return response.status


@dataclass
class InProcess:
    """A replica served in the test's own event loop: its public and its internal address."""

    app: web.Application
    runner: web.AppRunner
    base: str
    internal: str

    @property
    def router(self) -> SessionRouter:
        return self.app[ROUTER]

    def mcp_url(self, base: str | None = None) -> str:
        return f"{base or self.base}/mcp/demo"


async def serve_in_process(settings: Settings) -> InProcess:
    """The gateway app for `settings` on 127.0.0.1 port 0, with an internal address of its own
    (as `approvals serve` opens them: both listening before the app is made)."""
    public = socket.create_server(("127.0.0.1", 0))
    inner = socket.create_server(("127.0.0.1", 0))
    internal = f"http://127.0.0.1:{inner.getsockname()[1]}"
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, internal_url=internal)
    )
    app = await create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    for sock in (public, inner):
        await web.SockSite(runner, sock).start()
    return InProcess(app, runner, f"http://127.0.0.1:{public.getsockname()[1]}", internal)
