"""Pure JSON-RPC 2.0 and MCP helpers: parse and check envelopes, build errors and tool results.

Messages stay plain `dict`s parsed from the wire: the gateway forwards what it received, field for
field, and never round-trips a message through a model that could rename or add fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

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


class EnvelopeError(ValueError):
    """The bytes are not one well-formed JSON-RPC message; `code` is the JSON-RPC error code."""

    def __init__(self, code: int, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


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


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON; Python would accept them, and a NaN makes every numeric
    # policy condition false, which could let a call through that `deny_if` should stop.
    raise ValueError(f"{name} is not valid JSON")


# Made once: json.loads / json.dumps with options build a new decoder / encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def parse_message(body: bytes) -> Message:
    """Decode and check one message from a POST body."""
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32, told apart by the first bytes.
        obj = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvelopeError(PARSE_ERROR, f"invalid JSON: {exc}") from None
    return check_message(obj)


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
