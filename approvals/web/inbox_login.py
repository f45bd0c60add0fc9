"""Logging in and out of the inbox: the token form, one-time links, logout.

Login and link forms carry a CSRF token tied to a pre-login cookie (so a hostile site cannot log a
reviewer in under its own account), and their Origin must be the gateway's. A login always starts
a new session; logout ends it on every replica and clears the cookie.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from aiohttp import web

from approvals.config import Principal
from approvals.web import inbox_auth as auth
from approvals.web.inbox_auth import Session
from approvals.web.inbox_views import INBOX, SESSION_KEY, Form, Inbox, redirect, reviewer_only, text_field

log = logging.getLogger(__name__)


def safe_next(target: str | None) -> str:
    """Where to go after login: a path inside the inbox, never another site."""
    if not target or "\\" in target or any(ord(c) < 0x20 for c in target):
        return "/inbox"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not (parts.path == "/inbox" or parts.path.startswith("/inbox/")):
        return "/inbox"
    if parts.path.startswith("/inbox/login") or "//" in parts.path:
        return "/inbox"
    return parts.path + (f"?{parts.query}" if parts.query else "")


# ---- login and logout ------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.Response:
    inbox = request.app[INBOX]
    return _login_form(request, inbox, request.query.get("next"))


def _login_form(
    request: web.Request, inbox: Inbox, target: str | None, status: int = 200, error: str = ""
) -> web.Response:
    nonce, token = inbox.auth.login_form(request.cookies.get(auth.LOGIN_COOKIE), inbox.now())
    response = inbox.render(
        request, "login.html", status, login_csrf=token, next=safe_next(target), error=error
    )
    auth.set_login_cookie(response, nonce, inbox.secure(request))
    return response


async def login(request: web.Request) -> web.StreamResponse:
    inbox = request.app[INBOX]
    if not auth.origin_allowed(request, inbox.settings.server.public_url):
        return inbox.error(request, 403, "Refused", "This request did not come from the inbox's own pages.")
    form = await auth.read_form(request)
    target = text_field(form, "next")
    csrf = form.get("csrf")
    now = inbox.now()
    if not inbox.auth.login_csrf_ok(
        request.cookies.get(auth.LOGIN_COOKIE), csrf if isinstance(csrf, str) else None, now
    ):
        return _login_form(request, inbox, target, 403, "The login form expired. Please try again.")
    if (unavailable := _sessions_unknown(request, inbox)) is not None:
        return unavailable
    token = text_field(form, "token")
    reviewer = inbox.reviewers.find(token)
    if reviewer is None:
        if inbox.grants.find(token) is not None:
            return _login_form(
                request, inbox, target, 403, "That token belongs to an agent (a grant), not a reviewer."
            )
        return _login_form(request, inbox, target, 401, "Unknown token. Use your reviewer token.")
    return await _logged_in(request, inbox, reviewer, target)


def _sessions_unknown(request: web.Request, inbox: Inbox) -> web.Response | None:
    """A 503 while logouts on other replicas cannot be known (every session is refused meanwhile,
    so a new cookie would only lead back here); None when logging in can go on."""
    if inbox.auth.state.fresh:
        return None
    return inbox.error(
        request,
        503,
        "Inbox unavailable",
        "The inbox cannot reach its database to check sessions. Try again in a moment.",
    )


async def _logged_in(
    request: web.Request, inbox: Inbox, reviewer: Principal, target: str | None
) -> web.StreamResponse:
    now = inbox.now()
    # A login always starts a new session (a new id and CSRF token); the one before it ends.
    if (old := inbox.auth.session(request.cookies.get(auth.SESSION_COOKIE), now)) is not None:
        await inbox.auth.revoke(old)
    session, cookie = inbox.auth.new_session(reviewer, now)
    log.info("inbox: %s logged in", reviewer.name)
    response = redirect(safe_next(target))
    secure = inbox.secure(request)
    auth.set_session_cookie(response, cookie, inbox.auth.idle_seconds, secure)
    auth.clear_cookie(response, auth.LOGIN_COOKIE, secure)
    request[SESSION_KEY] = session
    return response


async def link_page(request: web.Request) -> web.Response:
    """A one-time login link lands on a confirmation page (link previews must not use it up)."""
    inbox = request.app[INBOX]
    token = request.query.get("t")
    reviewer = await inbox.auth.link_reviewer(token, inbox.now())
    if reviewer is None:
        return inbox.error(
            request,
            403,
            "Link not valid",
            "This login link has expired or was already used. "
            "Ask for a new one (approvals login-link) or log in with your token.",
        )
    nonce, csrf = inbox.auth.login_form(request.cookies.get(auth.LOGIN_COOKIE), inbox.now())
    response = inbox.render(
        request, "login_link.html", link=token, login_csrf=csrf, link_reviewer=reviewer.name
    )
    auth.set_login_cookie(response, nonce, inbox.secure(request))
    return response


async def link_login(request: web.Request) -> web.StreamResponse:
    inbox = request.app[INBOX]
    if not auth.origin_allowed(request, inbox.settings.server.public_url):
        return inbox.error(request, 403, "Refused", "This request did not come from the inbox's own pages.")
    form = await auth.read_form(request)
    csrf, now = form.get("csrf"), inbox.now()
    if not inbox.auth.login_csrf_ok(
        request.cookies.get(auth.LOGIN_COOKIE), csrf if isinstance(csrf, str) else None, now
    ):
        return inbox.error(request, 403, "Refused", "The form expired. Open the link again.")
    if (unavailable := _sessions_unknown(request, inbox)) is not None:
        return unavailable  # before the link is used up: it still works once the inbox is back
    reviewer = await inbox.auth.use_link(text_field(form, "link"), now)
    if reviewer is None:
        return inbox.error(request, 403, "Link not valid", "This login link has expired or was already used.")
    return await _logged_in(request, inbox, reviewer, "/inbox")


async def _logout(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    await inbox.auth.revoke(session)
    response = redirect("/inbox/login")
    auth.clear_cookie(response, auth.SESSION_COOKIE, inbox.secure(request))
    return response


logout = reviewer_only(_logout)
