"""The application factory: one `web.Application` with every route, its resources on `cleanup_ctx`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from approvals.auth import TokenIndex
from approvals.channels import slack
from approvals.config import Settings
from approvals.gatekeeper import Gatekeeper
from approvals.jsonrpc import INVALID_REQUEST, encode, error_response
from approvals.proxy.gate import Gate
from approvals.proxy.gateway import Gateway
from approvals.proxy.handlers import add_routes
from approvals.store.sqlite import SqliteStore
from approvals.web import api, inbox
from approvals.web.keys import GATEKEEPER, GATEWAY, GRANTS, SETTINGS
from approvals.web.origin import allowed_hostnames, origin_middleware

log = logging.getLogger(__name__)


def create_app(settings: Settings, gate: Gate | None = None) -> web.Application:
    """Build the gateway application for `settings`; the gate defaults to its policies and limits.

    Raises ConfigError when a policy file is invalid, before anything starts.
    """
    app = web.Application(
        middlewares=[
            undecodable_input,
            plain_bodies_only,
            origin_middleware(allowed_hostnames(settings.server)),
            api.store_errors,
        ],
        # aiohttp's own limit; the MCP handler checks first to answer with a JSON-RPC error.
        client_max_size=settings.server.max_body_bytes,
        # Bodies are not inflated by the server: it would inflate a body it then refuses (or one
        # it never reads, to drain the connection) in full. /mcp inflates, within its limit.
        # keepalive_timeout: aiohttp closes a connection that has not sent a whole request head
        # within it (from connect, or from the last response); its default is an hour.
        handler_args={"auto_decompress": False, "keepalive_timeout": settings.server.read_timeout_seconds},
    )
    app[SETTINGS] = settings
    app[GRANTS] = TokenIndex(settings.grants)
    gate = gate if gate is not None else Gatekeeper(settings)
    app[GATEWAY] = Gateway(settings, gate)
    app.cleanup_ctx.append(_lifetime)
    app.on_shutdown.append(_drain)
    add_routes(app)
    if isinstance(gate, Gatekeeper):
        app[GATEKEEPER] = gate
        api.add_routes(app, TokenIndex(settings.reviewers))
        inbox.setup(app, settings, gate)
        if settings.slack is not None:
            slack.setup(app, settings, gate)
    app.router.add_get("/healthz", healthz)
    return app


@web.middleware
async def undecodable_input(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The last line of defence: text a handler could not decode is the client's 4xx, not a 500.

    Handlers check their own input (headers, cookies, forms and JSON bodies); this answers what
    slips past them: bytes that are not UTF-8 (aiohttp keeps header bytes as lone surrogates, which
    fail when encoded) and a charset Python does not know (a bare LookupError, as aiohttp raises it;
    its subclasses KeyError and IndexError are bugs and stay 500s). It is logged with its traceback,
    since it means a handler missed a check.
    """
    try:
        return await handler(request)
    except (UnicodeError, LookupError) as exc:
        charset = type(exc) is LookupError
        if not charset and not isinstance(exc, UnicodeError):
            raise  # a KeyError or IndexError: a bug
        if request.writer.output_size > 0:
            raise  # an answer already begun, which no other answer can replace
        log.warning("%s %s: undecodable input", request.method, request.path, exc_info=exc)
        status, message = (415, f"unknown charset: {exc}") if charset else (400, f"undecodable text: {exc}")
    return _refusal(request, status, f"the request cannot be read: {message}")


@web.middleware
async def plain_bodies_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only /mcp inflates compressed bodies (within its limit); the API, the inbox and Slack take
    them as sent, so a `Content-Encoding` there is refused rather than read as garbage."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity") and not request.path.startswith("/mcp/"):
        return _refusal(request, 415, f"Content-Encoding {coding!r} is accepted only on /mcp")
    return await handler(request)


def _refusal(request: web.Request, status: int, message: str) -> web.Response:
    """An error answer in the shape of the route: JSON-RPC on /mcp, JSON elsewhere."""
    if request.path.startswith("/mcp"):
        body = encode(error_response(None, INVALID_REQUEST, message))
        return web.Response(body=body, status=status, content_type="application/json")
    return web.json_response({"error": message}, status=status)


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    """Open the store, start the gate and the gateway; on shutdown, close them in reverse."""
    gateway = app[GATEWAY]
    store = await SqliteStore.open(app[SETTINGS].store.path)
    try:
        await gateway.gate.start(store, gateway)
        await gateway.start()
        yield
    finally:
        await gateway.close()
        await gateway.gate.close()
        await store.close()


async def _drain(app: web.Application) -> None:
    # aiohttp waits for requests in flight before cleanup; a client's idle GET stream or a held
    # call would make every shutdown last the whole grace period.
    app[GATEWAY].drain()


async def healthz(request: web.Request) -> web.Response:
    """Liveness plus what an operator needs at a glance (policy reload errors make it "degraded")."""
    gateway = request.app[GATEWAY]
    problems = gateway.gate.health()
    body = {
        "status": "degraded" if problems else "ok",
        "sessions": len(gateway.sessions),
        "upstreams": sorted(gateway.settings.upstreams),
        **problems,
    }
    return web.json_response(body)
