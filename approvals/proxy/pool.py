"""The gateway's own upstream sessions for stateless (2026-07-28) clients: one per (grant, upstream).

A 2026-07-28 client sends every request on its own, without a session; an initialize-era upstream
(a stdio server, an older HTTP server) needs one. The gateway keeps that session itself, opened
with its own client info and no client capabilities, and serves every stateless request of the
grant through it (the session layer gives each request its own upstream id, so they share it
safely). One per grant keeps one grant's upstream state (a stdio process, its memory) apart from
another's. The pool is bounded by the configuration: at most one session per (grant, upstream).
A session no request has used for `[server] session_idle` is ended; one whose upstream went away
is replaced on the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from approvals.jsonrpc import HANDSHAKE_VERSIONS, UPSTREAM_UNAVAILABLE, JsonObject, error_response
from approvals.proxy.session import Session

log = logging.getLogger(__name__)

GATEWAY_CLIENT = {"name": "approvals-gateway", "version": "1"}

Connect = Callable[[str, str], Awaitable[Session]]
Key = tuple[str, str]  # (grant, upstream)


def stateless_session(grant: str) -> str:
    """The session a grant's stateless calls are made in, as the approval core sees it: limits with
    `scope = "session"` count them together, the same in every process, and a release goes
    through the grant's pooled session (`find`) when this process has it. Parentheses keep the
    name apart from real session ids."""
    return f"(stateless {grant})"


def is_stateless_session(session: str) -> bool:
    """Whether a session name is one `stateless_session` made (no real session id has parentheses)."""
    return session.startswith("(stateless ") and session.endswith(")")


@dataclass(frozen=True, slots=True)
class Pooled:
    """An initialized upstream session and what the upstream said about itself when it started."""

    session: Session
    server: JsonObject  # the upstream's InitializeResult


class UpstreamPool:
    """Initialized upstream sessions by (grant, upstream), opened on first use."""

    def __init__(self, connect: Connect, call_timeout: Callable[[str], float], idle_seconds: float) -> None:
        self._connect = connect
        self._call_timeout = call_timeout
        self._idle_seconds = idle_seconds
        self._sessions: dict[Key, Pooled] = {}
        self._locks: collections.defaultdict[Key, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.draining = asyncio.Event()  # set at shutdown: stateless holds answer at once

    async def acquire(self, grant: str, upstream: str) -> Pooled:
        """The grant's session with the upstream, opened and initialized if there is none.

        Raises ConnectionError when the upstream cannot be reached or refuses the handshake.
        """
        key = (grant, upstream)
        async with self._locks[key]:
            pooled = self._sessions.get(key)
            if pooled is not None and pooled.session.closed_reason is None:
                pooled.session.touch()
                return pooled
            if pooled is not None:  # its upstream went away: a new one replaces it
                await pooled.session.close(pooled.session.closed_reason or "replaced")
            session = await self._connect(grant, upstream)
            try:
                server = await self._handshake(session, upstream)
            except BaseException:
                await session.close("initialize failed")
                raise
            pooled = self._sessions[key] = Pooled(session, server)
            return pooled

    def find(self, session: str, upstream: str) -> Session | None:
        """The pooled session a stateless call named `session` (`stateless_session`) runs in, if open."""
        for (grant, name), pooled in self._sessions.items():
            if (
                name == upstream
                and stateless_session(grant) == session
                and pooled.session.closed_reason is None
            ):
                return pooled.session
        return None

    async def _handshake(self, session: Session, upstream: str) -> JsonObject:
        init = {"protocolVersion": HANDSHAKE_VERSIONS[-1], "capabilities": {}, "clientInfo": GATEWAY_CLIENT}
        try:
            async with asyncio.timeout(self._call_timeout(upstream)):
                answer = await _ask(session, "initialize", init)
        except TimeoutError:
            raise ConnectionError("the upstream did not answer initialize in time") from None
        result = answer.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("protocolVersion"), str):
            error = answer.get("error")
            detail = error.get("message") if isinstance(error, dict) else "no result"
            raise ConnectionError(f"initialize failed: {detail}")
        session.protocol_version = result["protocolVersion"]
        session.initialized = True
        assert session.connection is not None
        session.connection.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def reap(self, now: float) -> None:
        """End the sessions idle past `[server] session_idle` (none while a request is in flight)."""
        idle = [
            key
            for key, pooled in self._sessions.items()
            if not pooled.session.busy and now - pooled.session.last_seen >= self._idle_seconds
        ]
        for key in idle:
            pooled = self._sessions.pop(key)
            log.info("closing the stateless session of %s on %s: idle", *key)
            await pooled.session.close("the session was idle too long")

    def drain(self) -> None:
        """Shutdown: stateless holds answer at once, listen streams on pooled sessions end."""
        self.draining.set()
        for pooled in self._sessions.values():
            pooled.session.drain()

    async def close(self) -> None:
        sessions = [pooled.session for pooled in self._sessions.values()]
        self._sessions.clear()
        await asyncio.gather(
            *(s.close("the gateway is shutting down") for s in sessions), return_exceptions=True
        )


async def _ask(session: Session, method: str, params: JsonObject) -> JsonObject:
    exchange = session.request(method, params)
    try:
        message = await exchange.outbox.get()
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            session.cancel(exchange, "the gateway stopped waiting")
        raise
    finally:
        session.release(exchange)
    return message if message is not None else error_response(None, UPSTREAM_UNAVAILABLE, "no answer")
