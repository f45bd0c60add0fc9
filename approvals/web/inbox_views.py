"""The inbox's pages: the pending list and its live feed, the detail page and decisions.

Every page but the login needs a session; every POST needs the session's CSRF token and an Origin
of this gateway. Decisions go through `ApprovalQueue.decide` exactly as the JSON API's do, with
channel "web", and its refusals become pages: 404 unknown, 403 the reviewer's own agent, 409
already decided (naming who decided).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.core import render
from approvals.core.model import Approval
from approvals.core.ports import ApprovalStore
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused
from approvals.web import inbox_auth as auth
from approvals.web import inbox_format as fmt
from approvals.web.api import REFUSAL_STATUS
from approvals.web.inbox_auth import InboxAuth, Session
from approvals.web.inbox_viewed import ViewLog
from approvals.web.live import Filters, LiveFeed

log = logging.getLogger(__name__)

MAX_REASON = render.MAX_REASON_CHARS  # the form's maxlength stops typing at it; longer is cut
LIST_LIMIT = 200
COUNT_LIMIT = 500
SESSION_KEY = web.RequestKey("inbox_session", Session)
Form = MultiDictProxy[str | bytes | Any] | MultiDict[str]


@dataclass
class Inbox:
    """Everything the pages use, held on the app (no module globals)."""

    settings: Settings
    service: ApprovalService
    auth: InboxAuth
    feed: LiveFeed
    templates: jinja2.Environment
    reviewers: TokenIndex
    grants: TokenIndex
    views: ViewLog

    def now(self) -> float:
        return self.service.clock()

    @property
    def store(self) -> ApprovalStore:
        return self.service.store

    def secure(self, request: web.Request) -> bool:
        return auth.served_over_https(request, self.settings.server.public_url)

    def render(self, request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
        session: Session | None = request.get(SESSION_KEY)
        html = self.templates.get_template(name).render(
            reviewer=session.reviewer.name if session else None,
            csrf=session.csrf if session else "",
            path=request.path,
            **context,
        )
        # backslashreplace: a lone surrogate from JSON must not turn the page into a 500.
        return web.Response(
            body=html.encode("utf-8", "backslashreplace"),
            status=status,
            content_type="text/html",
            charset="utf-8",
        )

    def error(
        self, request: web.Request, status: int, title: str, message: str, **context: Any
    ) -> web.Response:
        return self.render(request, "error.html", status, title=title, message=message, **context)


INBOX = web.AppKey("inbox", Inbox)
View = Callable[[web.Request, Inbox, Session, Form], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reviewer_only(view: View) -> Handler:
    """Wrap a view: a live session, and for POST the CSRF token and an Origin of this gateway."""

    async def handler(request: web.Request) -> web.StreamResponse:
        inbox = request.app[INBOX]
        session = inbox.auth.session(request.cookies.get(auth.SESSION_COOKIE), inbox.now())
        form: Form = MultiDict()
        if session is None:
            if request.method == "GET" and not request.path.endswith((".csv", ".json", "/events")):
                target = request.path_qs
                return redirect(f"/inbox/login?{urlencode({'next': target})}")
            if request.method == "GET":
                raise web.HTTPUnauthorized(text="log in to the inbox first")
            return inbox.error(request, 403, "Not logged in", "Log in to the inbox to do that.")
        request[SESSION_KEY] = session
        if request.method == "POST":
            if not auth.origin_allowed(request, inbox.settings.server.public_url):
                return inbox.error(
                    request, 403, "Refused", "This request did not come from the inbox's own pages."
                )
            form = await auth.read_form(request)
            token = form.get("csrf")
            if not inbox.auth.csrf_ok(session, token if isinstance(token, str) else None):
                return inbox.error(
                    request,
                    403,
                    "Refused",
                    "The form's security token is missing or out of date. Reload the page and try again.",
                )
        response = await view(request, inbox, session, form)
        _slide(request, inbox, response)
        return response

    return handler


def _slide(request: web.Request, inbox: Inbox, response: web.StreamResponse) -> None:
    """Re-issue the session cookie with a later idle expiry (not on logout, nor on the event stream)."""
    if response.prepared or auth.SESSION_COOKIE in response.cookies:
        return
    session = inbox.auth.session(request.cookies.get(auth.SESSION_COOKIE), inbox.now())
    if session is not None and (cookie := inbox.auth.refresh(session, inbox.now())) is not None:
        auth.set_session_cookie(response, cookie, inbox.auth.idle_seconds, inbox.secure(request))


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST, the browser GETs the next page."""
    return web.Response(status=303, headers={"Location": location})


def text_field(form: Form, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


# ---- the pending list ------------------------------------------------------------------------


def list_filters(query: Mapping[str, str]) -> Filters:
    return Filters(
        upstream=query.get("upstream") or None,
        tool=query.get("tool") or None,
        agent=query.get("agent") or None,
    )


def list_item(approval: Approval, now: float) -> dict[str, Any]:
    """One approval as the list shows it (and as the live feed sends it, all plain text)."""
    return {
        "id": approval.id,
        "version": approval.version,
        "status": approval.status,
        "upstream": fmt.visible(approval.upstream),
        "tool": fmt.visible(approval.tool),
        "agent": fmt.visible(approval.grant),
        "owner": fmt.visible(approval.owner or ""),
        "summary": fmt.summary(fmt.arguments(approval)),
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "created_iso": fmt.iso(approval.created_at),
        "expires_iso": fmt.iso(approval.expires_at),
        "age": fmt.age(approval, now),
        "left": fmt.time_left(approval, now),
        "decided_by": fmt.visible(approval.decided_by or ""),
        "outcome": fmt.outcome(approval),
    }


async def _pending(inbox: Inbox, filters: Filters) -> tuple[list[Approval], int]:
    found = await inbox.store.list_approvals(
        status="pending",
        upstream=filters.upstream,
        tool=filters.tool,
        grant=filters.agent,
        limit=COUNT_LIMIT + 1,
    )
    return found[:LIST_LIMIT], len(found)


async def _pending_page(
    request: web.Request, inbox: Inbox, session: Session, form: Form
) -> web.StreamResponse:
    filters = list_filters(request.query)
    approvals, count = await _pending(inbox, filters)
    now = inbox.now()
    given = {"upstream": filters.upstream, "tool": filters.tool, "agent": filters.agent}
    query = {k: v for k, v in given.items() if v}
    return inbox.render(
        request,
        "pending.html",
        items=[list_item(a, now) for a in approvals],
        count=count,
        count_text=f"{COUNT_LIMIT}+" if count > COUNT_LIMIT else str(count),
        shown=len(approvals),
        filters=filters,
        upstreams=sorted(inbox.settings.upstreams),
        agents=sorted(g.name for g in inbox.settings.grants),
        tools=sorted({a.tool for a in approvals}),
        live_url="/inbox/events" + (f"?{urlencode(query)}" if query else ""),
    )


pending_page = reviewer_only(_pending_page)


async def _events(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    filters = list_filters(request.query)
    if approval_id := request.query.get("id"):
        filters = Filters(approval_id=approval_id)

    async def item(approval: Approval) -> dict[str, Any]:
        # One approval's page gets all it shows in each event, so every panel moves together.
        if filters.approval_id is not None:
            return await detail_item(inbox, approval)
        return list_item(approval, inbox.now())

    async def snapshot() -> dict[str, Any]:
        now = inbox.now()
        if filters.approval_id is not None:
            one = await inbox.store.get_approval(filters.approval_id)
            return {"items": [await item(one)] if one else [], "count": 1 if one else 0}
        approvals, count = await _pending(inbox, filters)
        return {"items": [list_item(a, now) for a in approvals], "count": count}

    return await inbox.feed.stream(request, filters, snapshot, item, security_headers(request))


events = reviewer_only(_events)


# ---- the detail page and decisions -----------------------------------------------------------


async def _detail(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    approval = await inbox.store.get_approval(request.match_info["id"])
    if approval is None:
        return inbox.error(request, 404, "Not found", "There is no approval with this id.")
    await inbox.views.note(approval, session.reviewer.name)
    return await _detail_page(request, inbox, session, approval, done=request.query.get("done"))


async def detail_item(inbox: Inbox, approval: Approval) -> dict[str, Any]:
    """What the detail page shows that changes as the approval moves (its page and its live events)."""
    events = await inbox.store.audit_events(approval_id=approval.id, limit=1000)
    return {
        **list_item(approval, inbox.now()),
        "decision": fmt.decision_text(approval),
        "reason": fmt.visible(approval.reason or ""),
        "args_note": fmt.args_note(approval.status),
        "result": fmt.result_view(approval),
        "timeline": fmt.timeline(events),
    }


async def _detail_page(
    request: web.Request,
    inbox: Inbox,
    session: Session,
    approval: Approval,
    *,
    status: int = 200,
    done: str | None = None,
    error: str = "",
    reason: str = "",
) -> web.Response:
    events = await inbox.store.audit_events(approval_id=approval.id, limit=1000)
    viewers: dict[str, float] = {}
    for event in events:
        if event.event == "viewed" and event.actor != session.reviewer.name:
            viewers[event.actor] = event.at
    title, description, schema = fmt.tool_definition(approval)
    args = fmt.arguments(approval)
    return inbox.render(
        request,
        "detail.html",
        status,
        a=approval,
        item=await detail_item(inbox, approval),
        arguments=args,
        hidden=fmt.count_hidden(args),
        tool_title=title,
        description=description,
        schema=fmt.pretty_json(schema) if schema is not None else "",
        viewers=sorted(viewers.items(), key=lambda kv: -kv[1]),
        own_agent=approval.owner == session.reviewer.name,
        done=_done(done, approval, session),
        error=error,
        reason=reason,
        max_reason=MAX_REASON,
        live_url=f"/inbox/events?{urlencode({'id': approval.id})}",
    )


def _done(done: str | None, approval: Approval, session: Session) -> str:
    """The flash after this reviewer's own decision ("approved" / "denied"), else ""."""
    decision = "denied" if approval.status == "denied" else "approved"
    mine = approval.decided_by == session.reviewer.name
    return decision if mine and done in ("approved", "denied") and done == decision else ""


async def _decide(
    request: web.Request, inbox: Inbox, session: Session, form: Form, approve: bool
) -> web.StreamResponse:
    approval_id = request.match_info["id"]
    reason = text_field(form, "reason")[:MAX_REASON] or None
    if not approve and reason is None:
        approval = await inbox.store.get_approval(approval_id)
        if approval is None:
            return inbox.error(request, 404, "Not found", "There is no approval with this id.")
        return await _detail_page(
            request, inbox, session, approval, status=400, error="Say why you deny it: the agent is told."
        )
    try:
        decided = await inbox.service.decide(
            approval_id, session.reviewer, approve=approve, reason=reason, channel="web"
        )
    except DecisionRefused as exc:
        return _refusal(request, inbox, exc)
    log.info("inbox: %s %s approval %s", session.reviewer.name, decided.status, decided.id)
    return redirect(f"/inbox/approvals/{decided.id}?done={decided.status}")


def _refusal(request: web.Request, inbox: Inbox, exc: DecisionRefused) -> web.Response:
    approval = exc.approval
    status = REFUSAL_STATUS[exc.kind]
    if status == 404:
        return inbox.error(request, 404, "Not found", "There is no approval with this id.")
    if status == 409 and approval is not None:
        item = list_item(approval, inbox.now())
        via = render.channel_name(approval.decided_via)
        verb = render.decided(approval.status)
        return inbox.render(request, "conflict.html", 409, a=approval, item=item, via=via, verb=verb)
    title = "Not yours to decide" if status == 403 else "Refused"
    return inbox.error(request, status, title, str(exc), approval_id=approval.id if approval else None)


async def _approve(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    return await _decide(request, inbox, session, form, True)


async def _deny(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    return await _decide(request, inbox, session, form, False)


detail = reviewer_only(_detail)
approve = reviewer_only(_approve)
deny = reviewer_only(_deny)


# ---- headers ---------------------------------------------------------------------------------

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def security_headers(request: web.Request) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        # same-origin, not no-referrer: with no-referrer, browsers send `Origin: null` on form posts.
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    if not request.path.startswith("/inbox/static/"):
        headers["Cache-Control"] = "no-store"  # approvals never linger in caches or the back button
    return headers


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers on every /inbox response (errors, redirects and static files included)."""
    if request.path != "/inbox" and not request.path.startswith("/inbox/"):
        return
    for name, value in security_headers(request).items():
        response.headers.setdefault(name, value)
