"""Decisions with review workflows: eligibility, step-up, quorum, edit before approve, and
"approve (or deny) and remember" — the decision half of the approval service (a base class of it).

A decision is judged against the :class:`~approvals.core.review.ReviewRule` kept with the approval
(who may decide, through which channel, how many must agree). An approval short of the quorum is a
``pending → pending`` step that records the vote; the approval that completes the quorum is the
``pending → approved`` move that starts the release. Both are compare-and-set on the record's
version, so two approvals arriving together are counted one after the other — the second one
sees the first — and the release happens once, on the approval that completes the quorum.

An edit is judged like any call — the tool's inputSchema, then the policy — before it can be
approved: nothing reaches the upstream that the policy did not see. Votes are bound to the
arguments' hash, so an edit leaves the votes for the earlier arguments behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from approvals.arg_schema import SchemaCache
from approvals.config import Principal
from approvals.core import render
from approvals.core.model import Approval, Status, canonical_json, sha256_of
from approvals.core.ports import ServiceStore
from approvals.core.review import (
    ReviewRule,
    Vote,
    judge_decision,
    progress,
    quorum_met,
    valid_votes,
    votes_from_json,
    votes_to_json,
)
from approvals.core.standing import (
    Constraint,
    StandingGrant,
    constraints_to_json,
    exact_constraints,
    new_standing_id,
)
from approvals.core.why import diff_arguments
from approvals.errors import DecisionRefused, RefusalKind

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from approvals.policy import Decision

__all__ = ["REMEMBER_CHOICES", "Deciding", "RememberRequest", "ReviewState", "review_of"]

# What a reviewer may choose for a standing grant's life (the inbox and Slack offer these; the API
# and CLI accept any duration from a minute to a week).
REMEMBER_CHOICES: tuple[tuple[str, float], ...] = (
    ("1 hour", 3600.0),
    ("8 hours", 28800.0),
    ("24 hours", 86400.0),
)
REMEMBER_MIN_SECONDS = 60.0
REMEMBER_MAX_SECONDS = 7 * 86400.0
MAX_USES_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class RememberRequest:
    """ "Approve (or deny) and remember": for how long, how many uses, and which later calls.

    ``constraints`` None means the approved call's arguments exactly (after any edit).
    """

    seconds: float
    max_uses: int | None = None
    constraints: tuple[Constraint, ...] | None = None


@dataclass(frozen=True, slots=True)
class ReviewState:
    """Where an approval's review stands, for every channel to show alike."""

    rule: ReviewRule
    votes: tuple[Vote, ...]  # the approvals counted so far (for the arguments as they stand)
    progress: str  # "1 of 2 approvals, waiting for someone in security"; "" for one-approval rules
    escalated_to: tuple[str, ...]  # the groups escalation has announced it to so far
    may_remember: bool  # a standing grant may be saved with a decision
    may_edit: bool  # the arguments may be changed before approving


# How often a decision re-reads and tries again when another step (a vote, an escalation) moved the
# record between its read and its write. Each retry sees the other step, so this is contention, not
# correctness; past it the reviewer is told to try again.
MAX_STEP_RETRIES = 32
MAX_EDIT_BYTES = 256 * 1024
_PENDING: tuple[Status, ...] = ("pending",)
_schemas = SchemaCache()  # the tool definitions approvals were held under, compiled once each


# What a review rule that cannot be read amounts to: nobody is in this group (a group name has no
# parentheses), so nobody may decide the call, nothing is remembered and nothing edited.
UNREADABLE_REVIEW = ReviewRule(reviewers=("(unreadable review rule)",), remember=False, edit=False)


def review_of(approval: Approval) -> ReviewRule:
    """The review rule kept with the approval. One that cannot be read fails closed (see
    UNREADABLE_REVIEW): the request stays visible and undecidable until it expires."""
    try:
        return ReviewRule.from_json(approval.review_json)
    except (ValueError, TypeError, KeyError, AttributeError):
        log.error("approval %s has an unreadable review rule; nobody may decide it", approval.id)
        return UNREADABLE_REVIEW


class Deciding:
    """The decision path of the approval service (see the module's docstring)."""

    store: ServiceStore
    clock: Callable[[], float]
    owner: str
    _judge: Callable[[str, str, Mapping[str, object]], Decision] | None

    if TYPE_CHECKING:  # provided by ApprovalService

        async def _move(
            self,
            approval_id: str,
            from_: tuple[Status, ...],
            to: Status,
            *,
            actor: str,
            channel: str,
            event: str | None = None,
            **fields: Any,
        ) -> Approval | None: ...

        async def _settle(self, approval: Approval, response: Any = None) -> None: ...

        def _start_release(self, approval: Approval) -> None: ...

        async def _time_out(self, approval: Approval) -> None: ...

        def _approved_lease(self, now: float) -> dict[str, Any]: ...

    # ---- reading where a review stands ----------------------------------------------------

    def review_state(self, approval: Approval) -> ReviewState:
        rule = review_of(approval)
        votes = valid_votes(votes_from_json(approval.votes_json), approval.release_sha256)
        escalated_to = tuple(g for step in rule.escalate[: approval.escalated] for g in step.to)
        return ReviewState(
            rule=rule,
            votes=votes,
            progress=progress(rule, votes, approval.escalated) if approval.status == "pending" else "",
            escalated_to=escalated_to,
            may_remember=rule.may_remember,
            may_edit=rule.edit,
        )

    def refusal_for(self, approval: Approval, reviewer: Principal, channel: str) -> str | None:
        if approval.owner == reviewer.name:
            return render.own_agent(approval, reviewer.name)
        if approval.status != "pending":
            return None
        state = self.review_state(approval)
        refused = judge_decision(
            state.rule,
            state.votes,
            escalated=approval.escalated,
            reviewer=reviewer.name,
            groups=reviewer.groups,
            channel=channel,
            approve=True,
        )
        return refused.message if refused is not None else None

    # ---- deciding -------------------------------------------------------------------------

    async def decide_and_remember(
        self,
        approval_id: str,
        reviewer: Principal,
        *,
        approve: bool,
        reason: str | None,
        channel: str,
        arguments: Mapping[str, object] | None = None,
        remember: RememberRequest | None = None,
        seen_sha256: str | None = None,
    ) -> tuple[Approval, StandingGrant | None]:
        for _ in range(MAX_STEP_RETRIES):
            approval = await self._pending(approval_id, reviewer)
            if seen_sha256 is not None and seen_sha256 != approval.release_sha256:
                raise DecisionRefused(
                    "changed",
                    f"{render.visible(approval.edited_by or 'a reviewer')} changed this call's arguments "
                    "after you looked: look at the call again before deciding",
                    approval,
                )
            rule = review_of(approval)
            # Who and through which channel first: a reviewer who may not decide learns that, not
            # what is wrong with an edit they may not make.
            who = judge_decision(
                rule, (), escalated=approval.escalated, reviewer=reviewer.name,
                groups=reviewer.groups, channel=channel, approve=False,
            )  # fmt: skip
            if who is not None:
                raise DecisionRefused(who.kind, who.message, approval)
            edit = self._edit(approval, rule, arguments, approve)
            released_sha = edit[1] if edit is not None else approval.release_sha256
            votes = valid_votes(votes_from_json(approval.votes_json), released_sha)
            refused = judge_decision(
                rule,
                votes,
                escalated=approval.escalated,
                reviewer=reviewer.name,
                groups=reviewer.groups,
                channel=channel,
                approve=approve,
            )
            if refused is not None:
                raise DecisionRefused(refused.kind, refused.message, approval)
            released_args = json.loads(edit[0]) if edit is not None else approval.release_arguments
            constraints = _remembered(approval, rule, remember, released_args) if remember else None
            decided = await (
                self._approve(approval, rule, reviewer, channel, reason, votes, edit)
                if approve
                else self._deny(approval, reviewer, channel, reason)
            )
            if decided is None:
                continue  # another step moved the record first: read it again and judge anew
            grant = None
            if remember is not None and constraints is not None:
                grant = await self._save_grant(
                    decided, reviewer, channel, approve, reason, remember, constraints
                )
            return decided, grant
        raise DecisionRefused(
            "already_decided", "the request changed too often while deciding; look again and retry"
        )

    async def decide_many(
        self,
        approval_ids: Sequence[str],
        reviewer: Principal,
        *,
        approve: bool,
        reason: str | None,
        channel: str,
    ) -> list[tuple[str, Approval | DecisionRefused]]:
        outcomes: list[tuple[str, Approval | DecisionRefused]] = []
        for approval_id in approval_ids:
            try:
                decided, _ = await self.decide_and_remember(
                    approval_id, reviewer, approve=approve, reason=reason, channel=channel
                )
            except DecisionRefused as exc:
                outcomes.append((approval_id, exc))
            else:
                outcomes.append((approval_id, decided))
        return outcomes

    async def _pending(self, approval_id: str, reviewer: Principal) -> Approval:
        """The approval, still pending and not the reviewer's own agent's; else the refusal."""
        approval = await self.store.get_approval(approval_id)
        if approval is None:
            raise DecisionRefused("unknown", f"no approval {approval_id!r}")
        if approval.owner == reviewer.name:
            raise DecisionRefused("own_agent", render.own_agent(approval, reviewer.name), approval)
        if approval.status == "pending" and self.clock() >= approval.expires_at:
            await self._time_out(approval)
            approval = await self.store.get_approval(approval_id) or approval
        if approval.status != "pending":
            kind: RefusalKind = "expired" if approval.status == "expired" else "already_decided"
            raise DecisionRefused(kind, render.already_decided(approval), approval)
        return approval

    async def _approve(
        self,
        approval: Approval,
        rule: ReviewRule,
        reviewer: Principal,
        channel: str,
        reason: str | None,
        votes: tuple[Vote, ...],
        edit: tuple[str, str] | None,
    ) -> Approval | None:
        now = self.clock()
        released_sha = edit[1] if edit is not None else approval.release_sha256
        vote = Vote(reviewer.name, now, channel, released_sha, tuple(reviewer.groups))
        # Every vote is kept (the audit trail of who approved what); only those for the arguments
        # as they stand count.
        kept = (*votes_from_json(approval.votes_json), vote)
        fields: dict[str, Any] = {"votes_json": votes_to_json(kept)}
        if edit is not None:
            fields.update(edited_json=edit[0], edited_sha256=edit[1], edited_by=reviewer.name)
        if reason:
            fields["reason"] = reason
        complete = quorum_met(rule, (*votes, vote))
        if complete:
            fields.update(decided_at=now, decided_by=reviewer.name, decided_via=channel)
            fields.update(self._approved_lease(now))
        to: Status = "approved" if complete else "pending"
        event = None if complete else "voted"  # an edit's own "edited" event follows, with the diff
        moved = await self._move(
            approval.id, _PENDING, to, actor=reviewer.name, channel=channel,
            event=event, version=approval.version, **fields,
        )  # fmt: skip
        if moved is None:
            return None
        if edit is not None:
            await self._audit_edit(approval, moved, reviewer, channel)
        if complete:
            self._start_release(moved)
        return moved

    async def _deny(
        self, approval: Approval, reviewer: Principal, channel: str, reason: str | None
    ) -> Approval | None:
        """Any eligible reviewer's denial denies at once, whatever approvals came before it."""
        fields: dict[str, Any] = {
            "decided_at": self.clock(),
            "decided_by": reviewer.name,
            "decided_via": channel,
        }
        if reason:
            fields["reason"] = reason
        moved = await self._move(
            approval.id, _PENDING, "denied", actor=reviewer.name, channel=channel, **fields
        )
        if moved is not None:
            await self._settle(moved)
        return moved

    # ---- edits ----------------------------------------------------------------------------

    def _edit(
        self, approval: Approval, rule: ReviewRule, arguments: Mapping[str, object] | None, approve: bool
    ) -> tuple[str, str] | None:
        """The edited arguments (JSON text, sha256), None when nothing changes; refusals raised."""
        if arguments is None:
            return None
        if not approve:
            raise DecisionRefused("edit_refused", "only an approval can change the arguments", approval)
        if not rule.edit:
            raise DecisionRefused(
                "edit_refused",
                "this call's rule does not allow changing its arguments (edit: false)",
                approval,
            )
        if not isinstance(arguments, Mapping):
            raise DecisionRefused("edit_refused", "arguments: must be a JSON object", approval)
        text = json.dumps(dict(arguments))  # ASCII, as arguments_json
        if len(text) > MAX_EDIT_BYTES:
            raise DecisionRefused("edit_refused", f"arguments: larger than {MAX_EDIT_BYTES} bytes", approval)
        sha = sha256_of(arguments)
        if sha == approval.release_sha256:
            return None  # the same call: an approval, not an edit
        definition = approval.tool_definition or {}
        problem = _schemas.compile(definition.get("inputSchema")).problem(arguments)
        if problem is not None:
            raise DecisionRefused(
                "edit_refused",
                f"{problem.path}: {problem.message} (the tool's inputSchema)",
                approval,
            )
        if self._judge is None:  # nothing to judge the edit with: never release an unjudged call
            raise DecisionRefused("edit_refused", "this gateway cannot judge edited calls", approval)
        verdict = self._judge(approval.upstream, approval.tool, arguments)
        if verdict.action == "deny":
            raise DecisionRefused(
                "edit_refused",
                f"the policy denies the edited call: {verdict.reason or verdict.explanation}",
                approval,
            )
        return text, sha

    async def _audit_edit(self, before: Approval, after: Approval, reviewer: Principal, channel: str) -> None:
        """Both versions in the audit log: the hashes, and what changed (paths and values)."""
        changes = diff_arguments(before.release_arguments, after.release_arguments)
        detail = canonical_json(
            {
                "from_sha256": before.release_sha256,
                "to_sha256": after.release_sha256,
                "changes": [{"path": c.path, "before": c.before, "after": c.after} for c in changes],
            }
        )
        await self.store.append_audit(
            after.id, "edited", actor=reviewer.name, channel=channel,
            args_sha256=after.release_sha256, detail=detail,
        )  # fmt: skip

    # ---- remembering ----------------------------------------------------------------------

    async def _save_grant(
        self,
        decided: Approval,
        reviewer: Principal,
        channel: str,
        approve: bool,
        reason: str | None,
        remember: RememberRequest,
        constraints: tuple[Constraint, ...],
    ) -> StandingGrant:
        now = self.clock()
        grant = StandingGrant(
            id=new_standing_id(),
            effect="allow" if approve else "deny",
            upstream=decided.upstream,
            tool=decided.tool,
            grant=decided.grant,
            constraints_json=constraints_to_json(constraints),
            rule=decided.rule,
            reason=reason,
            created_by=reviewer.name,
            created_via=channel,
            created_at=now,
            expires_at=now + remember.seconds,
            max_uses=remember.max_uses,
            source_approval=decided.id,
        )
        await self.store.create_standing(grant, actor=reviewer.name, channel=channel)
        return grant


def _remembered(
    approval: Approval, rule: ReviewRule, remember: RememberRequest, arguments: Mapping[str, object]
) -> tuple[Constraint, ...]:
    """The constraints of the standing grant asked for, checked before anything is decided."""
    if not rule.may_remember:
        why = "remember: false" if not rule.remember else f"a quorum of {rule.quorum}"
        raise DecisionRefused(
            "remember_refused", f"this call's rule does not allow standing grants ({why})", approval
        )
    if not (
        math.isfinite(remember.seconds) and REMEMBER_MIN_SECONDS <= remember.seconds <= REMEMBER_MAX_SECONDS
    ):
        raise DecisionRefused(
            "remember_refused",
            f"remember.for: must be from {render.duration(REMEMBER_MIN_SECONDS)} to "
            f"{render.duration(REMEMBER_MAX_SECONDS)}",
            approval,
        )
    if remember.max_uses is not None and not 1 <= remember.max_uses <= MAX_USES_LIMIT:
        raise DecisionRefused(
            "remember_refused", f"remember.max_uses: must be from 1 to {MAX_USES_LIMIT}", approval
        )
    constraints = remember.constraints if remember.constraints is not None else exact_constraints(arguments)
    named = {c.field for c in constraints}
    for name in arguments:
        if name not in named:
            raise DecisionRefused(
                "remember_refused",
                f"remember.constraints: argument {name!r} of this call is not constrained"
                ' (use {"op": "any"} to accept any value)',
                approval,
            )
    for i, constraint in enumerate(constraints):
        if not constraint.holds(arguments):
            raise DecisionRefused(
                "remember_refused",
                f"remember.constraints[{i}]: {constraint.describe()} does not hold for this call",
                approval,
            )
    return constraints
