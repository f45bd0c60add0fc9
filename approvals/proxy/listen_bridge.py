"""`subscriptions/listen` for 2026-07-28 clients in front of an initialize-era upstream.

The upstream has no listen method: in its era, list changes arrive on a session's stream. The
grant's pooled session (`pool.py`) is that session, so a listen stream is served from it: the
acknowledgement first (the filter the gateway can keep: list changes the upstream announces),
then each matching notification tagged with the subscription id (the listen request's id), until
the client leaves or the upstream session ends (then the listen result closes the stream).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from approvals.config import Principal
from approvals.jsonrpc import (
    INVALID_PARAMS,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    Message,
    encode,
    error_response,
    result_response,
)
from approvals.proxy.keys import GATEWAY
from approvals.proxy.modern_upstream import with_envelope
from approvals.proxy.sse import SSE_HEADERS, encode_comment, encode_event
from approvals.proxy.subscriptions import honored, wanted

SUBSCRIPTION_ID_KEY = "io.modelcontextprotocol/subscriptionId"
ACKNOWLEDGED = "notifications/subscriptions/acknowledged"
TOO_MANY_LISTENS = 429


def _json(status: int, message: JsonObject) -> web.Response:
    return web.Response(status=status, body=encode(message), content_type="application/json")


async def listen(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """One listen stream on the grant's pooled session with the upstream."""
    assert message.id is not None
    requested = message.params.get("notifications")
    if not isinstance(requested, dict):
        problem = "subscriptions/listen needs params.notifications, an object of the notifications wanted"
        return _json(400, error_response(message.id, INVALID_PARAMS, problem))
    gateway = request.app[GATEWAY]
    with gateway.listens.slot(grant.name) as admitted:
        if not admitted:
            return _json(TOO_MANY_LISTENS, gateway.listens.refusal(message.id))
        try:
            pooled = await gateway.pool.acquire(grant.name, upstream)
        except OSError as exc:
            problem = f"upstream {upstream} unavailable: {exc}"
            return _json(502, error_response(message.id, UPSTREAM_UNAVAILABLE, problem))
        kept = honored(requested, pooled.server)
        methods = wanted(kept)
        meta = {SUBSCRIPTION_ID_KEY: message.id}
        fanout, listener = gateway.fanouts.join(pooled.session)
        try:
            stream = web.StreamResponse(headers=SSE_HEADERS)
            await stream.prepare(request)
            ack = {"jsonrpc": "2.0", "method": ACKNOWLEDGED, "params": {"notifications": kept, "_meta": meta}}
            await stream.write(encode_event(encode(ack)))
            while True:
                try:
                    notification = await asyncio.wait_for(listener.get(), gateway.listens.keepalive_seconds)
                except TimeoutError:
                    await stream.write(encode_comment("keepalive"))  # raises once the client has gone
                    continue
                if notification is None:  # the upstream session ended: the stream ends gracefully
                    ended = result_response(message.id, {"resultType": "complete", "_meta": meta})
                    await stream.write(encode_event(encode(ended)))
                    await stream.write_eof()
                    return stream
                if notification.get("method") in methods:
                    await stream.write(encode_event(encode(with_envelope(notification, meta))))
        finally:
            gateway.fanouts.leave(fanout, listener)
