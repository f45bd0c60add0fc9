"""The reviewers' JSON API: list, read and decide approvals; read the audit log.

    GET  /api/approvals?status=&upstream=&tool=&grant=&limit=&offset=   newest first
    GET  /api/approvals/{id}
    POST /api/approvals/{id}/approve   {"reason": "…"} optional
    POST /api/approvals/{id}/deny      {"reason": "…"}
    GET  /api/audit?approval_id=&after=&limit=   oldest first, each event with its chain hashes

`Authorization: Bearer <reviewer token>`. 401 without a known token, 403 for a token that is not a
reviewer's and for a reviewer deciding their own agent's call, 404 unknown id, 409 already decided
(the body names the decision and who took it). A decision's body, when there is one, must be a
JSON object whose `reason` is a string of at most render.MAX_REASON_CHARS (2000) characters (400
otherwise); JSON is read as UTF-8 whatever `charset` the Content-Type names, and is bounded as
MCP bodies are (jsonrpc.MAX_JSON_DEPTH, finite numbers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from approvals.audit_chain import event_record
from approvals.auth import TokenIndex, bearer_token, is_utf8
from approvals.config import Principal
from approvals.core import render
from approvals.core.model import STATUSES, Approval
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused, RefusalKind, StoreError
from approvals.jsonrpc import JsonInputError, decode_bytes
from approvals.proxy.keys import GRANTS
from approvals.web.keys import REVIEWERS, SERVICE

MAX_PAGE = 500


def approval_json(approval: Approval) -> dict[str, Any]:
    """An approval as the API shows it: arguments, tool definition and kept result as JSON values."""
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
    }
    return record


def _error(http_status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=http_status)


def _reviewer(request: web.Request) -> Principal | web.Response:
    token = bearer_token(request.headers.get("Authorization"))
    reviewer = request.app[REVIEWERS].find(token)
    if reviewer is not None:
        return reviewer
    if request.app[GRANTS].find(token) is not None:
        return _error(403, "this token belongs to an agent (a grant), not a reviewer")
    return web.json_response(
        {"error": "a reviewer token is required: Authorization: Bearer <token>"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="approvals"'},
    )


# The web's answer to each kind of refused decision (the inbox answers with the same statuses).
REFUSAL_STATUS: Mapping[RefusalKind, int] = {
    "unknown": 404,
    "own_agent": 403,
    "not_reviewer": 403,
    "already_decided": 409,
    "expired": 409,
}


def _allowed(request: web.Request) -> tuple[Principal, ApprovalService] | web.Response:
    """The reviewer making the request and the approval service, or the response refusing it."""
    reviewer = _reviewer(request)
    if isinstance(reviewer, web.Response):
        return reviewer
    return reviewer, request.app[SERVICE]


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
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
    allowed = _allowed(request)
    if isinstance(allowed, web.Response):
        return allowed
    _, service = allowed
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        return _error(400, f"status must be one of {', '.join(STATUSES)}")
    limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    approvals = await service.list_approvals(
        status=status,
        upstream=request.query.get("upstream") or None,
        tool=request.query.get("tool") or None,
        grant=request.query.get("grant") or None,
        limit=limit,
        offset=offset,
    )
    return web.json_response(
        {"approvals": [approval_json(a) for a in approvals], "limit": limit, "offset": offset}
    )


async def get_approval(request: web.Request) -> web.Response:
    allowed = _allowed(request)
    if isinstance(allowed, web.Response):
        return allowed
    _, service = allowed
    approval = await service.get(request.match_info["id"])
    if approval is None:
        return _error(404, f"no approval {request.match_info['id']!r}")
    return web.json_response(approval_json(approval))


async def _decide(request: web.Request, approve: bool) -> web.Response:
    allowed = _allowed(request)
    if isinstance(allowed, web.Response):
        return allowed
    reviewer, service = allowed
    reason = await _reason(request)
    if isinstance(reason, web.Response):
        return reason
    try:
        decided = await service.decide(
            request.match_info["id"], reviewer, approve=approve, reason=reason, channel="api"
        )
    except DecisionRefused as exc:
        status = REFUSAL_STATUS[exc.kind]
        extra: dict[str, Any] = {}
        if exc.approval is not None and status == 409:
            extra = {
                "status": exc.approval.status,
                "decided_by": exc.approval.decided_by,
                "approval": approval_json(exc.approval),
            }
        return _error(status, str(exc), **extra)
    return web.json_response(approval_json(decided))


async def _reason(request: web.Request) -> str | web.Response | None:
    """The optional `reason` of a decision's body, or the 400 saying what is wrong with the body."""
    if not request.body_exists:
        return None
    # JSON is UTF-8 (or -16/-32, told apart by its first bytes) whatever `charset` says: RFC 8259
    # defines no charset parameter, so a bogus one is ignored rather than looked up.
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is larger than {request.client_max_size} bytes")
    try:
        body = decode_bytes(data)
    except JsonInputError as exc:
        return _error(400, f"the body is not acceptable JSON: {exc}")
    except ValueError as exc:  # UnicodeDecodeError is one
        return _error(400, f'the body must be JSON, e.g. {{"reason": "…"}}: {exc}')
    if not isinstance(body, dict):
        return _error(400, f'the body must be a JSON object, e.g. {{"reason": "…"}}, not {_kind(body)}')
    raw = body.get("reason")
    if raw is not None and not isinstance(raw, str):
        return _error(400, f"reason must be a string, not {_kind(raw)}")
    if raw is not None and not is_utf8(raw):
        # JSON can spell a lone surrogate ("\ud800"); no store or channel can encode one.
        return _error(400, "reason must be Unicode text: it holds a lone surrogate (\\ud800-\\udfff)")
    reason = raw.strip() if raw else ""
    if (too_long := render.reason_error(reason)) is not None:
        return _error(400, too_long)  # not cut: the agent would be told half a reason
    return reason or None


def _kind(value: object) -> str:
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


async def approve(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _decide(request, False)


async def audit(request: web.Request) -> web.Response:
    allowed = _allowed(request)
    if isinstance(allowed, web.Response):
        return allowed
    _, service = allowed
    events = await service.audit(
        approval_id=request.query.get("approval_id") or None,
        after_seq=_int_param(request, "after", 0, 0, 2**62),
        limit=_int_param(request, "limit", 100, 1, 1000),
    )
    return web.json_response({"events": [event_record(e) for e in events]})


@web.middleware
async def store_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A store failure is a 503 with what failed, never a stack trace; and nothing was decided."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except StoreError as exc:
        return _error(503, f"the approval store is unavailable: {exc}")


def add_routes(app: web.Application, reviewers: TokenIndex) -> None:
    app[REVIEWERS] = reviewers
    app.router.add_get("/api/approvals", list_approvals)
    app.router.add_get("/api/approvals/{id}", get_approval)
    app.router.add_post("/api/approvals/{id}/approve", approve)
    app.router.add_post("/api/approvals/{id}/deny", deny)
    app.router.add_get("/api/audit", audit)
