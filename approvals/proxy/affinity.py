"""Initialize-era sessions live in one process: a request of a session held by another replica is
forwarded there, so clients work whichever replica (or `--workers` process) a request lands on.

    client ──▶ replica B ──(Mcp-Session-Id not held here)──▶ registry: whose is it?
                   │                                              │ replica A, at its internal URL
                   └──────── the same request, streamed ─────────▶ replica A (judges it as its own)
                   ◀──────── the answer (JSON or SSE), streamed ───┘

- A replica records a session as its own when it answers an `initialize` with a new
  Mcp-Session-Id (before the client sees the id), and a heartbeat keeps its rows true: sessions
  that ended are forgotten within a beat, rows that failed to be written are written again
  (approvals.store.postgres_replicas).
- A request is forwarded only to a replica registered in the database, at its internal address,
  and never again from there: what arrives on the internal listener is always answered locally,
  so no request loops. The client's headers go as they came, Authorization and Host included: the
  owner authenticates and judges the request as if it had arrived there, and nothing is decided
  here.
- An owner that is gone (the look-up finds none, or its address refuses the connection) gives the
  404 of an unknown session, on which clients initialize again. 2026-07-28 requests have no
  session and are never forwarded; nor are requests without a valid grant token, which the
  handlers refuse without a database look-up.

`install` does nothing unless the store is PostgreSQL and `[server] internal_url` is set
(`approvals serve --workers N` sets one per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from approvals.auth import bearer_token
from approvals.errors import StoreError
from approvals.jsonrpc import INVALID_REQUEST
from approvals.log_format import REQUEST_ID_HEADER, request_id_of
from approvals.proxy.handlers import rpc_error
from approvals.proxy.keys import GRANTS
from approvals.proxy.stateless import MODERN_VERSIONS, VERSION_HEADER
from approvals.runtime import Runtime
from approvals.store.postgres import PostgresStore
from approvals.store.postgres_replicas import HEARTBEAT_SECONDS, Owner, ReplicaRegistry, session_hash

__all__ = ["ROUTER", "SessionRouter", "install"]

log = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"
RECORD_TIMEOUT_SECONDS = 5.0  # an initialize waits at most this for its session to be recorded
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_CACHED_OWNERS = 4096
# Per connection, not end to end (RFC 9110 §7.6.1): never passed on by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",  # set again from the body actually streamed
    }
)


class SessionRouter:
    """This replica's part in session routing: its registry rows and the forwarding of requests."""

    def __init__(self, runtime: Runtime, database_url: str, internal_url: str) -> None:
        self._gateway = runtime.gateway
        self._database_url = database_url
        self.internal_url = internal_url
        self.internal_port = urlsplit(internal_url).port
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._registry: ReplicaRegistry | None = None
        self._http: aiohttp.ClientSession | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._recorded: set[str] = set()  # hashes of this replica's sessions known to the database
        self._owners: dict[str, Owner] = {}  # a session id never changes owner: safe to keep
        self._forwarding: set[aiohttp.ClientResponse] = set()
        self.forwarded = 0  # requests sent to another replica (for tests and metrics)

    @property
    def registry(self) -> ReplicaRegistry:
        assert self._registry is not None, "SessionRouter.start() was not awaited"
        return self._registry

    # ---- life cycle (aiohttp signals) ----------------------------------------------------------

    async def start(self, _: web.Application) -> None:
        self._registry = await ReplicaRegistry.open(self._database_url, self.replica_id, self.internal_url)
        self._http = aiohttp.ClientSession(
            # No total or read timeout: a held call's stream legitimately stays open for minutes.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,  # bodies pass through as they are, compressed or not
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="replica-heartbeat")
        log.info("replica %s routes sessions; peers reach it at %s", self.replica_id, self.internal_url)

    async def shutdown(self, _: web.Application) -> None:
        """Forwarded streams end now, as held calls and GET streams of this replica do."""
        for response in list(self._forwarding):
            response.close()

    async def close(self, _: web.Application) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._http is not None:
            await self._http.close()
        if self._registry is not None:
            try:
                await self._registry.close()
            except StoreError as exc:  # its rows go when a live replica sees it stopped beating
                log.warning("could not unregister this replica: %s", exc)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self.beat()
            except Exception:  # the task must outlive a database outage
                log.exception("replica heartbeat failed; trying again in %.0f s", HEARTBEAT_SECONDS)

    async def beat(self) -> None:
        """One heartbeat: this replica is alive, and its rows name exactly its live sessions."""
        if not await self.registry.heartbeat():
            log.warning("this replica was taken for stopped (a long pause?); registering again")
            await self.registry.register()
            self._recorded.clear()
        live = {session_hash(session_id) for session_id in self._gateway.sessions}
        await self.registry.record(live - self._recorded)
        await self.registry.forget(self._recorded - live)
        self._recorded = live

    async def record_initialize(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: a new session of this replica is recorded before its client sees it."""
        session_id = response.headers.get(SESSION_HEADER)
        if (
            session_id is None
            or SESSION_HEADER in request.headers
            or session_id not in self._gateway.sessions
        ):
            return
        digest = session_hash(session_id)
        try:
            async with asyncio.timeout(RECORD_TIMEOUT_SECONDS):
                await self.registry.record([digest])
        except (StoreError, TimeoutError) as exc:
            # The session still works here (and wherever the load balancer sticks it); the next
            # heartbeat writes the row.
            log.warning("could not record session %s… as this replica's: %s", session_id[:8], exc)
            return
        self._recorded.add(digest)

    # ---- routing --------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        owner = await self._owner_elsewhere(request)
        if owner is None:
            return await handler(request)
        return await self._forward(request, owner)

    async def _owner_elsewhere(self, request: web.Request) -> Owner | None:
        """The other replica that holds this request's session, if it should go there."""
        session_id = request.headers.get(SESSION_HEADER)
        if (
            not session_id
            or not request.path.startswith("/mcp/")
            or not request.rel_url.raw_path.startswith("/mcp/")  # the URL built is the owner's, always
            or session_id in self._gateway.sessions
            or request.headers.get(VERSION_HEADER) in MODERN_VERSIONS
            or self._arrived_internally(request)
        ):
            return None
        if request.app[GRANTS].find(bearer_token(request.headers.get("Authorization"))) is None:
            return None  # refused by the handler: no database look-up for a stranger
        owner = self._owners.get(session_id)
        if owner is None:
            try:
                owner = await self.registry.owner(session_hash(session_id))
            except StoreError as exc:
                log.warning("cannot look up the replica of session %s…: %s", session_id[:8], exc)
                return None  # answered here: an unknown session, which fails closed
            if owner is None or owner.replica_id == self.replica_id:
                return None
            if len(self._owners) >= MAX_CACHED_OWNERS:
                self._owners.pop(next(iter(self._owners)))
            self._owners[session_id] = owner
        return owner

    def _arrived_internally(self, request: web.Request) -> bool:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        return isinstance(sockname, tuple) and sockname[1] == self.internal_port

    async def _forward(self, request: web.Request, owner: Owner) -> web.StreamResponse:
        assert self._http is not None
        session_id = request.headers[SESSION_HEADER]
        body = request.content.iter_any() if request.body_exists else None
        headers = _end_to_end(request.headers)
        if (request_id := request_id_of(request)) is not None:
            headers[REQUEST_ID_HEADER] = request_id  # one id in both replicas' logs
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        try:
            answer = await self._http.request(
                request.method,
                owner.internal_url + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as exc:
            # Its replica stopped: the session went with it, and the client initializes again.
            self._owners.pop(session_id, None)
            log.info("replica %s of session %s… is unreachable: %s", owner.replica_id, session_id[:8], exc)
            return rpc_error(404, INVALID_REQUEST, "unknown or expired session; initialize a new one")
        self.forwarded += 1
        self._forwarding.add(answer)
        try:
            return await self._relay(request, answer)
        finally:
            self._forwarding.discard(answer)
            if answer.content.is_eof():
                answer.release()  # the connection is kept for the next forwarded request
            else:
                answer.close()  # the client left: the owner sees its request's connection close

    async def _relay(self, request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
        response = web.StreamResponse(
            status=answer.status, reason=answer.reason, headers=_end_to_end(answer.headers)
        )
        if answer.content_length is not None:
            response.content_length = answer.content_length
        await response.prepare(request)
        try:
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
        except ConnectionResetError:  # the client left: closing `answer` tells the owner
            log.debug("client left a forwarded request")
            return response
        except (aiohttp.ClientError, OSError) as exc:
            # The owner stopped mid-answer, or this replica is shutting down: the client sees its
            # connection drop, as it would have talking to the owner itself.
            log.info("a forwarded answer ended early: %s", exc or type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


def _end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The headers a proxy passes on: all but the hop-by-hop ones (and those Connection names)."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")
    }
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP | named)


ROUTER = web.AppKey("session_router", SessionRouter)


def install(app: web.Application, runtime: Runtime) -> None:
    """Add session routing to `app` when it is one of several replicas sharing a PostgreSQL store
    (`[server] internal_url` set); otherwise leave `app` as it is."""
    internal_url = runtime.settings.server.internal_url
    if internal_url is None or not isinstance(runtime.store, PostgresStore):
        return
    router = SessionRouter(runtime, runtime.store.url, internal_url)
    app[ROUTER] = router
    app.middlewares.append(router.middleware)
    app.on_startup.append(router.start)
    app.on_response_prepare.append(router.record_initialize)
    app.on_shutdown.append(router.shutdown)
    app.on_cleanup.append(router.close)
