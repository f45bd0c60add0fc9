"""approvals.proxy.http1, the gateway's own HTTP/1.1 client: its parser fed in pieces, and its pool
against real servers on 127.0.0.1 (keep-alive reuse, closes at every point, a silent upstream).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from approvals.config import UPSTREAM_CLIENTS
from approvals.errors import ConfigError
from approvals.jsonrpc import UPSTREAM_UNAVAILABLE
from approvals.proxy.http1 import MAX_HEAD_BYTES, Connection, HttpError, Pool, Url, request_bytes
from tests.conftest import TOKEN_A, WAIT, StartGateway, settings_for
from tests.rawmcp import RawSession

CPU_BOUND = 0.5  # seconds


class Transport:
    """What the parser writes to and closes; the test feeds it bytes."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@dataclass
class Received:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    error: Exception | None = None
    calls: int = 0  # of end and fail together: the Receiver contract says exactly one, once
    over: asyncio.Event = field(default_factory=asyncio.Event)

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    def data(self, chunk: bytes) -> None:
        self.body += chunk

    def end(self) -> None:
        self.ended = True
        self.calls += 1
        self.over.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.calls += 1
        self.over.set()


def _exchange(response: bytes, step: int) -> tuple[Connection, Pool, Received]:
    """`response` fed to a fresh connection `step` bytes at a time."""
    pool = Pool()
    conn = Connection(pool, ("http", "127.0.0.1", 1))
    conn.connection_made(Transport())  # type: ignore[arg-type]
    received = Received()
    conn.send(b"POST / HTTP/1.1\r\n\r\n", received)
    for start in range(0, len(response), step):
        conn.data_received(response[start : start + step])
    return conn, pool, received


ORIGIN = Url.parse("http://127.0.0.1:1/")
BODY = b'{"jsonrpc":"2.0","id":1,"result":{}}'
GZIPPED = zlib.compress(BODY)


def _chunked(body: bytes, size: int, eol: bytes = b"\r\n") -> bytes:
    chunks = b"".join(
        b"%x;ext=1%s%s%s" % (len(body[i : i + size]), eol, body[i : i + size], eol)
        for i in range(0, len(body), size)
    )
    return chunks + b"0" + eol + b"X-Trailer: yes" + eol + eol


def _responses(eol: bytes) -> dict[str, bytes]:
    """The same responses with `eol` ending every line of the framing (never inside a body)."""

    def head(*lines: bytes) -> bytes:
        return b"".join(line + eol for line in lines) + eol

    chunked = head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked")
    gzip = head(b"HTTP/1.1 200 OK", b"Content-Encoding: gzip", b"Content-Length: %d" % len(GZIPPED))
    return {
        "length": head(b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(BODY)) + BODY,
        "chunked": chunked + _chunked(BODY, 5, eol),
        "one_byte_chunks": chunked + _chunked(BODY, 1, eol),
        "gzip": head(b"HTTP/1.1 100 Continue") + gzip + GZIPPED,
        "no_headers_empty": head(b"HTTP/1.1 204 No Content"),
    }


RESPONSES = _responses(b"\r\n")
LF_RESPONSES = _responses(b"\n")


def _expected(kind: str) -> bytes:
    return b"" if kind == "no_headers_empty" else BODY


# ---- the parser, fed in pieces ---------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 7, 4096])
@pytest.mark.parametrize("kind", sorted(RESPONSES))
def test_http1_parses_responses_however_they_are_split(kind: str, step: int) -> None:
    """Sized, chunked (extensions, trailers) and gzip bodies, fed in pieces: whole body, then reuse."""
    conn, pool, received = _exchange(RESPONSES[kind], step)
    assert (bytes(received.body), received.ended, received.error) == (_expected(kind), True, None)
    assert received.status in (200, 204)
    assert pool.take(ORIGIN) is conn  # complete and keep-alive: back in the pool


@pytest.mark.parametrize("step", [1, 3, 4096])
@pytest.mark.parametrize("kind", sorted(LF_RESPONSES))
def test_http1_accepts_lf_only_line_endings(kind: str, step: int) -> None:
    """A lone LF ends a head, chunk or trailer line (RFC 9112 2.2 lets a recipient accept it)."""
    conn, pool, received = _exchange(LF_RESPONSES[kind], step)
    assert (bytes(received.body), received.ended, received.error) == (_expected(kind), True, None)
    assert pool.take(ORIGIN) is conn


def test_http1_accepts_crlf_and_lf_mixed_in_one_response() -> None:
    """CRLF on some lines and a lone LF on others, the blank line included: one response, framed right."""
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\n\r\n5\nhello\r\n0\r\n\n"
    _, _, received = _exchange(response, 1)
    assert (bytes(received.body), received.ended) == (b"hello", True)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\rContent-Length: 2\r\n\r\nhi",  # a bare CR between status line and header
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nhi",  # inside a header value
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\r\n\r\nhi",  # before a CRLF
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r;a=b\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\rX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n",
    ],
)
@pytest.mark.parametrize("step", [1, 4096])
def test_http1_refuses_a_bare_cr(response: bytes, step: int) -> None:
    """A CR not followed by LF in a head, chunk line or trailer fails the response (RFC 9112 2.2)."""
    _, pool, received = _exchange(response, step)
    assert isinstance(received.error, HttpError)
    assert not received.ended
    assert pool.take(ORIGIN) is None


@pytest.mark.parametrize("kind", ["length", "chunked"])
def test_http1_fails_a_response_whose_connection_closes_mid_body(kind: str) -> None:
    """A sized or chunked body cut short by the connection closing fails; it is not taken as complete."""
    conn, pool, received = _exchange(RESPONSES[kind][:-10], 3)
    conn.connection_lost(None)
    assert isinstance(received.error, HttpError)
    assert (received.ended, received.calls) == (False, 1)
    assert pool.take(ORIGIN) is None


def test_http1_takes_a_body_without_length_as_ended_by_the_close() -> None:
    """No Content-Length and no chunking: the body is what comes until the connection closes."""
    conn, pool, received = _exchange(b"HTTP/1.1 200 OK\r\n\r\n" + BODY, 5)
    conn.connection_lost(None)
    assert (bytes(received.body), received.ended, received.error) == (BODY, True, None)
    assert pool.take(ORIGIN) is None


@pytest.mark.parametrize(
    "tail",
    [
        b"zz\r\n",
        b"-5\r\nhello\r\n",
        b"+5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"5_0\r\n",
        b"\r\n",
        b"5\r\nhelloXX",
        b"0\r\nX-Trailer: " + b"x" * (MAX_HEAD_BYTES + 1),
    ],
)
def test_http1_fails_a_malformed_chunked_body(tail: bytes) -> None:
    """A bad chunk size (sign, 0x, _, none), a chunk without its CRLF, or an endless trailer: it fails."""
    _, pool, received = _exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + tail, 4096)
    assert isinstance(received.error, HttpError)
    assert pool.take(ORIGIN) is None


@pytest.mark.parametrize("length", [b"-1", b"+2", b"0x2", b"2_0", b"2, 3", b""])
def test_http1_fails_a_malformed_content_length(length: bytes) -> None:
    """Content-Length is digits only: a sign, a base prefix, a list or nothing fails the response."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhi"
    _, pool, received = _exchange(response, 4096)
    assert isinstance(received.error, HttpError)
    assert pool.take(ORIGIN) is None


def test_http1_does_not_reuse_a_connection_after_chunked_with_content_length() -> None:
    """Both framings named: chunked wins (the body is whole) and the connection is not pooled."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
    _, pool, received = _exchange(response + _chunked(BODY, 5), 4096)
    assert (bytes(received.body), received.ended) == (BODY, True)
    assert pool.take(ORIGIN) is None


def test_http1_parses_many_tiny_chunks_in_one_read() -> None:
    """200,000 one-byte chunks arriving at once are parsed whole (the buffer is not re-sliced per chunk)."""
    body = b"x" * 200_000
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    cpu = time.process_time()
    _, _, received = _exchange(head + _chunked(body, 1), 1 << 30)
    assert (bytes(received.body), received.ended) == (body, True)
    assert time.process_time() - cpu < 5 * CPU_BOUND


# ---- the pool, against real servers ------------------------------------------------------------


async def _post(pool: Pool, url: Url, body: bytes = b"{}") -> tuple[Connection, Received]:
    """One POST the way http_upstream sends it: an idle pooled connection, else a new one."""
    conn = pool.take(url) or await pool.connect(url)
    received = Received()
    conn.send(request_bytes(url, "", body), received)
    await asyncio.wait_for(received.over.wait(), WAIT)
    return conn, received


async def _until(check: Callable[[], bool]) -> None:
    """Let the loop run (no timer) until `check` holds: the client's side of a close is a callback away."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool()
    yield pool
    pool.close()


@dataclass
class Peers:
    """The client ports an aiohttp server saw, one per connection."""

    seen: list[int] = field(default_factory=list)


@asynccontextmanager
async def _aiohttp_server(close_after: bool = False) -> AsyncIterator[tuple[Url, Peers]]:
    peers = Peers()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        port = request.transport.get_extra_info("peername")[1]
        if port not in peers.seen:
            peers.seen.append(port)
        response = web.Response(body=BODY, content_type="application/json")
        if close_after:
            response.force_close()  # answered with Connection: close
        return response

    app = web.Application()
    app.router.add_post("/mcp", answer)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Url.parse(str(server.make_url("/mcp"))), peers
    finally:
        await server.close()


async def test_http1_pool_reuses_a_keep_alive_connection(pool: Pool) -> None:
    """Two POSTs one after the other to an aiohttp server: one connection, taken back from the pool."""
    async with _aiohttp_server() as (url, peers):
        first, one = await _post(pool, url)
        second, two = await _post(pool, url)
    assert (bytes(one.body), bytes(two.body), one.error, two.error) == (BODY, BODY, None, None)
    assert second is first
    assert len(peers.seen) == 1


async def test_http1_pool_does_not_reuse_a_connection_answered_with_close(pool: Pool) -> None:
    """An answer with `Connection: close` is read whole, and the next POST opens a new connection."""
    async with _aiohttp_server(close_after=True) as (url, peers):
        first, one = await _post(pool, url)
        assert one.headers.get("connection", "").lower() == "close"
        assert pool.take(url) is None
        second, two = await _post(pool, url)
    assert (bytes(one.body), bytes(two.body)) == (BODY, BODY)
    assert second is not first
    assert len(peers.seen) == 2


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _raw_server(handle: Handler) -> AsyncIterator[Url]:
    """A TCP server on 127.0.0.1 port 0 that runs `handle` for each connection."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Url.parse(f"http://127.0.0.1:{port}/mcp")
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


async def test_http1_pool_replaces_an_idle_connection_the_server_closed(pool: Pool) -> None:
    """The server closes a pooled connection while idle: the next POST goes on a new connection."""
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(OK)  # keep-alive as far as the client knows, then closed (an idle timeout)
        await writer.drain()

    async with _raw_server(answer_once) as url:
        first, one = await _post(pool, url)
        await _until(lambda: first.closed)
        second, two = await _post(pool, url)
    assert (bytes(one.body), bytes(two.body), two.error) == (BODY, BODY, None)
    assert second is not first
    assert connections == 2


async def test_http1_fails_clearly_when_a_reused_connection_closes_unanswered(pool: Pool) -> None:
    """The server closes a reused connection on the next request (the idle-close race): that POST
    fails with HttpError, once; it is not sent again (a POST may have run) and the pool is left empty."""

    async def answer_one_of_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(OK)
        await writer.drain()
        await _read_request(reader)  # ... and close without a word

    async with _raw_server(answer_one_of_two) as url:
        first, _ = await _post(pool, url)
        second, failed = await _post(pool, url)
    assert second is first
    assert isinstance(failed.error, HttpError)
    assert (failed.ended, failed.calls) == (False, 1)
    assert pool.take(url) is None


CUT_SHORT = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY,
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(BODY, 5)[:-30],
}


@pytest.mark.parametrize("kind", sorted(CUT_SHORT))
async def test_http1_fails_when_a_real_connection_closes_mid_body(pool: Pool, kind: str) -> None:
    """A server that sends half a sized or chunked body and closes: HttpError, never a short body as whole."""

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(CUT_SHORT[kind])
        await writer.drain()

    async with _raw_server(cut_short) as url:
        _, received = await _post(pool, url)
    assert isinstance(received.error, HttpError)
    assert (received.ended, received.calls) == (False, 1)
    assert pool.take(url) is None


async def test_http1_has_no_read_timeout_of_its_own(pool: Pool) -> None:
    """An upstream that reads the request and never answers: the POST waits (http1 sets no read
    timeout; the caller's bound, [upstreams.NAME] call_timeout, ends the wait), and aborting the
    connection then fails it once and closes the socket."""
    asked, never = asyncio.Event(), asyncio.Event()
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        asked.set()
        reading = asyncio.create_task(reader.read())  # b"" once the client has closed
        await asyncio.wait([reading, asyncio.create_task(never.wait())], return_when="FIRST_COMPLETED")
        closed.set()

    async with _raw_server(silent) as url:
        conn = await pool.connect(url)
        received = Received()
        conn.send(request_bytes(url, "", b"{}"), received)
        await asyncio.wait_for(asked.wait(), WAIT)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(received.over.wait(), 0.05)  # the caller's bound, made short
        assert received.calls == 0
        conn.abort()  # what cancelling the POST does (http_upstream's _Post.cancel)
        await asyncio.wait_for(closed.wait(), WAIT)
        await asyncio.wait_for(received.over.wait(), WAIT)
        never.set()
    assert isinstance(received.error, HttpError)
    assert received.calls == 1
    assert pool.take(url) is None


# ---- the A/B switch: [server] upstream_client ---------------------------------------------------

SMALL_LIMIT = 64 * 1024  # server.max_body_bytes in the switch tests
# The User-Agent headers of the calls the upstream saw (the hot path the switch picks the client of;
# the gateway's one-off asks, such as which protocol eras the upstream speaks, use aiohttp's).
AGENTS = web.AppKey("agents", set[str])


async def _tiny_upstream(request: web.Request) -> web.StreamResponse:
    """An MCP server whose `echo` answers `size` bytes of text, as JSON or (form=sse) as CRLF SSE."""
    message = await request.json()
    if message.get("method") == "tools/call":
        request.app[AGENTS].add(request.headers.get("User-Agent", ""))
    if "id" not in message:
        return web.Response(status=202)
    method, params = message["method"], message.get("params", {})
    result: dict[str, object] = {}
    if method == "initialize":
        result = {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}}}
        result["serverInfo"] = {"name": "tiny", "version": "1"}
    elif method == "tools/list":
        result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        arguments = params["arguments"]
        result = {"content": [{"type": "text", "text": "x" * arguments["size"]}]}
        if arguments["form"] == "sse":
            data = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result})
            body = f": hello\r\n\r\nevent: message\r\nid: 1\r\ndata: {data}\r\n\r\n"
            return web.Response(text=body, content_type="text/event-stream")
    answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
    return web.json_response(answer, headers={"Mcp-Session-Id": "tiny"})


@pytest.mark.parametrize("form", ["json", "sse"])
@pytest.mark.parametrize("client", UPSTREAM_CLIENTS)
async def test_either_upstream_client_answers_and_bounds_a_call(
    start_gateway: StartGateway, client: str, form: str
) -> None:
    """http1 or aiohttp, JSON or SSE: a call is answered, and one over max_body_bytes is an error."""
    app = web.Application()
    app[AGENTS] = set()
    app.router.add_post("/mcp", _tiny_upstream)
    upstream = TestServer(app, host="127.0.0.1", port=0)
    await upstream.start_server()
    server = {"max_body_bytes": SMALL_LIMIT, "upstream_client": client}
    gw = await start_gateway({"tiny": {"url": str(upstream.make_url("/mcp"))}}, server=server)
    try:
        async with aiohttp.ClientSession() as http:
            raw = RawSession(http, gw.url("tiny"), token=TOKEN_A)
            await raw.initialize()
            small = await raw.request("tools/call", {"name": "echo", "arguments": {"size": 5, "form": form}})
            big = {"name": "echo", "arguments": {"size": 2 * SMALL_LIMIT, "form": form}}
            too_big = await raw.request("tools/call", big)
    finally:
        await upstream.close()
    assert small.last["result"]["content"][0]["text"] == "xxxxx"
    assert too_big.last["error"]["code"] == UPSTREAM_UNAVAILABLE
    assert {"aiohttp" in agent for agent in app[AGENTS]} == {client == "aiohttp"}  # http1 sends none


@pytest.mark.parametrize("value", ["curl", "", 1, ["http1"]])
def test_upstream_client_must_be_http1_or_aiohttp(tmp_path: Path, value: object) -> None:
    """[server] upstream_client other than "http1" or "aiohttp" is a config error at its path."""
    with pytest.raises(ConfigError) as error:
        settings_for(tmp_path, {"tiny": {"url": "http://127.0.0.1:1/mcp"}}, server={"upstream_client": value})
    assert [issue.path for issue in error.value.issues] == ["server.upstream_client"]
