"""The ephemeral answers to a Slack click — pure: values in, mrkdwn text out.

Only the clicking reviewer sees these (chat.postEphemeral): why nothing was decided, or what the
message cannot say to them alone (their approval counted towards a quorum, the grant they saved).
Every refusal the service can give has its answer in :func:`refusal`, an exhaustive match over
``RefusalKind``: mypy fails when a kind is added and not answered here. Untrusted text is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from approvals.channels.slack_blocks import MAX_NAME, MAX_REASON, already_decided, escape, fit, link, when
from approvals.core import render
from approvals.core.model import Approval
from approvals.core.standing import StandingGrant
from approvals.errors import RefusalKind

__all__ = [
    "Refusing",
    "counted",
    "not_a_reviewer",
    "not_recorded",
    "own_agent",
    "refusal",
    "remembered",
    "unknown_approval",
]


def not_a_reviewer() -> str:
    return "Only configured reviewers can decide approvals, and your Slack account is not one of them."


def own_agent(approval: Approval) -> str:
    return (
        f"You run agent {escape(approval.grant)}: a reviewer may not decide their own agent's calls. "
        "Ask another reviewer."
    )


def not_recorded() -> str:
    return "The gateway could not record your decision (its store failed), so nothing was decided. Try again."


def unknown_approval() -> str:
    return "This approval is not known to the gateway (it may belong to another gateway)."


def counted(progress: str) -> str:
    """An approval short of the quorum: "Counted: 1 of 2 approvals, waiting for someone in security."."""
    return f"Counted: {escape(progress or 'your approval is recorded; the rule needs more')}."


def remembered(grant: StandingGrant, *, grants_url: str) -> str:
    """The clicking reviewer's confirmation of approve and remember."""
    lasting = render.duration(grant.expires_at - grant.created_at)
    agent, tool = escape(fit(grant.grant, MAX_NAME)), escape(fit(grant.tool, MAX_NAME))
    return (
        f"Approved and remembered for {lasting} (grant `{escape(grant.id)}`): {agent}'s calls of `{tool}` "
        f"with exactly these arguments are allowed without asking until {when(grant.expires_at)}. "
        f"To widen the constraints or revoke it, use {link(grants_url, 'the inbox')}."
    )


@dataclass(frozen=True, slots=True)
class Refusing:
    """What a refusal's answer may name: the inbox link, the quorum's progress, who may decide."""

    url: str
    progress: str = ""
    deciders: tuple[str, ...] = ()


def refusal(kind: RefusalKind, message: str, approval: Approval | None, where: Refusing) -> str:
    """The ephemeral answer to a decision the service refused — one per kind, none forgotten."""
    said = escape(fit(render.one_line(message), MAX_REASON)).rstrip(".")
    match kind:
        case "unknown":
            return unknown_approval()
        case "not_reviewer":
            return not_a_reviewer()
        case "own_agent":
            return own_agent(approval) if approval is not None else f"{said}."
        case "already_decided" | "expired":
            return already_decided(approval) if approval is not None else f"{said}."
        case "not_eligible":
            who = ", ".join(escape(fit(name, MAX_NAME)) for name in where.deciders)
            also = f" Reviewers who may: {who}." if who else ""
            return f"You may not decide this request: {said}.{also}"
        case "step_up":
            return f"Not decided: {said}. {link(where.url, 'Decide in the inbox')}"
        case "already_voted":
            count, _, waiting = where.progress.partition(", waiting for ")
            if waiting:
                return f"You have approved this already; waiting for {escape(waiting)} ({escape(count)})."
            return "You have approved this already; another reviewer's approval is needed."
        case "edit_refused":
            return f"The edit was refused: {said}. {link(where.url, 'Edit in the inbox')}"
        case "changed":
            return f"Not decided: {said}. The message now shows the call as it stands."
        case "remember_refused":
            return (
                f"Nothing was decided: {said}. Approve without remembering, "
                f"or save a grant in {link(where.url, 'the inbox')}."
            )
        case _:
            assert_never(kind)
