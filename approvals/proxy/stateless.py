"""MCP 2026-07-28 (stateless) clients in front of initialize-era upstreams.

A 2026-07-28 request stands alone: no `initialize`, no `Mcp-Session-Id`; every request carries its
protocol version, client info and capabilities in `params._meta`, and mirrors its method (and the
tool, prompt or resource it names) in HTTP headers. The gateway checks that envelope as the spec's
validation ladder has it, answers `server/discover` itself, and serves every other request over an
upstream session it keeps per (grant, upstream) (`pool.py`). Nothing here depends on state of one
process beyond that pool: a held call follows its approval through the change feed, so any
process can serve any request.

What cannot be bridged: requests from the upstream to the client (sampling, elicitation, roots)
during a stateless request. The gateway opens its upstream sessions declaring no client
capabilities, so a conforming upstream sends none; one that does anyway is answered with
"method not found" (a `ping` with an empty result). They are not turned into `input_required`
results: the client's retry may reach another process, and the upstream's call would have to
stay open, waiting, in this one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from approvals.config import Principal
from approvals.core.model import Hold, ToolCall
from approvals.errors import ApprovalsError
from approvals.jsonrpc import (
    HANDSHAKE_VERSIONS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    Message,
    RequestId,
    encode,
    error_response,
    result_response,
)
from approvals.proxy import handlers, tasks_modern
from approvals.proxy.hold import stream_hold
from approvals.proxy.keys import GATE, GATEWAY
from approvals.proxy.pool import Pooled, stateless_session
from approvals.proxy.session import Exchange, Session, bad_progress_token
from approvals.proxy.sse import SSE_HEADERS, encode_event

log = logging.getLogger(__name__)

MODERN_VERSIONS = ("2026-07-28",)

# Error codes of 2026-07-28 (schema: "MCP error codes").
HEADER_MISMATCH = -32020
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
UNSUPPORTED_PROTOCOL_VERSION = -32022

# The HTTP status of an error answer, by JSON-RPC code (transports: "Sending Messages to the
# Server" — a request the server cannot accept gets a 4xx, an unknown method 404); others 200.
HTTP_STATUS = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    MISSING_REQUIRED_CLIENT_CAPABILITY: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
# Request `_meta` keys that are the client's envelope to the gateway, not for the upstream.
ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_KEY, CLIENT_INFO_KEY, CLIENT_CAPABILITIES_KEY, LOG_LEVEL_KEY})

VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
# The body field each method mirrors in `Mcp-Name`.
NAMED_BY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

# Methods served by passing them to the upstream session (tools/call goes through the gate).
PASSTHROUGH = frozenset(
    {
        "tools/list",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "completion/complete",
    }
)
# Results that carry caching hints in 2026-07-28 (`CacheableResult`: `ttlMs`, `cacheScope`).
CACHEABLE = PASSTHROUGH - {"prompts/get", "completion/complete"} | {"server/discover"}
# Capability fields that depend on what is not bridged (subscriptions/listen, logging).
UNBRIDGED_CAPABILITY_FIELDS = frozenset({"listChanged", "subscribe"})
BRIDGED_CAPABILITIES = ("tools", "prompts", "resources", "completions")

_BASE64_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


def is_stateless(headers: CIMultiDictProxy[str], message: Message) -> bool:
    """Whether a POST is of the 2026-07-28 era: no session, and a 2026 method, envelope or header.

    A 2026-07-28 version header wins over everything else, as the `mcp` SDK routes: a stray
    Mcp-Session-Id is ignored (the era has no sessions), and its `initialize` is a removed method
    (404). A version header of the initialize era without a session stays on the session path
    (which asks for the session); anything else without a session is checked here, so an unknown
    version is told which ones are served.
    """
    if headers.get(VERSION_HEADER) in MODERN_VERSIONS:
        return True
    if "Mcp-Session-Id" in headers or message.method == "initialize":
        return False
    if message.method == "server/discover":
        return True
    version = headers.get(VERSION_HEADER)
    if version is not None and version not in HANDSHAKE_VERSIONS:
        return True
    meta = message.params.get("_meta")
    return isinstance(meta, dict) and PROTOCOL_VERSION_KEY in meta


def no_stream(headers: CIMultiDictProxy[str]) -> web.Response | None:
    """405 for a GET or DELETE of 2026-07-28, which has no session stream to open or end."""
    version = headers.get(VERSION_HEADER)
    if version in MODERN_VERSIONS:
        return web.Response(status=405, headers={"Allow": "POST"})  # a stray Mcp-Session-Id changes nothing
    if "Mcp-Session-Id" in headers or version is None or version in HANDSHAKE_VERSIONS:
        return None
    return web.Response(status=405, headers={"Allow": "POST"})


def error(request_id: RequestId | None, code: int, message: str, data: object = None) -> web.Response:
    """A JSON-RPC error with the request's id, and the HTTP status the transport gives its code."""
    body = encode(error_response(request_id, code, message, data))
    return web.Response(status=HTTP_STATUS.get(code, 200), body=body, content_type="application/json")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused, as its JSON-RPC error."""

    code: int
    message: str
    data: object = None


async def handle(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """One 2026-07-28 message, checked as the spec's ladder has it, then served."""
    if message.kind == "response":
        return error(None, INVALID_REQUEST, "a 2026-07-28 client sends no responses: nothing asked it")
    if message.kind == "notification":
        # No client notification means anything on this wire (cancelling is closing the stream).
        version = request.headers.get(VERSION_HEADER, "")
        if version not in MODERN_VERSIONS:
            return _reject(None, _unsupported(version))
        return web.Response(status=202)
    assert message.id is not None
    rejection = check_envelope(request.headers, message)
    if rejection is not None:
        return _reject(message.id, rejection)
    if (bad_token := bad_progress_token(message.params)) is not None:
        return error(message.id, INVALID_PARAMS, bad_token)
    if (bad_responses := bad_input_responses(message.params)) is not None:
        return error(message.id, INVALID_PARAMS, bad_responses)
    method = message.method
    if method == "initialize":
        return error(
            message.id,
            METHOD_NOT_FOUND,
            "initialize does not exist in 2026-07-28 (there is no handshake): send server/discover,"
            " or initialize with an initialize-era MCP-Protocol-Version header",
        )
    if method == "server/discover":
        return await _discover(request, grant, upstream, message)
    if method in tasks_modern.METHODS:
        return await tasks_modern.handle(request, grant, upstream, message)
    if method == "tools/call":
        return await _tool_call(request, grant, upstream, message)
    if method in PASSTHROUGH:
        transform = handlers._tool_filter(request.app[GATE], upstream) if method == "tools/list" else None
        return await _forward(request, grant, upstream, message, message.body, transform)
    return error(
        message.id,
        METHOD_NOT_FOUND,
        f"method {method!r} is not served to 2026-07-28 clients by this gateway "
        f"(served: server/discover, tools/call, {', '.join(sorted(PASSTHROUGH))})",
    )


def _reject(request_id: RequestId | None, rejection: Rejection) -> web.Response:
    return error(request_id, rejection.code, rejection.message, rejection.data)


def _unsupported(version: object) -> Rejection:
    return Rejection(
        UNSUPPORTED_PROTOCOL_VERSION,
        f"unsupported protocol version {version!r}; supported without a session: {', '.join(MODERN_VERSIONS)}"
        " (initialize-era versions: send initialize)",
        {"supported": list(MODERN_VERSIONS), "requested": version},
    )


def check_envelope(headers: CIMultiDictProxy[str], message: Message) -> Rejection | None:
    """What is wrong with a request's envelope and headers, first problem first; None if nothing.

    The order is the spec's: the `_meta` fields must be there (-32602); the headers must agree
    with the body (-32020), before the version is judged, so a client that disagrees with itself
    is told so; the version must be a served one (-32022); then the fields' shapes (-32602).
    """
    for name in (VERSION_HEADER, METHOD_HEADER, NAME_HEADER):
        if len(headers.getall(name, [])) > 1:
            return Rejection(HEADER_MISMATCH, f"the {name} header appears more than once")
    meta = message.params.get("_meta")
    if not isinstance(meta, dict):
        return Rejection(
            INVALID_PARAMS,
            f"params._meta must be an object with {PROTOCOL_VERSION_KEY!r} and {CLIENT_CAPABILITIES_KEY!r}",
        )
    missing = [key for key in (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY) if key not in meta]
    if missing:
        return Rejection(INVALID_PARAMS, f"params._meta is missing {', '.join(missing)}")
    if (mismatch := _header_mismatch(headers, message, meta[PROTOCOL_VERSION_KEY])) is not None:
        return Rejection(HEADER_MISMATCH, mismatch)
    version = meta[PROTOCOL_VERSION_KEY]
    if not isinstance(version, str):
        return Rejection(INVALID_PARAMS, f"params._meta[{PROTOCOL_VERSION_KEY!r}] must be a string")
    if version not in MODERN_VERSIONS:
        return _unsupported(version)
    if not isinstance(meta[CLIENT_CAPABILITIES_KEY], dict):
        return Rejection(INVALID_PARAMS, f"params._meta[{CLIENT_CAPABILITIES_KEY!r}] must be an object")
    info = meta.get(CLIENT_INFO_KEY)
    if info is not None and not (
        isinstance(info, dict) and isinstance(info.get("name"), str) and isinstance(info.get("version"), str)
    ):
        return Rejection(
            INVALID_PARAMS, f'params._meta[{CLIENT_INFO_KEY!r}] needs string "name" and "version"'
        )
    return None


def _header_mismatch(headers: CIMultiDictProxy[str], message: Message, version: object) -> str | None:
    sent = headers.get(VERSION_HEADER)
    if sent is None or sent != version:
        return f"the {VERSION_HEADER} header ({sent!r}) does not match params._meta[{PROTOCOL_VERSION_KEY!r}]"
    if headers.get(METHOD_HEADER) != message.method:
        return f"the {METHOD_HEADER} header does not match the body's method {message.method!r}"
    field = NAMED_BY.get(message.method or "")
    named = message.params.get(field) if field is not None else None
    if named is not None and decode_header_value(headers.get(NAME_HEADER)) != named:
        return f"the {NAME_HEADER} header does not match the body's params.{field}"
    return None


def bad_input_responses(params: JsonObject) -> str | None:
    """What is wrong with `params.inputResponses`, if anything (schema: `InputResponses`).

    It is optional, but when present it is an object of responses, each an object (an
    `ElicitResult`, `CreateMessageResult` or `ListRootsResult`). The initialize-era upstream behind
    the gateway ignores the field, so a malformed one would pass unnoticed: it is refused here.
    """
    if "inputResponses" not in params:
        return None
    responses = params["inputResponses"]
    if not isinstance(responses, dict):
        got = "null" if responses is None else handlers._json_type(responses)
        return f"params.inputResponses must be an object of responses (got {got})"
    for key, response in responses.items():
        if not isinstance(response, dict):
            return f"params.inputResponses[{key!r}] must be an object (got {handlers._json_type(response)})"
    return None


def decode_header_value(value: str | None) -> str | None:
    """A header value as sent: `=?base64?…?=` wraps what a header cannot carry (None if malformed)."""
    if value is None:
        return None
    match = _BASE64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    try:
        return base64.b64decode(match["payload"], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


# ---- serving ---------------------------------------------------------------------------------


async def _acquire(request: web.Request, grant: Principal, upstream: str) -> Pooled | str:
    try:
        return await request.app[GATEWAY].pool.acquire(grant.name, upstream)
    except OSError as exc:  # a ConnectionError, or a command that cannot start
        return f"upstream {upstream} unavailable: {exc}"


def _unavailable(request_id: RequestId, problem: str) -> web.Response:
    body = encode(error_response(request_id, UPSTREAM_UNAVAILABLE, problem))
    return web.Response(status=502, body=body, content_type="application/json")


async def _discover(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    assert message.id is not None
    pooled = await _acquire(request, grant, upstream)
    if isinstance(pooled, str):
        return _unavailable(message.id, pooled)
    return handlers.json_message(result_response(message.id, discover_result(pooled.server)))


def discover_result(server: JsonObject) -> JsonObject:
    """The gateway's `server/discover` result from the upstream's `initialize` result.

    Only capabilities the gateway bridges are advertised; list-changed and subscribe need
    `subscriptions/listen`, which it does not serve yet. `cacheScope` is private: what a client
    sees (its tool list) depends on its grant.
    """
    given = server.get("capabilities")
    upstream_caps = given if isinstance(given, dict) else {}
    capabilities: JsonObject = {}
    for name in BRIDGED_CAPABILITIES:
        value = upstream_caps.get(name)
        if isinstance(value, dict):
            capabilities[name] = {k: v for k, v in value.items() if k not in UNBRIDGED_CAPABILITY_FIELDS}
    result: JsonObject = {
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": tasks_modern.advertise(capabilities),
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
    }
    if isinstance(server.get("instructions"), str):
        result["instructions"] = server["instructions"]
    if isinstance(server.get("serverInfo"), dict):
        result["_meta"] = {SERVER_INFO_KEY: server["serverInfo"]}
    return result


async def _tool_call(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """Judged by the gate exactly as a call in a session is, before anything reaches the upstream."""
    assert message.id is not None
    judged = handlers._judged(message)
    if isinstance(judged, str):
        return error(message.id, INVALID_PARAMS, judged)
    name, arguments, body = judged
    if (bad_task := tasks_modern.task_problem(message)) is not None:
        return error(message.id, INVALID_PARAMS, bad_task)
    call = ToolCall(upstream, grant.name, stateless_session(grant.name), name, arguments)
    try:
        admission = await request.app[GATE].admit(call)
    except ApprovalsError as exc:
        log.exception("could not admit %s on %s", name, upstream)
        return handlers.rpc_error(
            500, INTERNAL_ERROR, f"the gateway could not check this call: {exc}", message.id
        )
    gateway = request.app[GATEWAY]
    if admission.hold is not None and tasks_modern.wants_task(message):
        return await tasks_modern.create(request, grant, upstream, message, admission.hold)
    if admission.hold is not None:
        holder = Session(
            f"stateless-{secrets.token_urlsafe(12)}", grant.name, gateway.settings.upstreams[upstream]
        )
        holder.draining = gateway.pool.draining
        hold_seconds = gateway.settings.approvals.hold_seconds
        return await stream_hold(request, holder, message, ModernHold(admission.hold), hold_seconds)
    if admission.answer is not None:
        return handlers.json_message(result_response(message.id, complete(admission.answer, "tools/call")))
    response, answer = await _serve(request, grant, upstream, message, body)
    if admission.on_result is not None:
        await admission.on_result(answer or error_response(message.id, UPSTREAM_UNAVAILABLE, "no answer"))
    return response


class ModernHold:
    """A hold whose answers are 2026-07-28 results (`resultType`): the hold path is shared with
    sessions of the initialize era, whose clients do not know the field."""

    def __init__(self, hold: Hold) -> None:
        self._hold = hold
        self.approval_id = hold.approval_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hold, name)  # anything else a hold offers, as it is

    async def wait(self, timeout: float) -> JsonObject | None:
        outcome = await self._hold.wait(timeout)
        return _as_modern(outcome, "tools/call") if outcome is not None else None

    def status(self, now: float) -> str:
        return self._hold.status(now)

    def pending_result(self, now: float) -> JsonObject:
        return complete(self._hold.pending_result(now), "tools/call")

    def delivered(self) -> None:
        self._hold.delivered()

    async def cancel(self, reason: str) -> None:
        await self._hold.cancel(reason)

    def close(self) -> None:
        self._hold.close()


async def _forward(
    request: web.Request,
    grant: Principal,
    upstream: str,
    message: Message,
    body: JsonObject,
    transform: handlers.Transform | None,
) -> web.StreamResponse:
    response, _ = await _serve(request, grant, upstream, message, body, transform)
    return response


async def _serve(
    request: web.Request,
    grant: Principal,
    upstream: str,
    message: Message,
    body: JsonObject,
    transform: handlers.Transform | None = None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    assert message.id is not None
    pooled = await _acquire(request, grant, upstream)
    if isinstance(pooled, str):
        return _unavailable(message.id, pooled), error_response(message.id, UPSTREAM_UNAVAILABLE, pooled)
    exchange = pooled.session.forward_request(message, upstream_body(body))
    return await _relay(request, pooled.session, exchange, message.method or "", transform)


def upstream_body(body: JsonObject) -> JsonObject:
    """The request as the upstream gets it: without the client's envelope in `_meta`."""
    params = body.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("_meta"), dict):
        return body
    meta = {k: v for k, v in params["_meta"].items() if k not in ENVELOPE_KEYS}
    rest = {k: v for k, v in params.items() if k != "_meta"}
    return {**body, "params": {**rest, "_meta": meta} if meta else rest}


def complete(result: JsonObject, method: str) -> JsonObject:
    """An initialize-era result as 2026-07-28 has it: `resultType` always, caching hints where due."""
    extra: JsonObject = {"resultType": "complete"}
    if method in CACHEABLE:
        extra.update(ttlMs=0, cacheScope="private")
    return {**extra, **result}


def _as_modern(answer: JsonObject, method: str) -> JsonObject:
    result = answer.get("result")
    return {**answer, "result": complete(result, method)} if isinstance(result, dict) else answer


async def _relay(
    request: web.Request,
    session: Session,
    exchange: Exchange,
    method: str,
    transform: Callable[[JsonObject], JsonObject] | None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    """The upstream's answer as JSON, or as the last event of an SSE stream once progress came first.

    Only progress for this request is relayed: logging needs the client's opt-in, and list changes
    belong to `subscriptions/listen`. Requests from the upstream are answered here (`_refuse`).
    """
    accepts_sse = "text/event-stream" in request.headers.get("Accept", "text/event-stream")
    stream: web.StreamResponse | None = None
    try:
        while True:
            message = await exchange.outbox.get()
            if message is None:
                problem = "the upstream ended the request without an answer"
                message = error_response(exchange.client_id, UPSTREAM_UNAVAILABLE, problem)
            elif "method" in message:
                if "id" in message:
                    _refuse(session, message)
                    continue
                if message["method"] != "notifications/progress" or not accepts_sse:
                    continue
                if stream is None:
                    stream = web.StreamResponse(headers=SSE_HEADERS)
                    await stream.prepare(request)
                await stream.write(encode_event(encode(message)))
                continue
            answer = _as_modern(transform(message) if transform is not None else message, method)
            if stream is None:
                return _answer_json(answer), answer
            await stream.write(encode_event(encode(answer)))
            await stream.write_eof()
            return stream, answer
    except (ConnectionResetError, asyncio.CancelledError):
        # Closing the response stream is how a 2026-07-28 client cancels: the upstream is told.
        session.cancel(exchange, "the client closed the request's stream")
        raise
    finally:
        session.release(exchange)


def _answer_json(answer: JsonObject) -> web.Response:
    # 200 even for an upstream's error: the statuses of HTTP_STATUS are for requests the gateway
    # itself refused (an upstream's -32601 does not mean this endpoint is not there).
    return web.Response(body=encode(answer), content_type="application/json")


def _refuse(session: Session, request: JsonObject) -> None:
    """Answer a request the upstream sent during a stateless request: it cannot reach the client."""
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
