"""Batch review in the inbox: several pending requests approved or denied together (stub)."""

from __future__ import annotations

from aiohttp import web


async def batch(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()
