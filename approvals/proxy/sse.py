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


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    # Our own splitting: aiohttp's readline refuses lines over its buffer size, and a tool result
    # carrying an image is one long `data:` line.
    buffer = b""
    async for chunk in content.iter_any():
        buffer += chunk
        if b"\n" not in chunk:
            if len(buffer) > MAX_EVENT_BYTES:
                raise ValueError(f"SSE line longer than {MAX_EVENT_BYTES} bytes")
            continue
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line
    if buffer:
        yield buffer


async def read_events(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """Decode an SSE stream (the WHATWG rules the MCP servers rely on) into events."""
    data: list[str] = []
    event = "message"
    event_id: str | None = None
    async for raw in _lines(content):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not line:
            # An event with empty data is a priming or retry event (resumability): nothing to pass on.
            if any(data):
                yield Event(event, "\n".join(data), event_id)
            data, event = [], "message"
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
    if any(data):
        yield Event(event, "\n".join(data), event_id)
