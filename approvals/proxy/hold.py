"""Holding a `tools/call` open while a reviewer decides.

Clients give up on a request after a while (the TypeScript SDK after 60 s, unless progress resets
its timer), so a held call is answered on an SSE stream that carries a sign of life every few
seconds: `notifications/progress` when the client sent a progress token, an SSE comment
otherwise. After `hold_seconds` without a decision the call is answered with a result saying the
approval is pending and how to get the outcome; the approval itself stays pending.

At most `[approvals] max_holds_per_approval` calls are held open for one approval at once; a
repeat call beyond that is answered at once with the same pending result, rather than holding
one more connection for an answer the others will get.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from approvals.core.model import Hold
from approvals.jsonrpc import JsonObject, Message, encode, result_response
from approvals.proxy.keys import GATEWAY
from approvals.proxy.session import Session, bad_progress_token
from approvals.proxy.sse import SSE_HEADERS, encode_comment, encode_event

log = logging.getLogger(__name__)

SIGN_OF_LIFE_SECONDS = 5.0


async def stream_hold(
    request: web.Request,
    session: Session,
    message: Message,
    hold: Hold,
    hold_seconds: float,
    clock: Callable[[], float] = time.time,
) -> web.StreamResponse:
    """Answer a held call: signs of life until its outcome, or the pending result at the deadline."""
    assert message.id is not None
    holds = request.app[GATEWAY].holds
    try:
        if holds[hold.approval_id] >= request.app[GATEWAY].settings.approvals.max_holds_per_approval:
            body = encode(result_response(message.id, hold.pending_result(clock())))
            return web.Response(body=body, content_type="application/json")
        holds[hold.approval_id] += 1
        try:
            return await _hold_open(request, session, message, hold, hold_seconds, clock)
        finally:
            holds[hold.approval_id] -= 1
            if not holds[hold.approval_id]:
                del holds[hold.approval_id]
    finally:
        hold.close()


async def _hold_open(
    request: web.Request,
    session: Session,
    message: Message,
    hold: Hold,
    hold_seconds: float,
    clock: Callable[[], float],
) -> web.StreamResponse:
    assert message.id is not None
    meta = message.params.get("_meta")
    valid = bad_progress_token(message.params) is None  # the handler refuses others first
    token = meta.get("progressToken") if valid and isinstance(meta, dict) else None
    session.held[message.id] = hold
    stream = web.StreamResponse(headers=SSE_HEADERS)
    await stream.prepare(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + hold_seconds
    step = 0
    # One wait for the outcome and one for shutdown, for the whole hold: a sign of life is then
    # just a timeout of `asyncio.wait`, not new tasks (ten thousand held calls wake 2,000 times a
    # second).
    outcome: asyncio.Future[JsonObject | None] | None = None
    drained = asyncio.ensure_future(session.draining.wait())
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or session.draining.is_set():
                await stream.write(
                    encode_event(encode(result_response(message.id, hold.pending_result(clock()))))
                )
                break
            if outcome is None or (outcome.done() and outcome.result() is None):
                outcome = asyncio.ensure_future(hold.wait(remaining))
            # FIRST_COMPLETED: the outcome must reach the agent the moment it is known, not at the
            # next sign of life (the default, ALL_COMPLETED, waited out the whole timeout).
            await asyncio.wait(
                (outcome, drained),
                timeout=min(SIGN_OF_LIFE_SECONDS, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if message.id in session.cancelled:
                break  # the client cancelled: the spec says a cancelled request gets no answer
            result = outcome.result() if outcome.done() else None
            if result is not None:
                await stream.write(encode_event(encode({"jsonrpc": "2.0", "id": message.id, **result})))
                hold.delivered()
                break
            if drained.done() or loop.time() >= deadline:
                continue  # answered with the pending result at the top of the loop
            if token is not None:
                step += 1
                progress = {"progressToken": token, "progress": step, "message": hold.status(clock())}
                notification = {"jsonrpc": "2.0", "method": "notifications/progress", "params": progress}
                await stream.write(encode_event(encode(notification)))
            else:
                await stream.write(encode_comment(hold.status(clock())))
        await stream.write_eof()
    except ConnectionResetError:
        log.info("client left while approval %s was held; it stays open for a repeat call", hold.approval_id)
    finally:
        drained.cancel()
        if outcome is not None and not outcome.done():
            outcome.cancel()
        session.held.pop(message.id, None)
        session.cancelled.discard(message.id)
    return stream
