"""2026-07-28 clients served over the grant's pooled initialize-era upstream session (`pool.py`).

When the upstream speaks only the initialize era, the gateway keeps a session with it per
(grant, upstream) and serves each stateless request over it: `server/discover` from the session's
InitializeResult, other requests forwarded under the session's own ids, their answers given
2026-07-28's `resultType` and caching hints. Requests from the upstream to the client during such
a request cannot reach it (`session.refuse_upstream_request`); see stateless.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

from aiohttp import web

from approvals.config import Principal
from approvals.jsonrpc import (
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    Message,
    RequestId,
    encode,
    error_response,
    result_response,
)
from approvals.proxy import handlers, tasks_modern
from approvals.proxy.keys import GATEWAY
from approvals.proxy.modern_results import as_modern
from approvals.proxy.modern_upstream import (
    CLIENT_CAPABILITIES_KEY,
    CLIENT_INFO_KEY,
    LOG_LEVEL_KEY,
    MODERN_VERSIONS,
    PROTOCOL_VERSION_KEY,
    SERVER_INFO_KEY,
)
from approvals.proxy.pool import Pooled
from approvals.proxy.session import Exchange, Session, refuse_upstream_request
from approvals.proxy.sse import SSE_HEADERS, encode_event

# Request `_meta` keys that are the client's envelope to the gateway, not for the upstream.
ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_KEY, CLIENT_INFO_KEY, CLIENT_CAPABILITIES_KEY, LOG_LEVEL_KEY})
# Capability fields that depend on what is not bridged to an initialize-era upstream: resource
# subscriptions (list changes are, by listen_bridge.py).
UNBRIDGED_CAPABILITY_FIELDS = frozenset({"subscribe"})
BRIDGED_CAPABILITIES = ("tools", "prompts", "resources", "completions")


async def acquire(request: web.Request, grant: Principal, upstream: str) -> Pooled | str:
    try:
        return await request.app[GATEWAY].pool.acquire(grant.name, upstream)
    except OSError as exc:  # a ConnectionError, or a command that cannot start
        return f"upstream {upstream} unavailable: {exc}"


def unavailable(request_id: RequestId, problem: str) -> web.Response:
    body = encode(error_response(request_id, UPSTREAM_UNAVAILABLE, problem))
    return web.Response(status=502, body=body, content_type="application/json")


async def discover(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    assert message.id is not None
    pooled = await acquire(request, grant, upstream)
    if isinstance(pooled, str):
        return unavailable(message.id, pooled)
    return handlers.json_message(result_response(message.id, discover_result(pooled.server)))


def discover_result(server: JsonObject) -> JsonObject:
    """The gateway's `server/discover` result from the upstream's `initialize` result.

    Only capabilities the gateway bridges are advertised: list changes (served on listen streams
    from the pooled session) but not resource subscriptions. `cacheScope` is private: what a
    client sees (its tool list) depends on its grant.
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


async def forward(
    request: web.Request,
    grant: Principal,
    upstream: str,
    message: Message,
    body: JsonObject,
    transform: handlers.Transform | None,
) -> web.StreamResponse:
    response, _ = await serve(request, grant, upstream, message, body, transform)
    return response


async def serve(
    request: web.Request,
    grant: Principal,
    upstream: str,
    message: Message,
    body: JsonObject,
    transform: handlers.Transform | None = None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    assert message.id is not None
    pooled = await acquire(request, grant, upstream)
    if isinstance(pooled, str):
        return unavailable(message.id, pooled), error_response(message.id, UPSTREAM_UNAVAILABLE, pooled)
    sent, client_token = own_progress_token(upstream_body(body))
    exchange = pooled.session.forward_request(message, sent)
    return await relay(request, pooled.session, exchange, message.method or "", transform, client_token)


def own_progress_token(body: JsonObject) -> tuple[JsonObject, str | int | None]:
    """`body` with a progress token of the gateway's own, and the client's token it replaces.

    A pooled upstream session carries the requests of every stateless client of a grant, and their
    progress tokens are theirs to choose: two concurrent requests with the same token would get each
    other's progress. Each request goes up with a token unique in the session; its progress comes
    back with the client's.
    """
    params = body.get("params")
    if not isinstance(params, dict) or not isinstance(meta := params.get("_meta"), dict):
        return body, None
    token = meta.get("progressToken")
    if not isinstance(token, str | int) or isinstance(token, bool):
        return body, None  # none asked for (a malformed one was refused before this)
    own = f"approvals-{secrets.token_urlsafe(12)}"
    return {**body, "params": {**params, "_meta": {**meta, "progressToken": own}}}, token


def upstream_body(body: JsonObject) -> JsonObject:
    """The request as the initialize-era upstream gets it: without the client's envelope in
    `_meta`, and without a legacy `params.task`, which 2026-07-28 says is tolerated and never acted
    on (tasks are the extension's; an initialize-era upstream would act on it, or refuse it)."""
    params = body.get("params")
    if not isinstance(params, dict):
        return body
    rest = {k: v for k, v in params.items() if k not in ("_meta", "task")}
    meta = params.get("_meta")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
        if kept:
            rest["_meta"] = kept
    elif "_meta" in params:
        rest["_meta"] = meta
    return {**body, "params": rest}


async def relay(
    request: web.Request,
    session: Session,
    exchange: Exchange,
    method: str,
    transform: Callable[[JsonObject], JsonObject] | None,
    client_token: str | int | None = None,
) -> tuple[web.StreamResponse, JsonObject | None]:
    """The upstream's answer as JSON, or as the last event of an SSE stream once progress came first.
    Progress goes out with `client_token`, the token the client chose (`own_progress_token`).

    Only progress for this request is relayed: logging needs the client's opt-in, and list changes
    belong to `subscriptions/listen`. Requests from the upstream are answered here
    (`refuse_upstream_request`).
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
                    refuse_upstream_request(session, message)
                    continue
                if message["method"] != "notifications/progress" or not accepts_sse:
                    continue
                if stream is None:
                    stream = web.StreamResponse(headers=SSE_HEADERS)
                    await stream.prepare(request)
                progress = message.get("params")
                if client_token is not None and isinstance(progress, dict):
                    message = {**message, "params": {**progress, "progressToken": client_token}}
                await stream.write(encode_event(encode(message)))
                continue
            answer = as_modern(transform(message) if transform is not None else message, method)
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
