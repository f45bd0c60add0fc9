"""Hostile input at the MCP endpoint: every tools/call judged, bodies and answers bounded.

A lenient upstream (a tiny aiohttp app here) runs whatever it gets and records it, so a test can
see that a refused call never reached it; the demo upstream (the MCP SDK) shows the real bypass.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from approvals.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, UPSTREAM_UNAVAILABLE
from approvals.proxy.sse import SSE_HEADERS
from tests.approvals_kit import start_held
from tests.conftest import PROBE_COMMAND, TOKEN_A, WAIT, Running, StartGateway
from tests.rawmcp import RawSession

NOW = 1_800_000_010.0  # a frozen clock: the rate limit's window does not roll over mid-test
LIMIT = 1024 * 1024  # server.max_body_bytes in the answer tests
CPU_BOUND = 0.5  # seconds; inflating the 1 GiB bomb costs 1 s or more
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "list_files": {"action": "deny"},
        "get_time": {"action": "require_approval"},
        "send_email": {"limits": [{"counter": "mail", "window": "day", "max": 1, "scope": "grant"}]},
        "echo": {},
    },
}
NOT_OBJECTS = [[], "x", 1, True]


def gzip_bomb(inflated: int = 1 << 30) -> bytes:
    """A gzip body of about inflated/1000 bytes that inflates to `inflated` zero bytes.

    Full flushes make every MiB compress to the same bytes, so the bomb is built by repetition
    in milliseconds; its trailer is never reached (the stream has no end).
    """
    mib = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + repeated * (inflated // len(mib) - 1)


def _result(message_id: object, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def _text_result(message_id: object, text: str) -> dict[str, Any]:
    return _result(message_id, {"content": [{"type": "text", "text": text}]})


Answer = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class Lenient:
    """A lenient Streamable HTTP MCP server: it runs any tools/call, whatever its arguments.

    Each call is recorded with the client port it came on (a new port: a new connection).
    """

    answers: dict[str, Answer] = field(default_factory=dict)
    calls: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(status=405 if request.method == "GET" else 200)
        message = await request.json()
        method = message.get("method")
        if "id" not in message:
            return web.Response(status=202)
        if method == "initialize":
            result = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "lenient", "version": "1"},
            }
            return web.json_response(_result(message["id"], result), headers={"Mcp-Session-Id": "lenient"})
        if method == "tools/list":
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in POLICY["tools"]]
            return web.json_response(_result(message["id"], {"tools": tools}))
        if method != "tools/call":
            return web.json_response(_result(message["id"], {}))
        params = message["params"]
        self.calls.append((request.transport.get_extra_info("peername")[1], params))  # type: ignore[union-attr]
        answer = self.answers.get(params.get("name"))
        if answer is not None:
            return await answer(request, message)
        return web.json_response(_text_result(message["id"], json.dumps(params.get("arguments"))))

    def arguments(self) -> list[object]:
        return [params.get("arguments", "missing") for _, params in self.calls]


@pytest.fixture
async def lenient() -> AsyncIterator[tuple[Lenient, str]]:
    """The lenient upstream on 127.0.0.1, and its /mcp URL."""
    upstream = Lenient()
    app = web.Application()
    app.router.add_route("*", "/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield upstream, str(server.make_url("/mcp"))
    await server.close()


async def _judged_gateway(start_gateway: StartGateway, tmp_path: Path, url: str) -> Running:
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    upstreams = {"lenient": {"url": url, "policy": "policy.json"}}
    return await start_gateway(upstreams, clock=lambda: NOW)


async def _session(http: aiohttp.ClientSession, url: str) -> RawSession:
    raw = RawSession(http, url, token=TOKEN_A)
    await raw.initialize()
    return raw


def _call(name: object, **arguments: object) -> dict[str, Any]:
    return {"name": name, **arguments}


# ---- item 1: every call is judged ------------------------------------------------------------


async def test_null_arguments_are_denied_and_held_exactly_as_empty_ones_on_the_sdk_upstream(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """On the demo (SDK) upstream, which runs null as {}: a denied tool is denied, a held one held."""
    policy = {"version": "1", "default": "deny", "tools": POLICY["tools"]}
    held = await start_held(start_gateway, tmp_path, policy)
    raw = await _session(http, held.url())
    as_empty = await raw.request("tools/call", _call("list_files", arguments={}))
    as_null = await raw.request("tools/call", _call("list_files", arguments=None))
    assert as_null.last["result"] == as_empty.last["result"]
    assert as_null.last["result"]["isError"] is True
    reply = asyncio.create_task(raw.request("tools/call", _call("get_time", arguments=None)))
    pending = await held.recorder.status("pending")
    assert (pending.tool, json.loads(pending.arguments_json)) == ("get_time", {})
    assert (await held.api("POST", f"/api/approvals/{pending.id}/deny"))[0] == 200
    assert (await asyncio.wait_for(reply, WAIT)).last["result"]["isError"] is True


async def test_missing_or_null_arguments_are_forwarded_as_the_empty_object_that_was_judged(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, lenient: tuple[Lenient, str]
) -> None:
    """An allowed call with no or null arguments reaches the upstream with arguments {}."""
    upstream, url = lenient
    raw = await _session(http, (await _judged_gateway(start_gateway, tmp_path, url)).url("lenient"))
    for call in (_call("echo"), _call("echo", arguments=None)):
        assert "result" in (await raw.request("tools/call", call)).last
    assert upstream.arguments() == [{}, {}]


@pytest.mark.parametrize("arguments", NOT_OBJECTS)
async def test_non_object_arguments_are_refused_and_never_forwarded(
    start_gateway: StartGateway,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    lenient: tuple[Lenient, str],
    arguments: object,
) -> None:
    """[] "x" 1 true as arguments: -32602 for an allowed, a denied and a held tool; the upstream sees none."""
    upstream, url = lenient
    raw = await _session(http, (await _judged_gateway(start_gateway, tmp_path, url)).url("lenient"))
    for tool in ("echo", "list_files", "get_time"):
        reply = await raw.request("tools/call", _call(tool, arguments=arguments))
        assert reply.status == 200
        assert reply.last["error"]["code"] == INVALID_PARAMS
    assert upstream.calls == []


@pytest.mark.parametrize("params", [{}, {"name": None}, {"name": 5}, {"name": ["echo"]}])
async def test_a_call_without_a_string_name_is_refused_and_never_forwarded(
    start_gateway: StartGateway,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    lenient: tuple[Lenient, str],
    params: dict[str, Any],
) -> None:
    """A missing or non-string tool name is -32602, never forwarded unjudged."""
    upstream, url = lenient
    raw = await _session(http, (await _judged_gateway(start_gateway, tmp_path, url)).url("lenient"))
    reply = await raw.request("tools/call", {**params, "arguments": {}})
    assert reply.last["error"]["code"] == INVALID_PARAMS
    assert upstream.calls == []


async def test_a_tools_call_notification_is_refused_and_never_forwarded(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, lenient: tuple[Lenient, str]
) -> None:
    """A tools/call without an id cannot be answered by the gate, so it is refused (400), not forwarded."""
    upstream, url = lenient
    raw = await _session(http, (await _judged_gateway(start_gateway, tmp_path, url)).url("lenient"))
    reply = await raw.notify("tools/call", _call("echo", arguments={}))
    assert reply.status == 400
    assert reply.last["error"]["code"] == INVALID_REQUEST
    assert upstream.calls == []


async def test_an_exhausted_rate_limit_holds_for_null_and_non_object_arguments(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession, lenient: tuple[Lenient, str]
) -> None:
    """Once send_email's one call a day is used, null arguments are rate limited and [] refused."""
    upstream, url = lenient
    raw = await _session(http, (await _judged_gateway(start_gateway, tmp_path, url)).url("lenient"))
    assert (
        "isError" not in (await raw.request("tools/call", _call("send_email", arguments={}))).last["result"]
    )
    limited = (await raw.request("tools/call", _call("send_email", arguments=None))).last["result"]
    assert limited["_meta"]["approvals"]["code"] == "rate_limited"
    for arguments in NOT_OBJECTS:
        reply = await raw.request("tools/call", _call("send_email", arguments=arguments))
        assert reply.last["error"]["code"] == INVALID_PARAMS
    assert upstream.arguments() == [{}]


# ---- items 7 and 9: request bodies are decoded within bounds, after authentication ------------


PING = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping"}).encode()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("gzip", PING), ("deflate", PING), ("gzip", zlib.compress(PING, 9)[:2] + b"garbage")],
)
async def test_a_body_that_is_not_in_its_content_encoding_is_400(
    start_gateway: StartGateway, http: aiohttp.ClientSession, encoding: str, body: bytes
) -> None:
    """Bytes that do not decode as their Content-Encoding says: 400 with -32700, not 500."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    raw = await _session(http, gw.url("probe"))
    reply = await raw.post(body, **{"Content-Encoding": encoding})
    assert reply.status == 400
    assert reply.last["error"]["code"] == PARSE_ERROR


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, gzip", "bogus"])
async def test_an_unsupported_content_encoding_is_415(
    start_gateway: StartGateway, http: aiohttp.ClientSession, encoding: str
) -> None:
    """A coding the gateway does not decode is refused with 415, not read as if it were plain."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    raw = await _session(http, gw.url("probe"))
    reply = await raw.post(PING, **{"Content-Encoding": encoding})
    assert reply.status == 415
    assert reply.last["error"]["code"] == INVALID_REQUEST


@pytest.mark.parametrize("wbits", [31, 15])
async def test_gzip_and_deflate_bodies_are_decoded(
    start_gateway: StartGateway, http: aiohttp.ClientSession, wbits: int
) -> None:
    """A well-formed gzip or deflate (zlib) body is decoded and answered."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    raw = await _session(http, gw.url("probe"))
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = compressor.compress(PING) + compressor.flush()
    reply = await raw.post(body, **{"Content-Encoding": "gzip" if wbits == 31 else "deflate"})
    assert (reply.status, reply.last["result"]) == (200, {})


async def _bomb_then_ping(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, float]:
    """POST the 1 GiB bomb, then a ping on the same connection: the status and the CPU both took."""
    bomb = gzip_bomb()
    cpu = time.process_time()
    headers = {**headers, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with http.post(url, data=io.BytesIO(bomb), headers=headers) as response:
        status = response.status
    # The same connection: the ping is read only once the server is done with the bomb's body.
    async with http.post(url, data=PING, headers={"Content-Type": "application/json"}) as response:
        assert response.status in (400, 401)
    return status, time.process_time() - cpu


async def test_an_unauthenticated_gzip_bomb_is_refused_without_being_inflated(
    start_gateway: StartGateway,
) -> None:
    """401 for a 1 MiB gzip body without a token, and its 1 GiB is never inflated."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection:
        status, cpu = await _bomb_then_ping(one_connection, gw.url("probe"), {})
    assert status == 401
    assert cpu < CPU_BOUND


async def test_an_authenticated_gzip_bomb_is_413_and_others_are_answered_meanwhile(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """With a token, the bomb is inflated only up to max_body_bytes (413); another client gets its answer."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    other = await _session(http, gw.url("probe"))
    auth = {"Authorization": f"Bearer {TOKEN_A}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection:
        bomb = asyncio.create_task(_bomb_then_ping(one_connection, gw.url("probe"), auth))
        started = time.monotonic()
        assert (await other.request("ping")).status == 200
        assert time.monotonic() - started < WAIT
        status, cpu = await asyncio.wait_for(bomb, WAIT)
    assert status == 413
    assert cpu < CPU_BOUND


# ---- item 10: answers from HTTP upstreams are bounded ----------------------------------------


def _padded(message: dict[str, Any], size: int) -> bytes:
    return json.dumps(_text_result(message["id"], "x" * size)).encode()


async def _json_with_length(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    return web.Response(body=_padded(message, 48 * LIMIT), content_type="application/json")


async def _stream(response: web.StreamResponse, request: web.Request, pieces: AsyncIterator[bytes]) -> None:
    await response.prepare(request)
    try:
        async for piece in pieces:
            await response.write(piece)
    except ConnectionError:
        pass  # the gateway hung up: what the test expects


async def _pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _json_chunked(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await _stream(response, request, _pieces(_padded(message, 48 * LIMIT)))
    return response


async def _sse_big_event(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await _stream(response, request, _pieces(b"data: " + _padded(message, 2 * LIMIT) + b"\n\n"))
    return response


async def _sse_endless_line(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    async def endless() -> AsyncIterator[bytes]:
        yield b"data: "
        for _ in range(64):  # far past the limit; the gateway must hang up well before
            yield b"x" * LIMIT

    response = web.StreamResponse(headers=SSE_HEADERS)
    await _stream(response, request, endless())
    return response


async def _gzip_bomb(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    return web.Response(body=gzip_bomb(), headers=headers)


async def _fits(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    # Just under the limit, in many small chunks: the answer is put together whole and in order.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await _stream(response, request, _pieces(_padded(message, LIMIT - 1000), 997))
    return response


OVERSIZE: dict[str, Answer] = {
    "json_with_length": _json_with_length,
    "json_chunked": _json_chunked,
    "sse_big_event": _sse_big_event,
    "sse_endless_line": _sse_endless_line,
    "gzip_bomb": _gzip_bomb,
}


@pytest.mark.parametrize("tool", sorted(OVERSIZE))
async def test_an_oversize_answer_is_a_clear_error_and_its_connection_is_dropped(
    start_gateway: StartGateway, http: aiohttp.ClientSession, lenient: tuple[Lenient, str], tool: str
) -> None:
    """JSON (sized or chunked), an SSE event, an endless SSE line or a gzip bomb over max_body_bytes."""
    upstream, url = lenient
    upstream.answers.update(OVERSIZE)
    upstream.answers["fits"] = _fits
    gw = await start_gateway({"lenient": {"url": url}}, server={"max_body_bytes": LIMIT})
    raw = await _session(http, gw.url("lenient"))
    cpu = time.process_time()
    error = (await raw.request("tools/call", _call(tool, arguments={}))).last["error"]
    assert error["code"] == UPSTREAM_UNAVAILABLE
    assert str(LIMIT) in error["message"]
    assert time.process_time() - cpu < 2 * CPU_BOUND
    fits = await raw.request("tools/call", _call("fits", arguments={}))
    assert fits.last["result"]["content"][0]["text"] == "x" * (LIMIT - 1000)
    (first_port, _), (second_port, _) = upstream.calls
    assert first_port != second_port  # the connection of the refused answer was not reused


async def _too_deep(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    deep = "[" * 5000 + "]" * 5000
    body = f'{{"jsonrpc":"2.0","id":{message["id"]},"result":{{"content":{deep}}}}}'
    return web.Response(text=body, content_type="application/json")


async def _infinite(request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
    body = f'{{"jsonrpc":"2.0","id":{message["id"]},"result":{{"content":[],"n":1e400}}}}'
    return web.Response(text=body, content_type="application/json")


@pytest.mark.parametrize("tool", ["too_deep", "infinite"])
async def test_an_answer_the_gateway_would_not_accept_from_a_client_is_an_error(
    start_gateway: StartGateway, http: aiohttp.ClientSession, lenient: tuple[Lenient, str], tool: str
) -> None:
    """An upstream answer nested past MAX_JSON_DEPTH or holding 1e400 is a JSON-RPC error, not a
    crash of the connection and not `Infinity` passed on to the client."""
    upstream, url = lenient
    upstream.answers.update({"too_deep": _too_deep, "infinite": _infinite})
    gw = await start_gateway({"lenient": {"url": url}})
    raw = await _session(http, gw.url("lenient"))
    reply = await raw.request("tools/call", _call(tool, arguments={}))
    assert reply.last["error"]["code"] == UPSTREAM_UNAVAILABLE
    assert (await raw.request("ping")).status == 200  # the session lives on
