"""A byte-level Streamable HTTP client for tests that must see exactly what goes over the wire."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict

from approvals.proxy.sse import read_events

ACCEPT = "application/json, text/event-stream"


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    messages: list[dict[str, Any]]

    @property
    def last(self) -> dict[str, Any]:
        return self.messages[-1]


@dataclass
class RawSession:
    """One MCP session spoken by hand: POST a dict (or raw bytes), get every message of the reply."""

    http: aiohttp.ClientSession
    url: str
    token: str | None = None
    session_id: str | None = None
    version: str = "2025-11-25"
    extra_headers: dict[str, str] = field(default_factory=dict)
    _next: int = 0

    def headers(self) -> dict[str, str]:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json", **self.extra_headers}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = self.version
        return headers

    async def post(self, body: dict[str, Any] | bytes, **headers: str) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.url, data=data, headers={**self.headers(), **headers}) as response:
            messages: list[dict[str, Any]] = []
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/event-stream"):
                messages = [json.loads(e.data) async for e in read_events(response.content)]
            elif kind.startswith("application/json"):
                messages = [await response.json()]
            return Reply(response.status, CIMultiDict(response.headers), messages)

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Reply:
        self._next += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next, "method": method}
        if params is not None:
            body["params"] = params
        return await self.post(body)

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> Reply:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = params
        return await self.post(body)

    async def initialize(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.request(
            "initialize",
            {
                "protocolVersion": self.version,
                "capabilities": capabilities or {},
                "clientInfo": {"name": "rawmcp", "version": "1"},
            },
        )
        assert reply.status == 200, reply
        self.session_id = reply.headers.get("Mcp-Session-Id")
        await self.notify("notifications/initialized")
        return reply.last["result"]
