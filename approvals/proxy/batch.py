"""JSON-RPC batches, for 2025-03-26 sessions only.

MCP 2025-03-26 requires servers to accept a POST whose body is an array of messages; 2025-06-18
removed batching, and sessions of any other revision get -32600 for one. Each element is checked
and judged exactly as if it came alone: every `tools/call` goes through the gate. The answer is an
array of the requests' responses, in the batch's order (202 when it had no request).

A held call in a batch is answered at once with the pending result (the one a hold that runs out
gives), not held: holding one call would hold the whole batch's answer, and the agent repeats
the call to get the decision, as it would after any hold. A batch has at most `MAX_BATCH` elements.
Messages the upstream sends while answering (progress, server requests) go to the GET stream.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from approvals.config import Principal
from approvals.core.model import ToolCall
from approvals.errors import ApprovalsError
from approvals.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    UPSTREAM_UNAVAILABLE,
    EnvelopeError,
    JsonObject,
    Message,
    check_message,
    encode,
    error_response,
    result_response,
)
from approvals.outcomes import with_meta
from approvals.proxy import handlers
from approvals.proxy.keys import GATE
from approvals.proxy.session import Session, bad_progress_token

log = logging.getLogger(__name__)

BATCH_VERSION = "2025-03-26"
MAX_BATCH = 64


def _refused(status: int, message: str) -> web.Response:
    body = encode(error_response(None, INVALID_REQUEST, message))
    return web.Response(status=status, body=body, content_type="application/json")


async def handle_batch(
    request: web.Request, grant: Principal, upstream: str, items: list[object]
) -> web.StreamResponse:
    """A POST whose body is a JSON array."""
    if "Mcp-Session-Id" not in request.headers:
        return _refused(400, f"JSON-RPC batches are accepted only in {BATCH_VERSION} sessions")
    session = handlers._session_for(request, grant, upstream)
    if isinstance(session, web.Response):
        return session
    if session.protocol_version != BATCH_VERSION:
        return _refused(
            400,
            f"JSON-RPC batches are not part of MCP {session.protocol_version}; send one message per "
            f"POST (batches are accepted only in {BATCH_VERSION} sessions)",
        )
    if not items:
        return _refused(400, "an empty JSON-RPC batch: it must hold at least one message")
    if len(items) > MAX_BATCH:
        return _refused(400, f"a JSON-RPC batch of {len(items)} messages; at most {MAX_BATCH}")
    # Started in order, so the upstream gets the messages in the batch's order; answered in any.
    answers = await asyncio.gather(
        *(_element(request, session, index, item) for index, item in enumerate(items))
    )
    responses = [answer for answer in answers if answer is not None]
    if not responses:
        return web.Response(status=202)
    return web.Response(body=b"[" + b",".join(map(encode, responses)) + b"]", content_type="application/json")


async def _element(request: web.Request, session: Session, index: int, item: object) -> JsonObject | None:
    """One element's response, or None for a notification or response (and for a cancelled call)."""
    try:
        message = check_message(item)
    except EnvelopeError as exc:
        return error_response(exc.request_id, exc.code, f"batch element {index}: {exc.message}")
    if message.method == "initialize":
        return error_response(
            message.id, INVALID_REQUEST, f"batch element {index}: initialize cannot be batched"
        )
    if message.kind == "notification" and message.method == "tools/call":
        # A call without an id would reach the upstream unjudged, and a notification gets no answer.
        log.warning("session %s: dropped a tools/call notification in a batch", session.id[:8])
        return None
    if message.kind != "request":
        session.forward(message)
        return None
    assert message.id is not None
    if (problem := bad_progress_token(message.params)) is not None:
        return error_response(message.id, INVALID_PARAMS, problem)
    if message.method == "tools/call":
        return await _tool_call(request, session, message)
    transform = (
        handlers._tool_filter(request.app[GATE], session.upstream_name)
        if message.method == "tools/list"
        else None
    )
    answer = await _forwarded(session, message, message.body)
    return transform(answer) if answer is not None and transform is not None else answer


async def _tool_call(request: web.Request, session: Session, message: Message) -> JsonObject | None:
    """Judged exactly as a call sent alone; a hold is answered with the pending result now."""
    assert message.id is not None
    judged = handlers._judged(message)
    if isinstance(judged, str):
        return error_response(message.id, INVALID_PARAMS, judged)
    name, arguments, body = judged
    call = ToolCall(session.upstream_name, session.grant, session.id, name, arguments)
    try:
        admission = await request.app[GATE].admit(call)
    except ApprovalsError as exc:
        log.exception("could not admit %s on %s", name, session.upstream_name)
        return error_response(message.id, INTERNAL_ERROR, f"the gateway could not check this call: {exc}")
    if admission.hold is not None:
        try:
            return result_response(message.id, admission.hold.pending_result(time.time()))
        finally:
            admission.hold.close()
    if admission.answer is not None:
        return result_response(message.id, admission.answer)
    answer = await _forwarded(session, message, body)
    if answer is not None:
        answer = with_meta(answer, admission.meta)
    if admission.on_result is not None:
        await admission.on_result(answer or error_response(message.id, UPSTREAM_UNAVAILABLE, "no answer"))
    return answer


async def _forwarded(session: Session, message: Message, body: JsonObject) -> JsonObject | None:
    """The upstream's answer to one request; what else it sends on the way goes to the GET stream."""
    exchange = session.forward_request(message, body)
    try:
        while (item := await exchange.outbox.get()) is not None:
            if "method" not in item:
                return item
            session.divert(item)
        return None  # cancelled by the client, or the session ended
    finally:
        session.release(exchange)
