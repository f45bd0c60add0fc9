"""The application factory: one `web.Application` with every route, its parts opened before it
is returned (`approvals.runtime`) and closed on cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from approvals.audit_sink import WebhookTarget
from approvals.auth import TokenIndex
from approvals.channels import Channel, Channels, slack
from approvals.config import Settings
from approvals.jsonrpc import INVALID_REQUEST, encode, error_response
from approvals.log_format import echo_request_id, request_ids
from approvals.metrics import METRICS, Metrics, serve_metrics
from approvals.policy_files import WATCH_INTERVAL_SECONDS
from approvals.proxy import affinity
from approvals.proxy.gate import Gate
from approvals.proxy.handlers import add_routes
from approvals.proxy.keys import GATE, GATEWAY, GRANTS
from approvals.runtime import Runtime
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore
from approvals.store.sqlite_feed import POLL_SECONDS
from approvals.web import api, inbox, landing
from approvals.web.keys import GATEKEEPER, SERVICE, SETTINGS
from approvals.web.origin import allowed_hostnames, origin_middleware

log = logging.getLogger(__name__)


async def create_app(
    settings: Settings,
    gate: Gate | None = None,
    *,
    clock: Callable[[], float] = time.time,
    watch_interval: float = WATCH_INTERVAL_SECONDS,
    poll_interval: float = POLL_SECONDS,
    audit_webhook: WebhookTarget | None = None,
) -> web.Application:
    """The gateway application for `settings`, every part already started (closed on cleanup).

    `gate` replaces the policies and limits in front of the upstreams (the proxy's own tests).
    Raises ConfigError when a policy file is invalid, before anything starts. `audit_webhook`
    copies the audit log to a webhook as it grows (approvals.audit_sink); by default, the one
    `[audit] webhook_url` names.
    """
    if audit_webhook is None and settings.audit.webhook_url is not None:
        assert settings.audit.webhook_secret is not None  # the config refuses a URL without one
        audit_webhook = WebhookTarget(settings.audit.webhook_url, settings.audit.webhook_secret)
    runtime = await Runtime.open(
        settings,
        clock=clock,
        watch_interval=watch_interval,
        poll_interval=poll_interval,
        audit_webhook=audit_webhook,
    )
    try:
        inbox_auth = await inbox.open_auth(settings, runtime.store, runtime.secret, clock)
    except BaseException:
        await runtime.close()
        raise

    async def close_parts() -> None:
        await inbox_auth.state.close()
        await runtime.close()

    try:
        app = _application(settings)
        app[SETTINGS] = settings
        app[GRANTS] = TokenIndex(settings.grants)
        app[GATEWAY] = runtime.gateway
        app[GATE] = gate if gate is not None else runtime.gatekeeper
        app[GATEKEEPER] = runtime.gatekeeper
        app[SERVICE] = runtime.service
        affinity.install(app, runtime)
        add_routes(app)
        api.add_routes(app, TokenIndex(settings.reviewers))
        views: list[Channel] = [inbox.setup(app, settings, runtime.service, inbox_auth)]
        notifiers: list[Channel] = []
        if settings.slack is not None:
            notifiers.append(slack.setup(app, settings, runtime.service))
        app.router.add_get("/healthz", healthz)
        landing.add_routes(app, settings)
        app.router.add_get("/metrics", serve_metrics)
        if settings.metrics.token_sha256 is not None:
            app[METRICS] = metrics = Metrics(settings.metrics.token_sha256, clock)
            app.cleanup_ctx.append(_counting(metrics, runtime))
            log.info("metrics on: /metrics answers the bearer of the [metrics] token")
    except BaseException:
        await close_parts()
        raise
    channels = Channels.start(runtime.store, runtime.feed, views, notifiers)

    async def drain(_: web.Application) -> None:
        # aiohttp waits for requests in flight before cleanup; a client's idle GET stream or a held
        # call would make every shutdown last the whole grace period.
        runtime.drain()

    async def close(_: web.Application) -> None:
        await channels.close()
        await close_parts()

    app.on_shutdown.append(drain)
    app.on_cleanup.append(close)
    return app


def _counting(metrics: Metrics, runtime: Runtime) -> Callable[[web.Application], AsyncIterator[None]]:
    """Metrics on: counted by the gate, the gateway and a follower of the change feed while the
    application runs."""

    async def counting(_: web.Application) -> AsyncIterator[None]:
        metrics.attach_sources(runtime.store, runtime.gateway, runtime.policies)
        runtime.gatekeeper.metrics = runtime.gateway.metrics = metrics
        timed = runtime.store if isinstance(runtime.store, SqliteStore | PostgresStore) else None
        if timed is not None:
            timed.on_write = metrics.store_write
        follower = asyncio.create_task(metrics.follow(runtime.feed), name="metrics")
        yield
        runtime.gatekeeper.metrics = runtime.gateway.metrics = None
        if timed is not None:
            timed.on_write = None
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    return counting


def _application(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[
            request_ids,  # first: every log line of a request, the other middlewares' too, has its id
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
    app.on_response_prepare.append(echo_request_id)
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


async def healthz(request: web.Request) -> web.Response:
    """Liveness plus what an operator needs at a glance (policy reload errors make it "degraded")."""
    gateway = request.app[GATEWAY]
    problems = request.app[GATE].health()
    body = {
        "status": "degraded" if problems else "ok",
        "sessions": len(gateway.sessions),
        "upstreams": sorted(gateway.settings.upstreams),
        **problems,
    }
    return web.json_response(body)
