"""Nothing a client sends or leaves behind grows the gateway without bound, and bad tokens are refused.

Sessions per grant and in all, idle sessions, the messages kept for a client stream, slow requests,
calls held per approval, and progress tokens that are not a string or a number.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.config import UpstreamSettings
from approvals.core.model import Admission, ToolCall
from approvals.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, JsonObject
from approvals.proxy.gate import AllowAll
from approvals.proxy.gateway import Gateway
from approvals.proxy.keys import GATEWAY
from approvals.proxy.session import MAX_WAITING_MESSAGES, Session
from approvals.proxy.sse import read_events
from tests.conftest import PROBE_COMMAND, TOKEN_A, TOKEN_B, WAIT, StartGateway
from tests.rawmcp import ACCEPT, RawSession

# The lightest stdio upstream: answers every request, so many sessions start fast.
STUB = """
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" in m and "method" in m:
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {},
             "serverInfo": {"name": "stub", "version": "1"}} if m["method"] == "initialize" else {}
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"""
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


def stub(marker: str) -> dict[str, dict[str, Any]]:
    """The stub as the upstream "stub"; `marker` on its command line finds its processes."""
    return {"stub": {"command": [sys.executable, "-c", STUB, marker]}}


def processes_with(marker: str) -> list[int]:
    """The pids of live processes whose command line holds `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue  # it ended while we looked
    return pids


# ---- item 8: progress tokens -----------------------------------------------------------------


@pytest.mark.parametrize("token", [{"a": 1}, [1], True, None, 2.5])
async def test_a_progress_token_that_is_not_a_string_or_number_is_refused(
    start_gateway: StartGateway, http: Any, token: object
) -> None:
    """-32602 before anything is registered; the session then still delivers the upstream's requests."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize({"roots": {}})
    params = {"name": "echo", "arguments": {"text": "x"}, "_meta": {"progressToken": token}}
    bad = await raw.post({"jsonrpc": "2.0", "id": "bad", "method": "tools/call", "params": params})
    assert bad.status == 200
    assert bad.last["error"]["code"] == INVALID_PARAMS
    assert bad.last["id"] == "bad"
    session = gw.app[GATEWAY].sessions[str(raw.session_id)]
    assert not session.busy  # no exchange left registered

    # The probe's ask_roots sends roots/list, which belongs to no request: it reaches the GET stream.
    headers = {**raw.headers(), "Accept": "text/event-stream"}
    async with http.get(raw.url, headers=headers) as stream:
        events = read_events(stream.content)
        call = asyncio.create_task(raw.request("tools/call", {"name": "ask_roots", "arguments": {}}))
        asked = json.loads((await asyncio.wait_for(anext(events), WAIT)).data)
        assert asked["method"] == "roots/list"
        roots = {"roots": [{"uri": "file:///still/delivered"}]}
        await raw.post({"jsonrpc": "2.0", "id": asked["id"], "result": roots})
        answer = await asyncio.wait_for(call, WAIT)
    assert "file:///still/delivered" in json.dumps(answer.last)


async def test_a_string_or_integer_progress_token_is_accepted(start_gateway: StartGateway, http: Any) -> None:
    """A string or an integer progress token passes, and the call is answered."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}})
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize()
    for token in ("t-1", 7):
        params = {"name": "echo", "arguments": {"text": "x"}, "_meta": {"progressToken": token}}
        reply = await raw.request("tools/call", params)
        assert "result" in reply.last, token


# ---- item 11: sessions -------------------------------------------------------------------------


async def test_sessions_are_capped_per_grant_and_in_total(start_gateway: StartGateway, http: Any) -> None:
    """Beyond max_sessions_per_grant or max_sessions, initialize gets 429; ending one makes room."""
    marker = "cap-marker-7d1"
    server = {"max_sessions": 3, "max_sessions_per_grant": 2}
    gw = await start_gateway(stub(marker), server=server)
    a1, a2, a3 = (RawSession(http, gw.url("stub"), token=TOKEN_A) for _ in range(3))
    b1, b2 = (RawSession(http, gw.url("stub"), token=TOKEN_B) for _ in range(2))
    await a1.initialize()
    await a2.initialize()
    refused = await a3.request("initialize", INIT)
    assert refused.status == 429
    assert refused.last["error"]["code"] == INVALID_REQUEST
    await b1.initialize()  # another grant: within the total
    refused = await b2.request("initialize", INIT)
    assert refused.status == 429
    assert len(processes_with(marker)) == 3  # a refused initialize starts no upstream

    async with http.delete(a1.url, headers=a1.headers()) as deleted:
        assert deleted.status == 200
    await a3.initialize()
    assert len(gw.app[GATEWAY].sessions) == 3


async def test_abandoned_sessions_are_ended_with_their_upstream_processes(
    start_gateway: StartGateway, http: Any
) -> None:
    """20 sessions left without a handshake end at abandoned_session_idle, and their processes with them."""
    marker = "reap-marker-3f9"
    server = {"abandoned_session_idle": 60, "session_idle": 3600, "max_sessions_per_grant": 20}
    gw = await start_gateway(stub(marker), server=server)
    gateway: Gateway = gw.app[GATEWAY]
    for _ in range(20):  # initialize, then the client is gone: no notifications/initialized
        assert (
            await RawSession(http, gw.url("stub"), token=TOKEN_A).request("initialize", INIT)
        ).status == 200
    quiet = RawSession(http, gw.url("stub"), token=TOKEN_B)
    await quiet.initialize()  # initialized: the longer session_idle applies
    listening = RawSession(http, gw.url("stub"), token=TOKEN_B)
    await listening.initialize()
    headers = {**listening.headers(), "Accept": "text/event-stream"}
    async with http.get(listening.url, headers=headers) as stream:
        assert stream.status == 200
        assert len(processes_with(marker)) == 22

        ended = await gateway.reap(gateway.clock() + 60)
        assert len(ended) == 20
        assert len(processes_with(marker)) == 2  # only the two live sessions' upstreams
        assert set(gateway.sessions) == {quiet.session_id, listening.session_id}

        ended = await gateway.reap(gateway.clock() + 3600)
        assert [s.id for s in ended] == [quiet.session_id]  # an open stream is a client still there
        assert len(processes_with(marker)) == 1


def test_a_session_whose_stream_closed_counts_as_abandoned() -> None:
    """Once its last GET stream closes, a session ends at the shorter idle time; while open it is busy."""
    session = Session("s", "agent-a", UpstreamSettings("u", None, ("true",)))
    session.initialized = True
    assert not session.abandoned
    stream = session.open_stream()
    assert session.busy
    assert not session.abandoned
    session.close_stream(stream)
    assert not session.busy
    assert session.abandoned


# ---- item 11: messages kept for client streams ------------------------------------------------


def _note(n: int, size: int = 100) -> JsonObject:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n, "pad": "x" * size}}


def test_waiting_messages_are_bounded_in_bytes_and_count() -> None:
    """With no stream open, the newest messages are kept within max_backlog_bytes and the count cap."""
    session = Session("s", "agent-a", UpstreamSettings("u", None, ("true",)), max_backlog_bytes=2000)
    for n in range(100):
        session.divert(_note(n))
    assert 0 < session.waiting_bytes <= 2000
    stream = session.open_stream()
    kept = [item["params"]["n"] for item in stream.take_all()]
    assert kept == list(range(100 - len(kept), 100))  # the oldest were dropped

    session.close_stream(stream)
    roomy = Session("r", "agent-a", UpstreamSettings("u", None, ("true",)), max_backlog_bytes=10**9)
    for n in range(MAX_WAITING_MESSAGES + 5):
        roomy.divert(_note(n, 1))
    assert len(roomy.open_stream().take_all()) == MAX_WAITING_MESSAGES


async def test_a_get_stream_the_client_does_not_read_is_ended(start_gateway: StartGateway, http: Any) -> None:
    """A GET stream more than max_backlog_bytes behind is closed; its messages wait for the next one."""
    limit = 256 * 1024
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}}, server={"max_backlog_bytes": limit})
    raw = RawSession(http, gw.url("probe"), token=TOKEN_A)
    await raw.initialize()
    session = gw.app[GATEWAY].sessions[str(raw.session_id)]
    headers = {**raw.headers(), "Accept": "text/event-stream"}
    async with http.get(raw.url, headers=headers) as unread:
        assert unread.status == 200
        sent = 0
        # The client reads nothing: once the sockets' buffers are full, the gateway's backlog grows.
        while session.stream_count and sent < 4000:  # at most 256 MiB: far beyond any socket buffer
            session.divert(_note(sent, 64 * 1024))
            sent += 1
            await asyncio.sleep(0)  # a turn of the loop for the socket I/O, not a timed wait
        assert session.stream_count == 0, "the unread stream was never ended"
        assert session.waiting_bytes <= limit
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(unread.content.read(), WAIT)  # the connection was cut
    async with http.get(raw.url, headers={**headers, "Accept": ACCEPT}) as fresh:
        first = json.loads((await asyncio.wait_for(anext(read_events(fresh.content)), WAIT)).data)
        assert first["params"]["n"] > 0  # kept messages, the newest ones


# ---- item 11: slow requests ----------------------------------------------------------------


async def test_a_slow_request_head_or_body_is_cut_off(start_gateway: StartGateway) -> None:
    """A connection that does not finish its headers within read_timeout is closed; a slow body gets 408."""
    gw = await start_gateway({"probe": {"command": PROBE_COMMAND}}, server={"read_timeout": 0.3})
    host, port = gw.server.host, gw.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /mcp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
    writer.close()

    reader, writer = await asyncio.open_connection(host, port)
    head = (
        "POST /mcp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: {ACCEPT}\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Length: 100\r\n\r\n"
    )
    writer.write(head.encode() + b'{"jsonrpc"')  # 10 of the 100 bytes promised
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.split()[1] == b"408"
    writer.close()


# ---- item 11: holds per approval ----------------------------------------------------------------

PENDING = {"content": [{"type": "text", "text": "still pending"}], "isError": False}


class OneApproval:
    """A hold that every call shares, decided when the test says so."""

    approval_id = "approval-1"

    def __init__(self, waiters: int) -> None:
        self.waiting = 0
        self.all_waiting = asyncio.Event()
        self.expected = waiters
        self.decided = asyncio.Event()

    async def wait(self, timeout: float) -> JsonObject | None:
        self.waiting += 1
        if self.waiting >= self.expected:
            self.all_waiting.set()
        try:
            await asyncio.wait_for(self.decided.wait(), timeout)
        except TimeoutError:
            return None
        return {"result": {"content": [{"type": "text", "text": "approved and run"}]}}

    def status(self, now: float) -> str:
        return "waiting"

    def pending_result(self, now: float) -> JsonObject:
        return PENDING

    def delivered(self) -> None:
        pass

    async def cancel(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass


class HoldEverything(AllowAll):
    def __init__(self, hold: OneApproval) -> None:
        self.hold = hold

    async def admit(self, call: ToolCall) -> Admission:
        return Admission(hold=self.hold)


async def test_repeat_calls_beyond_the_hold_cap_get_the_pending_result_at_once(
    start_gateway: StartGateway, http: Any
) -> None:
    """With max_holds_per_approval = 2, a third call on the same approval is answered now, as pending."""
    hold = OneApproval(waiters=2)
    gw = await start_gateway(
        stub("holds-marker-5a2"), gate=HoldEverything(hold), approvals={"max_holds_per_approval": 2}
    )
    raw = RawSession(http, gw.url("stub"), token=TOKEN_A)
    await raw.initialize()
    call = {"name": "anything", "arguments": {}}
    held = [asyncio.create_task(raw.request("tools/call", call)) for _ in range(2)]
    await asyncio.wait_for(hold.all_waiting.wait(), WAIT)
    extra = await asyncio.wait_for(raw.request("tools/call", call), 10)
    assert extra.status == 200
    assert extra.headers["Content-Type"].startswith("application/json")  # not a held stream
    assert extra.last["result"] == PENDING
    assert gw.app[GATEWAY].holds == {"approval-1": 2}

    hold.decided.set()
    for reply in await asyncio.wait_for(asyncio.gather(*held), WAIT):
        assert reply.last["result"]["content"][0]["text"] == "approved and run"
    assert not gw.app[GATEWAY].holds
