"""A lean HTTP/1.1 client for the messages the gateway POSTs to Streamable HTTP upstreams.

Every tool call through the gateway is one POST upstream, so this is on the hot path; aiohttp's
client spends more on each request (request and response objects, a task, timers, its stream
reader) than the rest of the gateway's per-call work put together. Here a POST is a few bytes
written on a pooled keep-alive connection, and the response is parsed in `data_received` and
handed, piece by piece, to a `Receiver` — no task, no coroutine, unless a new connection has to
be opened. TLS, chunked and Content-Length bodies, bodies ended by the connection closing, and
gzip/deflate content encoding are handled; redirects are the caller's business (`Receiver.head`
sees the status and headers).

`Pool` keeps idle connections per origin, shared by every upstream session of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

from approvals.errors import UpstreamError

CONNECT_TIMEOUT_SECONDS = 10.0
MAX_IDLE_PER_ORIGIN = 256
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_BODY_BYTES = 4 * 1024 * 1024  # server.max_body_bytes' default
DECODE_STEP = 256 * 1024  # the most inflated from a compressed answer at a time


class HttpError(UpstreamError, ConnectionError):
    """The connection failed, or the server sent something that is not HTTP/1.1."""


class Receiver(Protocol):
    """What becomes of one response. Exactly one of `end` and `fail` is called, once."""

    def head(self, status: int, headers: dict[str, str]) -> None:
        """Status and headers (names in lower case) have arrived."""

    def data(self, chunk: bytes) -> None:
        """The next piece of the (decoded) body."""

    def end(self) -> None:
        """The body is complete."""

    def fail(self, error: Exception) -> None:
        """The connection broke (or was aborted) before the response was complete."""


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed absolute http(s) URL: where to connect, and what to ask for."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent in the request line
    host_header: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"

    @classmethod
    def parse(cls, url: str) -> Url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an absolute http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, host, port, target, shown if port == default else f"{shown}:{port}")

    def join(self, location: str) -> Url:
        """A redirect's Location, which may be relative to this URL."""
        if "://" in location:
            return Url.parse(location)
        if location.startswith("/"):
            return Url(self.scheme, self.host, self.port, location, self.host_header)
        base = self.target.split("?", 1)[0].rsplit("/", 1)[0]
        return Url(self.scheme, self.host, self.port, f"{base}/{location}", self.host_header)


def header_lines(headers: dict[str, str]) -> str:
    """Headers as `Name: value` lines, for `request_bytes` (made once, used for many requests)."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def request_bytes(url: Url, headers: str, body: bytes) -> bytes:
    """A POST request, head and body in one buffer (one write, one segment when it fits)."""
    head = f"POST {url.target} HTTP/1.1\r\nHost: {url.host_header}\r\nContent-Length: {len(body)}\r\n"
    return (head + headers + "\r\n").encode("latin-1") + body


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _IDLE = range(8)


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, pool: Pool, origin: tuple[str, str, int]) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._receiver: Receiver | None = None
        self._buffer = b""
        self._pos = 0  # where the unparsed part of `_buffer` starts
        self._state = _IDLE
        self._remaining = 0
        self._keep_alive = True
        self._decoder: zlib._Decompress | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._flush_decoder(receiver)
            receiver.end()
        else:
            reason = f": {exc}" if exc else ""
            receiver.fail(HttpError(f"the upstream closed the connection{reason}"))

    def data_received(self, data: bytes) -> None:
        if self._receiver is None:
            # Nothing was asked: a server talking out of turn. Do not reuse this connection.
            self.abort()
            return
        # Only an unfinished line (a head, a chunk size, a trailer) is left from before, and each
        # is bounded: joining it to the new data keeps the work linear in the response's size.
        self._buffer = self._buffer[self._pos :] + data if self._pos < len(self._buffer) else data
        self._pos = 0
        try:
            self._parse()
        except (ValueError, zlib.error) as exc:
            self._fail(HttpError(f"the upstream sent a malformed response: {exc}"))

    # ---- requests -----------------------------------------------------------------------

    def send(self, data: bytes, receiver: Receiver) -> None:
        """Write one request; its response goes to `receiver`."""
        assert self.transport is not None
        assert self._receiver is None, "one request at a time"
        self._receiver = receiver
        self._buffer, self._pos = b"", 0
        self._state = _HEAD
        self._keep_alive = True
        self._decoder = None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once; a receiver still waiting is told it failed."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _fail(self, error: Exception) -> None:
        receiver, self._receiver = self._receiver, None
        self.abort()
        if receiver is not None:
            receiver.fail(error)

    def _parse(self) -> None:
        # The buffer is read from `_pos` on and never sliced while parsing: a response of many
        # small chunks would otherwise copy its tail once per chunk.
        while self._receiver is not None and self._pos < len(self._buffer) and not self.closed:
            state = self._state
            if state == _HEAD:
                if not self._parse_head():
                    return
            elif state in (_LENGTH, _CHUNK_DATA):
                self._data(self._take(self._remaining))
                if self._remaining == 0 and not self.closed:
                    if state == _LENGTH:
                        self._complete()
                    else:
                        self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                line = self._line(MAX_CHUNK_LINE, "chunk size line")
                if line is None:
                    return
                size = _number(line.split(b";", 1)[0].strip(b" \t"), 16, "chunk size")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining, self._state = size, _CHUNK_DATA
            elif state == _CHUNK_END:
                if not self._chunk_end():
                    return
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                line = self._line(MAX_HEAD_BYTES, "trailer line")
                if line is None:
                    return
                if not line:  # the empty line that ends the trailers
                    self._complete()
            elif state == _UNTIL_CLOSE:
                self._data(self._take(len(self._buffer) - self._pos))
            else:
                raise ValueError("data after the response")

    def _take(self, most: int) -> bytes:
        """Up to `most` bytes from the buffer (the buffer itself when that is all of it)."""
        start, buffer = self._pos, self._buffer
        end = min(len(buffer), start + most)
        self._pos = end
        if self._state in (_LENGTH, _CHUNK_DATA):
            self._remaining -= end - start
        return buffer if start == 0 and end == len(buffer) else buffer[start:end]

    # Line endings (RFC 9112 section 2.2): CRLF, or a lone LF, which a recipient may accept. A bare
    # CR is refused: parsers that took it as a line end would frame the response differently from
    # those that do not, and on a reused connection that disagreement is response smuggling.

    def _line(self, limit: int, what: str) -> bytes | None:
        """The next line without its CRLF (or LF), or None until it has all arrived."""
        end = self._buffer.find(b"\n", self._pos)
        if end < 0:
            if len(self._buffer) - self._pos > limit:
                raise ValueError(f"{what} too long")
            return None
        line = self._buffer[self._pos : end]
        self._pos = end + 1
        line = line[:-1] if line.endswith(b"\r") else line
        if b"\r" in line:
            raise ValueError(f"bare CR in a {what}")
        return line

    def _chunk_end(self) -> bool:
        """Consume the CRLF (or LF) after a chunk's data; False until it has arrived."""
        buffer, pos = self._buffer, self._pos
        if buffer[pos] == 0x0A:  # LF
            self._pos = pos + 1
            return True
        if len(buffer) - pos < 2:
            if buffer[pos] == 0x0D:  # CR: its LF is still to come
                return False
        elif buffer[pos : pos + 2] == b"\r\n":
            self._pos = pos + 2
            return True
        raise ValueError("chunk not followed by CRLF")

    def _head_end(self) -> tuple[int, int]:
        """Where the head's last line ends and where the body starts; (-1, -1) until it has arrived."""
        buffer, pos = self._buffer, self._pos
        crlf, lf = buffer.find(b"\n\r\n", pos), buffer.find(b"\n\n", pos)
        if lf >= 0 and (crlf < 0 or lf < crlf):
            return lf, lf + 2
        return (crlf, crlf + 3) if crlf >= 0 else (-1, -1)

    def _parse_head(self) -> bool:
        end, body = self._head_end()
        if end < 0:
            if len(self._buffer) - self._pos > MAX_HEAD_BYTES:
                raise ValueError("response head too long")
            return False
        text = self._buffer[self._pos : end].decode("latin-1").replace("\r\n", "\n")
        self._pos = body
        text = text.removesuffix("\r")  # the last line's CR, before the blank line's LF
        if "\r" in text:
            raise ValueError("bare CR in the response head")
        lines = text.split("\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"malformed header line {line[:100]!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if status < 200:
            return True  # 100 Continue and friends: the real response follows
        connection = headers.get("connection", "").lower()
        self._keep_alive = version == "HTTP/1.1" and "close" not in connection
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, detected
        elif encoding not in ("identity", ""):
            raise ValueError(f"unsupported content encoding {encoding!r}")
        assert self._receiver is not None
        self._receiver.head(status, headers)
        if self.closed:
            return False  # the receiver gave up on the head
        if status in (204, 304):
            self._complete()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
            # Both framings named: chunked wins, and the connection is not trusted again (RFC 9112 6.3).
            self._keep_alive = self._keep_alive and "content-length" not in headers
        elif "content-length" in headers:
            self._remaining = _number(headers["content-length"].encode("latin-1"), 10, "Content-Length")
            self._state = _LENGTH
            if self._remaining == 0:
                self._complete()
        else:
            self._keep_alive = False
            self._state = _UNTIL_CLOSE
        return True

    def _data(self, piece: bytes) -> None:
        receiver = self._receiver
        assert receiver is not None
        if self._decoder is None:
            if piece:
                receiver.data(piece)
            return
        # Inflated a step at a time: a receiver that has had enough (its size limit) stops a
        # compressed answer before all of it is inflated.
        while piece and self._receiver is receiver and not self.closed:
            out = self._decoder.decompress(piece, DECODE_STEP)
            piece = self._decoder.unconsumed_tail
            if out:
                receiver.data(out)

    def _flush_decoder(self, receiver: Receiver) -> None:
        if self._decoder is not None and (rest := self._decoder.flush()):
            receiver.data(rest)

    def _complete(self) -> None:
        receiver, self._receiver = self._receiver, None
        self._state = _IDLE
        assert receiver is not None
        self._flush_decoder(receiver)
        if self._keep_alive and self._pos == len(self._buffer) and not self.closed:
            self._pool.put(self)
        else:
            self.abort()
        receiver.end()


_DIGITS = {10: b"0123456789", 16: b"0123456789abcdefABCDEF"}


def _number(text: bytes, base: int, what: str) -> int:
    """Digits only: int() would also take a sign, "0x", "_" or spaces, and framing must be exact."""
    if not text or text.lstrip(_DIGITS[base]):
        raise ValueError(f"malformed {what} {text[:40]!r}")
    return int(text, base)


class Pool:
    """Idle keep-alive connections per origin (scheme, host, port)."""

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        max_body_bytes: int = MAX_BODY_BYTES,
        client: str = "http1",
    ) -> None:
        # The largest answer (a JSON body, or one SSE event) its users accept: the parser streams,
        # so it is theirs to count (one SSE stream may carry any number of events).
        self.max_body_bytes = max_body_bytes
        # [server] upstream_client: "aiohttp" has http_upstream POST with aiohttp's client instead
        # of this pool (the A/B benchmark that decides whether this module earns its keep).
        self.client = client
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._connect_timeout = connect_timeout
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def take(self, url: Url) -> Connection | None:
        """An idle connection to the URL's origin, if one is open."""
        idle = self._idle.get(url.origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, url: Url) -> Connection:
        """A new connection to the URL's origin."""
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if url.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: Connection(self, url.origin),
                    url.host,
                    url.port,
                    ssl=tls,
                    server_hostname=url.host if tls else None,
                )
        except TimeoutError:
            raise HttpError(f"cannot connect to {url.host}:{url.port}: timed out") from None
        except OSError as exc:
            raise HttpError(f"cannot connect to {url.host}:{url.port}: {exc.strerror or exc}") from None
        # Some loops (uvloop) may call connection_made only after create_connection returns.
        conn.transport = conn.transport or transport
        return conn

    def put(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.abort()
        else:
            idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.abort()
        self._idle.clear()
