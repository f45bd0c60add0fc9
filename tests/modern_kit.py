"""Shared parts for tests of 2026-07-28 upstreams: raw 2026 requests, and a gateway with a policy in
front of one upstream, with a recorder on its queue and the reviewer API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.approvals_kit import Recorder
from tests.conftest import BOB_TOKEN, TOKEN_A, Running, StartGateway
from tests.rawmcp import ACCEPT

MODERN = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "sampling": {}, "roots": {}},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}
ASK_NAME = "test_input_required_result_elicitation"
NAME_ANSWER = {"user_name": {"action": "accept", "content": {"name": "Ada"}}}


def modern_request(method: str, params: dict[str, Any] | None = None, request_id: int = 7) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {"_meta": ENVELOPE, **(params or {})},
    }


def call(tool: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return modern_request("tools/call", {"name": tool, "arguments": arguments or {}, **extra})


def modern_headers(body: dict[str, Any], token: str = TOKEN_A) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": body["method"],
    }
    named = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(body["method"])
    if named is not None:
        headers["Mcp-Name"] = body["params"][named]
    return headers


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], token: str = TOKEN_A
) -> tuple[int, dict[str, Any]]:
    """A 2026-07-28 POST; the answer (the last event of an SSE stream)."""
    async with http.post(url, data=json.dumps(body), headers=modern_headers(body, token)) as response:
        text = await response.text()
        if response.content_type == "text/event-stream":
            events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
            answers = [json.loads(e) for e in events if e and "method" not in json.loads(e)]
            return response.status, answers[-1]
        return response.status, json.loads(text) if text else {}


@dataclass
class Policed:
    """A gateway with `policy` in front of the upstream `up`, and what to watch it with."""

    gateway: Running
    recorder: Recorder

    @property
    def url(self) -> str:
        return self.gateway.url("up")

    async def decide(self, approval_id: str, verdict: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.gateway.base}/api/approvals/{approval_id}/{verdict}",
                json={"reason": "test"},
                headers={"Authorization": f"Bearer {BOB_TOKEN}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()


async def start_policed(
    start_gateway: StartGateway, tmp_path: Path, url: str, policy: dict[str, Any], **extra: Any
) -> Policed:
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    running = await start_gateway({"up": {"url": url, "policy": "policy.json"}}, **extra)
    return Policed(running, Recorder.following(running.service.feed))
