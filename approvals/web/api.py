"""The reviewers' JSON API: list, read and decide approvals; read the audit log.

    GET  /api/approvals?status=&upstream=&tool=&grant=&limit=&offset=   newest first
    GET  /api/approvals/{id}                    the record, with `why` (what makes it risky)
    POST /api/approvals/{id}/approve   {"reason", "arguments", "remember"} all optional
    POST /api/approvals/{id}/deny      {"reason", "remember"}
    POST /api/approvals/approve        {"ids": [...], "reason": "…"}   each decided on its own
    POST /api/approvals/deny           {"ids": [...], "reason": "…"}
    GET  /api/standing-grants?active=&agent=&limit=&offset=             newest first
    GET  /api/standing-grants/{id}     POST …/{id}/revoke     GET …/{id}/policy
    GET  /api/audit?approval_id=&after=&limit=   oldest first, each event with its chain hashes

`Authorization: Bearer <reviewer token>`. 401 without a known token, 403 for a token that is not a
reviewer's, for a reviewer deciding their own agent's call, outside the groups the rule names, or
through a channel the rule does not accept; 404 unknown id, 409 already decided (the body names
the decision and who took it) or already approved by this reviewer. A decision's body, when there
is one, must be a JSON object whose `reason` is a string of at most render.MAX_REASON_CHARS (2000)
characters (400 otherwise); JSON is read as UTF-8 whatever `charset` the Content-Type names, and
is bounded as MCP bodies are (jsonrpc.MAX_JSON_DEPTH, finite numbers). The review workflows'
handlers (edit, remember, batch, standing grants) are in `approvals.web.api_review`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from approvals.audit_chain import event_record
from approvals.auth import TokenIndex, bearer_token, is_utf8
from approvals.config import Principal
from approvals.core import render
from approvals.core.deciding import ReviewState
from approvals.core.model import STATUSES, Approval
from approvals.core.review import ReviewRule
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused, RefusalKind, StoreError
from approvals.jsonrpc import JsonInputError, decode_bytes
from approvals.proxy.keys import GRANTS
from approvals.web.keys import REVIEWERS, SERVICE

MAX_PAGE = 500


def approval_json(approval: Approval, review: ReviewState | None = None) -> dict[str, Any]:
    """An approval as the API shows it: arguments, tool definition and kept result as JSON values;
    with `review` (the service's ReviewState of it), where its review stands."""
    record = {
        "id": approval.id,
        "status": approval.status,
        "upstream": approval.upstream,
        "tool": approval.tool,
        "arguments": json.loads(approval.arguments_json),
        "args_sha256": approval.args_sha256,
        "tool_definition": json.loads(approval.tool_json) if approval.tool_json else None,
        "tool_sha256": approval.tool_sha256,
        "grant": approval.grant,
        "owner": approval.owner,
        "rule": approval.rule,
        "explanation": approval.explanation,
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_at": approval.decided_at,
        "decided_by": approval.decided_by,
        "decided_via": approval.decided_via,
        "reason": approval.reason,
        "released_at": approval.released_at,
        "finished_at": approval.finished_at,
        "result": json.loads(approval.result_json) if approval.result_json else None,
        "note": approval.note,
        # The hash of the arguments a release would send (the edit's, when edited): what an
        # approve's "seen_sha256" names.
        "release_sha256": approval.release_sha256,
    }
    if approval.edited_json is not None:
        record["edited_arguments"] = json.loads(approval.edited_json)
        record["edited_by"] = approval.edited_by
    if review is not None:
        record["review"] = review_json(review)
    return record


def review_json(state: ReviewState) -> dict[str, Any]:
    """Where a review stands: the rule as the policy gave it, the approvals counted, what may be offered."""
    rule = state.rule.to_json()
    return {
        "rule": json.loads(rule) if rule else {},
        "votes": [{"by": v.by, "at": v.at, "via": v.via} for v in state.votes],
        "progress": state.progress,
        "escalated_to": list(state.escalated_to),
        "may_remember": state.may_remember,
        "may_edit": state.may_edit,
    }


def error(http_status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=http_status)


def _reviewer(request: web.Request) -> Principal | web.Response:
    token = bearer_token(request.headers.get("Authorization"))
    reviewer = request.app[REVIEWERS].find(token)
    if reviewer is not None:
        return reviewer
    if request.app[GRANTS].find(token) is not None:
        return error(403, "this token belongs to an agent (a grant), not a reviewer")
    return web.json_response(
        {"error": "a reviewer token is required: Authorization: Bearer <token>"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="approvals"'},
    )


# The web's answer to each kind of refused decision (the inbox answers with the same statuses).
# edit_refused and remember_refused are 400 here: `refusal_status` makes them 403 when the rule
# itself forbids what was asked.
REFUSAL_STATUS: Mapping[RefusalKind, int] = {
    "unknown": 404,
    "own_agent": 403,
    "not_reviewer": 403,
    "already_decided": 409,
    "expired": 409,
    "not_eligible": 403,
    "step_up": 403,
    "already_voted": 409,
    "changed": 409,
    "edit_refused": 400,
    "remember_refused": 400,
}


def refusal_status(exc: DecisionRefused) -> int:
    """The HTTP status of a refused decision.

    The service raises one kind for an edit (or a standing grant) that the rule forbids and for
    one that is invalid; the rule kept with the approval tells them apart: forbidden is 403 (no
    body would do), invalid is 400 (another body might).
    """
    if exc.kind not in ("edit_refused", "remember_refused") or exc.approval is None:
        return REFUSAL_STATUS[exc.kind]
    try:
        rule = ReviewRule.from_json(exc.approval.review_json)
    except (ValueError, TypeError, KeyError):  # an unreadable rule forbids rather than invites a retry
        return 403
    allowed = rule.edit if exc.kind == "edit_refused" else rule.may_remember
    return 400 if allowed else 403


def refusal_response(exc: DecisionRefused, service: ApprovalService) -> web.Response:
    """The answer to a refused decision; a conflict also shows the record as it stands."""
    status = refusal_status(exc)
    extra: dict[str, Any] = {"kind": exc.kind}
    if exc.approval is not None and status == 409:
        extra |= {
            "status": exc.approval.status,
            "decided_by": exc.approval.decided_by,
            "approval": approval_json(exc.approval, service.review_state(exc.approval)),
        }
    return error(status, str(exc), **extra)


def allowed(request: web.Request) -> tuple[Principal, ApprovalService] | web.Response:
    """The reviewer making the request and the approval service, or the response refusing it."""
    reviewer = _reviewer(request)
    if isinstance(reviewer, web.Response):
        return reviewer
    return reviewer, request.app[SERVICE]


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be an integer"}), content_type="application/json"
        ) from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be from {low} to {high}"}),
            content_type="application/json",
        )
    return value


async def list_approvals(request: web.Request) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    _, service = checked
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        return error(400, f"status must be one of {', '.join(STATUSES)}")
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, 10**9)
    approvals = await service.list_approvals(
        status=status,
        upstream=request.query.get("upstream") or None,
        tool=request.query.get("tool") or None,
        grant=request.query.get("grant") or None,
        limit=limit,
        offset=offset,
    )
    # No `why` here: it reads the store once per approval, and a list is read often.
    listed = [approval_json(a, service.review_state(a)) for a in approvals]
    return web.json_response({"approvals": listed, "limit": limit, "offset": offset})


async def get_approval(request: web.Request) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    _, service = checked
    approval = await service.get(request.match_info["id"])
    if approval is None:
        return error(404, f"no approval {request.match_info['id']!r}")
    record = approval_json(approval, service.review_state(approval))
    record["why"] = (await service.why(approval)).as_json()
    return web.json_response(record)


async def json_body(request: web.Request, example: str) -> dict[str, Any] | web.Response | None:
    """The request's body as a JSON object (None when there is none), or the 400 saying what is
    wrong with it; `example` shows a good one in the message."""
    if not request.body_exists:
        return None
    # JSON is UTF-8 (or -16/-32, told apart by its first bytes) whatever `charset` says: RFC 8259
    # defines no charset parameter, so a bogus one is ignored rather than looked up.
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"the body is larger than {request.client_max_size} bytes")
    try:
        body = decode_bytes(data)
    except JsonInputError as exc:
        return error(400, f"the body is not acceptable JSON: {exc}")
    except ValueError as exc:  # UnicodeDecodeError is one
        return error(400, f"the body must be JSON, e.g. {example}: {exc}")
    if not isinstance(body, dict):
        return error(400, f"the body must be a JSON object, e.g. {example}, not {kind_of(body)}")
    return body


def unknown_fields(body: Mapping[str, object], known: Iterable[str], where: str = "the body") -> str | None:
    """What to say about fields the body should not have (None when it has none)."""
    names = tuple(known)
    unknown = [name for name in body if name not in names]
    if not unknown:
        return None
    listed = ", ".join(json.dumps(name) for name in unknown[:10])  # JSON-quoted: no raw control characters
    return f"{where} has unknown field(s) {listed}; expected {', '.join(names)}"


def reason_of(body: Mapping[str, object] | None) -> str | web.Response | None:
    """The body's optional `reason` (stripped; None when empty), or the 400 saying what is wrong with it."""
    raw = body.get("reason") if body is not None else None
    if raw is not None and not isinstance(raw, str):
        return error(400, f"reason must be a string, not {kind_of(raw)}")
    if raw is not None and not is_utf8(raw):
        # JSON can spell a lone surrogate ("\ud800"); no store or channel can encode one.
        return error(400, "reason must be Unicode text: it holds a lone surrogate (\\ud800-\\udfff)")
    reason = raw.strip() if raw else ""
    if (too_long := render.reason_error(reason)) is not None:
        return error(400, too_long)  # not cut: the agent would be told half a reason
    return reason or None


def kind_of(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else "a number"


async def audit(request: web.Request) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    _, service = checked
    events = await service.audit(
        approval_id=request.query.get("approval_id") or None,
        after_seq=int_param(request, "after", 0, 0, 2**62),
        limit=int_param(request, "limit", 100, 1, 1000),
    )
    return web.json_response({"events": [event_record(e) for e in events]})


@web.middleware
async def store_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A store failure is a 503 with what failed, never a stack trace; and nothing was decided."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except StoreError as exc:
        return error(503, f"the approval store is unavailable: {exc}")


def add_routes(app: web.Application, reviewers: TokenIndex) -> None:
    # Imported here: api_review builds on this module's helpers, so it cannot be imported first.
    from approvals.web.api_review import add_routes as add_review_routes

    app[REVIEWERS] = reviewers
    app.router.add_get("/api/approvals", list_approvals)
    app.router.add_get("/api/approvals/{id}", get_approval)
    app.router.add_get("/api/audit", audit)
    add_review_routes(app)
