"""What the inbox shows about a request's review: why it was held, how far its review has come,
what a reviewer changed, and standing grants in words.

Plain values for the templates (strings the templates escape; nothing here is markup), built from
the service's `why`, `review_state` and `refusal_for`, and from `StandingGrant`s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from approvals.config import Principal
from approvals.core import render
from approvals.core.model import Approval
from approvals.core.review import ReviewRule
from approvals.core.service import ApprovalService
from approvals.core.standing import StandingGrant
from approvals.core.why import ArgChange, diff_arguments
from approvals.web import inbox_format as fmt
from approvals.web import inbox_review_forms as forms

__all__ = [
    "GRANT_ID",
    "Badge",
    "Shown",
    "annotation_badges",
    "confirm_context",
    "detail_context",
    "diff_rows",
    "grant_view",
    "rule_lines",
    "tally_text",
]

GRANT_ID = re.compile(r"sg_[0-9a-f]{32}")  # standing.new_standing_id; anything else is not a grant

# ---- why it was held ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Badge:
    label: str
    tone: str  # deny (red), warn, ok, muted: a CSS class suffix
    title: str


# (annotation, value) → (label, tone); an annotation not listed for a value is not shown.
_BADGES: Mapping[tuple[str, bool], tuple[str, str]] = {
    ("destructiveHint", True): ("destructive", "deny"),
    ("destructiveHint", False): ("not destructive", "muted"),
    ("openWorldHint", True): ("open world", "warn"),
    ("openWorldHint", False): ("closed world", "muted"),
    ("readOnlyHint", True): ("read-only", "ok"),
    ("readOnlyHint", False): ("writes", "warn"),
    ("idempotentHint", True): ("idempotent", "muted"),
    ("idempotentHint", False): ("not idempotent", "muted"),
}


def annotation_badges(annotations: Mapping[str, bool]) -> list[Badge]:
    """The tool's own risk hints, as the upstream declared them (a hint, not a guarantee)."""
    out = []
    for name, value in annotations.items():
        label, tone = _BADGES.get((name, value), (f"{name}: {value}", "muted"))
        out.append(Badge(label, tone, f"{name}: {'true' if value else 'false'}"))
    return out


def tally_text(recent: Mapping[str, int]) -> str:
    """ "Last 30 days: 12 approved, 1 denied" (most common first, approved before denied on ties)."""
    order = {"approved": 0, "denied": 1, "expired": 2, "cancelled": 3}
    parts = sorted(recent.items(), key=lambda kv: (-kv[1], order.get(kv[0], 9), kv[0]))
    counted = [f"{count} {render.visible(verdict)}" for verdict, count in parts if count]
    if not counted:
        return "Last 30 days: no other call of this tool by this agent was decided."
    return "Last 30 days: " + ", ".join(counted)


def diff_rows(changes: Iterable[ArgChange]) -> list[dict[str, str]]:
    """A diff as table rows of text: path, before, after ("" where the argument is absent)."""
    return [
        {
            "path": render.visible(c.path),
            "before": render.visible(c.before) if c.before is not None else "",
            "after": render.visible(c.after) if c.after is not None else "",
        }
        for c in changes
    ]


def rule_lines(rule: ReviewRule) -> list[str]:
    """How this request must be reviewed, in words (only what differs from one reviewer, anyone)."""
    lines = []
    if rule.quorum > 1:
        each = f", one from each of {_names(rule.from_groups)}" if rule.from_groups else ""
        lines.append(f"Needs {rule.quorum} approvals from different reviewers{each}.")
    elif rule.from_groups:
        lines.append(f"Needs an approval from each of {_names(rule.from_groups)}.")
    if rule.reviewers:
        lines.append(f"Decided by {_names(rule.reviewers)}.")
    if rule.via:
        lines.append(f"Decisions only through {_names(tuple(render.channel_name(v) for v in rule.via))}.")
    for step in rule.escalate:
        lines.append(f"Escalated to {_names(step.to)} after {render.duration(step.after)} undecided.")
    if rule.on_timeout == "deny":
        lines.append("Denied when nobody decides in time.")
    if not rule.edit:
        lines.append("The arguments may not be edited.")
    if not rule.remember:
        lines.append("No standing grants for this rule.")
    return lines


def _names(names: Iterable[str]) -> str:
    shown = [render.visible(n) for n in names]
    return ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else "".join(shown)


@dataclass(frozen=True, slots=True)
class Shown:
    """What the detail page shows besides the record: a flash, or a form as the reviewer typed it."""

    done: str | None = None  # the flash after the reviewer's own decision (?done=)
    grant_id: str = ""  # the standing grant that decision saved (?grant=)
    error: str = ""  # the deny form's error
    reason: str = ""
    edit_text: str | None = None  # the editor's text as posted (None: the arguments)
    edit_error: str = ""
    edit_open: bool = False
    remember: forms.RememberForm | None = None  # the remember form as posted (None: blank)
    remember_error: str = ""


async def detail_context(
    service: ApprovalService, approval: Approval, reviewer: Principal, shown: Shown
) -> dict[str, Any]:
    """The detail page's template values besides the live `item`: the call, why it was held, the
    review so far, and the edit and remember forms (each offered only when it may be used)."""
    title, description, schema = fmt.tool_definition(approval)
    args = fmt.release_arguments(approval)
    state = service.review_state(approval)
    pending = approval.status == "pending"
    refusal = service.refusal_for(approval, reviewer, "web") if pending else None
    voted = any(v.by == reviewer.name for v in state.votes)
    # Edit and remember work on an object; a record whose arguments cannot be read is only shown.
    usable = isinstance(args, dict)
    remember = shown.remember
    if remember is None and usable:
        remember = forms.blank_form("allow", args, approval.release_sha256)
    grant = await _made_grant(service, approval, shown.grant_id)
    return {
        "arguments": args,
        "hidden": fmt.count_hidden(args),
        "tool_title": title,
        "description": description,
        "schema": fmt.pretty_json(schema) if schema is not None else "",
        "own_agent": approval.owner == reviewer.name,
        "done": _done(shown.done, approval, reviewer, voted),
        "error": shown.error,
        "reason": shown.reason,
        "why": await _why(service, approval),
        "review": {
            "lines": rule_lines(state.rule),
            "progress": render.visible(state.progress),
            "votes": [
                {"by": render.visible(v.by), "at": fmt.iso(v.at), "via": render.channel_name(v.via)}
                for v in state.votes
            ],
            "escalated_to": ", ".join(render.visible(g) for g in state.escalated_to),
        },
        "read_only": (refusal or "").rstrip("."),
        "may_edit": pending and usable and state.may_edit and not refusal,
        "may_remember": pending and usable and state.may_remember and not refusal,
        "edited": _edited(approval),
        "edit_text": forms.edit_text(args) if shown.edit_text is None else shown.edit_text,
        "edit_error": shown.edit_error,
        "edit_open": shown.edit_open or bool(shown.edit_error),
        "remember": remember,
        "remember_error": shown.remember_error,
        "remember_open": shown.remember is not None,
        "grant": grant_view(grant, service.clock()) if grant else None,
    }


async def _why(service: ApprovalService, approval: Approval) -> dict[str, Any]:
    try:
        why = await service.why(approval)
    except (ValueError, RecursionError):  # a stored record too deep to compare: shown without it
        return {"rule": render.visible(approval.rule), "explanation": render.visible(approval.explanation),
                "badges": [], "previous_id": "", "previous_at": "", "diff": [], "tally": "",
                "unknown": True}  # fmt: skip
    previous = why.previous
    return {
        "rule": render.visible(why.rule),
        "explanation": render.visible(why.explanation),
        "badges": annotation_badges(why.annotations),
        "previous_id": previous.id if previous else "",
        "previous_at": fmt.iso(previous.decided_at or previous.created_at) if previous else "",
        "diff": diff_rows(why.diff),
        "tally": tally_text(why.recent),
        "unknown": False,
    }


def _edited(approval: Approval) -> dict[str, Any] | None:
    """A reviewer's edit: who, and the difference from the call as the agent made it."""
    if approval.edited_json is None:
        return None
    before, after = fmt.arguments(approval), fmt.release_arguments(approval)
    if isinstance(before, dict) and isinstance(after, dict):
        diff = diff_rows(diff_arguments(before, after))
    else:
        diff = []
    return {"by": render.visible(approval.edited_by or ""), "diff": diff, "original": fmt.pretty_json(before)}


def _done(done: str | None, approval: Approval, reviewer: Principal, voted: bool) -> str:
    """The flash after this reviewer's own decision ("approved" / "denied" / "voted"), else ""."""
    if done == "voted":
        return "voted" if voted and approval.status == "pending" else ""
    decision = "denied" if approval.status == "denied" else "approved"
    mine = approval.decided_by == reviewer.name
    return decision if mine and done in ("approved", "denied") and done == decision else ""


async def _made_grant(service: ApprovalService, approval: Approval, grant_id: str) -> StandingGrant | None:
    """The standing grant named by the flash's `grant=`, only if it was made from this request."""
    if not GRANT_ID.fullmatch(grant_id):
        return None
    grant = await service.get_standing(grant_id)
    return grant if grant is not None and grant.source_approval == approval.id else None


def confirm_context(approval: Approval, judged: forms.Remember, now: float) -> dict[str, Any]:
    """The confirmation page's words for the grant about to be saved, and the form to carry."""
    typed = judged.form
    uses = judged.request.max_uses
    return {
        "remember": judged,
        "effect_text": "Allow" if typed.effect == "allow" else "Deny",
        "words": [c.describe() for c in judged.constraints] or ["only calls without arguments"],
        "duration": render.duration(judged.request.seconds),
        "until": fmt.iso(now + judged.request.seconds),
        "uses": f"at most {uses:,} use{'s' if uses != 1 else ''}" if uses else "no limit on uses",
        "action": "approve" if typed.effect == "allow" else "deny",
        "back": f"/inbox/approvals/{approval.id}?{typed.query('form')}#remember",
    }


# ---- standing grants in words -------------------------------------------------------------------


def uses_text(grant: StandingGrant) -> str:
    """ "3 of 50" or "3 (no limit)"."""
    if grant.max_uses is None:
        return f"{grant.uses} (no limit)"
    return f"{grant.uses} of {grant.max_uses}"


def constraint_words(grant: StandingGrant) -> list[str]:
    """Each constraint's words ("to starts with "ops-""); a grant with none matches calls that
    have no arguments."""
    try:
        found = grant.constraints
    except (ValueError, TypeError, KeyError):
        return ["(the stored constraints cannot be read: this grant matches nothing)"]
    return [c.describe() for c in found] or ["only calls without arguments"]


STATE_WORDS: Mapping[str, str] = {
    "active": "active",
    "revoked": "revoked",
    "expired": "expired",
    "used_up": "used up",
}


def grant_view(grant: StandingGrant, now: float) -> dict[str, Any]:
    """A standing grant as the pages show it (plain text; the template escapes and marks)."""
    state = grant.state(now)
    return {
        "id": grant.id,
        "effect": grant.effect,
        "effect_text": "Allow" if grant.effect == "allow" else "Deny",
        "agent": render.visible(grant.grant),
        "upstream": render.visible(grant.upstream),
        "tool": render.visible(grant.tool),
        "constraints": constraint_words(grant),
        "uses": uses_text(grant),
        "until": fmt.iso(grant.expires_at),
        "left": render.time_left(grant.expires_at, now) if state == "active" else "",
        "state": state,
        "state_text": STATE_WORDS.get(state, state),
        "reason": render.visible(grant.reason or ""),
        "created_by": render.visible(grant.created_by),
        "created_via": render.channel_name(grant.created_via),
        "created_at": fmt.iso(grant.created_at),
        "source": grant.source_approval,
        "revoked_by": render.visible(grant.revoked_by or ""),
        "revoked_at": fmt.iso(grant.revoked_at),
    }
