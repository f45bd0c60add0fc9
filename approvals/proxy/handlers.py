"""MCP Streamable HTTP on aiohttp: `POST|GET|DELETE /mcp/{upstream}`.

This is the one place where gateway errors become HTTP statuses and JSON-RPC errors. A request is
answered with plain JSON when its answer is the first thing the upstream sends back, and switches
to an SSE stream as soon as anything else (progress, logging, a sampling request) comes first.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable

from aiohttp import web

from approvals.auth import bearer_token
from approvals.config import Principal
from approvals.core.model import ToolCall
from approvals.errors import ApprovalsError, ProtocolError
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
    encode,
    error_response,
    parse_payload,
    result_response,
)
from approvals.outcomes import with_meta
from approvals.proxy import batch, stateless, tasks
from approvals.proxy.gate import Gate
from approvals.proxy.gateway import Gateway
from approvals.proxy.hold import stream_hold, stream_resumed
from approvals.proxy.keys import GATE, GATEWAY, GRANTS
from approvals.proxy.session import Exchange, Session, bad_progress_token
from approvals.proxy.sse import SSE_HEADERS, encode_comment, encode_event

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
Transform = Callable[[JsonObject], JsonObject]


def rpc_error(
    status: int, code: int, message: str, request_id: object = None, **headers: str
) -> web.Response:
    """A JSON-RPC error as an HTTP response."""
    body = error_response(request_id if isinstance(request_id, str | int) else None, code, message)
    return web.Response(status=status, body=encode(body), content_type="application/json", headers=headers)


def json_message(message: JsonObject, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encode(message), content_type="application/json", headers=headers)


def _authenticate(request: web.Request) -> Principal | web.Response:
    grant = request.app[GRANTS].find(bearer_token(request.headers.get("Authorization")))
    if grant is None:
        challenge = 'Bearer realm="approvals", error="invalid_token"'
        return rpc_error(
            401,
            INVALID_REQUEST,
            "a valid grant token is required: Authorization: Bearer <token>",
            **{"WWW-Authenticate": challenge},
        )
    return grant


def _session_for(request: web.Request, grant: Principal, upstream: str) -> Session | web.Response:
    session_id = request.headers.get("Mcp-Session-Id")
    if not session_id:
        return rpc_error(400, INVALID_REQUEST, "the Mcp-Session-Id header is required after initialize")
    session = request.app[GATEWAY].find(session_id, grant.name, upstream)
    if session is None:
        # The same answer for a session that never existed and one of another grant: nothing leaks.
        return rpc_error(404, INVALID_REQUEST, "unknown or expired session; initialize a new one")
    version = request.headers.get("MCP-Protocol-Version")
    if version is not None and version not in HANDSHAKE_VERSIONS:
        return rpc_error(
            400,
            INVALID_REQUEST,
            f"unsupported MCP-Protocol-Version {version!r}; supported: {', '.join(HANDSHAKE_VERSIONS)}",
        )
    return session


# The codings a POST body may come in, as zlib window bits (None: as it is). The server does not
# inflate bodies itself (`auto_decompress=False` in the app): it would inflate a body in full, even
# one it then refuses, and a 1 MiB gzip body can inflate to 1 GiB.
CODINGS: dict[str, int | None] = {
    "identity": None,
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def _decoder(request: web.Request) -> tuple[str, zlib._Decompress | None]:
    coding = ",".join(request.headers.getall("Content-Encoding", [])).strip().lower() or "identity"
    if coding not in CODINGS:
        supported = ", ".join(CODINGS)
        raise ProtocolError(
            INVALID_REQUEST,
            status=415,
            message=f"unsupported Content-Encoding {coding!r}; use one of {supported}",
        )
    wbits = CODINGS[coding]
    return coding, (zlib.decompressobj(wbits) if wbits is not None else None)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, decoded as its Content-Encoding says; never more than `limit` bytes read or inflated."""
    too_large = ProtocolError(
        INVALID_REQUEST, status=413, message=f"the request body is larger than {limit} bytes"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    coding, decoder = _decoder(request)
    body = bytearray()
    received = 0
    try:
        while chunk := await request.content.readany():
            received += len(chunk)
            if received > limit:
                raise too_large
            # At most one byte past the limit is inflated: enough to know the body is too large.
            body += decoder.decompress(chunk, limit + 1 - len(body)) if decoder is not None else chunk
            if len(body) > limit:
                raise too_large
    except zlib.error as exc:
        raise ProtocolError(
            PARSE_ERROR, status=400, message=f"the body is not valid {coding} data: {exc}"
        ) from None
    if decoder is not None and not (decoder.eof and not decoder.unused_data):
        problem = "ends before its end" if not decoder.eof else "has data after its end"
        raise ProtocolError(PARSE_ERROR, status=400, message=f"the {coding} body {problem}")
    return bytes(body)


async def _read(request: web.Request) -> Message | list[object] | web.Response:
    try:
        server = request.app[GATEWAY].settings.server
        # A body sent slowly holds its connection: it must arrive within the read timeout.
        async with asyncio.timeout(server.read_timeout_seconds):
            body = await read_body(request, server.max_body_bytes)
        return parse_payload(body)  # a batch comes back as a list
    except ProtocolError as exc:  # an EnvelopeError among them, with the request's id if it had one
        return rpc_error(exc.status, exc.code, exc.message, exc.request_id)
    except TimeoutError:
        return rpc_error(408, INVALID_REQUEST, "the request body did not arrive within the read timeout")


async def handle_post(request: web.Request) -> web.StreamResponse:
    """One client message: a request (answered as JSON or SSE), or a notification / response (202)."""
    gateway = request.app[GATEWAY]
    upstream = request.match_info["upstream"]
    grant = _authenticate(request)
    if isinstance(grant, web.Response):
        return grant
    if upstream not in gateway.settings.upstreams:
        return rpc_error(404, METHOD_NOT_FOUND, f"no upstream named {upstream!r} on this gateway")
    message = await _read(request)
    if isinstance(message, web.Response):
        return message
    if isinstance(message, list):
        return await batch.handle_batch(request, grant, upstream, message)
    try:
        # First: a 2026-07-28 `initialize` is a removed method there (404), not a handshake.
        if stateless.is_stateless(request.headers, message):  # MCP 2026-07-28: no session
            return await stateless.handle(request, grant, upstream, message)
        if message.method == "initialize":
            return await _initialize(request, gateway, grant, upstream, message)
        return await _session_message(request, gateway, grant, upstream, message)
    except ConnectionResetError:
        # The client left before its answer: nothing to tell it, and not the gateway's error
        # (aiohttp would log the exception with its traceback). Counters stay as they are: a
        # forwarded call may have run.
        log.debug("client left before the answer to %r", message.id)
        return web.Response(status=499)


async def _session_message(
    request: web.Request, gateway: Gateway, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    session = _session_for(request, grant, upstream)
    if isinstance(session, web.Response):
        return session
    if message.kind == "notification" and message.method == "tools/call":
        # A call sent without an id would reach the upstream unjudged; it is refused, not forwarded.
        return rpc_error(400, INVALID_REQUEST, "tools/call must be a request, with an id")
    if message.kind != "request":
        session.forward(message)
        return web.Response(status=202)
    return await _request(request, gateway, session, message)


async def _initialize(
    request: web.Request, gateway: Gateway, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    if message.kind != "request" or "Mcp-Session-Id" in request.headers:
        return rpc_error(400, INVALID_REQUEST, "initialize must be a request sent without an Mcp-Session-Id")
    try:
        session = await gateway.open_session(grant.name, upstream)
    except ConnectionError as exc:
        return rpc_error(502, UPSTREAM_UNAVAILABLE, f"upstream {upstream} unavailable: {exc}", message.id)
    except ProtocolError as exc:  # a session limit: 429
        return rpc_error(exc.status, exc.code, exc.message, message.id)
    exchange = session.forward_request(message)
    response, answer = await _relay(
        request, session, exchange, headers={"Mcp-Session-Id": session.id}, transform=tasks.advertise
    )
    result = answer.get("result") if answer else None
    if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
        session.protocol_version = result["protocolVersion"]
    else:
        await gateway.end_session(session, "initialize failed")
    return response


async def _request(
    request: web.Request, gateway: Gateway, session: Session, message: Message
) -> web.StreamResponse:
    if (bad_token := bad_progress_token(message.params)) is not None:
        return rpc_error(200, INVALID_PARAMS, bad_token, message.id)  # before the gate judges it
    if message.method == "tools/call":
        return await _tool_call(request, gateway, session, message)
    transform = (
        tasks.mark_tools(
            request.app[GATE], session.upstream_name, _tool_filter(request.app[GATE], session.upstream_name)
        )
        if message.method == "tools/list"
        else None
    )
    if message.method in tasks.METHODS:
        # The gateway's tasks (held calls of this grant) are answered here; others are the upstream's.
        if (answered := await tasks.handle(request, session, message)) is not None:
            return answered
        transform = tasks.not_ours(message)
    exchange = session.forward_request(message)
    response, _ = await _relay(request, session, exchange, transform=transform)
    return response


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "not an object"


def _judged(message: Message) -> tuple[str, JsonObject, JsonObject] | str:
    """The tool name and arguments the gate judges, and the body to forward; or what is wrong.

    Upstreams (the MCP SDKs among them) run a call with missing or null `arguments` as `{}`, so it
    is judged as `{}` and forwarded as `{}`: what runs is what the policy saw. Any other
    non-object could be coerced by a lenient upstream in ways the policy never saw: refused.
    """
    params = message.params
    name, given = params.get("name"), params.get("arguments")
    if not isinstance(name, str):
        return f'tools/call needs "name", a string (got {_json_type(name) if "name" in params else "none"})'
    if isinstance(given, dict):
        return name, given, message.body
    if given is not None:
        return f'the "arguments" of tools/call must be an object (got {_json_type(given)})'
    return name, {}, {**message.body, "params": {**params, "arguments": {}}}


async def _tool_call(
    request: web.Request, gateway: Gateway, session: Session, message: Message
) -> web.StreamResponse:
    """Every call is judged by the gate before anything reaches the upstream."""
    judged = _judged(message)
    if isinstance(judged, str):
        return rpc_error(200, INVALID_PARAMS, judged, message.id)
    if (bad_task := tasks.task_problem(message.params)) is not None:
        return rpc_error(200, INVALID_PARAMS, bad_task, message.id)
    name, arguments, body = judged
    call = ToolCall(session.upstream_name, session.grant, session.id, name, arguments)
    try:
        admission = await request.app[GATE].admit(call)
    except ApprovalsError as exc:  # a StoreError among them
        # Fail closed: a call that could not be checked is not forwarded.
        log.exception("could not admit %s on %s", name, session.upstream_name)
        return rpc_error(500, INTERNAL_ERROR, f"the gateway could not check this call: {exc}", message.id)
    if admission.hold is not None and tasks.wants_task(message.params):
        return await tasks.create(request, session, message, admission.hold)  # answered at once
    if admission.hold is not None:
        hold_seconds = gateway.settings.approvals.hold_seconds
        return await stream_hold(request, session, message, admission.hold, hold_seconds)
    if admission.answer is not None:
        assert message.id is not None
        return json_message(result_response(message.id, admission.answer))
    exchange = session.forward_request(message, body)
    meta = admission.meta
    marked = None if meta is None else (lambda answer: with_meta(answer, meta))
    response, answer = await _relay(request, session, exchange, transform=marked)
    if admission.on_result is not None:
        await admission.on_result(answer or error_response(message.id, UPSTREAM_UNAVAILABLE, "no answer"))
    return response


def _tool_filter(gate: Gate, upstream: str) -> Transform:
    def keep_visible(answer: JsonObject) -> JsonObject:
        result = answer.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return answer
        tools = result["tools"]
        visible = gate.visible_tools(upstream, tools)
        if len(visible) == len(tools):
            return answer
        return {**answer, "result": {**result, "tools": visible}}

    return keep_visible


async def _relay(
    request: web.Request,
    session: Session,
    exchange: Exchange,
    *,
    headers: dict[str, str] | None = None,
    transform: Transform | None = None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    """Answer the client with the exchange's messages: JSON if the answer comes first, else SSE."""
    accepts_sse = "text/event-stream" in request.headers.get("Accept", "text/event-stream")
    stream: web.StreamResponse | None = None
    try:
        while True:
            message = await exchange.outbox.get()
            if message is None:  # cancelled by the client or the session ended without an answer
                return (stream or web.Response(status=202, headers=headers)), None
            is_answer = "method" not in message
            if is_answer and transform is not None:
                message = transform(message)
            if stream is None and is_answer:
                return json_message(message, headers), message
            if stream is None and not accepts_sse:
                session.divert(message)  # this client takes JSON only: the GET stream carries the rest
                continue
            if stream is None:
                stream = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})
                await stream.prepare(request)
            await stream.write(encode_event(encode(message)))
            if is_answer:
                await stream.write_eof()
                return stream, message
    except (ConnectionResetError, asyncio.CancelledError):
        log.debug("client left before the answer to %r", exchange.client_id)
        raise
    finally:
        session.release(exchange)


async def handle_get(request: web.Request) -> web.StreamResponse:
    """The client's standalone SSE stream: server messages that belong to no request."""
    grant = _authenticate(request)
    if isinstance(grant, web.Response):
        return grant
    if (refused := stateless.no_stream(request.headers)) is not None:
        return refused
    upstream = request.match_info["upstream"]
    if "text/event-stream" not in request.headers.get("Accept", ""):
        return rpc_error(406, INVALID_REQUEST, "GET needs Accept: text/event-stream")
    session = _session_for(request, grant, upstream)
    if isinstance(session, web.Response):
        return session
    if (last_event_id := request.headers.get("Last-Event-ID")) is not None:
        return await stream_resumed(request, session, last_event_id)
    transport = request.transport
    outbox = session.open_stream(transport.abort if transport is not None else None)
    stream = web.StreamResponse(headers=SSE_HEADERS)
    await stream.prepare(request)
    try:
        while True:
            try:
                message = await asyncio.wait_for(outbox.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await stream.write(encode_comment("keepalive"))
                continue
            if message is None:
                break
            await stream.write(encode_event(encode(message)))
    except ConnectionResetError:
        pass
    finally:
        session.close_stream(outbox)
    return stream


async def handle_delete(request: web.Request) -> web.StreamResponse:
    """End a session, and its upstream session with it."""
    grant = _authenticate(request)
    if isinstance(grant, web.Response):
        return grant
    if (refused := stateless.no_stream(request.headers)) is not None:
        return refused
    session = _session_for(request, grant, request.match_info["upstream"])
    if isinstance(session, web.Response):
        return session
    await request.app[GATEWAY].end_session(session)
    return web.Response(status=200)


def add_routes(app: web.Application) -> None:
    app.router.add_route("POST", "/mcp/{upstream}", handle_post)
    app.router.add_route("GET", "/mcp/{upstream}", handle_get)
    app.router.add_route("DELETE", "/mcp/{upstream}", handle_delete)
