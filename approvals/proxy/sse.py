"""Server-sent events: encoding what the gateway sends, decoding what an upstream sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from approvals.errors import UpstreamError

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform"}


def encode_event(data: bytes, event_id: str | None = None) -> bytes:
    """One `message` event. JSON from `jsonrpc.encode` has no raw newlines, so one data line suffices."""
    head = b"event: message\n"
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def encode_comment(text: str) -> bytes:
    """A comment line: ignored by clients, but it keeps proxies and idle timers from closing the stream."""
    return b": " + text.encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    data: str
    id: str | None


MAX_EVENT_BYTES = 64 * 1024 * 1024


class TooLarge(UpstreamError, ValueError):
    """An answer, or one event of a stream, is larger than the gateway accepts."""


class SseDecoder:
    """Push-style SSE decoding (the WHATWG rules the MCP servers rely on): feed bytes, get events.

    Our own line splitting: a tool result carrying an image is one long `data:` line, longer than
    stream readers' line limits. An event larger than `max_bytes` (counting the line it is still
    receiving) raises TooLarge: a stream that never ends a line is not buffered for ever.
    """

    __slots__ = (
        "_after_cr",
        "_data",
        "_data_bytes",
        "_event",
        "_id",
        "_pending",
        "_pending_bytes",
        "max_bytes",
        "retry_ms",
    )

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pending: list[bytes] = []  # the pieces of a line not ended yet, joined once it is
        self._pending_bytes = 0
        self._data: list[str] = []
        self._data_bytes = 0
        self._event = "message"
        self._id: str | None = None
        self._after_cr = False  # the last chunk ended in CR: an LF starting the next is its CRLF's
        self.retry_ms: int | None = None  # the stream's last `retry:`, for a reconnect

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk`."""
        if not chunk:
            return []
        # Lines end in CRLF, LF or a lone CR (all three are SSE): CR and CRLF become LF first.
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, rest = chunk.split(b"\n")
        events: list[Event] = []
        for raw in complete:
            if self._pending:
                raw = b"".join([*self._pending, raw])
                self._pending, self._pending_bytes = [], 0
            self._line(raw, events)
        if rest:
            self._pending.append(rest)
            self._pending_bytes += len(rest)
            self._check(self._pending_bytes)
        return events

    def _check(self, pending: int) -> None:
        if self._data_bytes + pending > self.max_bytes:
            raise TooLarge(f"an event of the upstream's stream is larger than {self.max_bytes} bytes")

    def end(self) -> list[Event]:
        """The stream ended: the last event, if it was not terminated by a blank line."""
        events: list[Event] = []
        if self._pending:
            raw = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            self._line(raw, events)
        if any(self._data):
            events.append(Event(self._event, "\n".join(self._data), self._id))
        self._data, self._data_bytes = [], 0
        return events

    def _line(self, raw: bytes, events: list[Event]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            # An event with empty data is a priming or retry event (resumability): nothing to pass on.
            if any(self._data):
                events.append(Event(self._event, "\n".join(self._data), self._id))
            self._data, self._data_bytes, self._event = [], 0, "message"
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data_bytes += len(raw)
            self._check(0)
            self._data.append(value)
        elif name == "event":
            self._event = value or "message"  # an empty type is a `message` event
        elif name == "id" and "\0" not in value:  # the spec ignores an id with NUL in it
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)

    @property
    def last_event_id(self) -> str | None:
        """The last event id seen, priming events (empty data) included: where a reconnect resumes."""
        return self._id


async def read_events(
    content: aiohttp.StreamReader, max_bytes: int = MAX_EVENT_BYTES
) -> AsyncIterator[Event]:
    """Decode an SSE stream into events (TooLarge for one over `max_bytes`)."""
    decoder = SseDecoder(max_bytes)
    async for chunk in content.iter_any():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.end():
        yield event
