"""Fixtures: the gateway on 127.0.0.1 port 0 in front of real upstreams, and real MCP clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from approvals.config import Settings, parse_settings, sha256_hex
from approvals.core.service import ApprovalService
from approvals.gatekeeper import Gatekeeper
from approvals.policy_files import WATCH_INTERVAL_SECONDS
from approvals.proxy.gate import Gate
from approvals.web.app import create_app
from approvals.web.keys import GATEKEEPER, SERVICE
from tests.conformance_kit import conformance_upstream
from tests.upstreams import start_everything

TOKEN_A = "agent-a-token-0123456789abcdef"
TOKEN_B = "agent-b-token-0123456789abcdef"
ALICE_TOKEN = "alice-reviewer-token-0123456789"
BOB_TOKEN = "bob-reviewer-token-0123456789ab"
PROBE = Path(__file__).parent / "probe_server.py"
DEMO_COMMAND = [sys.executable, "-m", "approvals.demo_server"]
PROBE_COMMAND = [sys.executable, str(PROBE)]
WAIT = 30.0  # the bound on every wait in the suite


def settings_for(
    tmp_path: Path, upstreams: dict[str, dict[str, Any]], env: dict[str, str] | None = None, **extra: Any
) -> Settings:
    """Settings as a gateway.toml in tmp_path would give them: two grants, two reviewers."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "public_url": "http://127.0.0.1:8080"},
        "store": {"path": str(tmp_path / "approvals.db")},
        "upstreams": upstreams,
        "grants": [
            {"name": "agent-a", "token_sha256": sha256_hex(TOKEN_A), "owner": "alice"},
            {"name": "agent-b", "token_sha256": sha256_hex(TOKEN_B), "owner": "bob"},
        ],
        "reviewers": [
            {"name": "alice", "token_sha256": sha256_hex(ALICE_TOKEN), "slack_user_id": "U0ALICE"},
            {"name": "bob", "token_sha256": sha256_hex(BOB_TOKEN), "slack_user_id": "U0BOB"},
        ],
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_settings(data, tmp_path / "gateway.toml", env=env or {})


@dataclass
class Running:
    """A gateway serving on 127.0.0.1 in this test's event loop."""

    server: TestServer
    app: web.Application

    @property
    def gatekeeper(self) -> Gatekeeper:
        return self.app[GATEKEEPER]

    @property
    def service(self) -> ApprovalService:
        return self.app[SERVICE]

    def url(self, upstream: str) -> str:
        return str(self.server.make_url(f"/mcp/{upstream}"))

    @property
    def base(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(upstreams, gate=None, env=None, clock=…, **settings)`: a gateway on port 0,
    stopped at the end."""
    servers: list[TestServer] = []

    async def start(
        upstreams: dict[str, dict[str, Any]],
        gate: Gate | None = None,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        watch_interval: float = WATCH_INTERVAL_SECONDS,
        **extra: Any,
    ) -> Running:
        settings = settings_for(tmp_path, upstreams, env, **extra)
        app = await create_app(settings, gate, clock=clock, watch_interval=watch_interval)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return Running(server, app)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for raw requests to a gateway or an upstream."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def dual_url() -> AsyncIterator[str]:
    """The `mcp` SDK's MCPServer with the conformance fixtures (it speaks both eras); its URL."""
    async with conformance_upstream() as url:
        yield url


@asynccontextmanager
async def mcp_client(url: str, token: str = TOKEN_A, **options: Any) -> AsyncIterator[Client]:
    """The SDK's `Client` in its default auto mode, over Streamable HTTP with a grant token."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(WAIT))
    async with http, Client(streamable_http_client(url, http_client=http), **options) as client:
        yield client


@pytest.fixture
async def everything_url() -> AsyncIterator[str]:
    """A fresh @modelcontextprotocol/server-everything over Streamable HTTP on 127.0.0.1."""
    async with start_everything() as url:
        yield url


@asynccontextmanager
async def probe_http() -> AsyncIterator[str]:
    """tests/probe_server.py over Streamable HTTP; yields its /mcp URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), "--http", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        assert line.startswith(b"LISTENING "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.kill()
        await process.wait()


POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"  # trust auth on these machines


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own on the local PostgreSQL, dropped at the end."""
    name = f"approvals_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:
        # On a thread of its own: the fixture may be first asked for inside a running event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, admin(sql)).result()

    run(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        run(f"DROP DATABASE {name} WITH (FORCE)")
