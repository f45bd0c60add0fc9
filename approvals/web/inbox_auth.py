"""Inbox logins: signed session cookies, CSRF tokens, Origin checks and one-time login links.

A session is a cookie the gateway signs (HMAC-SHA256) holding a random session id, the reviewer's
name, a fingerprint of the reviewer's token, the login time and an idle expiry. Nothing about a
session is stored server-side except the ids of sessions logged out early, which every replica
shares through the store (:mod:`approvals.web.inbox_state`), so:

- a cookie is good on every replica that has the same key: `APPROVALS_SESSION_SECRET`, or the key
  replicas sharing a database keep in it; one process without the variable uses a random key, and
  its sessions end when it does;
- a session ends after `[inbox] session_hours` without a request (each request slides the expiry),
  24 hours after login at the latest (or session_hours, if longer), when the reviewer leaves the
  config or their token changes, and at logout — on every replica (within a second on the others);
- a one-time login link is used up in the store, so it works once whichever replica sees it, and a
  restart does not make it good again.

CSRF tokens are synchronizer tokens derived from the session id (HMAC), so every form of every tab
carries the same token for the life of the session and a new login gets a new one. The login form
itself is protected by a random pre-login cookie and a token derived from it.

Pure apart from the shared state, whose calls are awaited, and the clock passed in: `now` is an
argument everywhere.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from multidict import MultiDict

from approvals.config import Principal
from approvals.store.memory import MemoryStore
from approvals.web.inbox_state import InboxState

SESSION_COOKIE = "approvals_session"
LOGIN_COOKIE = "approvals_login"
COOKIE_PATH = "/inbox"
MIN_ABSOLUTE_SECONDS = 24 * 3600.0
REFRESH_AFTER_SECONDS = 60.0  # re-issue the sliding cookie at most once a minute
LOGIN_FORM_SECONDS = 3600.0
LINK_SECONDS = 600.0  # a one-time login link is good for ten minutes


def _same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a token from a request with the ASCII token we made."""
    # compare_digest refuses non-ASCII str, and such a token cannot be ours anyway.
    return given is not None and given.isascii() and hmac.compare_digest(given, expected)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs small JSON payloads for one purpose each, so a token of one kind is never another."""

    def __init__(self, secret: str | None) -> None:
        # No secret configured: a random key, so every session ends with the process.
        self._key = secret.encode() if secret is not None else secrets.token_bytes(32)

    def mac(self, purpose: str, message: str) -> str:
        digest = hmac.new(self._key, f"{purpose}\x00{message}".encode(), hashlib.sha256).digest()
        return _b64(digest)

    def sign(self, purpose: str, payload: dict[str, object]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self.mac(purpose, body)}"

    def verify(self, purpose: str, token: str | None) -> dict[str, object] | None:
        """The payload of a token this signer made for `purpose`, or None."""
        # Every token this signer makes is ASCII; anything else (a cookie of latin-1 bytes, which
        # aiohttp keeps as lone surrogates) is forged and could not even be hashed.
        if not token or len(token) > 4096 or not token.isascii():
            return None
        body, _, mac = token.partition(".")
        if not hmac.compare_digest(mac.encode(), self.mac(purpose, body).encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (ValueError, binascii.Error):
            return None
        return payload if isinstance(payload, dict) else None


@dataclass(frozen=True, slots=True)
class Session:
    """A reviewer logged in to the inbox."""

    sid: str
    reviewer: Principal
    issued_at: float
    expires_at: float
    csrf: str


class InboxAuth:
    """Issues and checks session cookies, CSRF tokens and login links for the configured reviewers."""

    def __init__(
        self,
        reviewers: Iterable[Principal],
        secret: str | None,
        session_hours: float,
        state: InboxState | None = None,
    ) -> None:
        """`state` is what replicas share; without one (minting a link in the CLI, a unit test),
        logouts and used links are remembered by this object alone."""
        self.signer = Signer(secret)
        self.reviewers = {r.name: r for r in reviewers if r.token_sha256}
        self.idle_seconds = session_hours * 3600.0
        self.absolute_seconds = max(MIN_ABSOLUTE_SECONDS, self.idle_seconds)
        self.state = state if state is not None else InboxState(MemoryStore())

    # ---- sessions --------------------------------------------------------------------------

    def _token_print(self, reviewer: Principal) -> str:
        # Ties the session to the token it was opened with: a changed token ends old sessions.
        return self.signer.mac("token", reviewer.token_sha256)[:22]

    def new_session(self, reviewer: Principal, now: float) -> tuple[Session, str]:
        """A fresh session (new random id) and its cookie value."""
        sid = secrets.token_urlsafe(24)
        return self._issue(sid, reviewer, issued_at=now, now=now)

    def _issue(self, sid: str, reviewer: Principal, *, issued_at: float, now: float) -> tuple[Session, str]:
        expires = min(now + self.idle_seconds, issued_at + self.absolute_seconds)
        payload: dict[str, object] = {
            "sid": sid,
            "rev": reviewer.name,
            "tok": self._token_print(reviewer),
            "iat": issued_at,
            "exp": expires,
        }
        session = Session(sid, reviewer, issued_at, expires, self.signer.mac("csrf", sid))
        return session, self.signer.sign("session", payload)

    def session(self, cookie: str | None, now: float) -> Session | None:
        """The live session a cookie value names, or None (forged, expired, revoked, reviewer gone)."""
        payload = self.signer.verify("session", cookie)
        if payload is None:
            return None
        sid, name, tok = payload.get("sid"), payload.get("rev"), payload.get("tok")
        issued, expires = payload.get("iat"), payload.get("exp")
        if not (isinstance(sid, str) and isinstance(name, str) and isinstance(tok, str)):
            return None
        if not (isinstance(issued, int | float) and isinstance(expires, int | float)):
            return None
        reviewer = self.reviewers.get(name)
        if reviewer is None or not hmac.compare_digest(tok, self._token_print(reviewer)):
            return None
        if now >= expires or now >= issued + self.absolute_seconds or self.state.session_ended(sid):
            return None
        return Session(sid, reviewer, float(issued), float(expires), self.signer.mac("csrf", sid))

    def refresh(self, session: Session, now: float) -> str | None:
        """A new cookie value sliding the idle expiry, when one is due (at most once a minute)."""
        if session.expires_at - now > self.idle_seconds - REFRESH_AFTER_SECONDS:
            return None
        return self._issue(session.sid, session.reviewer, issued_at=session.issued_at, now=now)[1]

    async def revoke(self, session: Session) -> None:
        """Log out: this session id is refused from now on, on every replica.

        Remembered until the latest moment any cookie of the session could expire (a copy slid by
        a later request than the one logging out included), not only this cookie's expiry.
        """
        await self.state.end_session(session.sid, session.issued_at + self.absolute_seconds)

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return _same_token(token, session.csrf)

    # ---- the login form --------------------------------------------------------------------

    def login_form(self, nonce: str | None, now: float) -> tuple[str, str]:
        """(pre-login cookie value, the form's CSRF token); the cookie is reused while it is valid."""
        if nonce is None or self.signer.verify("prelogin", nonce) is None:
            fresh: dict[str, object] = {"n": secrets.token_urlsafe(16), "exp": now + LOGIN_FORM_SECONDS}
            nonce = self.signer.sign("prelogin", fresh)
        return nonce, self.signer.mac("login-csrf", nonce)

    def login_csrf_ok(self, nonce: str | None, token: str | None, now: float) -> bool:
        payload = self.signer.verify("prelogin", nonce)
        if payload is None or token is None or nonce is None:
            return False
        expires = payload.get("exp")
        if not isinstance(expires, int | float) or now >= expires:
            return False
        return _same_token(token, self.signer.mac("login-csrf", nonce))

    # ---- one-time login links --------------------------------------------------------------

    def mint_link(self, reviewer: Principal, now: float) -> str:
        """A login link token for `reviewer`, good once, for ten minutes (made by `approvals login-link`)."""
        payload: dict[str, object] = {
            "rev": reviewer.name,
            "tok": self._token_print(reviewer),
            "n": secrets.token_urlsafe(16),
            "exp": now + LINK_SECONDS,
        }
        return self.signer.sign("link", payload)

    def _link(self, token: str | None, now: float) -> tuple[Principal, str, float] | None:
        payload = self.signer.verify("link", token)
        if payload is None:
            return None
        name, tok, nonce, expires = (payload.get(k) for k in ("rev", "tok", "n", "exp"))
        if not (isinstance(name, str) and isinstance(tok, str) and isinstance(nonce, str)):
            return None
        reviewer = self.reviewers.get(name)
        if reviewer is None or not hmac.compare_digest(tok, self._token_print(reviewer)):
            return None
        if not isinstance(expires, int | float) or now >= expires:
            return None
        return reviewer, nonce, float(expires)

    async def link_reviewer(self, token: str | None, now: float) -> Principal | None:
        """The reviewer a login link is for, while it is valid and unused (does not use it up)."""
        found = self._link(token, now)
        if found is None or await self.state.login_link_used(found[1]):
            return None
        return found[0]

    async def use_link(self, token: str | None, now: float) -> Principal | None:
        """Redeem a login link: its reviewer, once on any replica; None when invalid, expired or used.

        The signature is checked first, so only links this gateway made ever reach the store.
        """
        found = self._link(token, now)
        if found is None:
            return None
        reviewer, nonce, expires = found
        return reviewer if await self.state.use_login_link(nonce, expires) else None


# ---- the request's side ------------------------------------------------------------------------


def served_over_https(request: web.Request, public_url: str) -> bool:
    """Whether cookies must be `Secure`: public URL https, a TLS request, or a proxy saying https."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return public_url.lower().startswith("https://") or request.secure or forwarded == "https"


def _origin(scheme: str, host: str) -> str:
    """scheme://host[:port] in normal form (lower case, default port dropped)."""
    try:
        # urlsplit refuses an unclosed `[` and NFKC-folding characters; .port a bad port.
        parts = urlsplit(f"{scheme.lower()}://{host}")
        port = parts.port
    except ValueError:
        return ""
    name = parts.hostname or ""
    if ":" in name:
        name = f"[{name}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{name}" + ("" if port in (None, default) else f":{port}")


def origin_allowed(request: web.Request, public_url: str) -> bool:
    """A state-changing request must come from a page of this gateway.

    Its `Origin` must be the public URL's origin or the request's own (scheme and Host); a request
    without one (or with `null`) is refused.
    """
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc:
        return False
    given = _origin(parts.scheme, parts.netloc)
    public = urlsplit(public_url)
    allowed = {_origin(public.scheme, public.netloc), _origin(request.scheme, request.host)}
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if forwarded in ("http", "https"):
        allowed.add(_origin(forwarded, request.host))
    return bool(given) and given in allowed


FORM_TYPE = "application/x-www-form-urlencoded"
# The largest inbox form: a batch of 200 ids (inbox_batch.MAX_BATCH), or a remember form's
# widening of up to 64 arguments; with room to count a batch that is too large and say by how much.
MAX_FORM_FIELDS = 410


def _form_refused(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=f"{message}\n", content_type="text/plain")


def _is_utf8_charset(charset: str) -> bool:
    try:
        return codecs.lookup(charset).name == "utf-8"
    except LookupError:
        return False


async def read_form(request: web.Request) -> MultiDict[str]:
    """The fields of an inbox form POST, or an HTTP 4xx naming what is wrong with the body.

    The inbox's forms are URL-encoded UTF-8, as browsers send them; anything else (a multipart
    body, another or unknown charset, bytes that are not UTF-8) is refused rather than guessed at.
    """
    if not request.body_exists:
        return MultiDict()
    if request.content_type != FORM_TYPE:
        raise _form_refused(
            web.HTTPUnsupportedMediaType,
            f"an inbox form must be sent as {FORM_TYPE}, not {request.content_type!r}",
        )
    if request.charset is not None and not _is_utf8_charset(request.charset):
        raise _form_refused(
            web.HTTPUnsupportedMediaType, f"an inbox form must be UTF-8, not charset {request.charset!r}"
        )
    body = await request.read()
    try:
        fields = parse_qsl(
            body.decode(), keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS
        )
    except UnicodeDecodeError:
        raise _form_refused(web.HTTPBadRequest, "the form is not valid UTF-8") from None
    except ValueError:
        raise _form_refused(web.HTTPBadRequest, f"the form has more than {MAX_FORM_FIELDS} fields") from None
    return MultiDict(fields)


def set_session_cookie(response: web.StreamResponse, value: str, max_age: float, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=int(max_age),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def set_login_cookie(response: web.StreamResponse, value: str, secure: bool) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        value,
        max_age=int(LOGIN_FORM_SECONDS),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def clear_cookie(response: web.StreamResponse, name: str, secure: bool) -> None:
    response.del_cookie(name, path=COOKIE_PATH, secure=secure, httponly=True, samesite="Strict")
