"""The reviewer dashboard, /inbox/stats?days=7|30: reads a window through the service, with bounds.

    GET /inbox/stats             the last 7 days (UTC, today included)
    GET /inbox/stats?days=30     the last 30; any other value is a 400 naming the allowed ones

What is read, and the bound on each (the page says when one was reached):

- The requests made in the window, newest first, at most MAX_APPROVALS. Past it the figures cover
  the newest MAX_APPROVALS requests, and the page says from when.
- Their audit events, from the first event of the window on (found by bisecting the log on its
  sequence: about log2(events) one-row reads), at most MAX_EVENTS rows. Past it the
  open-to-approve times cover the requests whose events were read; every other figure comes from
  the records and is whole.
- The requests pending now, whatever their age, newest first, at most MAX_WAITING; past it the
  count reads "1000+" and the oldest shown is the oldest of those read.

The figures are computed by inbox_stats (pure) and drawn by inbox_charts (pure).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from approvals.core import render
from approvals.core.model import Approval, AuditEvent
from approvals.core.service import ApprovalService
from approvals.web import inbox_charts as charts
from approvals.web import inbox_stats as figures_of
from approvals.web.inbox_auth import Session
from approvals.web.inbox_stats import Window
from approvals.web.inbox_views import Form, Inbox, reviewer_only

MAX_APPROVALS = 10_000
MAX_EVENTS = 100_000
MAX_WAITING = 1_000
BATCH = 500
EVENT_BATCH = 2_000
# Audit events are stamped by the clock of the process that wrote them: read from a little before
# the window so that a replica whose clock runs behind does not lose its first events.
CLOCK_SLACK_SECONDS = 300.0
WATCHED_EVENTS = frozenset({"viewed", "approved"})


@dataclass(frozen=True, slots=True)
class Read:
    """What was read for one window, and which bounds were reached."""

    approvals: list[Approval]
    events: list[AuditEvent]
    waiting: list[Approval]
    approvals_cut: bool
    events_cut: bool
    waiting_cut: bool


async def read_window(service: ApprovalService, window: Window) -> Read:
    """The requests made in `window`, their "viewed" and "approved" events, and those waiting now."""
    approvals, approvals_cut = await _made_since(service, window.since)
    events, events_cut = await _events_of(service, approvals)
    waiting, waiting_cut = await _waiting(service)
    return Read(approvals, events, waiting, approvals_cut, events_cut, waiting_cut)


async def _made_since(service: ApprovalService, since: float) -> tuple[list[Approval], bool]:
    found: dict[str, Approval] = {}  # by id: a request made while paging shifts the pages by one
    offset = 0
    while len(found) < MAX_APPROVALS:
        batch = await service.list_approvals(limit=BATCH, offset=offset)
        found.update((a.id, a) for a in batch if a.created_at >= since)
        if len(batch) < BATCH or batch[-1].created_at < since:
            return list(found.values()), False
        offset += BATCH
    # The bound is reached: there is more only if the next record is still in the window.
    more = await service.list_approvals(limit=1, offset=offset)
    return list(found.values())[:MAX_APPROVALS], bool(more) and more[0].created_at >= since


async def _events_of(service: ApprovalService, approvals: list[Approval]) -> tuple[list[AuditEvent], bool]:
    if not approvals:
        return [], False
    ids = {a.id for a in approvals}
    after = await first_seq_before(service, min(a.created_at for a in approvals) - CLOCK_SLACK_SECONDS)
    kept: list[AuditEvent] = []
    read = 0
    while read < MAX_EVENTS:
        asked = min(EVENT_BATCH, MAX_EVENTS - read)
        batch = await service.audit(after_seq=after, limit=asked)
        kept.extend(e for e in batch if e.event in WATCHED_EVENTS and e.approval_id in ids)
        read += len(batch)
        if len(batch) < asked:
            return kept, False
        after = batch[-1].seq
    return kept, bool(await service.audit(after_seq=after, limit=1))


async def first_seq_before(service: ApprovalService, at: float) -> int:
    """The `after_seq` from which the audit log's events are stamped `at` or later: the smallest
    `a` whose next event is that late (the log is in time order, up to the clocks of its writers).

    A bisection over the sequence, one single-row read per step; a gap in the sequence (a rolled
    back insert) only moves the lower end on.
    """
    low, high = 0, (await service.store.audit_head())[0]
    while low < high:
        middle = (low + high) // 2
        following = await service.audit(after_seq=middle, limit=1)
        if not following or following[0].at >= at:
            high = middle
        else:
            low = following[0].seq  # every `a` from middle to this seq - 1 has this same next event
    return low


async def _waiting(service: ApprovalService) -> tuple[list[Approval], bool]:
    found: dict[str, Approval] = {}
    offset = 0
    while len(found) < MAX_WAITING:
        batch = await service.list_approvals(status="pending", limit=BATCH, offset=offset)
        found.update((a.id, a) for a in batch)
        if len(batch) < BATCH:
            return list(found.values()), False
        offset += BATCH
    more = await service.list_approvals(status="pending", limit=1, offset=offset)
    return list(found.values())[:MAX_WAITING], bool(more)


class BadWindow(ValueError):
    """A `days=` the dashboard does not offer."""


def window_days(given: str | None) -> int:
    """The window asked for (7 when none); raises BadWindow naming the allowed values."""
    if given is None or given == "":
        return figures_of.WINDOWS[0]
    allowed = ", ".join(str(d) for d in figures_of.WINDOWS)
    if given.strip() not in {str(d) for d in figures_of.WINDOWS}:
        raise BadWindow(f"days must be one of {allowed} (got {given[:40]!r})")
    return int(given)


async def _stats(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    try:
        days = window_days(request.query.get("days"))
    except BadWindow as exc:
        return inbox.error(request, 400, "Bad window", str(exc))
    now = inbox.now()
    window = Window.ending(now, days)
    read = await read_window(inbox.service, window)
    stats = figures_of.figures(read.approvals, read.events, read.waiting, window)
    return inbox.render(
        request,
        "stats.html",
        stats=stats,
        read=read,
        windows=figures_of.WINDOWS,
        limits={
            "approvals": MAX_APPROVALS,
            "events": MAX_EVENTS,
            "waiting": MAX_WAITING,
            "fast_seconds": figures_of.FAST_APPROVAL_SECONDS,
            "fast_samples": figures_of.MIN_FAST_SAMPLES,
            "risky_percent": figures_of.RISKY_APPROVE_PERCENT,
            "rule_decisions": figures_of.MIN_RULE_DECISIONS,
        },
        oldest_for=render.span(now - stats.oldest.created_at) if stats.oldest else "",
        oldest_kept=min((a.created_at for a in read.approvals), default=None),
        daily=charts.daily_requests(stats),
        outcomes=charts.outcomes(stats),
        reviewer_times=charts.timings([(r.name, r.time_to_decision) for r in stats.reviewers]),
        tool_times=charts.timings([(t.name, t.time_to_decision) for t in stats.tools]),
    )


stats_page = reviewer_only(_stats)
