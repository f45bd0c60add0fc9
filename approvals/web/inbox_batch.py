"""Batch review in the inbox: several pending requests approved or denied together, each on its own.

    POST /inbox/batch    ids (repeated), action (approve | deny), reason (required to deny), csrf

Every id goes through `ApprovalService.decide_many` with channel "web", so each is judged exactly
as a decision on its own page would be: a request decided elsewhere meanwhile is reported (who
decided it, and through which channel), never overwritten; a quorum short of its count records
the vote ("counted: 1 of 2 approvals…"); one the reviewer may not decide is refused with the
reason. The answer is a page listing what became of each request.

Refused as a whole, with a 400 saying why: no request selected, more than MAX_BATCH, an `action`
other than approve / deny, a denial without a reason. Like every inbox POST it needs a session,
the session's CSRF token and an Origin of this gateway (403 otherwise): `inbox_views.reviewer_only`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web

from approvals.config import Principal
from approvals.core import render
from approvals.core.model import Approval
from approvals.errors import DecisionRefused
from approvals.web import inbox_format as fmt
from approvals.web.inbox_auth import Session
from approvals.web.inbox_views import MAX_REASON, Form, Inbox, list_filters, reviewer_only, text_field

log = logging.getLogger(__name__)

MAX_BATCH = 200  # the list shows at most this many, so "select all shown" always fits
MAX_ID_CHARS = 64  # approval ids are 32 hex digits; anything far longer is no id of ours
ACTIONS = ("approve", "deny")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one id of a batch, as the result page shows it (plain text, escaped there).

    kind: approved | counted (a vote short of the quorum) | denied | already_decided | refused |
    unknown.
    """

    id: str
    kind: str
    text: str
    tool: str = ""
    agent: str = ""
    summary: str = ""


class BadBatch(Exception):
    """The batch as a whole cannot be taken: a 400 with this title and message."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title
        self.message = message


def read_request(form: Form) -> tuple[list[str], bool, str | None]:
    """(ids in order without repeats, approve?, reason) from the form, or BadBatch."""
    actions = [a for a in form.getall("action", []) if isinstance(a, str)]
    if len(set(actions)) > 1:  # a browser sends only the button clicked: never guess which was meant
        raise BadBatch("Unknown action", "Give one action, approve or deny, not several.")
    action = actions[0] if actions else ""
    if action not in ACTIONS:
        shown = render.one_line(render.visible(action))[:40]
        raise BadBatch("Unknown action", f"action must be approve or deny, not {shown!r}.")
    ids = list(dict.fromkeys(i.strip() for i in form.getall("ids", []) if isinstance(i, str) and i.strip()))
    if not ids:
        raise BadBatch("Nothing selected", "Select at least one request.")
    if len(ids) > MAX_BATCH:
        raise BadBatch(
            "Too many requests",
            f"At most {MAX_BATCH} requests can be decided in one batch; {len(ids)} were selected.",
        )
    reason = text_field(form, "reason")[:MAX_REASON] or None
    if action == "deny" and reason is None:
        raise BadBatch("Say why", "Say why you deny them: each agent is told the reason.")
    return ids, action == "approve", reason


def outcome_of(inbox: Inbox, approval_id: str, result: Approval | DecisionRefused) -> Outcome:
    """One id's line on the result page."""
    if isinstance(result, DecisionRefused):
        record = result.approval
        if result.kind == "unknown" or record is None:
            return Outcome(_shown_id(approval_id), "unknown", "There is no request with this id.")
        if result.kind in ("already_decided", "expired"):
            kind, text = "already_decided", render.already_decided(record)
        else:
            kind, text = "refused", render.visible(str(result))
        return _with_call(Outcome(record.id, kind, text), record)
    if result.status == "pending":
        progress = inbox.service.review_state(result).progress
        text = f"counted ({progress})" if progress else "counted: the quorum needs more approvals"
        return _with_call(Outcome(result.id, "counted", text), result)
    if result.status == "denied":
        return _with_call(Outcome(result.id, "denied", "denied"), result)
    return _with_call(Outcome(result.id, "approved", render.decided(result.status)), result)


def _with_call(outcome: Outcome, approval: Approval) -> Outcome:
    return Outcome(
        outcome.id,
        outcome.kind,
        outcome.text,
        tool=render.visible(approval.tool),
        agent=render.visible(approval.grant),
        summary=fmt.release_summary(approval),
    )


def _shown_id(approval_id: str) -> str:
    text = render.one_line(render.visible(approval_id))
    return text if len(text) <= MAX_ID_CHARS else f"{text[:MAX_ID_CHARS]}…"


def back_link(given: str) -> str:
    """The pending list as the batch was made from it (its filters re-read, nothing else kept)."""
    try:
        fields = dict(parse_qsl(given.removeprefix("?")[:2000], max_num_fields=10))
    except ValueError:
        fields = {}
    return "/inbox" + list_filters(fields).query()


def tally(outcomes: list[Outcome]) -> list[tuple[str, int]]:
    """("approved", 45), ("already decided", 5)…: the summary line, in a fixed order, no zeros."""
    names = {
        "approved": "approved",
        "counted": "counted towards a quorum",
        "denied": "denied",
        "already_decided": "already decided",
        "refused": "refused",
        "unknown": "unknown",
    }
    counts = {kind: sum(o.kind == kind for o in outcomes) for kind in names}
    return [(names[kind], n) for kind, n in counts.items() if n]


async def decide(
    inbox: Inbox, reviewer: Principal, ids: list[str], approve: bool, reason: str | None
) -> list[Outcome]:
    """Each id decided on its own through the service; ids that cannot be ours are not looked up."""
    plausible = [i for i in ids if len(i) <= MAX_ID_CHARS]
    results = dict(
        await inbox.service.decide_many(plausible, reviewer, approve=approve, reason=reason, channel="web")
    )
    outcomes = []
    for approval_id in ids:
        result = results.get(approval_id)
        if result is None:
            outcomes.append(Outcome(_shown_id(approval_id), "unknown", "There is no request with this id."))
        else:
            outcomes.append(outcome_of(inbox, approval_id, result))
    return outcomes


async def _batch(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    try:
        ids, approve, reason = read_request(form)
    except BadBatch as bad:
        return inbox.error(request, 400, bad.title, bad.message)
    outcomes = await decide(inbox, session.reviewer, ids, approve, reason)
    log.info(
        "inbox: %s %s a batch of %d: %s",
        session.reviewer.name,
        "approved" if approve else "denied",
        len(ids),
        ", ".join(f"{n} {name}" for name, n in tally(outcomes)),
    )
    return inbox.render(
        request,
        "batch_result.html",
        back=back_link(text_field(form, "back")),
        action="approve" if approve else "deny",
        outcomes=outcomes,
        tally=tally(outcomes),
        reason=reason or "",
    )


# ---- the request's checks (those of inbox_views.reviewer_only, with room for a batch's ids) -----


batch = reviewer_only(_batch)
