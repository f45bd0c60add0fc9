"""The gateway's live state: client sessions by id, their upstream connections, and the idle reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

import aiohttp

from approvals.config import Settings
from approvals.proxy.gate import Gate
from approvals.proxy.session import Session
from approvals.proxy.upstream import connect

log = logging.getLogger(__name__)


class Gateway:
    """Creates, finds and ends client sessions. One per application."""

    def __init__(self, settings: Settings, gate: Gate) -> None:
        self.settings = settings
        self.gate = gate
        self.sessions: dict[str, Session] = {}
        self._http: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task[None] | None = None

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
        """A new session, connected to a new upstream session (a new process for stdio)."""
        assert self._http is not None, "Gateway.start() was not awaited"
        settings = self.settings.upstreams[upstream]
        session = Session(secrets.token_urlsafe(32), grant, settings)
        session.connection = connect(
            settings, self._http, session.on_upstream_message, session.on_upstream_closed
        )
        await session.connection.start()
        session.on_close = self._forget
        self.sessions[session.id] = session
        return session

    def find(self, session_id: str, grant: str, upstream: str) -> Session | None:
        """The session, only for the grant that created it and on its own upstream path."""
        session = self.sessions.get(session_id)
        if session is None or session.grant != grant or session.upstream_name != upstream:
            return None
        session.last_seen = time.monotonic()
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def end_session(self, session: Session, reason: str = "the client ended the session") -> None:
        self._forget(session)
        await session.close(reason)

    async def _reap_idle(self) -> None:
        idle = self.settings.server.session_idle_seconds
        while True:
            await asyncio.sleep(min(idle, 60.0))
            cutoff = time.monotonic() - idle
            for session in [s for s in self.sessions.values() if s.last_seen < cutoff]:
                log.info("closing session %s… after %.0f s idle", session.id[:8], idle)
                await self.end_session(session, "the session was idle too long")

    async def close(self) -> None:
        """Shutdown: end every session (stopping stdio upstreams), then the HTTP client."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(
            *(self.end_session(s, "the gateway is shutting down") for s in list(self.sessions.values())),
            return_exceptions=True,
        )
        if self._http is not None:
            await self._http.close()
