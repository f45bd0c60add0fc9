"""The inbox's pending list: filters, a checkbox per request for batch review, each review at a glance.

    GET /inbox                  pending approvals, newest first; ?upstream=&tool=&agent=
    GET /inbox/pending/events   the list's live feed (server-sent events), same filters

Each row shows, besides the call, where its review stands: the quorum's progress ("1 of 2
approvals, waiting for someone in security"), whether it was escalated and to whom, and — when
this reviewer may only look (`ApprovalService.refusal_for`) — a read-only marker whose checkbox is
disabled, with the reason as its title. The live feed sends rows in the same shape, computed for
the reviewer who opened the page, so a row turns read-only the moment (say) their vote is counted.
The batch form posts to /inbox/batch (`inbox_batch`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from approvals.config import Principal
from approvals.core.model import Approval
from approvals.web import inbox_batch
from approvals.web.inbox_auth import Session
from approvals.web.inbox_views import (
    MAX_REASON,
    Form,
    Inbox,
    list_filters,
    list_item,
    reviewer_only,
    security_headers,
)
from approvals.web.live import Filters

LIST_LIMIT = inbox_batch.MAX_BATCH  # "select all shown" never selects more than one batch may hold
COUNT_LIMIT = 500
EVENTS_PATH = "/inbox/pending/events"


def glance(inbox: Inbox, approval: Approval, reviewer: Principal) -> dict[str, Any]:
    """What the row adds to `list_item`: the review's progress, escalation and this reviewer's say.

    `read_only` is why this reviewer may not decide it here ("" when they may); a row whose review
    cannot be worked out is read-only too (fail closed: the server would refuse it anyway).
    """
    service = inbox.service
    try:
        state = service.review_state(approval)
        refusal = service.refusal_for(approval, reviewer, "web")
    except (ValueError, KeyError, TypeError):  # a stored review rule or vote list that does not parse
        return {"progress": "", "escalated": "", "read_only": "its review rule cannot be read"}
    escalated = ", ".join(state.escalated_to)
    return {
        "progress": state.progress,
        "escalated": f"escalated to {escalated}" if escalated else "",
        "read_only": refusal or "",
    }


def row(inbox: Inbox, approval: Approval, reviewer: Principal) -> dict[str, Any]:
    """One pending approval as the list shows it and its live feed sends it (all plain text)."""
    return {**list_item(approval, inbox.now()), **glance(inbox, approval, reviewer)}


async def matching(inbox: Inbox, filters: Filters) -> list[Approval]:
    """The newest COUNT_LIMIT + 1 pending approvals matching `filters` (the first LIST_LIMIT are
    shown; the length is the count, "500+" past COUNT_LIMIT)."""
    return await inbox.store.list_approvals(
        status="pending",
        upstream=filters.upstream,
        tool=filters.tool,
        grant=filters.agent,
        limit=COUNT_LIMIT + 1,
    )


async def choices(inbox: Inbox, filters: Filters, found: list[Approval]) -> tuple[list[str], list[str]]:
    """The tools and the agents of pending requests (whatever the filters), for the select boxes.

    Read from the newest COUNT_LIMIT + 1 pending requests (the list's own read when no filter is
    set); the value a filter has is always offered, so the box shows it even when it is rare.
    """
    if filters.upstream or filters.tool or filters.agent:
        found = await inbox.store.list_approvals(status="pending", limit=COUNT_LIMIT + 1)
    tools = {a.tool for a in found} | ({filters.tool} if filters.tool else set())
    agents = {a.grant for a in found} | ({filters.agent} if filters.agent else set())
    return sorted(tools), sorted(agents)


async def _pending_page(
    request: web.Request, inbox: Inbox, session: Session, form: Form
) -> web.StreamResponse:
    filters = list_filters(request.query)
    found = await matching(inbox, filters)
    approvals, count = found[:LIST_LIMIT], len(found)
    tools, agents = await choices(inbox, filters, found)
    return inbox.render(
        request,
        "pending.html",
        items=[row(inbox, a, session.reviewer) for a in approvals],
        count=count,
        count_text=f"{COUNT_LIMIT}+" if count > COUNT_LIMIT else str(count),
        shown=len(approvals),
        filters=filters,
        filtered=bool(filters.upstream or filters.tool or filters.agent),
        upstreams=sorted(inbox.settings.upstreams),
        agents=agents,
        tools=tools,
        live_url=EVENTS_PATH + filters.query(),
        back=filters.query(),
        max_batch=inbox_batch.MAX_BATCH,
        max_reason=MAX_REASON,
    )


async def _events(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    # Only the list's filters: a detail page follows its approval on /inbox/events?id=.
    filters = list_filters(request.query)
    reviewer = session.reviewer

    async def item(approval: Approval) -> dict[str, Any]:
        return row(inbox, approval, reviewer)

    async def snapshot() -> dict[str, Any]:
        found = await matching(inbox, filters)
        return {"items": [row(inbox, a, reviewer) for a in found[:LIST_LIMIT]], "count": len(found)}

    return await inbox.feed.stream(request, filters, snapshot, item, security_headers(request))


pending_page = reviewer_only(_pending_page)
events = reviewer_only(_events)
