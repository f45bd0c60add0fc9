"""Every bad input gets a clear error and loses nothing; identities, sessions and upstream failures."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from approvals.core.model import Admission, ToolCall
from approvals.errors import StoreError
from approvals.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    UPSTREAM_UNAVAILABLE,
)
from approvals.proxy.gate import AllowAll
from approvals.proxy.keys import GATEWAY
from tests.conftest import PROBE_COMMAND, TOKEN_A, TOKEN_B, StartGateway, mcp_client, probe_http
from tests.rawmcp import RawSession

PROBE = {"probe": {"command": PROBE_COMMAND}}


async def test_missing_or_wrong_token_is_refused_with_a_challenge(
    start_gateway: StartGateway, http: Any
) -> None:
    """No token, a wrong token and a non-Bearer scheme all get 401 with WWW-Authenticate."""
    gw = await start_gateway(PROBE)
    for token in (None, "not-a-grant-token-at-all", "Basic dXNlcjpwYXNz"):
        raw = RawSession(http, gw.url("probe"), token=token)
        headers = {"Authorization": token} if token and token.startswith("Basic") else {}
        reply = await raw.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, **headers)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
        assert reply.last["error"]["code"] == INVALID_REQUEST
    assert not gw.app[GATEWAY].sessions  # nothing was started for them


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", PARSE_ERROR),
        (b"", PARSE_ERROR),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": NaN}}', PARSE_ERROR),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1}', INVALID_REQUEST),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', INVALID_REQUEST),
        (b'"just a string"', INVALID_REQUEST),
    ],
)
async def test_malformed_messages_get_json_rpc_errors(
    start_gateway: StartGateway, http: Any, body: bytes, code: int
) -> None:
    """Bad JSON is -32700 and a bad envelope -32600, both with HTTP 400, in an initialized session."""
    gw = await start_gateway(PROBE)
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize()
    reply = await raw.post(body)
    assert reply.status == 400
    assert reply.last["error"]["code"] == code
    assert (
        await raw.request("tools/call", {"name": "echo", "arguments": {"text": "still fine"}})
    ).status == 200


async def test_oversize_body_is_refused_with_413(start_gateway: StartGateway, http: Any) -> None:
    """A body over server.max_body_bytes gets 413 before it is read."""
    gw = await start_gateway(PROBE, server={"max_body_bytes": 1000})
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    big = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 2000}}
    reply = await raw.post(big)
    assert reply.status == 413
    assert reply.last["error"]["code"] == INVALID_REQUEST


async def test_unknown_upstream_is_404(start_gateway: StartGateway, http: Any) -> None:
    """A path naming no configured upstream gets 404 with a JSON-RPC error naming it."""
    gw = await start_gateway(PROBE)
    reply = await RawSession(http, gw.url("nope"), token=TOKEN_A).request("ping")
    assert reply.status == 404
    assert "nope" in reply.last["error"]["message"]


async def test_sessions_are_bound_to_their_grant_and_upstream(start_gateway: StartGateway, http: Any) -> None:
    """Another grant, another upstream path, or an unknown id: 404; no session id at all: 400."""
    gw = await start_gateway({**PROBE, "other": {"command": PROBE_COMMAND}})
    owner = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await owner.initialize()
    thief = RawSession(http, gw.url("probe"), token=TOKEN_B, session_id=owner.session_id)
    assert (await thief.request("ping")).status == 404
    elsewhere = RawSession(http, gw.url("other"), token=TOKEN_A, session_id=owner.session_id)
    assert (await elsewhere.request("ping")).status == 404
    assert (
        await RawSession(http, gw.url("probe"), token=TOKEN_A, session_id="made-up").request("ping")
    ).status == 404
    assert (await RawSession(http, gw.url("probe"), token=TOKEN_A).request("ping")).status == 400
    assert (await owner.request("ping")).status == 200


async def test_unsupported_protocol_version_header_is_400(start_gateway: StartGateway, http: Any) -> None:
    """An MCP-Protocol-Version the gateway does not speak is refused, as the spec says."""
    gw = await start_gateway(PROBE)
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize()
    raw.version = "1999-01-01"
    reply = await raw.request("ping")
    assert reply.status == 400
    assert "1999-01-01" in reply.last["error"]["message"]


async def test_foreign_host_and_origin_are_refused(start_gateway: StartGateway, http: Any) -> None:
    """DNS rebinding: a Host or Origin naming another site is refused; localhost origins pass."""
    gw = await start_gateway(PROBE)
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    assert (
        await raw.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, Host="evil.example:80")
    ).status == 421
    assert (
        await raw.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, Origin="http://evil.example")
    ).status == 403
    raw.extra_headers = {"Origin": "http://localhost:3000"}
    await raw.initialize()
    assert (await raw.request("ping")).status == 200


async def test_discover_without_its_envelope_is_invalid_params(
    start_gateway: StartGateway, http: Any
) -> None:
    """server/discover is served (2026-07-28), but one without its `_meta` envelope gets 400 / -32602."""
    gw = await start_gateway(PROBE)
    reply = await RawSession(http, gw.url("probe"), token=TOKEN_A).request("server/discover", {})
    assert (reply.status, reply.last["error"]["code"], reply.last["id"]) == (400, INVALID_PARAMS, 1)


async def test_delete_ends_the_session_and_stops_its_upstream(start_gateway: StartGateway, http: Any) -> None:
    """DELETE: the session id stops working and the stdio upstream process exits."""
    gw = await start_gateway(PROBE)
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize()
    session = gw.app[GATEWAY].sessions[raw.session_id]
    process = session.connection._process  # type: ignore[union-attr]
    async with http.delete(raw.url, headers=raw.headers()) as response:
        assert response.status == 200
    assert process.returncode is not None
    assert (await raw.request("ping")).status == 404


async def test_upstream_that_dies_mid_call_gives_an_error_and_the_next_session_works(
    start_gateway: StartGateway,
) -> None:
    """A stdio upstream exiting mid-call: a JSON-RPC error, not a hang; a new process serves next."""
    gw = await start_gateway(PROBE)
    async with mcp_client(gw.url("probe")) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("exit_now", {"code": 3})
        assert caught.value.error.code == UPSTREAM_UNAVAILABLE
        assert "exited with code 3" in caught.value.error.message
    async with mcp_client(gw.url("probe")) as client:
        result = await client.call_tool("echo", {"text": "back again"})
        assert result.content[0].text == "back again"  # type: ignore[union-attr]


async def test_unreachable_http_upstream_gives_an_error(start_gateway: StartGateway, http: Any) -> None:
    """An HTTP upstream that refuses connections: initialize answers with a JSON-RPC error at once."""
    gw = await start_gateway({"gone": {"url": "http://127.0.0.1:9/mcp"}})
    raw = RawSession(http, gw.url("gone"), token=TOKEN_A)
    reply = await raw.request(
        "initialize",
        {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    )
    assert reply.last["error"]["code"] == UPSTREAM_UNAVAILABLE
    assert not gw.app[GATEWAY].sessions


async def test_client_token_never_reaches_the_upstream(start_gateway: StartGateway) -> None:
    """The upstream sees the configured headers (with ${ENV} expanded) and never the client's token."""
    async with probe_http() as url:
        upstreams = {"probe": {"url": url, "headers": {"X-Upstream-Key": "k-${PROBE_KEY}"}}}
        gw = await start_gateway(upstreams, env={"PROBE_KEY": "s3cret"})
        async with mcp_client(gw.url("probe")) as client:
            result = await client.call_tool("headers", {})
    seen = {k.lower(): v for k, v in json.loads(result.content[0].text).items()}  # type: ignore[union-attr]
    assert seen["x-upstream-key"] == "k-s3cret"
    assert "authorization" not in seen
    assert TOKEN_A not in json.dumps(seen)


async def test_two_clients_never_see_each_others_messages(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """Concurrent long-running calls from two clients: each gets only its own progress and result."""
    gw = await start_gateway({"everything": {"url": everything_url}})
    progress: dict[str, list[float]] = {"a": [], "b": []}

    async def run(name: str, token: str, steps: int) -> str:
        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress[name].append(value)

        async with mcp_client(gw.url("everything"), token) as client:
            result = await client.call_tool(
                "trigger-long-running-operation",
                {"duration": 0.4, "steps": steps},
                progress_callback=on_progress,
            )
            return result.content[0].text  # type: ignore[union-attr,no-any-return]

    text_a, text_b = await asyncio.gather(run("a", TOKEN_A, 4), run("b", TOKEN_B, 2))
    assert progress == {"a": [1, 2, 3, 4], "b": [1, 2]}
    assert "Steps: 4" in text_a
    assert "Steps: 2" in text_b


async def test_healthz_reports_ok(start_gateway: StartGateway, http: Any) -> None:
    """/healthz answers without credentials and names the upstreams."""
    gw = await start_gateway(PROBE)
    async with http.get(f"{gw.base}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok", "sessions": 0, "upstreams": ["probe"]}


class _BrokenGate(AllowAll):
    """A gate whose store fails: the in-memory stand-in for a disk that went away."""

    async def admit(self, call: ToolCall) -> Admission:
        raise StoreError("database is locked")


async def test_a_call_that_cannot_be_checked_is_not_forwarded(start_gateway: StartGateway) -> None:
    """Fail closed: when the gate cannot decide, the client gets a JSON-RPC error and the upstream nothing."""
    gw = await start_gateway(PROBE, gate=_BrokenGate())
    async with mcp_client(gw.url("probe")) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("echo", {"text": "should not pass"})
    assert caught.value.error.code == INTERNAL_ERROR
    assert "database is locked" in caught.value.error.message


@pytest.mark.parametrize("version", ["2025-03-26", "2025-06-18", "2025-11-25"])
async def test_each_handshake_version_works_with_and_without_the_version_header(
    start_gateway: StartGateway, http: Any, version: str
) -> None:
    """The negotiated version is passed through; a missing MCP-Protocol-Version header is accepted."""
    gw = await start_gateway(PROBE)
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A, version=version)
    assert (await raw.initialize())["protocolVersion"] == version
    assert (await raw.notify("notifications/progress", {"progressToken": "x", "progress": 1})).status == 202
    reply = await raw.request("tools/call", {"name": "echo", "arguments": {"text": version}})
    assert reply.last["result"]["content"][0]["text"] == version
    headers = {k: v for k, v in raw.headers().items() if k != "MCP-Protocol-Version"}
    async with http.post(
        raw.url, json={"jsonrpc": "2.0", "id": 99, "method": "ping"}, headers=headers
    ) as resp:
        assert resp.status == 200
