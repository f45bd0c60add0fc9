"""approvals.proxy.sse's decoder: what an upstream's event stream becomes, however it is cut up.

The rules are WHATWG's (HTML, "server-sent events"): lines end in CRLF, LF or a lone CR; `data:`
lines join with LF; comments and unknown fields are ignored; `id:` persists; an event is bounded.
"""

from __future__ import annotations

import pytest

from approvals.proxy.sse import Event, SseDecoder, TooLarge, encode_comment, encode_event

EOLS = {"crlf": b"\r\n", "lf": b"\n", "cr": b"\r"}


def _stream(eol: bytes) -> bytes:
    lines = [
        b": a comment, then a priming event with no data",
        b"id: 0",
        b"data:",
        b"",
        b"event: message",
        b"id: 1",
        b'data: {"jsonrpc":"2.0","method":"notifications/progress"}',
        b"",
        b"retry: 3000",
        b"data: first line",
        b"data:second line, no space",
        b"data:  two spaces keep one",
        b"",
        b"event: custom",
        b"unknown: field",
        b"data: {}",
        b"",
    ]
    return b"".join(line + eol for line in lines)


EXPECTED = [
    Event("message", '{"jsonrpc":"2.0","method":"notifications/progress"}', "1"),
    Event("message", "first line\nsecond line, no space\n two spaces keep one", "1"),
    Event("custom", "{}", "1"),
]


def _decode(pieces: list[bytes], max_bytes: int = 1 << 20) -> list[Event]:
    decoder = SseDecoder(max_bytes)
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events + decoder.end()


@pytest.mark.parametrize("eol", sorted(EOLS))
def test_sse_decodes_every_line_ending(eol: str) -> None:
    """CRLF, LF and a lone CR each end lines: the same events, priming event and comments dropped."""
    assert _decode([_stream(EOLS[eol])]) == EXPECTED


@pytest.mark.parametrize("eol", sorted(EOLS))
def test_sse_decodes_a_stream_split_at_every_byte(eol: str) -> None:
    """Cut in two at every offset, or fed a byte at a time (a CRLF split in two included): same events."""
    stream = _stream(EOLS[eol])
    for cut in range(len(stream) + 1):
        assert _decode([stream[:cut], stream[cut:]]) == EXPECTED, cut
    assert _decode([stream[i : i + 1] for i in range(len(stream))]) == EXPECTED


def test_sse_takes_a_cr_then_crlf_as_two_line_ends() -> None:
    """`data: x` CR, then CRLF in the next read: the line ends, then the blank line dispatches."""
    assert _decode([b"data: x\r", b"\r\n"])[:1] == [Event("message", "x", None)]
    decoder = SseDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\r\n") == [Event("message", "x", None)]


def test_sse_mixes_line_endings_in_one_stream() -> None:
    """One event's lines may end in CR, LF and CRLF alike."""
    assert _decode([b"data: a\rdata: b\ndata: c\r\n\r"]) == [Event("message", "a\nb\nc", None)]


def test_sse_keeps_the_last_id_and_ignores_retry() -> None:
    """`id:` carries over to later events until changed (one with NUL is ignored); `retry:` is not data."""
    stream = b"id: 7\ndata: a\n\nretry: 10\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n"
    events = _decode([stream])
    assert [(e.data, e.id) for e in events] == [("a", "7"), ("b", "7"), ("c", "7"), ("d", "")]


def test_sse_ignores_comments_unknown_fields_and_empty_events() -> None:
    """Comments, unknown fields, a retry-only event and `data:` with nothing in it yield no event."""
    stream = b": keep-alive\n\nretry: 5\n\nfoo: bar\n\ndata:\n\ndata\ndata\n\n"
    assert _decode([stream]) == []


def test_sse_names_an_empty_event_type_message() -> None:
    """`event:` with no value is a `message` event, as if the line were not there."""
    assert _decode([b"event:\ndata: x\n\n"]) == [Event("message", "x", None)]


@pytest.mark.parametrize("tail", [b"data: last\n", b"data: last"])
def test_sse_delivers_a_final_event_without_its_blank_line(tail: bytes) -> None:
    """A stream that ends without the blank line still hands over its last event at `end()`.

    (The spec discards it; an upstream that closes right after its answer's data line would
    otherwise lose an answer it did send. A cut-off JSON object does not parse, so fails anyway.)
    """
    decoder = SseDecoder()
    assert decoder.feed(b"data: first\n\n" + tail) == [Event("message", "first", None)]
    assert decoder.end() == [Event("message", "last", None)]
    assert decoder.end() == []


def test_sse_refuses_an_event_over_max_bytes() -> None:
    """Data lines adding up to more than max_bytes raise TooLarge; the bound is per event."""
    line = b"data: " + b"x" * 94 + b"\n"  # 100 bytes and its LF
    fits = SseDecoder(max_bytes=1000)
    for _ in range(20):  # 20,000 bytes in all, 1,000 per event: each at the bound, none over
        assert len(fits.feed(line * 10 + b"\n")) == 1
    with pytest.raises(TooLarge):
        SseDecoder(max_bytes=1000).feed(line * 11)


def test_sse_refuses_a_line_that_never_ends() -> None:
    """A line that has not ended is counted as it arrives: TooLarge once it passes max_bytes."""
    decoder = SseDecoder(max_bytes=1000)
    decoder.feed(b"data: ")
    for _ in range(9):
        decoder.feed(b"x" * 100)
    with pytest.raises(TooLarge):
        decoder.feed(b"x" * 100)


def test_sse_decodes_what_the_gateway_encodes() -> None:
    """encode_event and encode_comment, read back: the event and its id, the comment ignored."""
    stream = encode_comment("still here") + encode_event(b'{"a":1}', "s-1") + encode_event(b"{}")
    assert _decode([stream]) == [Event("message", '{"a":1}', "s-1"), Event("message", "{}", "s-1")]
