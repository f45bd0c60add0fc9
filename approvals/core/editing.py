"""Edit before approve, and what a reviewer was shown — pure, no I/O.

An edit is judged like any call before it can be approved: the tool's inputSchema (as listed when
the call was held), then the policy. Nothing reaches the upstream that the policy did not see; a
policy that changed since the request so that the edited call falls under another rule (or a
stricter review) refuses the edit, and the agent may ask again.

A reviewer approves what they were shown: decisions carry the hash of the arguments their page,
message or record showed (``seen_sha256``), and one that no longer matches is refused ("changed").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from approvals.arg_schema import SchemaCache
from approvals.config import Principal
from approvals.core import render
from approvals.core.model import Approval, canonical_json, sha256_of
from approvals.core.review import ReviewRule
from approvals.core.why import diff_arguments
from approvals.errors import DecisionRefused

if TYPE_CHECKING:
    from approvals.policy import Decision

__all__ = ["MAX_EDIT_BYTES", "Judge", "check_edit", "check_seen", "edit_detail"]

MAX_EDIT_BYTES = 256 * 1024
Judge = Callable[[str, str, Mapping[str, object]], "Decision"]  # (upstream, tool, arguments) → verdict
_schemas = SchemaCache()  # the tool definitions approvals were held under, compiled once each


def check_edit(
    approval: Approval,
    rule: ReviewRule,
    arguments: Mapping[str, object] | None,
    approve: bool,
    judge: Judge | None,
) -> tuple[str, str] | None:
    """The edited arguments (JSON text, sha256), None when nothing changes; refusals raised."""
    if arguments is None:
        return None
    if not isinstance(arguments, Mapping):
        raise DecisionRefused("edit_refused", "arguments: must be a JSON object", approval)
    text = json.dumps(dict(arguments))  # ASCII, as arguments_json
    if len(text) > MAX_EDIT_BYTES:
        raise DecisionRefused("edit_refused", f"arguments: larger than {MAX_EDIT_BYTES} bytes", approval)
    sha = sha256_of(arguments)
    if sha == approval.release_sha256:
        return None  # the same call: an approval (or denial) of it as it stands, not an edit
    if not approve:
        raise DecisionRefused("edit_refused", "only an approval can change the arguments", approval)
    if not rule.edit:
        raise DecisionRefused(
            "edit_refused", "this call's rule does not allow changing its arguments (edit: false)", approval
        )
    definition = approval.tool_definition or {}
    problem = _schemas.compile(definition.get("inputSchema")).problem(arguments)
    if problem is not None:
        raise DecisionRefused(
            "edit_refused", f"{problem.path}: {problem.message} (the tool's inputSchema)", approval
        )
    if judge is None:  # nothing to judge the edit with: never release an unjudged call
        raise DecisionRefused("edit_refused", "this gateway cannot judge edited calls", approval)
    verdict = judge(approval.upstream, approval.tool, arguments)
    if verdict.action == "deny":
        raise DecisionRefused(
            "edit_refused",
            f"the policy denies the edited call: {verdict.reason or verdict.explanation}",
            approval,
        )
    if verdict.rule != approval.rule or verdict.review != rule:
        raise DecisionRefused(
            "edit_refused",
            f"the edited call falls under the policy's rule {verdict.rule!r} as it is now, not the "
            f"rule this request was held under ({approval.rule!r}): it must be asked for anew",
            approval,
        )
    return text, sha


def edit_detail(before: Approval, after: Approval) -> str:
    """The "edited" audit event's detail: both versions' hashes and what changed (paths, values)."""
    changes = diff_arguments(before.release_arguments, after.release_arguments)
    return canonical_json(
        {
            "from_sha256": before.release_sha256,
            "to_sha256": after.release_sha256,
            "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in changes],
        }
    )


def check_seen(
    approval: Approval, reviewer: Principal, seen_sha256: str | None, *, approve: bool, editing: bool
) -> None:
    """Refuse ("changed") an approval of arguments the reviewer was not shown (a denial is always
    safe, whatever its page showed).

    ``seen_sha256`` is the hash of the arguments their page or message showed; without one, an
    approval of a call someone else edited is refused too — it must name what it approves (the
    page, the Slack message or the API record looked at), never a stale list row.
    """
    if not approve:
        return
    editor = approval.edited_by
    if seen_sha256 is not None and seen_sha256 != approval.release_sha256:
        who = f"{render.visible(editor)} changed" if editor else "these are not"
        raise DecisionRefused(
            "changed", f"{who} the arguments you were shown: look at the call again before deciding", approval
        )
    if seen_sha256 is None and not editing and approval.edited_json is not None and editor != reviewer.name:
        raise DecisionRefused(
            "changed",
            f"{render.visible(editor or 'a reviewer')} edited the arguments; approve them only after "
            f"looking at them, naming them by their hash: seen_sha256 {approval.release_sha256}",
            approval,
        )
