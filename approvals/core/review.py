"""Who may decide an approval, how many must agree, and through which channel — pure, no I/O.

A policy rule's ``approval`` object becomes a :class:`ReviewRule`, kept with the approval when it
is opened (``Approval.review_json``), so a decision is judged by the rule the call was held under
even after the policy changes or the gateway restarts.

    reviewers   groups whose members may decide (none: every reviewer)
    quorum      distinct approvals needed; with ``from``, at least one from each of those groups
    via         channels a decision may come through ("inbox", "slack", "api"; none: any)
    remember    whether a reviewer may approve (or deny) with a standing grant
    edit        whether a reviewer may change the arguments before approving
    escalate    after a time undecided, announce to more groups (who may then decide too)
    on_timeout  "expire" (default) or "deny" when nobody decided in time

Each approval is a :class:`Vote` bound to the arguments it approved: a reviewer who edits the
call invalidates the votes given for the arguments before the edit. The owner of the agent never
votes; a single denial by an eligible reviewer denies at once.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    from approvals.core.model import Approval

log = logging.getLogger(__name__)

__all__ = [
    "CHANNEL_OF_VIA",
    "DEFAULT_REVIEW",
    "UNREADABLE_REVIEW",
    "VIA_NAMES",
    "VIA_OF_CHANNEL",
    "Escalation",
    "OnTimeout",
    "Refusal",
    "ReviewRule",
    "Vote",
    "eligible_groups",
    "judge_decision",
    "progress",
    "quorum_met",
    "review_of",
    "valid_votes",
    "votes_from_json",
    "votes_to_json",
]

OnTimeout: TypeAlias = Literal["expire", "deny"]

# A policy's ``via`` names → the channel a decision is recorded with (``Approval.decided_via``).
# The CLI decides through the API, so it is "api" too.
CHANNEL_OF_VIA: Mapping[str, str] = {"inbox": "web", "slack": "slack", "api": "api"}
VIA_NAMES: tuple[str, ...] = tuple(CHANNEL_OF_VIA)
VIA_OF_CHANNEL: Mapping[str, str] = {channel: via for via, channel in CHANNEL_OF_VIA.items()}
_VIA_WORDS = {"inbox": "the inbox", "slack": "Slack", "api": "the API"}


@dataclass(frozen=True, slots=True)
class Escalation:
    """After ``after`` seconds undecided, the request is announced to the groups ``to``."""

    after: float
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReviewRule:
    """How a held call must be reviewed (a policy rule's ``approval`` object, parsed)."""

    timeout: float | None = None  # seconds; None = the gateway's default
    reviewers: tuple[str, ...] = ()
    quorum: int = 1
    from_groups: tuple[str, ...] = ()
    via: tuple[str, ...] = ()
    remember: bool = True
    edit: bool = True
    escalate: tuple[Escalation, ...] = ()
    on_timeout: OnTimeout = "expire"

    @property
    def restricted(self) -> bool:
        """Whether only some reviewers may decide (``reviewers`` or ``from`` names groups)."""
        return bool(self.reviewers or self.from_groups)

    @property
    def may_remember(self) -> bool:
        """Standing grants skip every later review, so they are offered only where one reviewer
        alone may decide: never under a quorum."""
        return self.remember and self.quorum == 1

    def to_json(self) -> str:
        """The stored form: only what differs from the defaults ("" when nothing does)."""
        out: dict[str, Any] = {}
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.reviewers:
            out["reviewers"] = list(self.reviewers)
        if self.quorum != 1:
            out["quorum"] = self.quorum
        if self.from_groups:
            out["from"] = list(self.from_groups)
        if self.via:
            out["via"] = list(self.via)
        if not self.remember:
            out["remember"] = False
        if not self.edit:
            out["edit"] = False
        if self.escalate:
            out["escalate"] = [{"after": e.after, "to": list(e.to)} for e in self.escalate]
        if self.on_timeout != "expire":
            out["on_timeout"] = self.on_timeout
        return json.dumps(out, sort_keys=True, separators=(",", ":")) if out else ""

    @classmethod
    def from_json(cls, text: str) -> ReviewRule:
        """The rule kept with an approval ("" is the default rule). Raises ValueError on junk."""
        if not text:
            return DEFAULT_REVIEW
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a stored review rule must be a JSON object")
        on_timeout = raw.get("on_timeout", "expire")
        if on_timeout not in ("expire", "deny"):
            raise ValueError(f"unknown on_timeout {on_timeout!r}")
        return cls(
            timeout=None if raw.get("timeout") is None else float(raw["timeout"]),
            reviewers=_names(raw.get("reviewers", ())),
            quorum=int(raw.get("quorum", 1)),
            from_groups=_names(raw.get("from", ())),
            via=_names(raw.get("via", ())),
            remember=bool(raw.get("remember", True)),
            edit=bool(raw.get("edit", True)),
            escalate=tuple(Escalation(float(e["after"]), _names(e["to"])) for e in raw.get("escalate", ())),
            on_timeout=on_timeout,
        )


DEFAULT_REVIEW = ReviewRule()


def _names(raw: Iterable[object]) -> tuple[str, ...]:
    return tuple(str(name) for name in raw)


@dataclass(frozen=True, slots=True)
class Vote:
    """One reviewer's approval, and the arguments (by hash) it approved."""

    by: str
    at: float
    via: str  # the channel it came through ("web", "slack", "api")
    args_sha256: str
    groups: tuple[str, ...] = field(default=())  # the reviewer's groups when they voted

    def as_json(self) -> dict[str, Any]:
        return {"by": self.by, "at": self.at, "via": self.via, "args_sha256": self.args_sha256,
                "groups": list(self.groups)}  # fmt: skip


def votes_from_json(text: str) -> tuple[Vote, ...]:
    if not text:
        return ()
    return tuple(
        Vote(str(v["by"]), float(v["at"]), str(v["via"]), str(v["args_sha256"]), _names(v.get("groups", ())))
        for v in json.loads(text)
    )


def votes_to_json(votes: Iterable[Vote]) -> str:
    return json.dumps([v.as_json() for v in votes], sort_keys=True, separators=(",", ":"))


def valid_votes(votes: Iterable[Vote], args_sha256: str) -> tuple[Vote, ...]:
    """The votes that approved these arguments (an edit leaves the earlier ones behind)."""
    return tuple(v for v in votes if v.args_sha256 == args_sha256)


def eligible_groups(rule: ReviewRule, escalated: int) -> frozenset[str] | None:
    """The groups whose members may decide, after ``escalated`` escalation steps; None = anyone."""
    if not rule.restricted:
        return None
    extra = (g for step in rule.escalate[:escalated] for g in step.to)
    return frozenset(itertools.chain(rule.reviewers, rule.from_groups, extra))


def _covers(rule: ReviewRule, votes: Sequence[Vote]) -> bool:
    """Whether distinct votes can be matched one to each ``from`` group (a reviewer in two groups
    fills one of them): a bipartite matching, found by augmenting paths — polynomial, where trying
    every assignment would not be for a quorum of 20."""
    groups = rule.from_groups
    if len(votes) < len(groups):
        return False
    taken: dict[int, str] = {}  # vote index → the group it fills

    def place(group: str, seen: set[int]) -> bool:
        for i, vote in enumerate(votes):
            if group in vote.groups and i not in seen:
                seen.add(i)
                if i not in taken or place(taken[i], seen):
                    taken[i] = group
                    return True
        return False

    return all(place(group, set()) for group in groups)


def quorum_met(rule: ReviewRule, votes: Sequence[Vote]) -> bool:
    """``votes`` (already the valid ones) are enough to release the call."""
    return len({v.by for v in votes}) >= rule.quorum and _covers(rule, votes)


def _missing_groups(rule: ReviewRule, votes: Sequence[Vote]) -> tuple[str, ...]:
    """The ``from`` groups no vote can be counted for yet (in the rule's order)."""
    missing = []
    for group in rule.from_groups:
        if not any(group in v.groups for v in votes):
            missing.append(group)
    if not missing and not _covers(rule, votes):  # every group seen, but one voter for two of them
        return rule.from_groups
    return tuple(missing)


RefusalKindName: TypeAlias = Literal["not_eligible", "step_up", "already_voted"]


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKindName
    message: str


def judge_decision(
    rule: ReviewRule,
    votes: Sequence[Vote],
    *,
    escalated: int,
    reviewer: str,
    groups: Iterable[str],
    channel: str,
    approve: bool,
) -> Refusal | None:
    """Why this reviewer may not take this decision now, or None when they may.

    ``votes`` are the valid ones (for the arguments as they stand). The agent's owner is refused
    before this is asked (service.decide).
    """
    if rule.via and VIA_OF_CHANNEL.get(channel) not in rule.via:
        where = " or ".join(_VIA_WORDS.get(v, v) for v in rule.via)
        return Refusal("step_up", f"this call's rule accepts decisions only through {where}")
    mine = frozenset(groups)
    allowed = eligible_groups(rule, escalated)
    if allowed is not None and not mine & allowed:
        return Refusal("not_eligible", f"only {_group_list(sorted(allowed))} may decide this call")
    if not approve:
        return None
    if any(v.by == reviewer for v in votes):
        return Refusal("already_voted", f"{reviewer} has already approved this call; another reviewer must")
    missing = _missing_groups(rule, votes)
    still = rule.quorum - len(votes)
    # The last approvals must come from the groups still missing: a vote that fills none is refused
    # rather than counted, or the quorum could be met by the wrong people.
    if missing and still <= len(missing) and not mine & set(missing):
        return Refusal("not_eligible", f"waiting for someone in {_group_list(missing)}")
    return None


def progress(rule: ReviewRule, votes: Sequence[Vote], escalated: int = 0) -> str:
    """ "1 of 2 approvals, waiting for someone in security" ("" for a one-approval rule)."""
    if rule.quorum <= 1 and not rule.from_groups:
        return ""
    count = len(votes)
    text = f"{count} of {rule.quorum} approvals"
    missing = _missing_groups(rule, votes)
    if missing:
        return f"{text}, waiting for someone in {_group_list(missing)}"
    allowed = eligible_groups(rule, escalated)
    who = f"someone in {_group_list(sorted(allowed))}" if allowed else "another reviewer"
    return f"{text}, waiting for {who}"


def _group_list(groups: Sequence[str]) -> str:
    if len(groups) <= 1:
        return "".join(groups)
    return ", ".join(groups[:-1]) + " or " + groups[-1]


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
