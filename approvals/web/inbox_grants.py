"""Standing grants in the inbox: listed, revoked, exported as the policy rule they amount to.

    GET  /inbox/grants                  active grants first, then recently revoked, expired or
                                        used-up ones; ?agent=NAME keeps one agent's
    POST /inbox/grants/{id}/revoke      csrf → revoked at once; 409 when it was revoked already
    GET  /inbox/grants/{id}/export      StandingGrant.as_policy_rule() as a JSON download

Every reviewer may see and revoke every grant: revoking only takes a permission away, and a grant
nobody can stop is worse than one any reviewer can.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from approvals.core.standing import StandingGrant
from approvals.errors import DecisionRefused
from approvals.web.inbox_auth import Session
from approvals.web.inbox_review import GRANT_ID, grant_view
from approvals.web.inbox_views import Form, Inbox, redirect, reviewer_only

log = logging.getLogger(__name__)

ACTIVE_LIMIT = 500
PAST_LIMIT = 50  # the most recent grants no longer in force shown under the active ones
SCAN_LIMIT = 500


async def _grants_page(
    request: web.Request, inbox: Inbox, session: Session, form: Form
) -> web.StreamResponse:
    agent = request.query.get("agent") or None
    now = inbox.now()
    active = await inbox.service.list_standing(active=True, grant=agent, limit=ACTIVE_LIMIT)
    recent = await inbox.service.list_standing(grant=agent, limit=SCAN_LIMIT)
    # "active" is the service's judgement at its clock; the page's own split uses the same `now`.
    current = [g for g in active if g.state(now) == "active"]
    shown = {g.id for g in current}
    past = [g for g in recent if g.id not in shown and g.state(now) != "active"][:PAST_LIMIT]
    revoked = await _flash(inbox, request.query.get("revoked", ""))
    return inbox.render(
        request,
        "grants.html",
        active=[grant_view(g, now) for g in current],
        past=[grant_view(g, now) for g in past],
        agent=agent or "",
        agents=sorted(g.name for g in inbox.settings.grants),
        revoked=grant_view(revoked, now) if revoked else None,
    )


async def _flash(inbox: Inbox, grant_id: str) -> StandingGrant | None:
    """The grant named by `?revoked=`, when it really is revoked (the flash says nothing else)."""
    if not GRANT_ID.fullmatch(grant_id):
        return None
    grant = await inbox.service.get_standing(grant_id)
    return grant if grant is not None and grant.revoked_at is not None else None


def _not_found(request: web.Request, inbox: Inbox) -> web.Response:
    return inbox.error(request, 404, "Not found", "There is no standing grant with this id.")


async def _revoke(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    grant_id = request.match_info["id"]
    if not GRANT_ID.fullmatch(grant_id):
        return _not_found(request, inbox)
    try:
        grant = await inbox.service.revoke_standing(grant_id, session.reviewer, "web")
    except DecisionRefused as exc:
        if exc.kind == "unknown":
            return _not_found(request, inbox)
        if exc.kind == "already_decided":
            return await _already_revoked(request, inbox, grant_id)
        return inbox.error(request, 403, "Refused", str(exc))
    log.info("inbox: %s revoked standing grant %s", session.reviewer.name, grant.id)
    return redirect(f"/inbox/grants?revoked={grant.id}")


async def _already_revoked(request: web.Request, inbox: Inbox, grant_id: str) -> web.Response:
    grant = await inbox.service.get_standing(grant_id)
    if grant is None or grant.revoked_at is None:
        message = "This standing grant is no longer in force."
    else:
        view = grant_view(grant, inbox.now())
        who = view["revoked_by"] or "A reviewer"
        message = f"{who} revoked this standing grant first, at {view['revoked_at']}."
    return inbox.error(request, 409, "Already revoked", message)


async def _export(request: web.Request, inbox: Inbox, session: Session, form: Form) -> web.StreamResponse:
    grant_id = request.match_info["id"]
    grant = await inbox.service.get_standing(grant_id) if GRANT_ID.fullmatch(grant_id) else None
    if grant is None:
        return _not_found(request, inbox)
    try:
        rule = grant.as_policy_rule()
    except ValueError:  # stored constraints that no longer parse: nothing sound to export
        return inbox.error(request, 409, "Cannot export", "This grant's constraints cannot be read.")
    return web.Response(
        text=json.dumps(rule, indent=2, ensure_ascii=False) + "\n",
        content_type="application/json",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="policy-rule-{grant.id}.json"'},
    )


grants_page = reviewer_only(_grants_page)
revoke = reviewer_only(_revoke)
export = reviewer_only(_export)
