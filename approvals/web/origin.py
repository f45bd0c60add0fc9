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
    # Never "": that is what a Host or Origin that names no host parses to.
    return (LOOPBACK_NAMES | {public.lower()} | set(server.allowed_hosts)) - {""}


def hostname(host_header: str) -> str:
    """`example.com:8080` → `example.com`; `[::1]:80` → `::1`; "" when it names no host."""
    return url_hostname(f"//{host_header}")


def url_hostname(url: str) -> str:
    """The lower-case host name of a URL, or "" when it has none or cannot be parsed."""
    try:
        # urlsplit refuses an unclosed `[` and characters NFKC folds into `/`, `?`, `#` or `@`
        # (a full-width solidus, U+FF0F): such a name matches nothing we serve.
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def origin_middleware(
    allowed: frozenset[str],
) -> Middleware:
    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        if hostname(request.host) not in allowed:
            return web.json_response({"error": f"Host {request.host!r} is not served here"}, status=421)
        origin = request.headers.get("Origin")
        if origin is not None and url_hostname(origin) not in allowed:
            return web.json_response({"error": f"Origin {origin!r} is not allowed"}, status=403)
        return await handler(request)

    return check_origin
