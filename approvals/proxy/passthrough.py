"""2026-07-28 clients in front of 2026-07-28 upstreams: each request passed through as it is.

When the upstream speaks 2026-07-28 itself, the gateway does not keep a session with it: the
client's request goes up as the same 2026 request (its `_meta` envelope, its id, the protocol's
routing headers; the upstream's own credentials from its settings, never the client's), and the
upstream's answer, JSON or SSE, streams back. Nothing is lost in translation: input-required
results, caching hints, logging the client opted into, `subscriptions/listen` streams.

What the gateway still does on the way: `tools/call` is judged by the gate first (stateless.py),
`tools/list` is filtered by the policy, an InputRequiredResult's `requestState` is wrapped in the
gateway's own (request_state.py), and `subscriptions/listen` streams are bounded per grant.
"""

from __future__ import annotations

import asyncio
import collections.abc
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

from approvals.jsonrpc import (
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    RequestId,
    encode,
    error_response,
)
from approvals.proxy.keys import GATEWAY
from approvals.proxy.modern_upstream import mirrored_headers, post
from approvals.proxy.sse import SSE_HEADERS, encode_comment, encode_event

log = logging.getLogger(__name__)

Transform = Callable[[JsonObject], JsonObject]

LISTEN = "subscriptions/listen"
TOO_MANY_LISTENS = 429
HEADER_MISMATCH = -32020


async def relay(
    request: web.Request,
    upstream: str,
    request_id: RequestId,
    body: JsonObject,
    transform: Transform | None = None,
    keepalive: float | None = None,
    arguments: JsonObject | None = None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    """Send `body` to the 2026-07-28 upstream; answer the client with what comes back.

    Returns the response and the final answer (None when there was none), so that the gate can be
    told how a forwarded call ended. The answer keeps the upstream's HTTP status when it is JSON
    (an upstream's 404 for an unknown method stays a 404). `arguments` are a judged call's:
    its `Mcp-Param-*` headers must mirror them (`mirrored_headers`).
    """
    gateway = request.app[GATEWAY]
    settings = gateway.settings.upstreams[upstream]
    limit = gateway.settings.server.max_body_bytes
    headers = mirrored_headers(request.headers, arguments)
    if isinstance(headers, str):
        refused = error_response(request_id, HEADER_MISMATCH, headers)
        return web.Response(status=400, body=encode(refused), content_type="application/json"), refused
    stream: web.StreamResponse | None = None
    try:
        async with post(gateway.http, settings, body, headers, limit) as answer:
            if not answer.is_stream:
                async for message in answer.messages():
                    if "method" not in message:
                        final = transform(message) if transform is not None else message
                        response = web.Response(
                            status=answer.status, body=encode(final), content_type="application/json"
                        )
                        return response, final
                problem = f"the upstream answered HTTP {answer.status} without a JSON-RPC response"
                return _unavailable(request_id, problem)
            stream = web.StreamResponse(headers=SSE_HEADERS)
            await stream.prepare(request)
            final = await _copy_stream(stream, answer.messages(), request_id, transform, keepalive)
            await stream.write_eof()
            return stream, final
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        gateway.eras.forget(upstream)
        problem = f"upstream {upstream} unavailable: {exc or type(exc).__name__}"
        if stream is None:
            return _unavailable(request_id, problem)
        failed = error_response(request_id, UPSTREAM_UNAVAILABLE, problem)
        try:
            await stream.write(encode_event(encode(failed)))
            await stream.write_eof()
        except ConnectionResetError:
            pass
        return stream, failed


async def _copy_stream(
    stream: web.StreamResponse,
    messages: collections.abc.AsyncIterator[JsonObject],
    request_id: RequestId,
    transform: Transform | None,
    keepalive: float | None,
) -> JsonObject:
    """Copy the upstream's events to the client until the answer; a comment after `keepalive`
    seconds of quiet (a listen stream).

    A write to a client that has gone raises ConnectionResetError, which ends the block in `relay`
    and with it the upstream's stream: closing the client stream closes the upstream one.
    """
    iterator = aiter(messages)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), keepalive)
        except TimeoutError:
            await stream.write(encode_comment("keepalive"))
            continue
        except StopAsyncIteration:
            problem = "the upstream ended its stream without an answer"
            final = error_response(request_id, UPSTREAM_UNAVAILABLE, problem)
            await stream.write(encode_event(encode(final)))
            return final
        is_answer = "method" not in message and message.get("id") == request_id
        if is_answer and transform is not None:
            message = transform(message)
        await stream.write(encode_event(encode(message)))
        if is_answer:
            return message


def _unavailable(request_id: RequestId, problem: str) -> tuple[web.Response, JsonObject]:
    answer = error_response(request_id, UPSTREAM_UNAVAILABLE, problem)
    return web.Response(status=502, body=encode(answer), content_type="application/json"), answer


async def listen(
    request: web.Request, grant: str, upstream: str, request_id: RequestId, body: JsonObject
) -> web.StreamResponse:
    """`subscriptions/listen`, passed through while the grant has fewer than its bound open."""
    listens = request.app[GATEWAY].listens
    with listens.slot(grant) as admitted:
        if not admitted:
            refused = listens.refusal(request_id)
            return web.Response(
                status=TOO_MANY_LISTENS, body=encode(refused), content_type="application/json"
            )
        response, _ = await relay(request, upstream, request_id, body, keepalive=listens.keepalive_seconds)
        return response
