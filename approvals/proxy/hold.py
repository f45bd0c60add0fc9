"""Holding a `tools/call` open while a reviewer decides.

Clients give up on a request after a while (the TypeScript SDK after 60 s, unless progress resets
its timer), so a held call is answered on an SSE stream that carries a sign of life every few
seconds: `notifications/progress` when the client sent a progress token, an SSE comment
otherwise. After `hold_seconds` without a decision the call is answered with a result saying the
approval is pending and how to get the outcome; the approval itself stays pending.

At most `[approvals] max_holds_per_approval` calls are held open for one approval at once; a
repeat call beyond that is answered at once with the same pending result, rather than holding
one more connection for an answer the others will get.

A held call's stream is resumable (`resume`): its events carry ids, and a client whose connection
broke reconnects with `GET` + `Last-Event-ID` (`stream_resumed`) to get what it missed and the
call's answer, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from approvals.core.model import Hold
from approvals.jsonrpc import (
    INVALID_REQUEST,
    JsonObject,
    Message,
    RequestId,
    encode,
    error_response,
    result_response,
)
from approvals.metrics import METRICS, Metrics
from approvals.proxy.keys import GATEWAY
from approvals.proxy.resume import HeldStream, UnknownEvent
from approvals.proxy.session import Session, bad_progress_token
from approvals.proxy.sse import SSE_HEADERS, encode_comment

log = logging.getLogger(__name__)

SIGN_OF_LIFE_SECONDS = 5.0
PRIMING_VERSION = "2025-11-25"
# Held calls' producers, which outlive their handlers (a reference keeps each task alive).
_PRODUCERS: set[asyncio.Task[None]] = set()


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
    if holds[hold.approval_id] >= request.app[GATEWAY].settings.approvals.max_holds_per_approval:
        hold.close()
        body = encode(result_response(message.id, hold.pending_result(clock())))
        return web.Response(body=body, content_type="application/json")
    holds[hold.approval_id] += 1
    session.held[message.id] = hold
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
    except BaseException:
        _release(holds, session, message.id, hold)
        raise
    # Written through a resumable stream, by a task of its own: a client whose connection breaks
    # (which may cancel this handler) reconnects with Last-Event-ID and gets the rest, so the
    # hold goes on to its end even with nobody attached.
    stream = session.replays.open(hold.delivered, prime=_primes(session.protocol_version))
    metrics = request.app.get(METRICS)
    task = asyncio.create_task(
        _produce(session, message, hold, hold_seconds, clock, stream, response, metrics)
    )
    _PRODUCERS.add(task)
    task.add_done_callback(_PRODUCERS.discard)
    task.add_done_callback(lambda _: _release(holds, session, message.id, hold))
    await asyncio.shield(task)
    return response


def _release(holds: Counter[str], session: Session, request_id: RequestId | None, hold: Hold) -> None:
    holds[hold.approval_id] -= 1
    if not holds[hold.approval_id]:
        del holds[hold.approval_id]
    hold.close()
    if request_id is not None:
        session.held.pop(request_id, None)
        session.cancelled.discard(request_id)


async def _produce(
    session: Session,
    message: Message,
    hold: Hold,
    hold_seconds: float,
    clock: Callable[[], float],
    stream: HeldStream,
    response: web.StreamResponse,
    metrics: Metrics | None,
) -> None:
    meta = message.params.get("_meta")
    valid = bad_progress_token(message.params) is None  # the handler refuses others first
    token = meta.get("progressToken") if valid and isinstance(meta, dict) else None
    answer: tuple[bytes, bool] | None = None
    try:
        await stream.start(response)
        answer = await _follow(session, message, hold, hold_seconds, clock, stream, token)
    finally:
        data, outcome = answer or (None, False)
        await stream.end(data, outcome=outcome)
        session.replays.ended(stream)
        if outcome and stream.delivered and metrics is not None:
            metrics.answered(hold.approval_id)  # decision → agent
        if answer is not None and not stream.delivered:
            log.info("approval %s: the held call's answer waits for the client to resume", hold.approval_id)


def _primes(version: str | None) -> bool:
    # Priming events (empty data) came with 2025-11-25; clients of earlier revisions may try to
    # parse the empty data as a message.
    return version is not None and version >= PRIMING_VERSION


async def _follow(
    session: Session,
    message: Message,
    hold: Hold,
    hold_seconds: float,
    clock: Callable[[], float],
    stream: HeldStream,
    token: object,
) -> tuple[bytes, bool] | None:
    """Signs of life on `stream` until the call's answer, returned with whether it is the decided
    outcome (or the pending result at the deadline); None when the client cancelled."""
    assert message.id is not None
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
                return encode(result_response(message.id, hold.pending_result(clock()))), False
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
                return None  # the client cancelled: the spec says a cancelled request gets no answer
            result = outcome.result() if outcome.done() else None
            if result is not None:
                return encode({"jsonrpc": "2.0", "id": message.id, **result}), True
            if drained.done() or loop.time() >= deadline:
                continue  # answered with the pending result at the top of the loop
            if token is not None:
                step += 1
                progress = {"progressToken": token, "progress": step, "message": hold.status(clock())}
                notification = {"jsonrpc": "2.0", "method": "notifications/progress", "params": progress}
                await stream.event(encode(notification))
            else:
                await stream.comment(encode_comment(hold.status(clock())))
    finally:
        drained.cancel()
        if outcome is not None and not outcome.done():
            outcome.cancel()


async def stream_resumed(request: web.Request, session: Session, last_event_id: str) -> web.StreamResponse:
    """`GET` with `Last-Event-ID`: the rest of the held-call stream that id belongs to."""
    try:
        stream, seq = session.replays.find(last_event_id)
    except UnknownEvent:
        # 400, not 404: a 404 tells a client its whole session is gone.
        body = error_response(
            None,
            INVALID_REQUEST,
            f"Last-Event-ID {last_event_id[:80]!r} names no stream of this session that can be "
            "resumed: it is unknown, of another session, or its answer was already delivered",
        )
        return web.Response(status=400, body=encode(body), content_type="application/json")
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    session.touch()
    await (await stream.resume(response, seq))
    return response
