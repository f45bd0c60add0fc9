"""DNS-rebinding defence: a request must name this gateway in `Host`, and in `Origin` when it has one.

A web page on an attacker's domain that resolves to 127.0.0.1 reaches a local gateway with the
attacker's host name in `Host` and `Origin`; refusing unknown names stops it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from approvals.config import ServerSettings

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hostnames(server: ServerSettings) -> frozenset[str]:
    """The host names requests may use: the public URL's, loopback, and any configured."""
    public = urlsplit(server.public_url).hostname or ""
    return LOOPBACK_NAMES | {public.lower()} | set(server.allowed_hosts)


def hostname(host_header: str) -> str:
    """`example.com:8080` → `example.com`; `[::1]:80` → `::1`."""
    return (urlsplit(f"//{host_header}").hostname or "").lower()


def origin_middleware(
    allowed: frozenset[str],
) -> Middleware:
    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        if hostname(request.host) not in allowed:
            return web.json_response({"error": f"Host {request.host!r} is not served here"}, status=421)
        origin = request.headers.get("Origin")
        if origin is not None and (urlsplit(origin).hostname or "").lower() not in allowed:
            return web.json_response({"error": f"Origin {origin!r} is not allowed"}, status=403)
        return await handler(request)

    return check_origin
