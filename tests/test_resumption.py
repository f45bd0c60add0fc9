"""Held-call streams are resumable: event ids, a priming event, and `GET` + `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import approvals.proxy.hold
from approvals.proxy import resume
from approvals.proxy.http_upstream import MAX_RESUMES
from approvals.proxy.resume import Replays, UnknownEvent
from approvals.proxy.sse import read_events
from tests.approvals_kit import Held, start_held
from tests.conftest import TOKEN_A, WAIT, StartGateway
from tests.rawmcp import RawSession, Reply

EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}
NEVER = 3600.0


@pytest.fixture(autouse=True)
def _no_sign_of_life(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals.proxy.hold, "SIGN_OF_LIFE_SECONDS", NEVER)


async def _session(http: aiohttp.ClientSession, held: Held) -> RawSession:
    raw = RawSession(http, held.url(), TOKEN_A)
    await raw.initialize()
    return raw


async def _first_event_id(response: aiohttp.ClientResponse) -> str:
    """The id of the stream's first event (the priming one), read off the raw bytes."""
    buffer = b""
    async with asyncio.timeout(WAIT):
        while b"\n\n" not in buffer:
            buffer += await response.content.readany()
    head = buffer.split(b"\n\n", 1)[0].decode()
    fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    assert fields.get("data", "") == ""  # priming: an id and no message
    return fields["id"]


async def _held_then_dropped(http: aiohttp.ClientSession, raw: RawSession) -> str:
    """Call send_email, read the priming event's id, then close the connection mid-hold."""
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "send_email", "arguments": EMAIL},
    }
    response = await http.post(raw.url, data=json.dumps(call), headers=raw.headers())
    assert response.headers["Content-Type"].startswith("text/event-stream")
    event_id = await _first_event_id(response)
    response.close()  # drops the connection: the client's stream is gone
    return event_id


async def _resume(http: aiohttp.ClientSession, raw: RawSession, event_id: str) -> tuple[int, list[Any]]:
    headers = {**raw.headers(), "Accept": "text/event-stream", "Last-Event-ID": event_id}
    async with asyncio.timeout(WAIT), http.get(raw.url, headers=headers) as response:
        if response.status != 200:
            return response.status, [await response.json()]
        return 200, [json.loads(event.data) async for event in read_events(response.content)]


async def test_a_dropped_held_call_resumes_with_its_result_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Drop the stream, approve, resume with Last-Event-ID: the result once; the same id again: 400."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with aiohttp.ClientSession() as http:
        raw = await _session(http, held)
        event_id = await _held_then_dropped(http, raw)
        pending = await held.recorder.status("pending")
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 200
        status, messages = await _resume(http, raw, event_id)
        assert status == 200
        assert [m["id"] for m in messages] == [7]
        assert messages[0]["result"].get("isError") is not True
        again, error = await _resume(http, raw, event_id)
    assert again == 400
    assert error[0]["error"]["code"] == -32600
    assert len(held.sent()) == 1  # released once


async def test_a_resume_before_the_decision_waits_for_it(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Resumed while still pending: the resumed stream carries the decision when it comes."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with aiohttp.ClientSession() as http:
        raw = await _session(http, held)
        event_id = await _held_then_dropped(http, raw)
        pending = await held.recorder.status("pending")
        resumed = asyncio.create_task(_resume(http, raw, event_id))
        assert (await held.api("POST", f"/api/approvals/{pending.id}/deny", body={"reason": "no"}))[0] == 200
        status, messages = await resumed
    assert status == 200
    assert [m["id"] for m in messages] == [7]
    assert messages[0]["result"]["isError"] is True


async def test_an_unknown_or_foreign_event_id_is_refused(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A made-up id, or a live id of another session, gets 400 / -32600, never that stream."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with aiohttp.ClientSession() as http:
        mine, other = await _session(http, held), await _session(http, held)
        event_id = await _held_then_dropped(http, mine)
        for session, bad in ((mine, "nonsense"), (mine, event_id + "9"), (other, event_id)):
            status, body = await _resume(http, session, bad)
            assert status == 400, bad
            assert body[0]["error"]["code"] == -32600


async def test_a_held_stream_before_2025_11_25_has_no_priming_event(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A 2025-03-26 client gets no empty-data event it might choke on; the answer still comes."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), TOKEN_A, version="2025-03-26")
        await raw.initialize()
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "send_email", "arguments": EMAIL},
        }
        response = await http.post(raw.url, data=json.dumps(call), headers=raw.headers())
        pending = await held.recorder.status("pending")
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve"))[0] == 200
        async with asyncio.timeout(WAIT):
            body = await response.read()
    events = [e for e in body.decode().split("\n\n") if e.strip()]
    datas = [line for e in events for line in e.splitlines() if line.startswith("data:")]
    assert [json.loads(d.removeprefix("data:"))["id"] for d in datas] == [1]  # no empty data
    assert all("id: " in e for e in events)  # still resumable from the answer's id


def _ended(replays: Replays, size: int) -> str:
    stream = replays.open(lambda: None, prime=True)
    stream._seq, stream._final = 1, (1, b"x" * size)  # an answer no connection took
    stream.ended = True
    replays.ended(stream)
    return f"{stream.key}.1"


def test_kept_answers_are_bounded_in_time_and_bytes() -> None:
    """An untaken answer is kept KEEP_SECONDS at most, and the oldest go first past the byte bound."""
    now = [0.0]
    replays = Replays(max_bytes=1000, clock=lambda: now[0])
    first = _ended(replays, 600)
    replays.find(first)
    second = _ended(replays, 600)  # 1200 bytes kept: over the bound, the oldest goes
    with pytest.raises(UnknownEvent):
        replays.find(first)
    replays.find(second)
    now[0] += resume.KEEP_SECONDS + 1
    with pytest.raises(UnknownEvent):
        replays.find(second)


class Closing:
    """A Streamable HTTP upstream that answers tools/call by closing its stream after an event id
    (SEP-1699), and gives the answer only on a `GET` + `Last-Event-ID` after `closes` more closes."""

    def __init__(self, closes: int) -> None:
        self.closes = closes
        self.resumed_from: list[str] = []
        self._call_id: object = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            last = request.headers.get("Last-Event-ID")
            if last is None:
                return web.Response(status=405)  # no standalone stream
            self.resumed_from.append(last)
            if len(self.resumed_from) <= self.closes:
                return await self._sse(request, f"e{len(self.resumed_from) + 1}", None)
            done = {"content": [{"type": "text", "text": "done"}]}
            return await self._sse(request, "last", {"jsonrpc": "2.0", "id": self._call_id, "result": done})
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        if message["method"] == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "closing", "version": "1"},
            }
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if message["method"] == "tools/call":
            self._call_id = message["id"]
            return await self._sse(request, "e1", None)
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {}})

    async def _sse(
        self, request: web.Request, event_id: str, message: dict[str, Any] | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        data = json.dumps(message) if message is not None else ""
        await response.write(f"id: {event_id}\nretry: 1\ndata: {data}\n\n".encode())
        await response.write_eof()  # closed without the answer, unless this is it
        return response


async def _through_closing(start_gateway: StartGateway, tmp_path: Path, closes: int) -> tuple[Closing, Reply]:
    upstream = Closing(closes)
    app = web.Application()
    app.router.add_route("*", "/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        (tmp_path / "policy.json").write_text(json.dumps({"version": "1", "default": "allow"}))
        url = str(server.make_url("/mcp"))
        gateway = await start_gateway({"closing": {"url": url, "policy": "policy.json"}})
        async with aiohttp.ClientSession() as http:
            raw = RawSession(http, gateway.url("closing"), TOKEN_A)
            await raw.initialize()
            call = {"name": "work", "arguments": {}}
            reply = await asyncio.wait_for(raw.request("tools/call", call), WAIT)
    finally:
        await server.close()
    return upstream, reply


async def test_an_upstream_that_closes_its_stream_mid_call_is_resumed(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The upstream closes the call's stream twice after an event id: the gateway reconnects with
    Last-Event-ID each time and the call gets its answer."""
    upstream, reply = await _through_closing(start_gateway, tmp_path, closes=1)
    assert upstream.resumed_from == ["e1", "e2"]
    assert reply.last["result"]["content"][0]["text"] == "done"


async def test_an_upstream_that_never_answers_after_reconnects_fails_the_call(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Reconnects are bounded: after MAX_RESUMES the call gets -32001, not an endless loop."""
    upstream, reply = await _through_closing(start_gateway, tmp_path, closes=1000)
    assert len(upstream.resumed_from) == MAX_RESUMES
    assert reply.last["error"]["code"] == -32001
