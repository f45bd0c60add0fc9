"""The inbox's pages: the pending list and its live feed, the detail page and decisions.

Every page but the login needs a session; every POST needs the session's CSRF token and an Origin
of this gateway. Decisions go through the service's `decide_and_remember` exactly as the JSON
API's do, with channel "web", and its refusals become pages with the API's statuses
(`api.refusal_status`): 404 unknown, 403 not this reviewer's to decide (own agent, outside the
rule's groups, wrong channel, an edit or grant the rule forbids), 400 an invalid edit or grant
(the form shown again as typed), 409 already decided (naming who decided) or already counted.

The detail page also shows why the call was held and how far its review has come, and offers,
when the rule allows and the reviewer may decide:

    POST …/approve  arguments=<JSON>           edit before approve
    POST …/approve  remember=preview|confirm   approve and remember (fields: inbox_review_forms)
    POST …/deny     remember=preview|confirm   deny and remember
    GET  /inbox/approvals/{id}?remember=approve|deny|form&…   the same confirmation page, or the
                                               page with the remember form filled in, as a link
    GET  /inbox/approvals/{id}?edit=1          the page with the editor open
    GET  /inbox/approvals/{id}?done=approved|denied|voted&grant=sg_…   the flash after a decision

What the page shows is built in inbox_review; the forms are read in inbox_review_forms.
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
from approvals.core.deciding import RememberRequest
from approvals.core.model import Approval
from approvals.core.ports import ApprovalStore
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused
from approvals.web import inbox_auth as auth
from approvals.web import inbox_format as fmt
from approvals.web import inbox_review
from approvals.web import inbox_review_forms as forms
from approvals.web.api import refusal_status
from approvals.web.inbox_auth import InboxAuth, Session
from approvals.web.inbox_review import Shown
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
        "summary": fmt.release_summary(approval),
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
        return _not_found(request, inbox)
    await inbox.views.note(approval, session.reviewer.name)
    query = request.query
    step = query.get("remember", "")
    if step in ("approve", "deny", "form"):  # a link to the remember form or its confirmation page
        typed = forms.read_form(query, "deny" if step == "deny" else "allow", *_remembered(approval))
        if step == "form":
            return await _detail_page(request, inbox, session, approval, remember=typed)
        page = await _remember_step(request, inbox, session, approval, typed, "preview")
        assert isinstance(page, web.Response)  # only "confirm" gives back the grant to save
        return page
    return await _detail_page(
        request,
        inbox,
        session,
        approval,
        done=query.get("done"),
        grant_id=query.get("grant", ""),
        edit_open=query.get("edit") == "1",
    )


def _not_found(request: web.Request, inbox: Inbox) -> web.Response:
    return inbox.error(request, 404, "Not found", "There is no approval with this id.")


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
        "progress": fmt.visible(inbox.service.review_state(approval).progress),
    }


def _remembered(approval: Approval) -> tuple[dict[str, Any], str]:
    """The arguments a decision now is about (after any edit), as an object, and their hash."""
    args = fmt.release_arguments(approval)
    return (args if isinstance(args, dict) else {}), approval.release_sha256


async def _detail_page(
    request: web.Request,
    inbox: Inbox,
    session: Session,
    approval: Approval,
    status: int = 200,
    **shown: Any,
) -> web.Response:
    """The detail page; `shown` are the fields of inbox_review.Shown (a flash, a form as typed)."""
    events = await inbox.store.audit_events(approval_id=approval.id, limit=1000)
    viewers: dict[str, float] = {}
    for event in events:
        if event.event == "viewed" and event.actor != session.reviewer.name:
            viewers[event.actor] = event.at
    context = await inbox_review.detail_context(inbox.service, approval, session.reviewer, Shown(**shown))
    return inbox.render(
        request,
        "detail.html",
        status,
        a=approval,
        item=await detail_item(inbox, approval),
        viewers=sorted(viewers.items(), key=lambda kv: -kv[1]),
        max_reason=MAX_REASON,
        live_url=f"/inbox/events?{urlencode({'id': approval.id})}",
        **context,
    )


async def _decide(
    request: web.Request, inbox: Inbox, session: Session, form: Form, approve: bool
) -> web.StreamResponse:
    approval = await inbox.store.get_approval(request.match_info["id"])
    if approval is None:
        return _not_found(request, inbox)
    reason = text_field(form, "reason")[:MAX_REASON] or None
    edit = form.get("arguments") if approve else None
    step = text_field(form, "remember")
    arguments: dict[str, Any] | None = None
    remember: RememberRequest | None = None
    typed: forms.RememberForm | None = None
    if isinstance(edit, str):  # edit before approve
        parsed = forms.parse_edit(edit)
        if isinstance(parsed, str):
            return await _detail_page(request, inbox, session, approval, status=400, edit_text=edit,
                                      edit_error=f"The arguments were not approved: {parsed}.")  # fmt: skip
        arguments = parsed
    elif step:  # approve (deny) and remember: the confirmation page first, then the grant
        typed = forms.read_form(form, "allow" if approve else "deny", *_remembered(approval))
        judged = await _remember_step(request, inbox, session, approval, typed, step)
        if isinstance(judged, web.Response):
            return judged
        remember, reason = judged.request, typed.reason or None
    elif not approve and reason is None:
        return await _detail_page(
            request, inbox, session, approval, status=400, error="Say why you deny it: the agent is told."
        )
    try:
        decided, grant = await inbox.service.decide_and_remember(
            approval.id, session.reviewer, approve=approve, reason=reason, channel="web",
            arguments=arguments, remember=remember,
            # The arguments the page (or the confirmed grant) showed: an edit since is refused.
            seen_sha256=(text_field(form, "seen_sha256") or None) if approve and typed is None
            else (typed.args_sha256 if typed is not None else None),
        )  # fmt: skip
    except DecisionRefused as exc:
        if refusal_status(exc) == 400 and isinstance(edit, str):
            return await _detail_page(request, inbox, session, approval, status=400, edit_text=edit,
                                      edit_error=f"The edit was refused: {exc}")  # fmt: skip
        if refusal_status(exc) == 400 and typed is not None:
            return await _detail_page(request, inbox, session, approval, status=400, remember=typed,
                                      remember_error=f"Not remembered: {exc}")  # fmt: skip
        return _refusal(request, inbox, exc)
    log.info("inbox: %s %s approval %s", session.reviewer.name, decided.status, decided.id)
    done = "denied" if not approve else "voted" if decided.status == "pending" else "approved"
    query = {"done": done, **({"grant": grant.id} if grant is not None else {})}
    return redirect(f"/inbox/approvals/{decided.id}?{urlencode(query)}")


async def _remember_step(
    request: web.Request,
    inbox: Inbox,
    session: Session,
    approval: Approval,
    typed: forms.RememberForm,
    step: str,
) -> web.Response | forms.Remember:
    """The remember form judged: the page to answer with (an error, or the confirmation page when
    `step` is not "confirm"), or the grant to save."""
    args, sha = _remembered(approval)
    refusal = inbox.service.refusal_for(approval, session.reviewer, "web")
    if refusal is None and not inbox.service.review_state(approval).may_remember:
        refusal = "this call's rule does not allow standing grants"
    if approval.status != "pending" or refusal is not None:
        # The service says the same on a POST; before one, the reviewer learns it at once.
        status = 409 if approval.status != "pending" else 403
        message = (
            f"{refusal.rstrip('.')}."
            if refusal
            else f"This request is {approval.status}: nothing to remember."
        )
        return inbox.error(request, status, "Cannot remember this decision", message, approval_id=approval.id)
    if typed.args_sha256 != sha:
        message = "The arguments changed since this form was shown (a reviewer edited them). Look again."
        return inbox.error(request, 409, "The arguments changed", message, approval_id=approval.id)
    judged = forms.judge(typed, args)
    if isinstance(judged, str):
        return await _detail_page(request, inbox, session, approval, status=400, remember=typed,
                                  remember_error=f"Not remembered yet: {judged}.")  # fmt: skip
    if step == "confirm":
        return judged
    return inbox.render(
        request,
        "remember_confirm.html",
        a=approval,
        item=list_item(approval, inbox.now()),
        **inbox_review.confirm_context(approval, judged, inbox.now()),
    )


def _refusal(request: web.Request, inbox: Inbox, exc: DecisionRefused) -> web.Response:
    approval = exc.approval
    status = refusal_status(exc)
    if status == 404:
        return _not_found(request, inbox)
    if exc.kind in ("already_decided", "expired") and approval is not None:
        item = list_item(approval, inbox.now())
        via = render.channel_name(approval.decided_via)
        verb = render.decided(approval.status)
        return inbox.render(request, "conflict.html", 409, a=approval, item=item, via=via, verb=verb)
    mine = exc.kind in ("own_agent", "not_reviewer", "not_eligible", "step_up")
    titles = {"already_voted": "Already counted", "changed": "The arguments changed"}
    title = "Not yours to decide" if mine else titles.get(exc.kind, "Refused")
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
