"""What an agent is told at each step of an approval, in words a model can act on (pure).

Every answer is a `CallToolResult` with `isError: true` and machine-readable fields under
`_meta.approvals` (code, approval_id, status, and what else applies), except a released call's
outcome, which is the upstream's own response (with a note added when a reviewer changed the
arguments before approving: :func:`with_edit_note`). Durations and who decided are worded
by approvals.core.render, as every channel words them.
"""

from __future__ import annotations

import json
import math

from approvals.core import render
from approvals.core.model import Approval
from approvals.core.review import progress, review_of, valid_votes, votes_from_json
from approvals.core.standing import StandingGrant
from approvals.core.why import diff_arguments
from approvals.jsonrpc import JsonObject, tool_error
from approvals.limits import LimitRefusal
from approvals.policy import Decision

META_KEY = "approvals"


def denial(decision: Decision) -> JsonObject:
    """The answer to a call the policy refuses."""
    return tool_error(
        f"Denied by policy: {decision.reason or 'not allowed'}",
        {META_KEY: {"code": decision.code, "rule": decision.rule}},
    )


def limit_refusal(refusal: LimitRefusal, decision: Decision) -> JsonObject:
    """The answer to a call over a rate limit; `retry_after` is null when waiting cannot help."""
    retry = None if math.isinf(refusal.retry_after) else math.ceil(refusal.retry_after)
    meta = {
        "code": refusal.code,
        "rule": decision.rule,
        "counter": refusal.limit.counter,
        "retry_after": retry,
    }
    return tool_error(refusal.message, {META_KEY: meta})


def _meta(approval: Approval, code: str, **extra: object) -> JsonObject:
    return {META_KEY: {"code": code, "approval_id": approval.id, "status": approval.status, **extra}}


def pending_result(approval: Approval, now: float, url: str) -> JsonObject:
    """The answer when the hold runs out before the outcome: what is true of the call right now."""
    again = (
        f"To get the outcome, call {approval.tool} again later with exactly the same arguments: "
        "you then receive the tool's result or the reviewer's answer. Different arguments make a new request."
    )
    if approval.status == "released":
        text = (
            f"Approved by {render.decider(approval)}: the call to {approval.tool} was sent to the "
            f"server (request {approval.id}) and its answer has not arrived yet. It will not be sent again. "
            + again
        )
        return tool_error(text, _meta(approval, "approval_released", url=url))
    if approval.status == "approved":
        text = (
            f"Approved by {render.decider(approval)}: the call to {approval.tool} (request "
            f"{approval.id}) is about to be sent, once its rate limits allow; it has not been made yet. "
            + again
        )
        return tool_error(text, _meta(approval, "approval_approved", url=url))
    left = render.expires_in(approval.expires_at, now)
    so_far = review_progress(approval)
    text = (
        f"Approval pending: calling {approval.tool} needs a reviewer's approval (request {approval.id}, "
        f"expires {left}{'; ' + so_far if so_far else ''}). Reviewers have been asked; "
        f"the request is at {url}. "
        "The call has not been made. "
        f"To get the outcome, call {approval.tool} again later with exactly the same arguments: while the "
        "request is pending the call waits for it again, and once it is decided you receive the tool's "
        "result or the reviewer's answer. Different arguments make a new request."
    )
    extra = {"progress": so_far} if so_far else {}
    return tool_error(
        text, _meta(approval, "approval_pending", url=url, expires_at=approval.expires_at, **extra)
    )


def review_progress(approval: Approval) -> str:
    """ "1 of 2 approvals, waiting for someone in security" for a pending quorum, else ""."""
    if approval.status != "pending":
        return ""
    rule = review_of(approval)
    votes = valid_votes(votes_from_json(approval.votes_json), approval.release_sha256)
    return progress(rule, votes, approval.escalated)


def upstream_timeout(approval: Approval, seconds: float) -> JsonObject:
    """The outcome of a released call whose upstream did not answer in time (kept for the agent)."""
    text = (
        f"The call to {approval.tool} was approved and sent to the server, but no answer came within "
        f"{render.duration(seconds)}. It was not sent again, so that it cannot run twice: check with the "
        "user whether it took effect."
    )
    return {"result": tool_error(text, _meta(approval, "upstream_timeout", timeout_seconds=seconds))}


def waiting_status(approval: Approval, now: float) -> str:
    """One line for progress notifications while a call is held."""
    if approval.status == "approved":
        return f"Approved; sending the call once its rate limits allow ({approval.id[:8]}…)"
    if approval.status == "released":
        return f"Approved and sent; waiting for the server's answer ({approval.id[:8]}…)"
    so_far = review_progress(approval)
    left = render.expires_in(approval.expires_at, now)
    return f"Waiting for approval {approval.id[:8]}… — {so_far + ', ' if so_far else ''}expires {left}"


def standing_denial(grant: StandingGrant) -> JsonObject:
    """The answer to a call a remembered denial covers."""
    reason = f" Reason: {grant.reason}" if grant.reason else ""
    text = (
        f"Denied by {render.visible(grant.created_by)}'s standing decision {grant.id} for calls like this "
        f"one: the call to {grant.tool} was not made.{reason}"
    )
    meta = {"code": "denied_by_standing_grant", "standing_grant": grant.id, "granted_by": grant.created_by,
            "reason": grant.reason}  # fmt: skip
    return tool_error(text, {META_KEY: meta})


def with_edit_note(approval: Approval, response: JsonObject) -> JsonObject:
    """A released call's answer, telling the agent that a reviewer changed the call and how.

    The note is added after the tool's own content (which stays first) and in ``_meta``, so an agent
    reading either learns that what ran is not what it asked for.
    """
    result = response.get("result")
    if approval.edited_json is None or not isinstance(result, dict):
        return response
    changes = diff_arguments(approval.arguments, approval.release_arguments)
    shown = "; ".join(f"{c.path}: {c.before or '(absent)'} → {c.after or '(absent)'}" for c in changes)
    note = (
        f"Note from the approval gateway: {render.visible(approval.edited_by or 'a reviewer')} changed the "
        f"arguments before approving, and the call ran with the changed ones. Changes: {shown}."
    )
    content = result.get("content")
    content = [*content, {"type": "text", "text": note}] if isinstance(content, list) else content
    found = result.get("_meta")
    meta: JsonObject = found if isinstance(found, dict) else {}
    edited = {
        "code": "edited_by_reviewer",
        "approval_id": approval.id,
        "edited_by": approval.edited_by,
        "original_arguments": approval.arguments,
        "released_arguments": approval.release_arguments,
        "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in changes],
    }
    new_result = {**result, "_meta": {**meta, META_KEY: edited}}
    if content is not None:
        new_result["content"] = content
    return {**response, "result": new_result}


def with_meta(answer: JsonObject, meta: JsonObject | None) -> JsonObject:
    """A forwarded call's answer with ``meta`` merged into its result's ``_meta`` (an error, or a
    result that is not an object, is left as it is)."""
    result = answer.get("result")
    if not meta or not isinstance(result, dict):
        return answer
    found = result.get("_meta")
    merged: JsonObject = {**(found if isinstance(found, dict) else {}), **meta}
    return {**answer, "result": {**result, "_meta": merged}}


def too_many_pending(limit: int) -> JsonObject:
    return tool_error(
        f"Denied: this client already has {limit} calls waiting for approval, the most allowed. "
        "Wait for reviewers to decide them before asking for more.",
        {META_KEY: {"code": "too_many_pending", "limit": limit}},
    )


def final_outcome(approval: Approval) -> JsonObject:
    """The agent's answer for a record in a final state: a JSON-RPC response without its id."""
    if approval.result_json:
        kept = json.loads(approval.result_json)
        return {k: v for k, v in kept.items() if k not in ("id", "jsonrpc")}
    return {"result": _final_result(approval)}


def _final_result(approval: Approval) -> JsonObject:
    reason = f" Reason: {approval.reason}" if approval.reason else ""
    if approval.status == "denied" and not approval.decided_by:
        # on_timeout: deny — nobody decided in time, and the rule says that means no.
        text = (
            f"Denied: no reviewer decided the approval request {approval.id} for {approval.tool} in time, "
            f"and its rule denies calls then. The call was not made.{reason} "
            "Ask the user before trying again."
        )
        return tool_error(text, _meta(approval, "denied_on_timeout", reason=approval.reason))
    if approval.status == "denied":
        text = f"Denied by {render.decider(approval)}: the call to {approval.tool} was not made.{reason}"
        who = approval.decided_by or "a reviewer"
        return tool_error(text, _meta(approval, "denied_by_reviewer", decided_by=who, reason=approval.reason))
    if approval.status == "expired":
        # Approved, then expired waiting for room under a rate limit: it was decided, never sent.
        how = (
            f"was approved by {render.decider(approval)} but expired before it could be sent"
            if approval.decided_by
            else "expired without a decision"
        )
        text = (
            f"The approval request {approval.id} for {approval.tool} {how}; the call "
            f"was not made.{reason} Ask the user before trying again."
        )
        return tool_error(text, _meta(approval, "approval_expired", reason=approval.reason))
    if approval.status == "cancelled":
        text = f"The approval request {approval.id} for {approval.tool} was cancelled; the call was not made."
        text += reason
        return tool_error(text, _meta(approval, "approval_cancelled", reason=approval.reason))
    if approval.status == "failed" and approval.reason == "interrupted":
        text = (
            f"The call to {approval.tool} was approved and sent to the server, but the gateway stopped "
            "before "
            "the answer arrived. It was not sent again, so that it cannot run twice: check with the user "
            "whether it took effect."
        )
        return tool_error(text, _meta(approval, "release_interrupted"))
    text = (
        f"The call to {approval.tool} was approved and made, but its result is no longer kept "
        f"({approval.note or 'result not kept'})."
    )
    return tool_error(text, _meta(approval, "result_not_kept"))


def encode_outcome(response: JsonObject) -> str:
    """The form a final outcome is kept in (`Approval.result_json`)."""
    return json.dumps(response, separators=(",", ":"))  # ASCII: any upstream answer can be kept
