"""Shared parts for the inbox tests: a reviewer's browser-less session (cookies, CSRF, Origin)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from tests.approvals_kit import Held

CSRF = re.compile(r'name="csrf" value="([^"]*)"')
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on a page."""
    found = CSRF.search(page)
    assert found is not None, page[:2000]
    return html.unescape(found.group(1))


@dataclass
class Page:
    status: int
    text: str
    headers: Any
    cookies: list[str] = field(default_factory=list)


@dataclass
class Reviewer:
    """An aiohttp client with its own cookie jar, speaking to the inbox as a browser would."""

    base: str
    http: aiohttp.ClientSession

    @property
    def origin(self) -> str:
        return self.base

    def session_cookie(self) -> str:
        """The value of the session cookie in this reviewer's jar."""
        return self.http.cookie_jar.filter_cookies(URL(f"{self.base}/inbox"))["approvals_session"].value

    async def get(self, path: str, **options: Any) -> Page:
        async with self.http.get(f"{self.base}{path}", allow_redirects=False, **options) as response:
            return Page(
                response.status,
                await response.text(),
                response.headers,
                response.headers.getall("Set-Cookie", []),
            )

    async def post(self, path: str, data: dict[str, str], origin: str | None = "", **options: Any) -> Page:
        """POST a form; `origin` "" means this gateway's own origin, None sends no Origin header."""
        headers = dict(options.pop("headers", {}))
        if origin is not None:
            headers["Origin"] = origin or self.origin
        async with self.http.post(
            f"{self.base}{path}", data=data, headers=headers, allow_redirects=False, **options
        ) as response:
            return Page(
                response.status,
                await response.text(),
                response.headers,
                response.headers.getall("Set-Cookie", []),
            )

    async def login(self, token: str, next_path: str = "") -> Page:
        form = await self.get("/inbox/login")
        data = {"csrf": csrf_of(form.text), "token": token, "next": next_path}
        return await self.post("/inbox/login", data)

    async def csrf(self) -> str:
        """The session's CSRF token, as the pages carry it."""
        page = await self.get("/inbox/history")
        assert page.status == 200, page.status
        return csrf_of(page.text)

    async def decide(self, approval_id: str, verdict: str, reason: str = "", csrf: str | None = None) -> Page:
        token = await self.csrf() if csrf is None else csrf
        data = {"csrf": token, **({"reason": reason} if reason else {})}
        return await self.post(f"/inbox/approvals/{approval_id}/{verdict}", data)


def reviewer_client(held: Held) -> tuple[aiohttp.ClientSession, str]:
    """A client session whose cookie jar accepts the gateway's 127.0.0.1 cookies."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)), held.gateway.base
