"""Review workflows on top of a decision: quorum, eligibility, step-up, edits and standing grants.

(Filled in by the lead; the signatures here are the contract the channels code against.)
"""

from __future__ import annotations

from dataclasses import dataclass

from approvals.core.review import ReviewRule, Vote
from approvals.core.standing import Constraint

__all__ = ["RememberRequest", "ReviewState"]

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
