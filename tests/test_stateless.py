"""MCP 2026-07-28 (stateless) clients through the gateway, in front of initialize-era upstreams."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError
from multidict import CIMultiDict

from approvals.proxy.keys import GATEWAY
from tests.approvals_kit import start_held
from tests.conftest import DEMO_COMMAND, PROBE_COMMAND, TOKEN_A, WAIT, Running, StartGateway, mcp_client
from tests.modern_kit import modern_headers, modern_request
from tests.rawmcp import ACCEPT
from tests.upstreams import TIME_SERVER_COMMAND

MODERN = "2026-07-28"
EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}


def _text(result: Any) -> str:
    return result.content[0].text  # type: ignore[no-any-return]


# ---- real clients ----------------------------------------------------------------------------


async def test_auto_client_negotiates_2026_without_falling_back(start_gateway: StartGateway) -> None:
    """`mcp.Client` in auto mode gets server/discover answered and stays on 2026-07-28."""
    gw = await start_gateway({"demo": {"command": DEMO_COMMAND}})
    async with mcp_client(gw.url("demo"), mode="auto") as client:
        assert client.protocol_version == MODERN
        assert client.server_info is not None
        assert client.server_info.name == "approvals-demo"
        tools = await client.list_tools()
        result = await client.call_tool("get_time", {})
    assert "get_time" in [tool.name for tool in tools.tools]
    assert not result.is_error
    assert gw.app[GATEWAY].sessions == {}  # no client session: every request stood alone


async def test_pinned_client_lists_and_makes_an_allowed_call(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A client pinned to 2026-07-28 lists the policy's tools and an allowed call reaches the upstream."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url(), mode=MODERN) as client:
        assert client.protocol_version == MODERN
        names = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("get_time", {})
    assert {"send_email", "get_time"} <= names
    assert not result.is_error


async def test_pinned_client_held_call_approved(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A held stateless call waits on its stream; approved, it runs once and its result reaches the agent."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url(), mode=MODERN) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        assert (pending.tool, pending.grant) == ("send_email", "agent-a")
        status, _ = await held.api("POST", f"/api/approvals/{pending.id}/approve", body={"reason": "fine"})
        assert status == 200
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert _text(result).startswith("queued message")
    assert [{k: m[k] for k in EMAIL} for m in held.sent()] == [EMAIL]


async def test_pinned_client_held_call_denied(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A held stateless call, denied, answers the agent with the denial; the upstream never sees it."""
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url(), mode=MODERN) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        status, _ = await held.api("POST", f"/api/approvals/{pending.id}/deny", body={"reason": "no"})
        assert status == 200
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert result.model_dump(by_alias=True)["_meta"]["approvals"]["code"] == "denied_by_reviewer"
    assert held.sent() == []


async def test_server_to_client_request_is_refused_not_hung(start_gateway: StartGateway) -> None:
    """An upstream's roots/list during a stateless call is refused: the call ends with an error."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    async with mcp_client(gw.url("probe"), mode=MODERN) as client:
        with pytest.raises(MCPError) as raised:
            await asyncio.wait_for(client.call_tool("ask_roots", {}), WAIT)
    assert raised.value.code == -32601  # the gateway's answer to roots/list, passed on by the upstream


# ---- the wire, byte for byte -----------------------------------------------------------------


@pytest.fixture
async def demo(start_gateway: StartGateway) -> Running:
    return await start_gateway({"demo": {"command": DEMO_COMMAND}})


def _request(method: str, params: dict[str, Any] | None = None, request_id: int = 7) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {"_meta": ENVELOPE, **(params or {})},
    }
    return body


def _headers(method: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {TOKEN_A}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
        **extra,
    }


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else {}), dict(response.headers)


async def test_discover_is_answered_from_the_upstreams_initialize(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """server/discover without a session: modern versions, the upstream's capabilities and info."""
    status, body, headers = await _post(
        http, demo.url("demo"), _request("server/discover"), _headers("server/discover")
    )
    assert status == 200
    assert "Mcp-Session-Id" not in headers
    result = body["result"]
    assert body["id"] == 7
    assert result["supportedVersions"] == [MODERN]
    assert "tools" in result["capabilities"]
    assert (result["resultType"], result["ttlMs"], result["cacheScope"]) == ("complete", 0, "private")
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "approvals-demo"


async def test_results_carry_2026_fields(demo: Running, http: aiohttp.ClientSession) -> None:
    """A passed-through tools/list gets resultType and the caching hints 2026-07-28 requires."""
    status, body, _ = await _post(http, demo.url("demo"), _request("tools/list"), _headers("tools/list"))
    assert status == 200
    assert body["id"] == 7
    assert (body["result"]["resultType"], body["result"]["cacheScope"]) == ("complete", "private")
    assert body["result"]["ttlMs"] == 0


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in ENVELOPE.items() if k != key}


# (name, body, header overrides, HTTP status, JSON-RPC code)
ERROR_CASES: list[tuple[str, dict[str, Any], dict[str, str], int, int]] = [
    (
        "no _meta",
        {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}},
        {},
        400,
        -32602,
    ),
    (
        "no protocol version in _meta",
        {**_request("tools/list"), "params": {"_meta": _without("io.modelcontextprotocol/protocolVersion")}},
        {},
        400,
        -32602,
    ),
    (
        "no capabilities in _meta",
        {
            **_request("tools/list"),
            "params": {"_meta": _without("io.modelcontextprotocol/clientCapabilities")},
        },
        {},
        400,
        -32602,
    ),
    (
        "capabilities not an object",
        {
            **_request("tools/list"),
            "params": {"_meta": {**ENVELOPE, "io.modelcontextprotocol/clientCapabilities": []}},
        },
        {},
        400,
        -32602,
    ),
    (
        "client info without a version",
        {
            **_request("tools/list"),
            "params": {"_meta": {**ENVELOPE, "io.modelcontextprotocol/clientInfo": {"name": "x"}}},
        },
        {},
        400,
        -32602,
    ),
    (
        "version header differs from _meta",
        _request("tools/list"),
        {"MCP-Protocol-Version": "2026-01-01"},
        400,
        -32020,
    ),
    ("method header differs from body", _request("tools/list"), {"Mcp-Method": "prompts/list"}, 400, -32020),
    (
        "name header differs from body",
        _request("tools/call", {"name": "get_time", "arguments": {}}),
        {"Mcp-Method": "tools/call", "Mcp-Name": "send_email"},
        400,
        -32020,
    ),
    (
        "name header missing",
        _request("tools/call", {"name": "get_time", "arguments": {}}),
        {"Mcp-Method": "tools/call"},
        400,
        -32020,
    ),
    (
        "unsupported version",
        {
            **_request("tools/list"),
            "params": {"_meta": {**ENVELOPE, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}},
        },
        {"MCP-Protocol-Version": "2099-01-01"},
        400,
        -32022,
    ),
    ("a method 2026-07-28 removed", _request("ping"), {"Mcp-Method": "ping"}, 404, -32601),
    ("not JSON-RPC 2.0", {**_request("tools/list"), "jsonrpc": "1.0"}, {}, 400, -32600),
]


@pytest.mark.parametrize(
    ("body", "overrides", "status", "code"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_bad_requests_get_the_specs_error_with_the_requests_id(
    demo: Running,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    overrides: dict[str, str],
    status: int,
    code: int,
) -> None:
    """Every envelope, header and version problem: the spec's code, its HTTP status, the request's id."""
    got_status, reply, _ = await _post(http, demo.url("demo"), body, _headers(body["method"], **overrides))
    assert (got_status, reply["error"]["code"], reply["id"]) == (status, code, 7)


async def test_unsupported_version_names_the_supported_ones(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """-32022 carries data.supported and data.requested, so a client can pick a version."""
    meta = {**ENVELOPE, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    body = {**_request("server/discover"), "params": {"_meta": meta}}
    headers = _headers("server/discover", **{"MCP-Protocol-Version": "2099-01-01"})
    status, reply, _ = await _post(http, demo.url("demo"), body, headers)
    assert status == 400
    assert reply["error"]["data"] == {"supported": [MODERN], "requested": "2099-01-01"}


async def test_duplicated_routing_header_is_a_mismatch(demo: Running, http: aiohttp.ClientSession) -> None:
    """Two Mcp-Method headers: -32020, since readers of the first and the last would disagree."""
    headers = CIMultiDict(_headers("tools/list"))
    headers.add("Mcp-Method", "tools/list")
    async with http.post(
        demo.url("demo"), data=json.dumps(_request("tools/list")), headers=headers
    ) as response:
        reply = await response.json()
    assert (response.status, reply["error"]["code"], reply["id"]) == (400, -32020, 7)


async def test_base64_name_header_matches_its_decoded_value(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """An Mcp-Name in the =?base64?…?= form is compared decoded: a matching one passes the check."""
    wrapped = "=?base64?" + base64.b64encode(b"get_time").decode() + "?="
    body = _request("tools/call", {"name": "get_time", "arguments": {}})
    status, reply, _ = await _post(
        http, demo.url("demo"), body, _headers("tools/call", **{"Mcp-Name": wrapped})
    )
    assert status == 200
    assert reply["id"] == 7
    assert reply["result"]["resultType"] == "complete"


async def test_garbage_body_is_a_parse_error(demo: Running, http: aiohttp.ClientSession) -> None:
    """A body that is not JSON: 400 and -32700 (its id cannot be known: null)."""
    status, reply, _ = await _post(http, demo.url("demo"), b"{not json", _headers("tools/list"))
    assert (status, reply["error"]["code"], reply["id"]) == (400, -32700, None)


async def test_notification_is_accepted_and_dropped(demo: Running, http: aiohttp.ClientSession) -> None:
    """A 2026-07-28 notification (no session to act on) is acknowledged with 202."""
    body = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"_meta": ENVELOPE, "requestId": 1},
    }
    status, _, _ = await _post(http, demo.url("demo"), body, _headers("notifications/cancelled"))
    assert status == 202


async def test_initialize_era_without_session_still_needs_one(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """A 2025-11-25 request without Mcp-Session-Id is still told to initialize (400), as before."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    headers = {**_headers("tools/list"), "MCP-Protocol-Version": "2025-11-25"}
    status, reply, _ = await _post(http, demo.url("demo"), body, headers)
    assert (status, reply["error"]["code"]) == (400, -32600)


async def test_hold_runs_out_then_the_repeat_call_gets_the_result(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A stateless call is answered pending when its hold ends; approved, the repeat call gets the result."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.3})
    async with mcp_client(held.url(), mode=MODERN) as client:
        first = await client.call_tool("send_email", EMAIL)
        approval_id = first.model_dump(by_alias=True)["_meta"]["approvals"]["approval_id"]
        assert (await held.api("POST", f"/api/approvals/{approval_id}/approve"))[0] == 200
        await held.recorder.status("completed", approval_id)
        again = await client.call_tool("send_email", EMAIL)
    assert not again.is_error, (approval_id, again)
    assert _text(again).startswith("queued message")
    assert len(held.sent()) == 1


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_get_and_delete_of_2026_are_not_allowed(
    demo: Running, http: aiohttp.ClientSession, method: str
) -> None:
    """2026-07-28 has no session stream to open or end: GET and DELETE get 405, Allow: POST."""
    headers = {**_headers("tools/list"), "Accept": "text/event-stream"}
    async with http.request(method, demo.url("demo"), headers=headers) as response:
        assert (response.status, response.headers.get("Allow")) == (405, "POST")


async def test_a_held_call_can_be_finished_by_another_process(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Any process serves any stateless request: a call held on one gateway, repeated on a second gateway
    over the same store after approval, gets the result there; the upstream runs it once."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.3})
    other = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.3})
    async with mcp_client(held.url(), mode=MODERN) as client:
        first = await client.call_tool("send_email", EMAIL)
    approval_id = first.model_dump(by_alias=True)["_meta"]["approvals"]["approval_id"]
    assert (await held.api("POST", f"/api/approvals/{approval_id}/approve"))[0] == 200
    await held.recorder.status("completed", approval_id)
    async with mcp_client(other.url(), mode=MODERN) as client:
        again = await client.call_tool("send_email", EMAIL)
    assert not again.is_error
    assert _text(again).startswith("queued message")
    assert len(held.sent()) == 1


async def test_session_limits_count_a_grants_stateless_calls_together(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """No session without one: a per-session limit (the default) counts all of a grant's stateless calls."""
    policy = {"version": "1", "tools": {"get_time": {"rate_limit": {"max": 2, "window": 60}}}}
    held = await start_held(start_gateway, tmp_path, policy)
    async with mcp_client(held.url(), mode=MODERN) as one, mcp_client(held.url(), mode=MODERN) as two:
        results = [await one.call_tool("get_time", {}), await two.call_tool("get_time", {})]
        results.append(await two.call_tool("get_time", {}))
    assert [r.is_error for r in results] == [False, False, True]


async def test_pinned_client_through_the_time_server_and_server_everything(
    start_gateway: StartGateway, everything_url: str
) -> None:
    """mcp-server-time (stdio) and server-everything (Streamable HTTP), both initialize-era: a 2026-07-28
    client lists and calls through the gateway."""
    gw = await start_gateway(
        {"time": {"command": TIME_SERVER_COMMAND}, "everything": {"url": everything_url}}
    )
    async with mcp_client(gw.url("time"), mode="auto") as client:
        assert client.protocol_version == MODERN
        assert "get_current_time" in {t.name for t in (await client.list_tools()).tools}
        now = await client.call_tool("get_current_time", {"timezone": "UTC"})
    async with mcp_client(gw.url("everything"), mode="auto") as client:
        assert client.protocol_version == MODERN
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        echoed = await client.call_tool("echo", {"message": "héllo"})
    assert not now.is_error
    assert not echoed.is_error
    assert "héllo" in _text(echoed)


# ---- removed methods, input responses, stray session ids --------------------------------------


async def test_initialize_of_2026_is_method_not_found_404(demo: Running, http: aiohttp.ClientSession) -> None:
    """A 2026-07-28 initialize is a removed method: 404 and -32601; no session is opened."""
    status, reply, headers = await _post(
        http, demo.url("demo"), _request("initialize"), _headers("initialize")
    )
    assert (status, reply["error"]["code"], reply["id"]) == (404, -32601, 7)
    assert "Mcp-Session-Id" not in headers
    assert demo.app[GATEWAY].sessions == {}


async def test_initialize_of_2026_without_envelope_is_invalid_params(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """A 2026-07-28 initialize with no `_meta` envelope fails the ladder first: 400 and -32602."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {"protocolVersion": MODERN}}
    status, reply, _ = await _post(http, demo.url("demo"), body, _headers("initialize"))
    assert (status, reply["error"]["code"]) == (400, -32602)
    assert demo.app[GATEWAY].sessions == {}


async def test_initialize_era_initialize_still_opens_a_session(
    demo: Running, http: aiohttp.ClientSession
) -> None:
    """An initialize without a 2026-07-28 header is the handshake, as before: a session id comes back."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "r", "version": "1"},
        },
    }
    headers = {k: v for k, v in _headers("initialize").items() if k != "MCP-Protocol-Version"}
    status, reply, reply_headers = await _post(http, demo.url("demo"), body, headers)
    assert status == 200
    assert reply["result"]["protocolVersion"] == "2025-11-25"
    assert reply_headers.get("Mcp-Session-Id")


@pytest.mark.parametrize(
    "responses", [None, 12345, "yes", [], [{"action": "accept"}], {"user_name": 12345}, {"user_name": None}]
)
async def test_malformed_input_responses_are_invalid_params(
    demo: Running, http: aiohttp.ClientSession, responses: object
) -> None:
    """`inputResponses` that is not an object of objects is refused (400, -32602), never forwarded."""
    body = _request("tools/call", {"name": "get_time", "arguments": {}, "inputResponses": responses})
    headers = _headers("tools/call", **{"Mcp-Name": "get_time"})
    status, reply, _ = await _post(http, demo.url("demo"), body, headers)
    assert (status, reply["error"]["code"], reply["id"]) == (400, -32602, 7)


async def test_well_formed_input_responses_pass(demo: Running, http: aiohttp.ClientSession) -> None:
    """An object of response objects (extra keys included) passes the check: the call is served."""
    responses = {
        "user_name": {"action": "accept", "content": {"name": "Alice"}},
        "extra": {"action": "decline"},
    }
    body = _request("tools/call", {"name": "get_time", "arguments": {}, "inputResponses": responses})
    headers = _headers("tools/call", **{"Mcp-Name": "get_time"})
    status, reply, _ = await _post(http, demo.url("demo"), body, headers)
    assert status == 200
    assert reply["result"]["resultType"] == "complete"


@pytest.mark.parametrize("session_id", ["made-up", ""])
async def test_stray_session_id_is_ignored_by_a_2026_request(
    demo: Running, http: aiohttp.ClientSession, session_id: str
) -> None:
    """A 2026-07-28 request with an Mcp-Session-Id is served statelessly: the header is ignored."""
    headers = _headers("tools/list", **{"Mcp-Session-Id": session_id})
    status, reply, reply_headers = await _post(http, demo.url("demo"), _request("tools/list"), headers)
    assert status == 200
    assert reply["result"]["resultType"] == "complete"
    assert "Mcp-Session-Id" not in reply_headers
    assert demo.app[GATEWAY].sessions == {}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_get_and_delete_of_2026_with_a_stray_session_id_are_not_allowed(
    demo: Running, http: aiohttp.ClientSession, method: str
) -> None:
    """GET and DELETE of 2026-07-28 get 405 even with an Mcp-Session-Id: the era has no sessions."""
    headers = {**_headers("tools/list"), "Accept": "text/event-stream", "Mcp-Session-Id": "made-up"}
    async with http.request(method, demo.url("demo"), headers=headers) as response:
        assert (response.status, response.headers.get("Allow")) == (405, "POST")


async def test_concurrent_calls_with_one_progress_token_each_get_their_own_progress(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Two stateless calls of one grant share the pooled upstream session (stdio: progress is routed
    by its token alone) and both chose progress token "p": each stream gets its own three progress
    events, under "p", and its own answer."""
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    command = [sys.executable, str(Path(__file__).parent / "conformance_upstream.py"), "--stdio"]
    async with aiohttp.ClientSession() as http:
        running = await start_gateway({"up": {"command": command, "policy": "policy.json"}})

        async def progress_call(request_id: int) -> list[dict[str, Any]]:
            meta = {**ENVELOPE, "progressToken": "p"}
            params = {"name": "test_tool_with_progress", "arguments": {}, "_meta": meta}
            body = modern_request("tools/call", params, request_id)
            headers = modern_headers(body)
            async with http.post(running.url("up"), data=json.dumps(body), headers=headers) as answer:
                lines = (await answer.text()).splitlines()
            return [json.loads(line[5:]) for line in lines if line.startswith("data:") and line[5:].strip()]

        first, second = await asyncio.gather(progress_call(1), progress_call(2))
    for request_id, events in ((1, first), (2, second)):
        progress = [e for e in events if e.get("method") == "notifications/progress"]
        assert [e["params"]["progressToken"] for e in progress] == ["p"] * 3, events
        assert [e["params"]["progress"] for e in progress] == [0, 50, 100]
        assert events[-1]["id"] == request_id
        assert events[-1]["result"]["content"][0]["text"] == "Progress test completed"
