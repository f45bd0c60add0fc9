"""The load generator: MCP clients speaking Streamable HTTP over a minimal HTTP/1.1 client.

Each client has its own keep-alive connection and its own MCP session (`initialize`,
`notifications/initialized`, then `tools/call` after `tools/call`). The HTTP client is a small
asyncio protocol rather than aiohttp's or the SDK's, so that the generator — which shares this
2-core machine with what it measures — costs a fraction of the target. It understands what the
targets send: JSON bodies with Content-Length, chunked SSE streams, and `Connection: close`.

Two modes, each printing one JSON object per line on stdout:

    calls  N clients call `echo` as fast as they can; after a warm-up, a measured window reports
           calls/s, latency percentiles, errors, and the CPU seconds per 1,000 calls and peak RSS
           of the target processes (--pid, read from /proc).
    held   S sessions send K `approve_echo` calls with distinct arguments, each on its own
           connection, and wait for their results (the runner approves them meanwhile). Prints
           {"event": "sessions"} once the sessions are open and waits for a line on stdin before
           calling; then {"event": "sent"}, and {"event": "done", ...} when every call is answered,
           with the time each answer arrived and whether it was the result or a tool error
           (`answers`). With --drop each connection is closed as soon as its request is written,
           as an agent that gave up would: the approvals stay pending with nobody waiting.
    repeat K calls of `approve_echo` with the same distinct arguments, one after another on one
           session (the agent's repeat call for a kept result); prints each round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PROTOCOL_VERSION = "2025-06-18"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, the whole response at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.head: tuple[int, dict[str, str]] | None = None
        self.body_start = 0
        self.length: int | None = None  # Content-Length, or None
        self.chunked = False
        self.chunk_pos = 0  # parse position inside the buffer for chunked bodies
        self.chunks = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.head is not None and self.length is None and not self.chunked:
            status, headers = self.head  # a body delimited by the end of the connection
            waiter.set_result(Response(status, headers, bytes(self.buffer[self.body_start :])))
        else:
            waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse()
            except Exception as exc:  # malformed response: fail this request
                self.waiter.set_exception(HttpError(f"bad response: {exc!r}"))

    def _parse(self) -> None:
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.head = (status, headers)
            self.body_start = end + 4
            if "content-length" in headers:
                self.length = int(headers["content-length"])
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                self.chunked = True
                self.chunk_pos = self.body_start
            elif status in (202, 204, 304) or status < 200:
                self.length = 0
        status, headers = self.head
        if self.length is not None:
            end = self.body_start + self.length
            if len(buffer) < end:
                return
            body = bytes(buffer[self.body_start : end])
            del buffer[:end]
            self._finish(Response(status, headers, body))
        elif self.chunked:
            pos = self.chunk_pos
            while True:
                line_end = buffer.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
                if size == 0:
                    trailer_end = buffer.find(b"\r\n\r\n", line_end)  # "0\r\n" [trailers] "\r\n"
                    if trailer_end < 0:
                        break
                    del buffer[: trailer_end + 4]
                    body = bytes(self.chunks)
                    self._finish(Response(status, headers, body))
                    return
                data_end = line_end + 2 + size
                if len(buffer) < data_end + 2:
                    break
                self.chunks += buffer[line_end + 2 : data_end]
                pos = data_end + 2
            self.chunk_pos = pos

    def _finish(self, response: Response) -> None:
        waiter = self.waiter
        self._reset()
        if response.headers.get("connection", "").lower() == "close" and self.transport is not None:
            self.transport.close()
        assert waiter is not None
        waiter.set_result(response)

    async def request(self, data: bytes) -> Response:
        if self.closed or self.transport is None:
            raise HttpError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def messages_of(response: Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages in a response: one JSON body, or the `data` of each SSE event."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        found = []
        for event in response.body.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data and any(data):
                found.append(json.loads(b"\n".join(data)))
        return found
    return [json.loads(response.body)] if response.body.strip() else []


class McpClient:
    """One MCP session over one connection (reconnected if the server closes it)."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.token = token
        self.session_id: str | None = None
        self.conn: Connection | None = None
        self.next_id = 0

    async def connect(self) -> Connection:
        if self.conn is None or self.conn.closed:
            loop = asyncio.get_running_loop()
            _, self.conn = await loop.create_connection(Connection, self.host, self.port)
        return self.conn

    def encode(self, body: dict[str, Any]) -> bytes:
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Accept: application/json, text/event-stream",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        if self.token:
            head.append(f"Authorization: Bearer {self.token}")
        if self.session_id:
            head.append(f"Mcp-Session-Id: {self.session_id}")
            head.append(f"MCP-Protocol-Version: {PROTOCOL_VERSION}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    async def post(self, body: dict[str, Any], conn: Connection | None = None) -> Response:
        conn = conn or await self.connect()
        return await conn.request(self.encode(body))

    async def initialize(self) -> None:
        init = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "approvals-bench", "version": "1"},
        }
        response = await self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        if response.status != 200:
            raise HttpError(f"initialize: HTTP {response.status}: {response.body[:200]!r}")
        self.session_id = response.headers.get("mcp-session-id")
        notified = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if notified.status >= 300:
            raise HttpError(f"notifications/initialized: HTTP {notified.status}")

    def call_body(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        params = {"name": tool, "arguments": arguments}
        return {"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params}


def call_error(response: Response, request_id: int) -> str | None:
    """Why a tools/call answer is not the echo result (None when it is)."""
    if response.status != 200:
        return f"HTTP {response.status}"
    for message in messages_of(response):
        if message.get("id") == request_id:
            if "error" in message:
                return f"JSON-RPC error {message['error'].get('code')}: {message['error'].get('message')}"
            result = message.get("result") or {}
            if result.get("isError"):
                return "tool error: " + str(result.get("content"))[:200]
            return None
    return "no answer in the response"


# ---- target process figures --------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# ---- calls mode ---------------------------------------------------------------------------


@dataclass
class Window:
    start: float = 0.0
    end: float = float("inf")
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def run_calls(args: argparse.Namespace) -> dict[str, Any]:
    clients = [McpClient(args.url, args.token) for _ in range(args.clients)]
    await asyncio.gather(*(c.initialize() for c in clients))
    window = Window()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + args.warmup + args.duration

    async def one(client: McpClient) -> None:
        perf = time.perf_counter
        while loop.time() < stop_at:
            body = client.call_body("echo", {"text": "hello"})
            t0 = perf()
            try:
                response = await client.post(body)
                error = call_error(response, body["id"])
            except (HttpError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            done = perf()
            if window.start <= done <= window.end:
                if error is None:
                    window.latencies.append(done - t0)
                else:
                    window.errors += 1
                    if len(window.error_samples) < 5:
                        window.error_samples.append(error)

    tasks = [asyncio.create_task(one(c)) for c in clients]
    await asyncio.sleep(args.warmup)
    cpu0 = cpu_seconds(args.pid)
    window.start = time.perf_counter()
    await asyncio.sleep(args.duration)
    window.end = time.perf_counter()
    cpu1 = cpu_seconds(args.pid)
    await asyncio.gather(*tasks)
    seconds = window.end - window.start
    calls = len(window.latencies)
    latencies = sorted(window.latencies)
    return {
        "clients": args.clients,
        "calls": calls,
        "errors": window.errors,
        "error_samples": window.error_samples,
        "seconds": seconds,
        "calls_per_s": calls / seconds,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "cpu_s_per_1000": (cpu1 - cpu0) / calls * 1000 if calls else float("nan"),
        "peak_rss_kib": status_kib(args.pid, "VmHWM"),
    }


# ---- held mode ----------------------------------------------------------------------------


async def run_held(args: argparse.Namespace) -> dict[str, Any]:
    sessions = [McpClient(args.url, args.token) for _ in range(args.sessions)]
    for batch in range(0, len(sessions), 50):
        await asyncio.gather(*(s.initialize() for s in sessions[batch : batch + 50]))
    emit({"event": "sessions"})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    connecting = asyncio.Semaphore(200)  # do not overrun the server's accept backlog
    sent = 0
    all_sent = asyncio.Event()
    answered: dict[int, float] = {}
    # n → (when the agent had the answer, "ok" or "tool_error"): what a decision looks like from here.
    answers: dict[int, tuple[float, str]] = {}
    errors: list[str] = []

    async def one(i: int) -> None:
        nonlocal sent
        session = sessions[i % len(sessions)]
        body = session.call_body("approve_echo", {"n": args.first + i})
        try:
            async with connecting:
                loop = asyncio.get_running_loop()
                _, conn = await loop.create_connection(Connection, session.host, session.port)
                pending = asyncio.ensure_future(session.post(body, conn))
                await asyncio.sleep(0)  # the request is written before the next connect
            sent += 1
            if sent == args.calls:
                all_sent.set()
            if args.drop:
                assert conn.transport is not None
                conn.transport.close()
                pending.cancel()
                return
            response = await pending
            at = time.time()
            error = call_error(response, body["id"])
            answers[args.first + i] = (at, "tool_error" if (error or "").startswith("tool error") else "ok")
            if conn.transport is not None:
                conn.transport.close()
        except (HttpError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            at = time.time()
            sent += 1
            if sent == args.calls:
                all_sent.set()
        if error is None:
            answered[args.first + i] = at
        elif len(errors) < 1000:
            errors.append(error)

    tasks = [asyncio.create_task(one(i)) for i in range(args.calls)]
    await all_sent.wait()
    emit({"event": "sent"})
    await asyncio.gather(*tasks)
    return {
        "event": "done",
        "ok": len(answered),
        "errors": 0 if args.drop else args.calls - len(answered),
        "error_samples": errors[:5],
        "last_answer": max(answered.values(), default=None),
        "answers": answers,
    }


async def run_repeat(args: argparse.Namespace) -> dict[str, Any]:
    client = McpClient(args.url, args.token)
    await client.initialize()
    round_trips: list[float] = []
    errors: list[str] = []
    for i in range(args.calls):
        body = client.call_body("approve_echo", {"n": args.first + i})
        started = time.perf_counter()
        response = await client.post(body)
        round_trips.append(time.perf_counter() - started)
        if (error := call_error(response, body["id"])) is not None and len(errors) < 5:
            errors.append(error)
    return {"event": "done", "round_trips_s": round_trips, "error_samples": errors}


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["calls", "held", "repeat"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default=os.environ.get("BENCH_AGENT_TOKEN"))
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--pid", type=int, action="append", default=[])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--first", type=int, default=0, help="the first `n` argument of held calls")
    parser.add_argument("--drop", action="store_true", help="held: close each connection once sent")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run = {"calls": run_calls, "held": run_held, "repeat": run_repeat}[args.mode]
    emit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
