"""What makes a held call risky, for the reviewer: the rule and value that held it, the tool's own
hints, how it differs from the last call of the tool this agent got approved, and how this agent's
calls of the tool were decided lately.

Every channel shows the same :class:`Why` (the inbox's detail page, the Slack message, the API's
``why``); the values are plain data and each channel escapes them for its own medium.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from approvals.core.model import Approval, canonical_json
from approvals.core.ports import ApprovalStore

__all__ = ["ANNOTATIONS", "ArgChange", "Why", "diff_arguments", "explain", "tool_annotations"]

# The MCP tool annotations that say something about risk, in the order they are shown.
ANNOTATIONS = ("destructiveHint", "openWorldHint", "readOnlyHint", "idempotentHint")
RECENT_SECONDS = 30 * 86400.0
RECENT_LOOKED_AT = 200  # the newest calls of the tool by the agent that the tally reads
APPROVED_STATES = ("approved", "released", "completed", "failed")
MAX_DIFF_ENTRIES = 50


@dataclass(frozen=True, slots=True)
class ArgChange:
    """One argument (a dotted path) that differs; ``None`` on a side where it is absent. Values
    are canonical JSON text."""

    path: str
    before: str | None
    after: str | None


@dataclass(frozen=True, slots=True)
class Why:
    rule: str
    explanation: str  # the policy's words: "rule create_refund: approval_if args.amount gt 500 (value 900)"
    annotations: Mapping[str, bool]  # only those the tool's definition sets
    previous: Approval | None  # the last approved call of this tool by this agent, before this one
    diff: tuple[ArgChange, ...]  # from previous to this call ((): no previous, or the same arguments)
    recent: Mapping[str, int]  # decisions on this agent's calls of this tool in the last 30 days

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "explanation": self.explanation,
            "annotations": dict(self.annotations),
            "previous_approval": self.previous.id if self.previous else None,
            "diff": [{"path": c.path, "before": c.before, "after": c.after} for c in self.diff],
            "recent": dict(self.recent),
        }


def tool_annotations(approval: Approval) -> dict[str, bool]:
    definition = approval.tool_definition or {}
    raw = definition.get("annotations")
    if not isinstance(raw, dict):
        return {}
    return {name: raw[name] for name in ANNOTATIONS if isinstance(raw.get(name), bool)}


def diff_arguments(
    before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = ""
) -> tuple[ArgChange, ...]:
    """The paths where two argument objects differ, objects compared key by key (at most 50)."""
    changes: list[ArgChange] = []
    for key in sorted(set(before) | set(after), key=str):
        path = f"{prefix}{key}"
        if key not in after:
            changes.append(ArgChange(path, canonical_json(before[key]), None))
        elif key not in before:
            changes.append(ArgChange(path, None, canonical_json(after[key])))
        elif isinstance(before[key], dict) and isinstance(after[key], dict):
            changes.extend(diff_arguments(before[key], after[key], f"{path}."))
        elif canonical_json(before[key]) != canonical_json(after[key]):
            changes.append(ArgChange(path, canonical_json(before[key]), canonical_json(after[key])))
    return tuple(changes[:MAX_DIFF_ENTRIES])


async def explain(store: ApprovalStore, approval: Approval, now: float) -> Why:
    """The :class:`Why` of one approval, read from the store."""
    recent_calls = await store.list_approvals(
        upstream=approval.upstream, tool=approval.tool, grant=approval.grant, limit=RECENT_LOOKED_AT
    )
    tally: dict[str, int] = {}
    previous: Approval | None = None
    for other in recent_calls:  # newest first
        if other.id == approval.id:
            continue
        if previous is None and other.status in APPROVED_STATES and other.created_at <= approval.created_at:
            previous = other
        when = other.decided_at or other.finished_at  # expiry and cancellation finish, nobody decides
        if other.status != "pending" and when is not None and when >= now - RECENT_SECONDS:
            verdict = "approved" if other.status in APPROVED_STATES else other.status
            tally[verdict] = tally.get(verdict, 0) + 1
    # The call as it would run (a reviewer's edit, when there is one) against the one that ran last.
    diff = diff_arguments(previous.release_arguments, approval.release_arguments) if previous else ()
    return Why(approval.rule, approval.explanation, tool_annotations(approval), previous, diff, tally)
