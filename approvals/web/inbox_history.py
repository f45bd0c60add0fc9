"""The inbox's history: every decided approval, searchable, filterable, exportable as CSV and JSON.

    /inbox/history?status=&upstream=&tool=&agent=&reviewer=&q=&page=
    /inbox/history.csv, /inbox/history.json   the same filters, every match

Newest decision first (by the Decided column: decided, else finished, else asked). `decision=` is
the same filter as `status=` (the page labels it "Decision"); an unknown value is a 400 naming the
allowed ones, not silently every record.

The store filters by status, upstream, tool and agent; the reviewer filter and the text search
(tool, agent, reviewer, reason, and any key or string in the arguments) run here over the newest
SCAN_LIMIT records.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from approvals.core import render
from approvals.core.model import Approval, Status
from approvals.web import inbox_format as fmt
from approvals.web.api import approval_json
from approvals.web.inbox_auth import Session
from approvals.web.inbox_views import Form, Inbox, list_item, reviewer_only

PAGE_SIZE = 50
BATCH = 500
SCAN_LIMIT = 10_000
APPROVED: tuple[Status, ...] = ("approved", "released", "completed", "failed")
STATUS_FILTERS: dict[str, tuple[Status, ...]] = {
    "approved": APPROVED,
    "completed": ("completed",),
    "failed": ("failed",),
    "denied": ("denied",),
    "expired": ("expired",),
    "cancelled": ("cancelled",),
}
ANY = ("all", "any")  # no status filter, as the CLI's --status all
DECIDED: frozenset[str] = frozenset(s for group in STATUS_FILTERS.values() for s in group)
CSV_COLUMNS = (
    "id",
    "status",
    "decided_by",
    "decided_via",
    "reason",
    "outcome",
    "upstream",
    "tool",
    "agent",
    "owner",
    "rule",
    "created_at",
    "decided_at",
    "finished_at",
    "arguments",
)


class BadSearch(ValueError):
    """A history query the inbox cannot honour (said in the 400's text)."""


@dataclass(frozen=True, slots=True)
class Search:
    status: str | None
    upstream: str | None
    tool: str | None
    agent: str | None
    reviewer: str | None
    text: str | None

    @classmethod
    def of(cls, query: Mapping[str, str]) -> Search:
        def get(name: str) -> str | None:
            return (query.get(name) or "").strip() or None

        return cls(
            status=_status(get("status"), get("decision")),
            upstream=get("upstream"),
            tool=get("tool"),
            agent=get("agent"),
            reviewer=get("reviewer"),
            text=get("q"),
        )

    def query(self) -> dict[str, str]:
        """The canonical query string (status=, never decision=) for page links and exports."""
        pairs = {
            "status": self.status,
            "upstream": self.upstream,
            "tool": self.tool,
            "agent": self.agent,
            "reviewer": self.reviewer,
            "q": self.text,
        }
        return {k: v for k, v in pairs.items() if v}

    def matches(self, approval: Approval) -> bool:
        if approval.status not in (STATUS_FILTERS[self.status] if self.status else DECIDED):
            return False
        if self.reviewer is not None and approval.decided_by != self.reviewer:
            return False
        if self.text is None:
            return True
        needle = self.text.casefold()
        fields = (approval.tool, approval.grant, approval.owner, approval.decided_by, approval.reason)
        if any(needle in f.casefold() for f in fields if f):
            return True
        return any(needle in s.casefold() for s in fmt.walk_strings(fmt.arguments(approval)))


def _status(status: str | None, decision: str | None) -> str | None:
    """The one status filter asked for, by either name; raises BadSearch naming what is allowed."""
    if status and decision and status != decision:
        raise BadSearch(f"status={status} and decision={decision} disagree: give one of them")
    given = status or decision
    if given is None or given in ANY:
        return None
    if given not in STATUS_FILTERS:
        name = "status" if status else "decision"
        allowed = ", ".join((*STATUS_FILTERS, ANY[0]))
        raise BadSearch(f"{name} must be one of {allowed} (got {given!r})")
    return given


def decided_key(approval: Approval) -> tuple[float, float]:
    """Sort key of the Decided column: when it was decided, else finished (expired), else asked."""
    shown = approval.decided_at or approval.finished_at or approval.created_at
    return (shown, approval.created_at)


async def find(inbox: Inbox, search: Search) -> tuple[list[Approval], bool]:
    """Every decided approval matching `search`, newest decision first; True when the scan limit
    was reached (the scan runs over the newest records by creation)."""
    statuses = STATUS_FILTERS[search.status] if search.status else ()
    exact = statuses[0] if len(statuses) == 1 else None
    found: list[Approval] = []
    offset = 0
    while offset < SCAN_LIMIT:
        batch = await inbox.store.list_approvals(
            status=exact,
            upstream=search.upstream,
            tool=search.tool,
            grant=search.agent,
            limit=BATCH,
            offset=offset,
        )
        found.extend(a for a in batch if search.matches(a))
        if len(batch) < BATCH:
            return _by_decided(found), False
        offset += BATCH
    return _by_decided(found), True


def _by_decided(found: list[Approval]) -> list[Approval]:
    return sorted(found, key=decided_key, reverse=True)


def decision(approval: Approval) -> str:
    return render.decided(approval.status)


async def _history(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    try:
        search = Search.of(request.query)
    except BadSearch as exc:
        return inbox.error(request, 400, "Bad search", str(exc))
    found, truncated = await find(inbox, search)
    try:
        page = max(int(request.query.get("page", "1")), 1)
    except ValueError:
        page = 1
    pages = max((len(found) + PAGE_SIZE - 1) // PAGE_SIZE, 1)
    page = min(page, pages)
    shown = found[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    now = inbox.now()
    query = search.query()
    return inbox.render(
        request,
        "history.html",
        items=[
            {
                **list_item(a, now),
                "decision": decision(a),
                "reason": fmt.one_line(a.reason or ""),
                "decided_iso": fmt.iso(a.decided_at),
                "finished_iso": fmt.iso(a.finished_at),
                "via": render.channel_name(a.decided_via),
            }
            for a in shown
        ],
        total=len(found),
        truncated=truncated,
        scan_limit=SCAN_LIMIT,
        search=search,
        statuses=list(STATUS_FILTERS),
        upstreams=sorted(inbox.settings.upstreams),
        agents=sorted(g.name for g in inbox.settings.grants),
        reviewers=sorted(r.name for r in inbox.settings.reviewers),
        page=page,
        pages=pages,
        prev_url=_page_url(query, page - 1) if page > 1 else None,
        next_url=_page_url(query, page + 1) if page < pages else None,
        export_query=("?" + urlencode(query)) if query else "",
    )


def _page_url(query: dict[str, str], page: int) -> str:
    return "/inbox/history?" + urlencode({**query, "page": str(page)})


def _row(approval: Approval) -> list[str]:
    values: dict[str, object] = {
        "id": approval.id,
        "status": approval.status,
        "decided_by": approval.decided_by,
        "decided_via": approval.decided_via,
        "reason": approval.reason,
        "outcome": fmt.outcome(approval),
        "upstream": approval.upstream,
        "tool": approval.tool,
        "agent": approval.grant,
        "owner": approval.owner,
        "rule": approval.rule,
        "created_at": fmt.iso_machine(approval.created_at),
        "decided_at": fmt.iso_machine(approval.decided_at),
        "finished_at": fmt.iso_machine(approval.finished_at),
        "arguments": approval.arguments_json,
    }
    return [fmt.csv_cell(values[column]) for column in CSV_COLUMNS]


def _exported(approval: Approval) -> dict[str, Any]:
    """approval_json, or for arguments nested deeper than json.loads manages (stored before the
    gateway bounded nesting) the record with its arguments as the JSON text received."""
    try:
        return approval_json(approval)
    except RecursionError:
        record = approval_json(dataclasses.replace(approval, arguments_json="null"))
        return {**record, "arguments": approval.arguments_json, "arguments_as_text": True}


def _export_search(request: web.Request) -> Search:
    """The export's search; a bad one is a plain-text 400 (an export is a file, not a page)."""
    try:
        return Search.of(request.query)
    except BadSearch as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


async def _history_csv(
    request: web.Request, inbox: Inbox, session: Session, form: Form
) -> web.StreamResponse:
    found, _ = await find(inbox, _export_search(request))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_row(a) for a in found)
    return web.Response(
        body=out.getvalue().encode("utf-8", "backslashreplace"),
        content_type="text/csv",
        charset="utf-8",
        headers=_attachment("approvals-history.csv"),
    )


async def _history_json(
    request: web.Request, inbox: Inbox, session: Session, form: Form
) -> web.StreamResponse:
    search = _export_search(request)
    found, truncated = await find(inbox, search)
    body: dict[str, Any] = {
        "filters": search.query(),
        "truncated": truncated,
        "approvals": [{**_exported(a), "outcome": fmt.outcome(a)} for a in found],
    }
    # ensure_ascii: a lone surrogate in the arguments stays valid JSON (as \\ud800).
    # json_chunks, not json.dumps: arguments nested hundreds deep must export, not overflow the stack.
    return web.Response(
        text="".join(fmt.json_chunks(body, indent=1, ensure_ascii=True)),
        content_type="application/json",
        headers=_attachment("approvals-history.json"),
    )


history = reviewer_only(_history)
history_csv = reviewer_only(_history_csv)
history_json = reviewer_only(_history_json)
