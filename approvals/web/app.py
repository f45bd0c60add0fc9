"""The application factory: one `web.Application` with every route, its resources on `cleanup_ctx`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.proxy.gate import AllowAll, Gate
from approvals.proxy.gateway import Gateway
from approvals.proxy.handlers import add_routes
from approvals.web.keys import GATEWAY, GRANTS, SETTINGS
from approvals.web.origin import allowed_hostnames, origin_middleware


def create_app(settings: Settings, gate: Gate | None = None) -> web.Application:
    """Build the gateway application for `settings`."""
    app = web.Application(
        middlewares=[origin_middleware(allowed_hostnames(settings.server))],
        # aiohttp's own limit; the MCP handler checks first to answer with a JSON-RPC error.
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[GRANTS] = TokenIndex(settings.grants)
    app[GATEWAY] = Gateway(settings, gate or AllowAll())
    app.cleanup_ctx.append(_gateway_lifetime)
    add_routes(app)
    app.router.add_get("/healthz", healthz)
    return app


async def _gateway_lifetime(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.close()


async def healthz(request: web.Request) -> web.Response:
    """Liveness plus what an operator needs at a glance."""
    gateway = request.app[GATEWAY]
    return web.json_response(
        {"status": "ok", "sessions": len(gateway.sessions), "upstreams": sorted(gateway.settings.upstreams)}
    )
