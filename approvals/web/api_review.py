"""The API's review workflows: edit before approve, approve (or deny) and remember, batch
decisions, and standing grants.

    POST /api/approvals/{id}/approve   {"reason": "…", "arguments": {…},
                                        "remember": {"for": "1h", "max_uses": 50,
                                                     "constraints": [{"field", "op", "value"}]},
                                        "seen_sha256": "…"}   (409 "changed" if an edit came since)
    POST /api/approvals/{id}/deny      {"reason": "…", "remember": {…}}   (reason required with remember)
        200 the record (status "pending" after an approval: counted, the quorum needs more), with
        "standing_grant" when one was saved
    POST /api/approvals/approve | deny {"ids": [...], "reason": "…"}      at most 200 whole ids
        200 {"results": [{"id", "ok": true, "status", "approval"}
                         | {"id", "ok": false, "error", "kind", "http_status"}]}
    GET  /api/standing-grants?active=1&agent=NAME&limit=&offset=   {"standing_grants": [...]}
    GET  /api/standing-grants/{id}            the grant
    POST /api/standing-grants/{id}/revoke     200 the grant; 409 revoked already; 404 unknown
    GET  /api/standing-grants/{id}/policy     the policy.json rule it amounts to

The shapes are checked here, each problem a 400 naming where it is (`remember.for`,
`remember.constraints[0].op`, `ids[3]`); whether the rule allows an edit or a grant, and whether
the arguments suit the tool, the service judges (api.refusal_status: 403 forbidden, 400 invalid).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from approvals.core import render
from approvals.core.deciding import (
    MAX_USES_LIMIT,
    REMEMBER_MAX_SECONDS,
    REMEMBER_MIN_SECONDS,
    RememberRequest,
)
from approvals.core.service import ApprovalService
from approvals.core.standing import StandingGrant, parse_constraints
from approvals.durations import parse_duration
from approvals.errors import DecisionRefused
from approvals.web.api import (
    allowed,
    approval_json,
    error,
    int_param,
    json_body,
    kind_of,
    reason_of,
    refusal_response,
    refusal_status,
    unknown_fields,
)

MAX_BATCH = 200
MAX_ID_CHARS = 64  # longer than any id the gateway makes (32 hex; sg_ + 32 hex)
APPROVE_FIELDS = ("reason", "arguments", "remember", "seen_sha256")
DENY_FIELDS = ("reason", "remember")
REMEMBER_FIELDS = ("for", "max_uses", "constraints")
BATCH_FIELDS = ("ids", "reason")
_DECISION_EXAMPLE = '{"reason": "…"}'
_BATCH_EXAMPLE = '{"ids": ["…"], "reason": "…"}'
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


@dataclasses.dataclass(frozen=True, slots=True)
class DecisionBody:
    """A single decision's body, its shape checked."""

    reason: str | None = None
    arguments: dict[str, Any] | None = None
    remember: RememberRequest | None = None
    seen_sha256: str | None = None  # the arguments' hash the reviewer was shown (record's release_sha256)


def parse_decision(body: Mapping[str, object] | None, approve: bool) -> DecisionBody | web.Response:
    """A decision's body, or the 400 naming the first thing wrong with it."""
    if body is None:
        return DecisionBody()
    fields = APPROVE_FIELDS if approve else DENY_FIELDS
    if problem := unknown_fields(body, fields):
        if not approve and "arguments" in body:
            problem += " (only an approval may change the arguments)"
        return error(400, problem)
    reason = reason_of(body)
    if isinstance(reason, web.Response):
        return reason
    arguments = body.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        what = kind_of(arguments)
        return error(400, f"arguments: must be a JSON object (the tool's arguments), not {what}")
    remember: RememberRequest | None = None
    if body.get("remember") is not None:
        parsed = parse_remember(body["remember"])
        if isinstance(parsed, str):
            return error(400, parsed)
        remember = parsed
        if not approve and reason is None:
            return error(400, "reason: required when denying with remember (later calls are told it)")
    seen = body.get("seen_sha256")
    if seen is not None and not (isinstance(seen, str) and re.fullmatch(r"[0-9a-f]{64}", seen)):
        return error(400, "seen_sha256: must be the 64 hex digits of the record's release_sha256")
    return DecisionBody(reason, arguments, remember, seen)


def parse_remember(raw: object) -> RememberRequest | str:
    """`remember` of a decision's body, or what is wrong with it and where."""
    if not isinstance(raw, dict):
        return f'remember: must be an object like {{"for": "1h"}}, not {kind_of(raw)}'
    if problem := unknown_fields(raw, REMEMBER_FIELDS, "remember"):
        return problem
    span = f"from {render.duration(REMEMBER_MIN_SECONDS)} to {render.duration(REMEMBER_MAX_SECONDS)}"
    if "for" not in raw:
        return f'remember.for: required, a duration like "1h" ({span})'
    try:
        seconds = parse_duration(raw["for"])  # a value of any other type is refused there
    except ValueError as exc:
        return f'remember.for: must be a duration like "1h" ({span}): {exc}'
    if not REMEMBER_MIN_SECONDS <= seconds <= REMEMBER_MAX_SECONDS:
        return f"remember.for: must be {span} (got {render.duration(seconds)})"
    max_uses = raw.get("max_uses")
    if max_uses is not None and (
        isinstance(max_uses, bool) or not isinstance(max_uses, int) or not 1 <= max_uses <= MAX_USES_LIMIT
    ):
        return f"remember.max_uses: must be a whole number from 1 to {MAX_USES_LIMIT} (or null: no limit)"
    constraints = None
    if raw.get("constraints") is not None:
        parsed = parse_constraints(raw["constraints"], "remember.constraints")
        if isinstance(parsed, str):
            return parsed
        constraints = parsed
    return RememberRequest(seconds, max_uses, constraints)


async def _decide(request: web.Request, approve: bool) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    reviewer, service = checked
    body = await json_body(request, _DECISION_EXAMPLE)
    if isinstance(body, web.Response):
        return body
    decision = parse_decision(body, approve)
    if isinstance(decision, web.Response):
        return decision
    try:
        decided, grant = await service.decide_and_remember(
            request.match_info["id"],
            reviewer,
            approve=approve,
            reason=decision.reason,
            channel="api",
            arguments=decision.arguments,
            remember=decision.remember,
            seen_sha256=decision.seen_sha256,
        )
    except DecisionRefused as exc:
        return refusal_response(exc, service)
    record = approval_json(decided, service.review_state(decided))
    if grant is not None:
        record["standing_grant"] = standing_json(grant, service.clock())
    return web.json_response(record)


async def approve(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _decide(request, False)


def parse_batch(body: Mapping[str, object] | None) -> tuple[list[str], str | None] | web.Response:
    """The ids and reason of a batch decision, or the 400 naming the first thing wrong."""
    if body is None:
        return error(400, f"the body must be a JSON object, e.g. {_BATCH_EXAMPLE}")
    if problem := unknown_fields(body, BATCH_FIELDS):
        return error(400, problem)
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids:
        return error(400, f"ids: must be a non-empty list of approval ids, not {kind_of(ids)}")
    if len(ids) > MAX_BATCH:
        return error(400, f"ids: at most {MAX_BATCH} ids at once (got {len(ids)})")
    seen: set[str] = set()
    for i, given in enumerate(ids):
        if not isinstance(given, str) or not given or len(given) > MAX_ID_CHARS:
            return error(400, f"ids[{i}]: must be a whole approval id (a string), not {kind_of(given)}")
        if given in seen:
            return error(400, f"ids[{i}]: {quote(given)} is listed twice")
        seen.add(given)
    reason = reason_of(body)
    if isinstance(reason, web.Response):
        return reason
    return ids, reason


async def _decide_many(request: web.Request, approve: bool) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    reviewer, service = checked
    body = await json_body(request, _BATCH_EXAMPLE)
    if isinstance(body, web.Response):
        return body
    batch = parse_batch(body)
    if isinstance(batch, web.Response):
        return batch
    ids, reason = batch
    outcomes = await service.decide_many(ids, reviewer, approve=approve, reason=reason, channel="api")
    return web.json_response({"results": [_batch_result(service, i, o) for i, o in outcomes]})


def _batch_result(service: ApprovalService, approval_id: str, outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, DecisionRefused):
        return {
            "id": approval_id,
            "ok": False,
            "error": str(outcome),
            "kind": outcome.kind,
            "http_status": refusal_status(outcome),
        }
    record = approval_json(outcome, service.review_state(outcome))
    return {"id": approval_id, "ok": True, "status": outcome.status, "approval": record}


async def approve_many(request: web.Request) -> web.Response:
    return await _decide_many(request, True)


async def deny_many(request: web.Request) -> web.Response:
    return await _decide_many(request, False)


# ---- standing grants ---------------------------------------------------------------------------


def standing_json(grant: StandingGrant, now: float) -> dict[str, Any]:
    """A standing grant as the API shows it: every field, its constraints parsed and described,
    and its state at `now`."""
    record: dict[str, Any] = {f.name: getattr(grant, f.name) for f in dataclasses.fields(grant) if f.init}
    record["constraints"] = [c.as_json() for c in grant.constraints]
    record["described"] = [c.describe() for c in grant.constraints]
    record["state"] = grant.state(now)
    return record


async def list_standing(request: web.Request) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    _, service = checked
    active = _BOOLEANS.get(request.query.get("active", "").lower())
    if active is None:
        return error(400, "active must be 1 or 0 (true or false)")
    limit = int_param(request, "limit", 100, 1, 500)
    offset = int_param(request, "offset", 0, 0, 10**9)
    grants = await service.list_standing(
        active=active, grant=request.query.get("agent") or None, limit=limit, offset=offset
    )
    now = service.clock()
    listed = [standing_json(g, now) for g in grants]
    return web.json_response({"standing_grants": listed, "limit": limit, "offset": offset})


async def _grant(request: web.Request) -> tuple[ApprovalService, StandingGrant] | web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    _, service = checked
    grant_id = request.match_info["id"]
    grant = await service.get_standing(grant_id)
    if grant is None:
        return error(404, f"no standing grant {grant_id!r}")
    return service, grant


async def get_standing(request: web.Request) -> web.Response:
    found = await _grant(request)
    if isinstance(found, web.Response):
        return found
    service, grant = found
    return web.json_response(standing_json(grant, service.clock()))


async def standing_policy(request: web.Request) -> web.Response:
    found = await _grant(request)
    if isinstance(found, web.Response):
        return found
    _, grant = found
    return web.json_response(grant.as_policy_rule())


async def revoke_standing(request: web.Request) -> web.Response:
    checked = allowed(request)
    if isinstance(checked, web.Response):
        return checked
    reviewer, service = checked
    grant_id = request.match_info["id"]
    try:
        revoked = await service.revoke_standing(grant_id, reviewer, "api")
    except DecisionRefused as exc:
        status = refusal_status(exc)
        extra: dict[str, Any] = {"kind": exc.kind}
        if status == 409 and (grant := await service.get_standing(grant_id)) is not None:
            extra["standing_grant"] = standing_json(grant, service.clock())
        return error(status, str(exc), **extra)
    return web.json_response(standing_json(revoked, service.clock()))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/approvals/approve", approve_many)
    app.router.add_post("/api/approvals/deny", deny_many)
    app.router.add_post("/api/approvals/{id}/approve", approve)
    app.router.add_post("/api/approvals/{id}/deny", deny)
    app.router.add_get("/api/standing-grants", list_standing)
    app.router.add_get("/api/standing-grants/{id}", get_standing)
    app.router.add_post("/api/standing-grants/{id}/revoke", revoke_standing)
    app.router.add_get("/api/standing-grants/{id}/policy", standing_policy)
