"""The gateway's live state: client sessions by id, their upstream connections, and the idle reaper.

Sessions are bounded: `[server] max_sessions` in all and `max_sessions_per_grant` per grant (each
may be an upstream process), and a session no client uses any more is ended — after
`session_idle` with no request and no stream open, or after the shorter `abandoned_session_idle`
when its client seems gone (it never finished the handshake, or its GET stream closed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from approvals.config import Settings
from approvals.errors import ProtocolError
from approvals.jsonrpc import (
    HANDSHAKE_VERSIONS,
    INVALID_REQUEST,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    error_response,
)
from approvals.proxy.bridge import ModernBridge, legacy_result
from approvals.proxy.http1 import Pool
from approvals.proxy.modern_upstream import (
    UpstreamEras,
    envelope,
    first_answer,
    post,
    routing_headers,
    with_envelope,
)
from approvals.proxy.pool import UpstreamPool, is_stateless_session
from approvals.proxy.request_state import RequestStates
from approvals.proxy.session import Session
from approvals.proxy.subscriptions import Fanouts, ListenLimit
from approvals.proxy.upstream import connect

if TYPE_CHECKING:
    from approvals.metrics import Metrics

log = logging.getLogger(__name__)

GATEWAY_CLIENT = {"name": "approvals-gateway", "version": "1"}
SERVICE_GRANT = "(gateway)"  # not a configurable grant name: config names must start with a letter or digit
MAX_REAP_INTERVAL_SECONDS = 30.0
TOO_MANY_SESSIONS = 429  # HTTP status of an initialize refused for a session limit


class Gateway:
    """Creates, finds and ends client sessions. One per application."""

    def __init__(
        self, settings: Settings, clock: Callable[[], float] = time.monotonic, *, secret: str | None = None
    ) -> None:
        # `secret`: the replicas' shared secret (approvals.gateway_secret), None for a random key.
        self.settings = settings
        self.clock = clock  # for idle times; tests drive `reap` with their own `now`
        self.sessions: dict[str, Session] = {}
        self._opening: collections.Counter[str] = collections.Counter()  # initializes under way, per grant
        self.holds: collections.Counter[str] = collections.Counter()  # calls held open, per approval id
        server = settings.server
        shortest = min(server.session_idle_seconds, server.abandoned_session_idle_seconds)
        self.reap_interval = min(shortest / 4, MAX_REAP_INTERVAL_SECONDS)
        # The gateway's own upstream sessions, for calls that outlive the client's session
        # (a release after the hold ran out) and for reading tool definitions.
        self._service: dict[str, Session] = {}
        self._service_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        # Keep-alive connections for the POSTs to HTTP upstreams (the hot path); answers are bounded too.
        self._pool = Pool(max_body_bytes=server.max_body_bytes, client=server.upstream_client)
        self._reaper: asyncio.Task[None] | None = None
        # Upstream sessions the gateway keeps for stateless (2026-07-28) clients, per (grant, upstream).
        self.pool = UpstreamPool(
            self._connect, lambda name: settings.upstreams[name].call_timeout, server.session_idle_seconds
        )
        # Which protocol eras each upstream speaks (asked once), and what 2026-07-28 needs kept.
        self.eras = UpstreamEras(settings, lambda: self.http)
        self.listens = ListenLimit()
        self.fanouts = Fanouts()  # listen streams served from pooled initialize-era sessions
        self.states = RequestStates(secret)
        # Every session with a stdio upstream (client, pooled and the gateway's own), for the
        # count of upstream processes at a metrics scrape; a closed one drops out by itself.
        self._stdio: weakref.WeakSet[Session] = weakref.WeakSet()
        self.metrics: Metrics | None = None  # set when metrics are on (approvals.web.app)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The HTTP client every upstream request shares (after `start`)."""
        assert self._http is not None, "Gateway.start() was not awaited"
        return self._http

    async def start(self) -> None:
        # One pooled HTTP client for every Streamable HTTP upstream: connections are kept alive
        # and reused across sessions. No total timeout: a tool call may legitimately run long.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            auto_decompress=True,
        )
        self._reaper = asyncio.create_task(self._reap_idle(), name="session-reaper")

    async def open_session(self, grant: str, upstream: str) -> Session:
        """A new session, connected to a new upstream session (a new process for stdio).

        Raises ProtocolError (HTTP 429) when the grant, or the gateway, has its most sessions open.
        """
        self._check_session_limits(grant)
        self._opening[grant] += 1
        try:
            session = await self._connect(grant, upstream)
        finally:
            self._opening[grant] -= 1
            if not self._opening[grant]:
                del self._opening[grant]
        session.on_close = self._forget
        self.sessions[session.id] = session
        return session

    def _check_session_limits(self, grant: str) -> None:
        server = self.settings.server
        total = len(self.sessions) + self._opening.total()
        if total >= server.max_sessions:
            raise ProtocolError(
                INVALID_REQUEST,
                f"the gateway has {total} sessions open, the most [server] max_sessions allows;"
                " try again when one ends",
                status=TOO_MANY_SESSIONS,
            )
        mine = self._opening[grant] + sum(1 for s in self.sessions.values() if s.grant == grant)
        if mine >= server.max_sessions_per_grant:
            raise ProtocolError(
                INVALID_REQUEST,
                f"grant {grant!r} has {mine} sessions open, the most [server] max_sessions_per_grant"
                " allows; end one (DELETE with its Mcp-Session-Id) or wait for an idle one to expire",
                status=TOO_MANY_SESSIONS,
            )

    async def _connect(self, grant: str, upstream: str) -> Session:
        assert self._http is not None, "Gateway.start() was not awaited"
        settings = self.settings.upstreams[upstream]
        session = Session(
            secrets.token_urlsafe(32),
            grant,
            settings,
            max_backlog_bytes=self.settings.server.max_backlog_bytes,
            clock=self.clock,
        )
        eras = await self.eras.of(upstream)
        if eras.modern and not eras.legacy:
            # No initialize era upstream: the session is bridged, request by request (bridge.py).
            session.connection = ModernBridge(
                settings,
                self._http,
                self.settings.server.max_body_bytes,
                session.on_upstream_message,
                lambda: self.eras.forget(upstream),
            )
        else:
            session.connection = connect(
                settings, self._http, self._pool, session.on_upstream_message, session.on_upstream_closed
            )
        await session.connection.start()
        if settings.is_stdio:
            self._stdio.add(session)
        return session

    def upstream_processes(self) -> int:
        """How many stdio upstream processes this gateway runs now."""
        return sum(1 for s in self._stdio if s.closed_reason is None)

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        """The gateway's own request to an upstream, answered with the upstream's JSON-RPC response.

        It goes through the client's session while that is open (so what the upstream sends about
        it reaches that client), else through the gateway's own session with the upstream. To an
        upstream of 2026-07-28 it is a 2026 request when the call is a stateless client's (so an
        InputRequiredResult comes back to that client as such) or the upstream has no other era.
        """
        metrics = self.metrics
        if method != "tools/call" or metrics is None:
            return await self._call(upstream, method, params, prefer_session)
        # A release: its round trip is timed; one cut short (the call timeout) counts as failed.
        started, failed = time.perf_counter(), True
        try:
            answer = await self._call(upstream, method, params, prefer_session)
            failed = "error" in answer
            return answer
        finally:
            metrics.upstream_call(upstream, time.perf_counter() - started, failed)

    async def _call(
        self, upstream: str, method: str, params: JsonObject, prefer_session: str | None
    ) -> JsonObject:
        eras = await self.eras.of(upstream)
        stateless_client = prefer_session is not None and is_stateless_session(prefer_session)
        if eras.modern and (stateless_client or not eras.legacy):
            answer = await self._modern_call(upstream, method, params)
            result = answer.get("result")
            if not stateless_client and isinstance(result, dict):
                answer = {**answer, "result": legacy_result(result)}
            return answer
        session = self.sessions.get(prefer_session) if prefer_session else None
        if session is None and prefer_session:  # a stateless client's: the grant's pooled session
            session = self.pool.find(prefer_session, upstream)
        if session is None or session.closed_reason is not None or session.upstream_name != upstream:
            try:
                session = await self._service_session(upstream)
            except ConnectionError as exc:
                return error_response(None, UPSTREAM_UNAVAILABLE, f"upstream {upstream} unavailable: {exc}")
        return await _answer(session, method, params)

    async def _modern_call(self, upstream: str, method: str, params: JsonObject) -> JsonObject:
        """One 2026-07-28 request of the gateway's own (its own client info, no capabilities)."""
        settings = self.settings.upstreams[upstream]
        body: JsonObject = {"jsonrpc": "2.0", "id": f"approvals-{secrets.token_hex(6)}", "method": method}
        body = with_envelope({**body, "params": params}, envelope(GATEWAY_CLIENT, {}))
        limit = self.settings.server.max_body_bytes
        try:
            # Leaving early (the caller's timeout) closes the POST: a 2026 upstream's cancellation.
            async with post(self.http, settings, body, routing_headers(body), limit) as answer:
                response = await first_answer(answer, body["id"])
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.eras.forget(upstream)
            return error_response(None, UPSTREAM_UNAVAILABLE, f"upstream {upstream} unavailable: {exc}")
        if response is None:
            return error_response(
                None, UPSTREAM_UNAVAILABLE, f"upstream {upstream} answered without a response"
            )
        return response

    async def _service_session(self, upstream: str) -> Session:
        async with self._service_lock:
            session = self._service.get(upstream)
            if session is not None and session.closed_reason is None:
                return session
            session = await self._connect(SERVICE_GRANT, upstream)
            init = {
                "protocolVersion": HANDSHAKE_VERSIONS[-1],
                "capabilities": {},
                "clientInfo": GATEWAY_CLIENT,
            }
            answer = await _answer(session, "initialize", init)
            result = answer.get("result")
            if not isinstance(result, dict):
                await session.close("initialize failed")
                raise ConnectionError(f"initialize failed: {answer.get('error')}")
            session.protocol_version = str(result.get("protocolVersion"))
            assert session.connection is not None
            session.connection.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            self._service[upstream] = session
            return session

    def find(self, session_id: str, grant: str, upstream: str) -> Session | None:
        """The session, only for the grant that created it and on its own upstream path."""
        session = self.sessions.get(session_id)
        if session is None or session.grant != grant or session.upstream_name != upstream:
            return None
        session.touch()
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def end_session(self, session: Session, reason: str = "the client ended the session") -> None:
        self._forget(session)
        await session.close(reason)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.reap()

    async def reap(self, now: float | None = None) -> list[Session]:
        """End every session idle past its limit (at `now`, by default the clock's); the ended ones."""
        now = self.clock() if now is None else now
        ended = [s for s in self.sessions.values() if self._idle_past_limit(s, now)]
        for session in ended:
            log.info("closing session %s… after %.0f s idle", session.id[:8], now - session.last_seen)
        await asyncio.gather(
            *(self.end_session(s, "the session was idle too long") for s in ended), return_exceptions=True
        )
        await self.pool.reap(now)
        return ended

    def _idle_past_limit(self, session: Session, now: float) -> bool:
        if session.busy:
            return False
        server = self.settings.server
        limit = server.session_idle_seconds
        if session.abandoned:
            limit = min(limit, server.abandoned_session_idle_seconds)
        return now - session.last_seen >= limit

    def drain(self) -> None:
        """First step of shutdown: end idle streams and holds so in-flight requests can finish."""
        for session in self.sessions.values():
            session.drain()
        self.pool.drain()

    async def close(self) -> None:
        """Shutdown: end every session (stopping stdio upstreams), then the HTTP client."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(
            *(self.end_session(s, "the gateway is shutting down") for s in list(self.sessions.values())),
            *(s.close("the gateway is shutting down") for s in self._service.values()),
            self.pool.close(),
            return_exceptions=True,
        )
        self._pool.close()
        if self._http is not None:
            await self._http.close()


async def _answer(session: Session, method: str, params: JsonObject) -> JsonObject:
    exchange = session.request(method, params)
    try:
        message = await exchange.outbox.get()
    except asyncio.CancelledError:
        session.cancel(exchange, "the gateway stopped waiting (call timeout)")
        raise
    finally:
        session.release(exchange)
    return message if message is not None else error_response(None, UPSTREAM_UNAVAILABLE, "no answer")
