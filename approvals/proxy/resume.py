"""Resumable held-call streams (Streamable HTTP "Resumability and Redelivery", 2025-11-25).

A held call's SSE stream is written through a `HeldStream`: every event gets an id
`<stream key>.<sequence>` (the key is random, so an id names one stream of one session) and is
kept for replay. A client whose connection broke reconnects with `GET` + `Last-Event-ID`: it gets
the events after that id, then the rest of the stream as it comes, the held call's outcome
included. The outcome is handed out once: after it has been written (and the stream ended) on any
connection, the stream is forgotten, and a further reconnect with its ids is refused.

What is kept is bounded: a stream's last `MAX_KEPT_EVENTS` progress events, and per session at most
`MAX_ENDED_STREAMS` ended streams whose outcome no connection took, for at most `KEEP_SECONDS`, in
at most `max_bytes`. An outcome dropped from here is not lost: the approval keeps its result for
the agent's repeat call (it is marked delivered only when a connection took it).
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from approvals.proxy.sse import encode_event

MAX_KEPT_EVENTS = 16
MAX_ENDED_STREAMS = 32
KEEP_SECONDS = 300.0
# Sent with the priming event: how long a client waits before it reconnects (SSE `retry`, ms).
RETRY_MS = 1000

Clock = Callable[[], float]


class UnknownEvent(LookupError):
    """A Last-Event-ID that names no stream this session can resume (or is malformed)."""


def _encode(data: bytes, event_id: str) -> bytes:
    return encode_event(data, event_id)


def priming_event(event_id: str) -> bytes:
    """An event with an id and empty data: the client learns an id to resume from, and nothing else."""
    return f"id: {event_id}\nretry: {RETRY_MS}\ndata: \n\n".encode()


class HeldStream:
    """One held call's stream: its kept events and the connection it is written to, if any.

    Writes go to one connection at a time, under a lock, so that a resumed connection gets the
    replay before anything new. A failed write detaches the connection; the stream goes on being
    produced (and kept) until its end, so a client that reconnects in time misses nothing.
    """

    def __init__(self, key: str, on_delivered: Callable[[bool], None], *, prime: bool) -> None:
        self.key = key
        self._on_delivered = on_delivered
        self._prime = prime
        self._events: collections.deque[tuple[int, bytes]] = collections.deque()
        self._final: tuple[int, bytes] | None = None
        self._outcome = False
        self._seq = 0
        self._lock = asyncio.Lock()
        self._writer: web.StreamResponse | None = None
        self._writer_over: asyncio.Future[None] | None = None
        self.ended = False  # the producer is done: the final event (if any) is in
        self.delivered = False  # the final event was written, and the stream ended, on a connection
        self.ended_at: float | None = None  # set by `Replays.ended`: from then on it may be trimmed

    @property
    def has_final(self) -> bool:
        return self._final is not None

    @property
    def size(self) -> int:
        kept = sum(len(data) for _, data in self._events)
        return kept + (len(self._final[1]) if self._final is not None else 0)

    def _next_id(self) -> tuple[int, str]:
        self._seq += 1
        return self._seq, f"{self.key}.{self._seq}"

    async def start(self, response: web.StreamResponse) -> None:
        """Attach the POST's own response; send the priming event (clients of 2025-11-25 on)."""
        async with self._lock:
            self._writer = response
            if self._prime:
                seq, event_id = self._next_id()
                self._events.append((seq, priming_event(event_id)))
                await self._write(self._events[-1][1])

    async def event(self, data: bytes) -> None:
        """A progress event: kept (the last few) and written."""
        async with self._lock:
            seq, event_id = self._next_id()
            self._events.append((seq, _encode(data, event_id)))
            while len(self._events) > MAX_KEPT_EVENTS:
                self._events.popleft()
            await self._write(self._events[-1][1])

    async def comment(self, text: bytes) -> None:
        """A sign of life: written, never kept."""
        async with self._lock:
            await self._write(text)

    async def end(self, data: bytes | None, *, outcome: bool) -> None:
        """The stream's last event, or None when it ends unanswered (cancelled). `outcome`: it is
        the call's decided outcome, not the pending result a hold that runs out answers with."""
        async with self._lock:
            self.ended = True
            self._outcome = outcome
            if data is not None:
                seq, event_id = self._next_id()
                self._final = (seq, _encode(data, event_id))
                await self._write(self._final[1])
            await self._close_writer()

    async def resume(self, response: web.StreamResponse, after: int) -> asyncio.Future[None]:
        """Attach a resumed connection: the events after `after`, then the rest. The future is done
        when this connection is no longer written to (the stream ended, it broke, or was replaced)."""
        over = asyncio.get_running_loop().create_future()
        async with self._lock:
            self._detach()
            self._writer, self._writer_over = response, over
            for seq, data in self._events:
                if seq > after and self._writer is response:
                    await self._write(data)
            if self.ended:
                if self._final is not None and self._final[0] > after and self._writer is response:
                    await self._write(self._final[1])
                await self._close_writer()
        return over

    def knows(self, seq: int) -> bool:
        """`seq` was handed out on this stream (an id from the future is not resumable)."""
        return 0 < seq <= self._seq

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            await writer.write(data)
        except (ConnectionResetError, RuntimeError):  # RuntimeError: the response was already ended
            self._detach()

    async def _close_writer(self) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            await writer.write_eof()
        except (ConnectionResetError, RuntimeError):
            self._detach()
            return
        if self._final is not None and not self.delivered:
            self.delivered = True
            self._on_delivered(self._outcome)
        self._detach()

    def _detach(self) -> None:
        self._writer = None
        over, self._writer_over = self._writer_over, None
        if over is not None and not over.done():
            over.set_result(None)


class Replays:
    """A session's held-call streams, live and ended, by key (bounded: see the module doc)."""

    def __init__(self, max_bytes: int, clock: Clock = time.monotonic) -> None:
        self._streams: dict[str, HeldStream] = {}
        self._max_bytes = max_bytes
        self._clock = clock

    def open(self, on_delivered: Callable[[], None], *, prime: bool) -> HeldStream:
        self._trim()
        key = secrets.token_urlsafe(9)

        def delivered(outcome: bool) -> None:
            # Handed out once: a further reconnect with this stream's ids is refused.
            self._streams.pop(key, None)
            if outcome:  # a pending result is not the outcome: the approval keeps it for later
                on_delivered()

        stream = HeldStream(key, delivered, prime=prime)
        self._streams[key] = stream
        return stream

    def ended(self, stream: HeldStream) -> None:
        """The producer is done: an unanswered (cancelled) stream has nothing left to resume."""
        stream.ended_at = self._clock()
        if not stream.has_final:
            self._streams.pop(stream.key, None)
        self._trim()

    def find(self, last_event_id: str) -> tuple[HeldStream, int]:
        """The stream and sequence a Last-Event-ID names; UnknownEvent if it names none here."""
        self._trim()
        key, _, seq = last_event_id.rpartition(".")
        stream = self._streams.get(key)
        if stream is None or not seq.isdigit() or not stream.knows(int(seq)):
            raise UnknownEvent(last_event_id)
        return stream, int(seq)

    def _trim(self) -> None:
        """Drop ended streams past KEEP_SECONDS, then the oldest beyond the count and byte bounds."""
        now = self._clock()
        ended = sorted(
            ((s.ended_at, s) for s in self._streams.values() if s.ended_at is not None),
            key=lambda pair: pair[0],
        )
        total = sum(s.size for _, s in ended)
        for index, (ended_at, stream) in enumerate(ended):
            fits = len(ended) - index <= MAX_ENDED_STREAMS and total <= self._max_bytes
            if now - ended_at <= KEEP_SECONDS and fits:
                break
            total -= stream.size
            del self._streams[stream.key]

    def clear(self) -> None:
        """The session ended: nothing is resumable any more."""
        self._streams.clear()

    def __len__(self) -> int:
        return len(self._streams)
