"""Standing grants in the inbox: listed, revoked, exported as a policy rule (stub)."""

from __future__ import annotations

from aiohttp import web


async def grants_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()


async def revoke(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()


async def export(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()
