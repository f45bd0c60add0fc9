"""A client's MCP session through the gateway, and the routing of every message in it.

Each client session owns one upstream session. Client request ids are replaced by the gateway's
own integers on the way up (so the gateway's own requests can share the connection) and restored
on the way down. What the upstream sends is routed to the client stream it belongs to:

- the answer to a request, and messages the upstream sent on that request's HTTP stream or that
  carry the request's progress token, go to the stream of the POST that made the request;
- everything else (logging, list_changed, sampling / elicitation / roots requests) goes to the
  client's GET stream, or, while it has none, to its newest open request stream, or waits.

What waits, and what a GET stream has not yet written, is bounded in bytes and count per session
(`[server] max_backlog_bytes`): a client that does not read cannot grow the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from approvals.config import UpstreamSettings
from approvals.core.model import Hold
from approvals.jsonrpc import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    Message,
    RequestId,
    encode,
    error_response,
    result_response,
)
from approvals.proxy.resume import Replays
from approvals.proxy.upstream import Upstream

log = logging.getLogger(__name__)

MAX_WAITING_MESSAGES = 1000
DEFAULT_BACKLOG_BYTES = 4 * 1024 * 1024

Abort = Callable[[], None]
Clock = Callable[[], float]


def bad_progress_token(params: JsonObject) -> str | None:
    """What is wrong with `params._meta.progressToken`, or None when it is absent or valid.

    A token must be a string or an integer, as the MCP SDKs have it (the schema says "number";
    the Python SDK's servers refuse a fraction). Anything else (an object, a list, a boolean,
    null) is refused before the request is registered or judged, rather than dropped: a client
    that asked for progress would otherwise wait for progress that never comes.
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict) or "progressToken" not in meta:
        return None
    token = meta["progressToken"]
    if isinstance(token, str | int) and not isinstance(token, bool):
        return None
    return "params._meta.progressToken must be a string or an integer"


def _size(message: JsonObject) -> int:
    return len(encode(message))


class Outbox:
    """Messages for one client stream, read by one task; None means the stream is over.

    One is made for every request, so it is lighter than `asyncio.Queue`: a deque and, while the
    reader waits, one future.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[JsonObject | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: JsonObject | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> JsonObject | None:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class StreamOutbox(Outbox):
    """A GET stream's outbox: it knows how many bytes its reader has not yet taken."""

    __slots__ = ("_sizes", "abort", "backlog")

    def __init__(self, abort: Abort | None = None) -> None:
        super().__init__()
        self.abort = abort  # ends the HTTP response at once (its write may be stuck on the client)
        self.backlog = 0
        self._sizes: collections.deque[int] = collections.deque()

    def put_nowait(self, item: JsonObject | None) -> None:
        size = _size(item) if item is not None else 0
        self._sizes.append(size)
        self.backlog += size
        super().put_nowait(item)

    async def get(self) -> JsonObject | None:
        item = await super().get()
        self.backlog -= self._sizes.popleft()
        return item

    def take_all(self) -> list[JsonObject]:
        """Empty the outbox: the messages not yet taken by its reader."""
        items = [item for item in self._items if item is not None]
        self._items.clear()
        self._sizes.clear()
        self.backlog = 0
        return items


class Exchange:
    """One request in flight upstream: where its answer and related messages go."""

    __slots__ = ("client_id", "done", "outbox", "progress_token", "upstream_id")

    def __init__(self, upstream_id: int, client_id: RequestId | None, progress_token: object) -> None:
        self.upstream_id = upstream_id
        self.client_id = client_id  # None for the gateway's own requests
        self.progress_token = progress_token
        self.outbox = Outbox()
        self.done = False


class Session:
    """A client session: identity, its upstream connection and the messages in flight."""

    def __init__(
        self,
        session_id: str,
        grant: str,
        upstream: UpstreamSettings,
        *,
        max_backlog_bytes: int = DEFAULT_BACKLOG_BYTES,
        clock: Clock = time.monotonic,
    ) -> None:
        self.id = session_id
        self.grant = grant
        self.upstream_name = upstream.name
        self.protocol_version: str | None = None
        self.initialized = False  # the client sent notifications/initialized
        self.closed_reason: str | None = None
        self._clock = clock
        self.last_seen = clock()  # the last request, or the end of the last stream or request
        self._had_stream = False
        self._max_backlog = max_backlog_bytes
        self.connection: Upstream | None = None
        self._next_id = 0
        self._exchanges: dict[int, Exchange] = {}
        self._by_client_id: dict[RequestId, int] = {}
        self._by_progress: dict[object, int] = {}
        self._streams: list[StreamOutbox] = []
        self._waiting: collections.deque[tuple[JsonObject, int]] = collections.deque()
        self.waiting_bytes = 0
        self.held: dict[RequestId, Hold] = {}  # calls waiting for a reviewer, by client request id
        self.cancelled: set[RequestId] = set()  # held calls the client cancelled
        self.replays = Replays(max_backlog_bytes, clock)  # held-call streams a client may resume
        self._background: set[asyncio.Task[None]] = set()
        self.task_watchers: set[asyncio.Task[None]] = set()  # tasks followed for status (proxy.tasks)
        self.draining = asyncio.Event()  # set at shutdown: streams end, held calls answer now
        self.on_close: Callable[[Session], None] | None = None

    # ---- client → upstream ---------------------------------------------------------------

    def forward_request(self, message: Message, body: JsonObject | None = None) -> Exchange:
        """Send a client request upstream under a fresh id; its answer arrives on the exchange's outbox."""
        body = dict(message.body if body is None else body)
        params = body.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        problem = bad_progress_token(params) if isinstance(params, dict) else None
        if problem is not None:
            # Refused before anything is registered: an exchange left behind would swallow the
            # session's unsolicited messages (`_to_client_stream`) and never be freed.
            exchange = Exchange(0, message.id, None)
            exchange.outbox.put_nowait(error_response(message.id, INVALID_PARAMS, problem))
            exchange.outbox.put_nowait(None)
            return exchange
        exchange = self._open(message.id, token)
        body["id"] = exchange.upstream_id
        self._send(body, exchange)
        return exchange

    def request(self, method: str, params: JsonObject) -> Exchange:
        """The gateway's own request to the upstream, in this session."""
        exchange = self._open(None, None)
        self._send(
            {"jsonrpc": "2.0", "id": exchange.upstream_id, "method": method, "params": params}, exchange
        )
        return exchange

    def forward(self, message: Message) -> None:
        """Pass a client notification or response upstream, translating the ids they name."""
        body = message.body
        if message.method == "notifications/initialized":
            self.initialized = True
        if message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            if isinstance(request_id, str | int) and request_id in self.held:
                self._cancel_hold(request_id, "the client cancelled the request")
                return  # never sent upstream: the upstream has not seen this call
            upstream_id = self._by_client_id.get(request_id) if isinstance(request_id, str | int) else None
            if upstream_id is None:
                return  # the request is already answered or unknown: nothing to cancel
            body = {**body, "params": {**message.params, "requestId": upstream_id}}
            self._finish(upstream_id, None)
        if self.connection is not None and self.closed_reason is None:
            self.connection.send(body)

    def _cancel_hold(self, request_id: RequestId, reason: str) -> None:
        hold = self.held.pop(request_id)
        self.cancelled.add(request_id)
        task = asyncio.create_task(hold.cancel(reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _open(self, client_id: RequestId | None, token: object) -> Exchange:
        self._next_id += 1
        exchange = Exchange(self._next_id, client_id, token)
        self._exchanges[exchange.upstream_id] = exchange
        if client_id is not None:
            self._by_client_id[client_id] = exchange.upstream_id
        if token is not None:
            self._by_progress[token] = exchange.upstream_id
        return exchange

    def _send(self, body: JsonObject, exchange: Exchange) -> None:
        if self.connection is None or self.closed_reason is not None:
            reason = self.closed_reason or "not connected"
            self._answer(exchange, error_response(exchange.upstream_id, UPSTREAM_UNAVAILABLE, reason))
            return
        self.connection.send(body)

    def cancel(self, exchange: Exchange, reason: str) -> None:
        """The gateway gave up on its own request (a timeout): the upstream is told, so that it can
        stop the work and an HTTP upstream's POST is not left open."""
        if not exchange.done and self.connection is not None and self.closed_reason is None:
            params = {"requestId": exchange.upstream_id, "reason": reason}
            self.connection.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
        self.release(exchange)

    def release(self, exchange: Exchange) -> None:
        """The client stopped waiting for this exchange (answered, cancelled or disconnected)."""
        self._finish(exchange.upstream_id, None)
        self.touch()

    # ---- upstream → client ---------------------------------------------------------------

    def on_upstream_message(self, message: JsonObject, related: int | None) -> None:
        """Route one message from the upstream (the transports' sink)."""
        if "method" not in message:
            upstream_id = message.get("id")
            exchange = self._exchanges.get(upstream_id) if isinstance(upstream_id, int) else None
            if exchange is None:
                log.debug("session %s: dropping an answer nobody waits for: id %r", self.id[:8], upstream_id)
                return
            self._answer(exchange, message)
            return
        if related is None and message.get("method") == "notifications/progress":
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            related = self._by_progress.get(token) if isinstance(token, str | int) else None
        exchange = self._exchanges.get(related) if related is not None else None
        if exchange is not None and exchange.client_id is not None:
            exchange.outbox.put_nowait(message)
        else:
            self._to_client_stream(message)

    def _answer(self, exchange: Exchange, message: JsonObject) -> None:
        if exchange.client_id is not None:
            message = {**message, "id": exchange.client_id}
        exchange.outbox.put_nowait(message)
        self._finish(exchange.upstream_id, None)

    def _finish(self, upstream_id: int, _: Any) -> None:
        exchange = self._exchanges.pop(upstream_id, None)
        if exchange is None:
            return
        exchange.done = True
        if exchange.client_id is not None and self._by_client_id.get(exchange.client_id) == upstream_id:
            del self._by_client_id[exchange.client_id]
        if exchange.progress_token is not None:
            self._by_progress.pop(exchange.progress_token, None)
        exchange.outbox.put_nowait(None)

    def _to_client_stream(self, message: JsonObject) -> None:
        if not self._streams:
            for exchange in reversed(self._exchanges.values()):
                if exchange.client_id is not None:
                    exchange.outbox.put_nowait(message)
                    return
        self.divert(message)

    def divert(self, message: JsonObject) -> None:
        """Send a message to the GET stream, or keep it until one opens (bounded)."""
        if not self._streams:
            self._keep(message, _size(message))
            return
        stream = self._streams[-1]
        stream.put_nowait(message)
        if stream.backlog > self._max_backlog:
            self._overflow(stream)

    def _keep(self, message: JsonObject, size: int) -> None:
        """Keep a message for the next GET stream; the oldest go first when over the bounds."""
        if size > self._max_backlog:
            log.warning(
                "session %s: dropping a %d-byte message larger than max_backlog_bytes", self.id[:8], size
            )
            return
        self._waiting.append((message, size))
        self.waiting_bytes += size
        dropped = 0
        while self.waiting_bytes > self._max_backlog or len(self._waiting) > MAX_WAITING_MESSAGES:
            self.waiting_bytes -= self._waiting.popleft()[1]
            dropped += 1
        if dropped:
            log.warning(
                "session %s: no client stream reading; dropped the %d oldest waiting message(s)",
                self.id[:8],
                dropped,
            )

    def _overflow(self, stream: StreamOutbox) -> None:
        """A GET stream fell too far behind: end it, keeping what it had not sent for the next one."""
        log.warning(
            "session %s: the client is not reading its GET stream (%d bytes behind); ending it",
            self.id[:8],
            stream.backlog,
        )
        self.close_stream(stream)
        for message in stream.take_all():
            self._keep(message, _size(message))
        stream.put_nowait(None)
        if stream.abort is not None:
            stream.abort()

    def open_stream(self, abort: Abort | None = None) -> StreamOutbox:
        """A GET stream: gets every message that belongs to no request, starting with those waiting.

        `abort` ends the HTTP response at once; it is called when the client falls more than
        `max_backlog_bytes` behind, since the response's writer then waits on the client.
        """
        outbox = StreamOutbox(abort)
        while self._waiting:
            outbox.put_nowait(self._waiting.popleft()[0])
        self.waiting_bytes = 0
        self._streams.append(outbox)
        self._had_stream = True
        return outbox

    def drain(self) -> None:
        """Shutdown: end the GET streams and let held calls answer at once; calls upstream go on."""
        self.draining.set()
        for outbox in self._streams:
            outbox.put_nowait(None)

    def close_stream(self, outbox: StreamOutbox) -> None:
        if outbox in self._streams:
            self._streams.remove(outbox)
            self.touch()

    # ---- idleness ----------------------------------------------------------------------------

    def touch(self) -> None:
        """The client did something: idle time counts from now."""
        self.last_seen = self._clock()

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def busy(self) -> bool:
        """A stream is open or a request is in flight: the client is there, however long it takes."""
        if self._streams or self.held:
            return True
        return any(exchange.client_id is not None for exchange in self._exchanges.values())

    @property
    def abandoned(self) -> bool:
        """The client seems gone: it never finished the handshake, or its GET stream closed."""
        return not self.initialized or (self._had_stream and not self._streams)

    # ---- end -------------------------------------------------------------------------------

    def on_upstream_closed(self, reason: str) -> None:
        """The upstream is gone: every waiting request gets an error now, rather than hanging."""
        self.closed_reason = f"upstream {self.upstream_name} is gone: {reason}"
        self._end_all(self.closed_reason)
        if self.on_close is not None:
            self.on_close(self)

    async def close(self, reason: str = "session ended") -> None:
        """End the session: cancel held calls, answer calls in flight, end streams, close the upstream."""
        if self.closed_reason is None:
            self.closed_reason = reason
        for request_id in list(self.held):
            self._cancel_hold(request_id, "the client's session ended")
        for watcher in self.task_watchers:
            watcher.cancel()  # the tasks themselves go on: another session may ask for them
        await asyncio.gather(*self._background, return_exceptions=True)
        self.replays.clear()
        self._end_all(self.closed_reason)
        if self.connection is not None:
            await self.connection.close()

    def _end_all(self, reason: str) -> None:
        """Answer every request in flight with `reason` as an error, and end every client stream."""
        for exchange in list(self._exchanges.values()):
            self._answer(exchange, error_response(exchange.upstream_id, UPSTREAM_UNAVAILABLE, reason))
        for outbox in self._streams:
            outbox.put_nowait(None)


def refuse_upstream_request(session: Session, request: JsonObject) -> None:
    """Answer a request the upstream sent in a session the gateway keeps for stateless clients: it
    cannot reach a client (`ping` is answered, anything else refused)."""
    request_id = request.get("id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        return
    method = request.get("method")
    if method == "ping":
        body: JsonObject = result_response(request_id, {})
    else:
        body = error_response(
            request_id,
            METHOD_NOT_FOUND,
            f"{method} cannot reach this client: it speaks MCP 2026-07-28 (stateless) through the"
            " approvals gateway, which declared no client capabilities to this server",
        )
    session.forward(Message("response", body, request_id, None))
