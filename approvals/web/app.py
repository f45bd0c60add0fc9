"""The application factory: one `web.Application` with every route, its resources on `cleanup_ctx`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.channels import slack
from approvals.config import Settings
from approvals.gatekeeper import Gatekeeper
from approvals.proxy.gate import Gate
from approvals.proxy.gateway import Gateway
from approvals.proxy.handlers import add_routes
from approvals.store.sqlite import SqliteStore
from approvals.web import api, inbox
from approvals.web.keys import GATEKEEPER, GATEWAY, GRANTS, SETTINGS
from approvals.web.origin import allowed_hostnames, origin_middleware


def create_app(settings: Settings, gate: Gate | None = None) -> web.Application:
    """Build the gateway application for `settings`; the gate defaults to its policies and limits.

    Raises ConfigError when a policy file is invalid, before anything starts.
    """
    app = web.Application(
        middlewares=[origin_middleware(allowed_hostnames(settings.server)), api.store_errors],
        # aiohttp's own limit; the MCP handler checks first to answer with a JSON-RPC error.
        client_max_size=settings.server.max_body_bytes,
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
