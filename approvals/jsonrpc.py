"""Pure JSON-RPC 2.0 and MCP helpers: parse and check envelopes, build errors and tool results.

Messages stay plain `dict`s parsed from the wire: the gateway forwards what it received, field for
field, and never round-trips a message through a model that could rename or add fields.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

from approvals.errors import ProtocolError

JsonObject = dict[str, Any]
RequestId = str | int

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000 to -32099).
UPSTREAM_UNAVAILABLE = -32001
REQUEST_CANCELLED = -32800

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# The spec: a server that gets no MCP-Protocol-Version header assumes 2025-03-26.
ASSUMED_VERSION = "2025-03-26"

Kind = Literal["request", "notification", "response"]


class EnvelopeError(ProtocolError, ValueError):
    """The bytes are not one well-formed JSON-RPC message; `code` is the JSON-RPC error code.

    A ValueError too: decoding code catches it as the bad value it is."""

    def __init__(self, code: int, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(code, message, request_id=request_id)


@dataclass(frozen=True, slots=True)
class Message:
    """One checked JSON-RPC message and the fields the gateway routes on."""

    kind: Kind
    body: JsonObject
    id: RequestId | None = None
    method: str | None = None

    @property
    def params(self) -> JsonObject:
        params = self.body.get("params")
        return params if isinstance(params, dict) else {}


def _is_id(value: object) -> bool:
    # MCP forbids null ids, and a bool is not an id even though Python calls it an int.
    return isinstance(value, str | int) and not isinstance(value, bool)


def check_message(obj: object) -> Message:
    """Classify one decoded JSON value as request, notification or response, or raise EnvelopeError."""
    if isinstance(obj, list):
        raise EnvelopeError(INVALID_REQUEST, "JSON-RPC batches are not supported; send one message per POST")
    if not isinstance(obj, dict):
        raise EnvelopeError(INVALID_REQUEST, "a JSON-RPC message must be a JSON object")
    raw_id = obj.get("id")
    request_id = raw_id if _is_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        raise EnvelopeError(INVALID_REQUEST, 'the "jsonrpc" member must be "2.0"', request_id)
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise EnvelopeError(INVALID_REQUEST, '"method" must be a non-empty string', request_id)
        if "params" in obj and not isinstance(obj["params"], dict):
            raise EnvelopeError(INVALID_REQUEST, '"params" must be an object in MCP', request_id)
        if "id" not in obj:
            return Message("notification", obj, None, method)
        if request_id is None:
            raise EnvelopeError(INVALID_REQUEST, '"id" must be a string or an integer (not null)')
        return Message("request", obj, request_id, method)
    if "id" in obj and ("result" in obj) != ("error" in obj):
        if request_id is None:
            raise EnvelopeError(INVALID_REQUEST, 'a response "id" must be a string or an integer')
        error = obj.get("error")
        if "error" in obj and not (isinstance(error, dict) and isinstance(error.get("code"), int)):
            raise EnvelopeError(
                INVALID_REQUEST, 'a response "error" must be an object with an integer "code"'
            )
        return Message("response", obj, request_id, None)
    raise EnvelopeError(
        INVALID_REQUEST,
        'not a request, notification or response (needs "method", or "id" with '
        'exactly one of "result" and "error")',
        request_id,
    )


# The deepest nesting of arrays and objects a JSON body may have. Python's decoder recurses once per
# level, so ~1,000 levels would be a RecursionError; every page that renders a stored request (the
# inbox's detail page) can rely on this bound too. MCP's own messages need a handful of levels.
MAX_JSON_DEPTH = 64
# The largest magnitude a JSON number may have: what a double can hold. Beyond it, a float parses
# as `inf` (which is not JSON and would be forwarded and stored as `Infinity`) and an integer has no
# JSON peer that other programs can read.
MAX_JSON_NUMBER = sys.float_info.max


class JsonInputError(ProtocolError, ValueError):
    """The text is JSON Python could decode, but not JSON the gateway accepts (depth, numbers)."""

    def __init__(self, message: str, code: int = PARSE_ERROR, value: object = None) -> None:
        super().__init__(code, message)
        self.value = value  # for an out-of-range number: the text decoded leniently, if it can be


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON; Python would accept them, and a NaN makes every numeric
    # policy condition false, which could let a call through that `deny_if` should stop.
    raise ValueError(f"{name} is not valid JSON")


def _out_of_range(literal: str) -> JsonInputError:
    shown = literal if len(literal) <= 40 else f"{literal[:20]}…{literal[-10:]} ({len(literal)} digits)"
    return JsonInputError(
        f"the number {shown} is out of range: JSON numbers must be finite doubles "
        f"(magnitude at most {MAX_JSON_NUMBER:.6g})",
        INVALID_PARAMS,
    )


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _out_of_range(literal)
    return value


def _bounded_int(literal: str) -> int:
    value = int(literal)
    # An integer of at most 308 digits is below 10**308, inside the bound: only longer literals
    # need the exact test, so an ordinary id costs one len().
    if len(literal) > 308 and abs(value) > MAX_JSON_NUMBER:
        raise _out_of_range(literal)
    return value


_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = str.maketrans("[{]}", "\x02\x02\x00\x00")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON `text`, without recursing (or decoding).

    On malformed text it is the deepest any decoder can reach before failing, so a text whose depth
    is within MAX_JSON_DEPTH cannot make the decoder recurse further.
    """
    # Escapes go first, so that `\"` cannot end a string; then strings, whose brackets are text.
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    # Each opener counts 2 and each closer 0, so the running sum minus the count so far is the
    # depth after each bracket; all of it runs in C, linear in the body.
    steps = skeleton.translate(_DELTA).encode("latin-1")
    return max(0, max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0))


def check_json_depth(text: str) -> None:
    """Raise JsonInputError (-32700) when `text` nests deeper than MAX_JSON_DEPTH."""
    # Fewer openers than the limit cannot nest deeper than it: the common case costs two counts.
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    if (depth := json_depth(text)) > MAX_JSON_DEPTH:
        raise JsonInputError(
            f"the JSON nests {depth} levels deep; at most {MAX_JSON_DEPTH} levels of arrays and objects"
        )


# Made once: json.loads / json.dumps with options build a new decoder / encoder on every call.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
)
_LENIENT = json.JSONDecoder()
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def decode_text(text: str) -> object:
    """Decode JSON the gateway accepts: bounded depth, finite numbers, no NaN or Infinity.

    Raises JsonInputError for text that is JSON but out of those bounds, ValueError for text that
    is not JSON at all.
    """
    check_json_depth(text)
    try:
        return _DECODER.decode(text)
    except JsonInputError as exc:
        raise _located(text, exc) from None


def decode_bytes(body: bytes) -> object:
    """decode_text for a body: UTF-8, -16 or -32, told apart by the first bytes (as json.loads)."""
    return decode_text(body.decode(json.detect_encoding(body), "surrogatepass"))


def _out_of_range_path(value: object) -> str:
    """Where the first out-of-range number sits in a leniently decoded value, as `a.b[2].c`."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float | int) and not isinstance(item, bool) and abs(item) > MAX_JSON_NUMBER:
            return path or "the top level"
        if isinstance(item, dict):
            stack.extend((f"{path}.{key}" if path else str(key), v) for key, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return "the body"


def _located(text: str, exc: JsonInputError) -> JsonInputError:
    # Only on this error path: decode leniently (the depth was checked) to say where the number is,
    # and to give parse_message the message's id.
    try:
        value = _LENIENT.decode(text)
    except ValueError:
        return exc
    return JsonInputError(f"{_out_of_range_path(value)}: {exc}", exc.code, value)


def _id_of(value: object) -> RequestId | None:
    try:
        return check_message(value).id
    except EnvelopeError:
        return None


def _decode_body(body: bytes) -> object:
    try:
        return decode_bytes(body)
    except JsonInputError as exc:
        # An out-of-range number sits in an otherwise well-formed message: answer it with the
        # message's id, so the client can match the error to its call.
        raise EnvelopeError(exc.code, str(exc), _id_of(exc.value)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError(PARSE_ERROR, f"invalid JSON: {exc}") from None


def parse_message(body: bytes) -> Message:
    """Decode and check one message from a POST body."""
    return check_message(_decode_body(body))


def parse_payload(body: bytes) -> Message | list[object]:
    """parse_message, except that a JSON array (a batch) comes back as its unchecked elements:
    the caller accepts it (2025-03-26 sessions) or refuses it."""
    obj = _decode_body(body)
    return obj if isinstance(obj, list) else check_message(obj)


def error_response(request_id: RequestId | None, code: int, message: str, data: object = None) -> JsonObject:
    """A JSON-RPC error response."""
    error: JsonObject = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def result_response(request_id: RequestId, result: JsonObject) -> JsonObject:
    """A JSON-RPC success response."""
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def tool_error(text: str, meta: JsonObject | None = None) -> JsonObject:
    """A `CallToolResult` with `isError: true`: the way to tell an agent no, so that it can act on it."""
    result: JsonObject = {"content": [{"type": "text", "text": text}], "isError": True}
    if meta:
        result["_meta"] = meta
    return result


def is_failure(response: JsonObject) -> bool:
    """A JSON-RPC error, or a tool result the server marked as an error."""
    if "error" in response:
        return True
    result = response.get("result")
    return isinstance(result, dict) and result.get("isError") is True


def encode(message: JsonObject) -> bytes:
    """Compact UTF-8 JSON, as sent on the wire."""
    try:
        return _ENCODER.encode(message).encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" in the JSON received) has no UTF-8 form: send it escaped,
        # exactly as it arrived, rather than failing the call.
        return _ASCII_ENCODER.encode(message).encode()
