"""Server-sent events: encoding what the gateway sends, decoding what an upstream sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

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


class SseDecoder:
    """Push-style SSE decoding (the WHATWG rules the MCP servers rely on): feed bytes, get events.

    Our own line splitting: a tool result carrying an image is one long `data:` line, longer than
    stream readers' line limits.
    """

    __slots__ = ("_buffer", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = "message"
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk`."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\n" not in chunk:
            if len(buffer) > MAX_EVENT_BYTES:
                raise ValueError(f"SSE line longer than {MAX_EVENT_BYTES} bytes")
            self._buffer = buffer
            return []
        *complete, self._buffer = buffer.split(b"\n")
        events: list[Event] = []
        for raw in complete:
            self._line(raw, events)
        return events

    def end(self) -> list[Event]:
        """The stream ended: the last event, if it was not terminated by a blank line."""
        events: list[Event] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        if any(self._data):
            events.append(Event(self._event, "\n".join(self._data), self._id))
        self._data = []
        return events

    def _line(self, raw: bytes, events: list[Event]) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not line:
            # An event with empty data is a priming or retry event (resumability): nothing to pass on.
            if any(self._data):
                events.append(Event(self._event, "\n".join(self._data), self._id))
            self._data, self._event = [], "message"
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value


async def read_events(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """Decode an SSE stream into events."""
    decoder = SseDecoder()
    async for chunk in content.iter_any():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.end():
        yield event
