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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from approvals.config import Principal
from approvals.core import render
from approvals.core.editing import Judge, check_edit, check_seen, edit_detail
from approvals.core.model import Approval, Status
from approvals.core.ports import ServiceStore
from approvals.core.remembering import remembered_constraints
from approvals.core.review import (
    ReviewRule,
    Vote,
    judge_decision,
    progress,
    quorum_met,
    review_of,
    valid_votes,
    votes_from_json,
    votes_to_json,
)
from approvals.core.standing import (
    MAX_USES_LIMIT,
    REMEMBER_CHOICES,
    REMEMBER_MAX_SECONDS,
    REMEMBER_MIN_SECONDS,
    Constraint,
    RememberRequest,
    StandingGrant,
)
from approvals.errors import DecisionRefused, RefusalKind, StoreError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass

# Re-exported: the channels build RememberRequests and read where a review stands from here.
__all__ = [
    "MAX_USES_LIMIT",
    "REMEMBER_CHOICES",
    "REMEMBER_MAX_SECONDS",
    "REMEMBER_MIN_SECONDS",
    "Deciding",
    "RememberRequest",
    "ReviewState",
    "review_of",
]


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
_PENDING: tuple[Status, ...] = ("pending",)


class Deciding:
    """The decision path of the approval service (see the module's docstring)."""

    store: ServiceStore
    clock: Callable[[], float]
    owner: str
    _judge: Judge | None

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

        async def _save_grant(
            self,
            decided: Approval,
            reviewer: Principal,
            channel: str,
            approve: bool,
            reason: str | None,
            remember: RememberRequest,
            constraints: tuple[Constraint, ...],
        ) -> StandingGrant: ...

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
            check_seen(approval, reviewer, seen_sha256, approve=approve, editing=arguments is not None)
            rule = review_of(approval)
            # Who and through which channel first: a reviewer who may not decide learns that, not
            # what is wrong with an edit they may not make.
            who = judge_decision(
                rule, (), escalated=approval.escalated, reviewer=reviewer.name,
                groups=reviewer.groups, channel=channel, approve=False,
            )  # fmt: skip
            if who is not None:
                raise DecisionRefused(who.kind, who.message, approval)
            edit = check_edit(approval, rule, arguments, approve, self._judge)
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
            constraints = (
                remembered_constraints(approval, rule, remember, released_args) if remember else None
            )
            decided = await (
                self._approve(approval, rule, reviewer, channel, reason, votes, edit)
                if approve
                else self._deny(approval, reviewer, channel, reason)
            )
            if decided is None:
                continue  # another step moved the record first: read it again and judge anew
            grant = None
            if remember is not None and constraints is not None:
                try:
                    grant = await self._save_grant(
                        decided, reviewer, channel, approve, reason, remember, constraints
                    )
                except StoreError:
                    # The decision stands (it is recorded and may be released already); only the
                    # grant is missing, which every channel shows by naming none. Fail closed:
                    # later calls are asked about again.
                    log.exception("approval %s decided, but its standing grant was not saved", decided.id)
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
        seen: Mapping[str, str] | None = None,
    ) -> list[tuple[str, Approval | DecisionRefused]]:
        """Each id decided on its own, in order. ``seen``: the arguments' hash each was shown with;
        an edited request without one is refused ("changed"), not approved blind."""
        outcomes: list[tuple[str, Approval | DecisionRefused]] = []
        for approval_id in approval_ids:
            try:
                decided, _ = await self.decide_and_remember(
                    approval_id, reviewer, approve=approve, reason=reason, channel=channel,
                    seen_sha256=(seen or {}).get(approval_id),
                )  # fmt: skip
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
        complete = quorum_met(rule, (*votes, vote))
        # The record's reason is its latest step's (the store writes it to that step's audit event
        # too): set even when None, so an earlier voter's reason never reads as this approval's.
        fields["reason"] = reason or None
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
        if edit is not None:  # both versions in the audit log: the hashes and what changed
            await self.store.append_audit(
                moved.id, "edited", actor=reviewer.name, channel=channel,
                args_sha256=moved.release_sha256, detail=edit_detail(approval, moved),
            )  # fmt: skip
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
            # Set even when None: an earlier voter's reason must not read as this denial's.
            "reason": reason or None,
        }
        moved = await self._move(
            approval.id, _PENDING, "denied", actor=reviewer.name, channel=channel, **fields
        )
        if moved is not None:
            await self._settle(moved)
        return moved
