"""The Streamable HTTP upstream transport: a POST per message, plus the GET stream for the rest.

Every tool call through the gateway is one POST here, so it is built for the hot path: POSTs go
over the gateway's lean HTTP/1.1 pool (`http1`) and are answered in callbacks — no task, no
coroutine per message unless a connection has to be opened. What an upstream sends on a POST's
stream (JSON or SSE, progress and server requests included) reaches the sink as it arrives.
With `[server] upstream_client = "aiohttp"` (undocumented; the A/B benchmark's switch) POSTs go
over aiohttp's client instead, their responses handled by the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from approvals.config import UpstreamSettings
from approvals.jsonrpc import (
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    RequestId,
    decode_bytes,
    decode_text,
    encode,
    error_response,
)
from approvals.proxy.http1 import Connection, HttpError, Pool, Url, header_lines, request_bytes
from approvals.proxy.sse import SseDecoder, TooLarge, read_events

if TYPE_CHECKING:
    from approvals.proxy.upstream import OnClose, Sink

log = logging.getLogger(__name__)


class HttpUpstream:
    """A Streamable HTTP upstream session: a POST per message, plus the GET stream for the rest.

    POSTs go over the gateway's lean HTTP/1.1 pool (`http1`), answered in callbacks; the rare
    GET stream and the closing DELETE use aiohttp.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        http: aiohttp.ClientSession,
        pool: Pool,
        sink: Sink,
        on_close: OnClose,
    ) -> None:
        self._settings = settings
        self._url = Url.parse(settings.url)
        self._http = http
        self._pool = pool
        self._sink = sink
        self._on_close = on_close
        self._session_id: str | None = None
        self._version: str | None = None
        self._posts: set[_Post] = set()
        self._requests: dict[object, _Post] = {}  # request id → its POST, for cancellation
        self._get_task: asyncio.Task[None] | None = None
        # Notifications and responses are POSTed one after another, and a request only after
        # those sent before it, so the upstream sees them in the order the client sent them.
        self._last_ordered: _Post | None = None
        self._closed = False
        self._post_head: tuple[tuple[str | None, str | None], str] | None = None
        self._post_dict: tuple[tuple[str | None, str | None], dict[str, str]] | None = None

    async def start(self) -> None:
        """Nothing to do: the upstream session begins with the client's `initialize`."""

    def _post_headers(self) -> str:
        """The header lines of every POST; they change only with the session id and version."""
        key = (self._session_id, self._version)
        if self._post_head is None or self._post_head[0] != key:
            headers = self._headers(accept="application/json, text/event-stream")
            headers["Content-Type"] = "application/json"
            self._post_head = (key, header_lines(headers))
        return self._post_head[1]

    def _post_header_dict(self) -> dict[str, str]:
        """`_post_headers` as aiohttp takes them (upstream_client = "aiohttp")."""
        key = (self._session_id, self._version)
        if self._post_dict is None or self._post_dict[0] != key:
            headers = self._headers(accept="application/json, text/event-stream")
            headers["Content-Type"] = "application/json"
            self._post_dict = (key, headers)
        return self._post_dict[1]

    def _headers(self, *, accept: str) -> dict[str, str]:
        headers = {**self._settings.headers, "Accept": accept}
        if self._session_id:
            headers["Mcp-Session-Id"] = self._session_id
        if self._version:
            headers["MCP-Protocol-Version"] = self._version
        return headers

    def send(self, message: JsonObject) -> None:
        post = _Post(self, message)
        after = self._last_ordered
        if post.request_id is not None:
            self._requests[post.request_id] = post
        else:
            self._last_ordered = post
        method = message.get("method")
        if method == "notifications/cancelled":
            # Some servers keep a cancelled request's stream open for ever; nobody waits for it now.
            params = message.get("params")
            cancelled = self._requests.get(params.get("requestId")) if isinstance(params, dict) else None
            if cancelled is not None:
                post.then(cancelled.cancel)
        if method == "notifications/initialized" and self._get_task is None:
            self._get_task = asyncio.create_task(self._listen())
        if self._closed:
            post.cancel()
        elif after is not None and not after.done:
            after.then(post.start)
        else:
            post.start()

    def _forget(self, post: _Post) -> None:
        self._posts.discard(post)
        if post.request_id is not None and self._requests.get(post.request_id) is post:
            del self._requests[post.request_id]
        if self._last_ordered is post:
            self._last_ordered = None

    def _deliver(self, data: str | bytes, request_id: object) -> bool:
        """Pass one received message on; True when it is the answer to `request_id`."""
        # The gateway's own bounds (depth, finite numbers) hold for what upstreams send, too.
        message = decode_text(data) if isinstance(data, str) else decode_bytes(data)
        if not isinstance(message, dict):
            return False
        is_answer = "method" not in message and message.get("id") == request_id
        if is_answer and isinstance(result := message.get("result"), dict) and "protocolVersion" in result:
            self._version = str(result["protocolVersion"])
        self._sink(message, request_id if isinstance(request_id, int) else None)
        return is_answer

    async def _listen(self) -> None:
        """The upstream's GET stream: its requests and notifications that belong to no request."""
        try:
            async with self._http.get(
                self._settings.url, headers=self._headers(accept="text/event-stream")
            ) as resp:
                if resp.status != 200:
                    return  # 405: this server has no standalone stream, which the spec allows
                async for event in read_events(resp.content, self._pool.max_body_bytes):
                    message = decode_text(event.data)
                    if isinstance(message, dict):
                        self._sink(message, None)
        except (aiohttp.ClientError, ValueError) as exc:
            log.info("upstream %s: GET stream ended: %s", self._settings.name, exc)

    async def close(self) -> None:
        self._closed = True
        connecting = [p.connecting for p in self._posts if p.connecting is not None]
        for post in list(self._posts):
            post.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        if self._get_task is not None:
            self._get_task.cancel()
            await asyncio.gather(self._get_task, return_exceptions=True)
        if self._session_id:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.delete(
                    self._settings.url, headers=self._headers(accept="application/json")
                ):
                    pass


MAX_REDIRECTS = 10
# Reconnects of one POST's stream that the upstream closed before its answer (SEP-1699), and the
# bounds on the wait before each (the upstream's `retry:`, else the SSE default).
MAX_RESUMES = 5
DEFAULT_RETRY_MS = 1000
MAX_RETRY_MS = 10_000
_IGNORE, _JSON, _SSE, _REDIRECT = range(4)


class _Post:
    """One message POSTed to an HTTP upstream, and what its response becomes (an `http1.Receiver`).

    A request's answer and the messages sent on its stream go to the sink as they arrive; a
    request that gets no answer (a broken connection, an HTTP error, a stream that ends first)
    gets a JSON-RPC error in its place. Notifications and responses only need to be accepted.
    """

    __slots__ = (
        "_after",
        "_answered",
        "_body",
        "_buffer",
        "_conn",
        "_mode",
        "_redirects",
        "_resumes",
        "_size",
        "_sse",
        "_status",
        "_url",
        "connecting",
        "done",
        "message",
        "request_id",
        "upstream",
    )

    def __init__(self, upstream: HttpUpstream, message: JsonObject) -> None:
        self.upstream = upstream
        self.message = message
        raw_id = message.get("id") if "method" in message else None
        self.request_id: RequestId | None = raw_id if isinstance(raw_id, str | int) else None
        self.done = False
        self._after: list[Callable[[], None]] = []
        self._answered = False
        self._body = encode(message)
        self._url = upstream._url
        self._redirects = 0
        self._resumes = 0
        self._conn: Connection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self._mode = _IGNORE
        self._status = 0
        self._buffer: list[bytes] = []  # a JSON answer's pieces, joined once when it is complete
        self._size = 0
        self._sse: SseDecoder | None = None
        upstream._posts.add(self)

    def then(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this POST is over (at once if it is)."""
        if self.done:
            callback()
        else:
            self._after.append(callback)

    # ---- sending ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.done:
            return
        if self.upstream._pool.client == "aiohttp":
            self.connecting = asyncio.create_task(self._post_with_aiohttp())
            return
        conn = self.upstream._pool.take(self._url)
        if conn is not None:
            self._send(conn)
        else:
            self.connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.upstream._pool.connect(self._url)
        except HttpError as exc:
            self.fail(exc)
            return
        finally:
            self.connecting = None
        if self.done:
            conn.abort()
        else:
            self._send(conn)

    async def _post_with_aiohttp(self) -> None:
        """The same POST over aiohttp's client, its response fed to the same Receiver methods."""
        upstream = self.upstream
        try:
            async with upstream._http.post(
                URL(str(self._url), encoded=True),
                data=self._body,
                headers=upstream._post_header_dict(),
                allow_redirects=False,  # `head` follows 307/308 itself, as with http1
            ) as resp:
                headers: dict[str, str] = {}
                for name, value in resp.headers.items():
                    key = name.lower()
                    headers[key] = f"{headers[key]}, {value}" if key in headers else value
                self.head(resp.status, headers)
                async for chunk in resp.content.iter_any():
                    if self.done:
                        break  # failed (too large) or cancelled: the unread rest closes the connection
                    self.data(chunk)
            self.end()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.fail(HttpError(str(exc) or type(exc).__name__))
        finally:
            if self.connecting is asyncio.current_task():  # not a redirect's new task
                self.connecting = None

    def _send(self, conn: Connection) -> None:
        self._conn = conn
        conn.send(request_bytes(self._url, self.upstream._post_headers(), self._body), self)

    def cancel(self) -> None:
        """Stop waiting: the connection is dropped, nothing more is delivered, no error either."""
        if self.done:
            return
        self._finish()
        if self.connecting is not None:
            self.connecting.cancel()
        if self._conn is not None:
            self._conn.abort()

    # ---- http1.Receiver ---------------------------------------------------------------------

    def head(self, status: int, headers: dict[str, str]) -> None:
        if self.done:
            return
        self._status = status
        upstream = self.upstream
        if self.message.get("method") == "initialize" and "mcp-session-id" in headers:
            upstream._session_id = headers["mcp-session-id"]
        content_type = headers.get("content-type", "")
        if status in (307, 308) and "location" in headers and self._redirects < MAX_REDIRECTS:
            self._mode = _REDIRECT  # the method and body are kept: POST again at the new place
            self._url = self._url.join(headers["location"])
        elif status == 202 or self.request_id is None:
            if status >= 400:
                log.warning("upstream %s refused a message: HTTP %d", upstream._settings.name, status)
            self._mode = _IGNORE
        elif status >= 400 and not content_type.startswith("application/json"):
            self.fail(ConnectionError(f"HTTP {status}"))
        elif content_type.startswith("text/event-stream"):
            self._mode = _SSE
            self._sse = SseDecoder(upstream._pool.max_body_bytes)
        else:
            self._mode = _JSON
            self._check_length(headers.get("content-length", ""))

    def _check_length(self, length: str) -> None:
        """An answer that says it is too large is refused before any of it is read."""
        limit = self.upstream._pool.max_body_bytes
        if length.isdigit() and int(length) > limit:
            self.fail(TooLarge(f"the upstream's answer is {int(length)} bytes, over the limit of {limit}"))

    def _add_json(self, chunk: bytes) -> None:
        self._buffer.append(chunk)
        self._size += len(chunk)
        limit = self.upstream._pool.max_body_bytes
        if self._size > limit:
            self.fail(
                TooLarge(f"the upstream's answer is at least {self._size} bytes, over the limit of {limit}")
            )

    def data(self, chunk: bytes) -> None:
        if self.done:
            return
        if self._mode == _JSON:
            self._add_json(chunk)
        elif self._mode == _SSE:
            assert self._sse is not None
            try:
                for event in self._sse.feed(chunk):
                    self._answered = self.upstream._deliver(event.data, self.request_id) or self._answered
            except ValueError as exc:
                self.fail(exc)

    def end(self) -> None:
        if self.done:
            return
        self._conn = None
        try:
            if self._mode == _REDIRECT:
                self._redirects += 1
                self.start()
                return
            if self._mode == _JSON:
                self._answered = self.upstream._deliver(b"".join(self._buffer), self.request_id)
            elif self._mode == _SSE:
                assert self._sse is not None
                for event in self._sse.end():
                    self._answered = self.upstream._deliver(event.data, self.request_id) or self._answered
            elif self._mode == _IGNORE:
                self._finish()
                return
        except ValueError as exc:
            self.fail(exc)
            return
        if self._answered:
            self._finish()
        elif self._resumable():
            # SEP-1699: the upstream closed the stream after an event id, expecting a reconnect.
            self.connecting = asyncio.create_task(self._resume())
        else:
            self.fail(ConnectionError("the upstream ended its answer without a response"))

    def _resumable(self) -> bool:
        return (
            self._mode == _SSE
            and self._sse is not None
            and bool(self._sse.last_event_id)
            and self._resumes < MAX_RESUMES
        )

    async def _resume(self) -> None:
        """`GET` + `Last-Event-ID` until the answer comes, at most MAX_RESUMES times in all."""
        upstream = self.upstream
        try:
            while self._resumable():
                assert self._sse is not None
                self._resumes += 1
                retry_ms = self._sse.retry_ms if self._sse.retry_ms is not None else DEFAULT_RETRY_MS
                await asyncio.sleep(min(retry_ms, MAX_RETRY_MS) / 1000)  # the upstream's `retry:`
                headers = upstream._headers(accept="text/event-stream")
                headers["Last-Event-ID"] = str(self._sse.last_event_id)
                async with upstream._http.get(upstream._settings.url, headers=headers) as resp:
                    if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                        raise ConnectionError(f"HTTP {resp.status} to a reconnect with Last-Event-ID")
                    async for chunk in resp.content.iter_any():
                        self.data(chunk)
                        if self.done or self._answered:
                            break
                if self.done:
                    return  # failed (too large) or cancelled meanwhile
                if not self._answered:
                    for event in self._sse.end():
                        self._answered = upstream._deliver(event.data, self.request_id) or self._answered
                if self._answered:
                    self._finish()
                    return
            self.fail(
                ConnectionError(
                    f"the upstream's stream ended without a response ({self._resumes} reconnects)"
                )
            )
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as exc:
            self.fail(ConnectionError(f"reconnecting to the upstream's stream failed: {exc}"))
        finally:
            if self.connecting is asyncio.current_task():
                self.connecting = None

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        conn, self._conn = self._conn, None
        self._finish()
        if conn is not None:
            conn.abort()  # a response cut short leaves the connection in an unknown state
        if self.request_id is not None and not self._answered:
            detail = str(error) or type(error).__name__
            if isinstance(error, TooLarge):  # the upstream is there; its answer was refused
                detail = f"{detail} (server.max_body_bytes); the answer was dropped"
            else:
                detail = f"upstream unavailable: {detail}"
            self.upstream._sink(error_response(self.request_id, UPSTREAM_UNAVAILABLE, detail), None)

    def _finish(self) -> None:
        self.done = True
        self.upstream._forget(self)
        after, self._after = self._after, []
        for callback in after:
            callback()
