"""The review parts of an approval's Slack message — pure: values in, Block Kit out, no I/O, no clock.

::

    header · [escalated to oncall: undecided for 10 min] · the request (slack_blocks)
    why          tool badges, "differs from the last approved call in: amount, to", recent tally
    review       "1 of 2 approvals, waiting for someone in security", who approved so far
    controls     Approve & remember… (select) · Edit in inbox (link) · Approve / Deny
                 — or, for a rule that takes decisions only in the inbox, a link there and why
    outcome      approved (with changes) by … and remembered for 1 h (grant sg_…), the diff

Slack offers only the exact "approve and remember" (the approved call's arguments, 1 h / 8 h /
24 h, no use limit): widening constraints, use limits and "deny and remember" need the inbox, which
shows the grant in words before saving it. Slack cannot host the schema editor either, so "Edit"
is a link. Everything untrusted is escaped with :func:`slack_blocks.escape`; values are cut to
Block Kit limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from approvals.channels import slack_blocks as blocks
from approvals.channels.slack_blocks import MAX_NAME, Block, Message, escape, fit, mrkdwn, plain, when
from approvals.core import render
from approvals.core.deciding import REMEMBER_CHOICES, ReviewState
from approvals.core.model import Approval
from approvals.core.review import ReviewRule, Vote
from approvals.core.standing import StandingGrant
from approvals.core.why import Why, diff_arguments

__all__ = [
    "ACTION_EDIT",
    "ACTION_OPEN_INBOX",
    "ACTION_REMEMBER",
    "Review",
    "escalation_text",
    "read_remember_choice",
    "remember_choice",
    "request_message",
    "step_up",
]

ACTION_REMEMBER = "approvals_remember"  # static select: approve and remember for 1 h / 8 h / 24 h
ACTION_EDIT = "approvals_edit_in_inbox"  # link button: the inbox's editor
ACTION_OPEN_INBOX = "approvals_open_inbox"  # link button: decide in the inbox (step-up rules)
LINK_ACTIONS = (ACTION_EDIT, ACTION_OPEN_INBOX)  # Slack still sends a click for a link: acked, no more

MAX_OPTION_TEXT = 75
MAX_CONFIRM_TEXT = 300
MAX_VALUE = 80  # a diff's value shown in a line; the inbox shows it in full
MAX_PATHS = 20  # paths named in "differs from the last approved call in"

# The tool annotations shown as badges, when the tool sets them to true.
BADGES = (
    ("destructiveHint", "🔥 destructive"),
    ("openWorldHint", "🌐 open world"),
    ("readOnlyHint", "👁 read-only"),
    ("idempotentHint", "🔁 idempotent"),
)
_TALLY_ORDER = ("approved", "denied", "expired", "cancelled")
_VIA_WORDS = {"inbox": "the inbox", "api": "the API or CLI", "slack": "Slack"}
_APPROVED = frozenset({"approved", "released", "completed", "failed"})


@dataclass(frozen=True, slots=True)
class Review:
    """What the message shows beyond the record, as the channel read it from the service."""

    state: ReviewState
    why: Why | None = None  # None when it could not be read (the message goes out without it)
    remembered: StandingGrant | None = None  # the standing grant saved with the approval


def step_up(rule: ReviewRule) -> bool:
    """Whether the rule refuses decisions from Slack (its ``via`` names other channels only)."""
    return bool(rule.via) and "slack" not in rule.via


def _via_words(rule: ReviewRule) -> str:
    return " or ".join(_VIA_WORDS.get(v, escape(v)) for v in rule.via)


def _groups(groups: Sequence[str]) -> str:
    names = [escape(fit(render.visible(g), MAX_NAME)) for g in groups]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def escalation_text(rule: ReviewRule, step: int) -> str:
    """ "Escalated to oncall: undecided for 10 min" (plain words; escaped)."""
    if not 1 <= step <= len(rule.escalate):
        return "Escalated"
    escalation = rule.escalate[step - 1]
    return f"Escalated to {_groups(escalation.to)}: undecided for {render.duration(escalation.after)}"


# ---- the message --------------------------------------------------------------------------------


def request_message(
    approval: Approval, review: Review, *, url: str, now: float, escalation: int = 0
) -> Message:
    """The message of an approval with its review; ``escalation`` > 0: the post of that escalation step."""
    rule = review.state.rule
    lead: list[Block] = []
    fallback = None
    if escalation:
        text = escalation_text(rule, escalation)
        lead.append({"type": "context", "elements": [mrkdwn(f"⏫ *{text}*")]})
        if approval.status == "pending":
            who, tool = escape(approval.grant), escape(approval.tool)
            fallback = f"{text} — {who} wants to call {tool} on {escape(approval.upstream)}"
    context = [b for b in (_why_block(review.why), _review_block(approval, review.state)) if b is not None]
    outcome, after = _outcome(approval, review)
    return blocks.approval_message(
        approval,
        url=url,
        now=now,
        lead=lead,
        context=context,
        controls=_controls(approval, review.state, url),
        outcome=outcome,
        after=after,
        fallback=fallback,
    )


def _why_block(why: Why | None) -> Block | None:
    """What makes the call risky, in one context block (the explanation is in the request's rule field)."""
    if why is None:
        return None
    parts: list[str] = []
    badges = [label for hint, label in BADGES if why.annotations.get(hint) is True]
    if badges:
        parts.append("*Tool:* " + " · ".join(badges))
    if why.previous is not None:
        if why.diff:
            paths = [f"`{escape(fit(render.visible(c.path), MAX_NAME))}`" for c in why.diff[:MAX_PATHS]]
            more = f" and {len(why.diff) - MAX_PATHS} more" if len(why.diff) > MAX_PATHS else ""
            parts.append("*Differs from the last approved call in:* " + ", ".join(paths) + more)
        else:
            parts.append("*Same arguments as the last approved call* of this tool by this agent")
    tally = [f"{why.recent[k]} {k}" for k in _TALLY_ORDER if why.recent.get(k)]
    if tally:
        parts.append("*This agent's calls of this tool, last 30 days:* " + ", ".join(tally))
    if not parts:
        return None
    return {"type": "context", "elements": [mrkdwn("\n".join(parts))]}


def _voters(votes: Sequence[Vote]) -> str:
    shown = (f"*{escape(fit(render.visible(v.by), MAX_NAME))}* via {escape(render.channel_name(v.via))}"
             for v in votes)  # fmt: skip
    return ", ".join(shown)


def _review_block(approval: Approval, state: ReviewState) -> Block | None:
    """While pending: quorum progress, who approved so far, where it was escalated."""
    if approval.status != "pending":
        return None
    lines: list[str] = []
    if state.progress:
        lines.append(f"*Review:* {escape(state.progress)}")
    if state.votes:
        lines.append(f"*Approved so far:* {_voters(state.votes)}")
    if state.escalated_to:
        lines.append(f"⏫ *Escalated to* {_groups(state.escalated_to)}")
    return {"type": "section", "text": mrkdwn("\n".join(lines))} if lines else None


def _controls(approval: Approval, state: ReviewState, url: str) -> list[Block]:
    """While pending: what a reviewer may do from Slack. Approve / Deny stay the last actions block."""
    rule = state.rule
    if step_up(rule):
        why = (
            f"🔒 This rule accepts decisions only in {_via_words(rule)}: "
            "a Slack click is refused (Slack's sign-in is weaker than the inbox's)."
        )
        controls: list[Block] = [{"type": "section", "text": mrkdwn(why)}]
        if "inbox" in rule.via:
            button = _link_button(ACTION_OPEN_INBOX, "Decide in the inbox", url, approval.id, primary=True)
            controls.append({"type": "actions", "block_id": "approvals_step_up", "elements": [button]})
        return controls
    controls = []
    if state.may_remember:
        controls.append(_remember_section(approval))
    if state.may_edit:
        text = "*Edit before approving?* Slack cannot change the arguments; the inbox can."
        # ?edit=1 opens the inbox's editor (#edit scrolls to it).
        button = _link_button(ACTION_EDIT, "Edit in inbox", f"{url}?edit=1#edit", approval.id)
        controls.append({"type": "section", "text": mrkdwn(text), "accessory": button})
    controls.append(blocks.decision_buttons(approval))
    return controls


def _link_button(action_id: str, label: str, url: str, approval_id: str, *, primary: bool = False) -> Block:
    button: Block = {
        "type": "button",
        "action_id": action_id,
        "text": plain(label, blocks.MAX_BUTTON),
        "url": url,
        "value": approval_id,
    }
    if primary:
        button["style"] = "primary"
    return button


def _remember_section(approval: Approval) -> Block:
    agent, tool = escape(fit(approval.grant, MAX_NAME)), escape(fit(approval.tool, MAX_NAME))
    text = (
        f"*Approve & remember:* approve, and let *{agent}* make this same call of `{tool}` again "
        "without asking for a while. To widen the constraints, use the inbox."
    )
    confirm = (
        f"{approval.grant}'s calls of {approval.tool} with exactly these arguments will be allowed "
        "without asking for the time you picked. Revoke it in the inbox."
    )
    select = {
        "type": "static_select",
        "action_id": ACTION_REMEMBER,
        "placeholder": plain("Approve & remember…", MAX_OPTION_TEXT),
        "options": [
            {
                "text": plain(f"Approve, remember {label}", MAX_OPTION_TEXT),
                "value": remember_choice(approval.id, d, approval.release_sha256),
            }
            for label, d in REMEMBER_CHOICES
        ],
        "confirm": {
            "title": plain("Approve and remember?", 100),
            "text": plain(confirm, MAX_CONFIRM_TEXT),
            "confirm": plain("Approve", 30),
            "deny": plain("Cancel", 30),
        },
    }
    return {"type": "section", "block_id": "approvals_remember", "text": mrkdwn(text), "accessory": select}


def remember_choice(approval_id: str, seconds: float, seen_sha256: str = "") -> str:
    """An option's value: the approval id, the hash of the arguments the message shows, and one of
    REMEMBER_CHOICES' durations."""
    return f"{approval_id}:{seen_sha256}:{int(seconds)}"


def read_remember_choice(value: str) -> tuple[str, str | None, float] | None:
    """(approval id, the arguments' hash shown or None, seconds) from an option's value: only a
    duration Slack offers, else None. A value without the hash (a message posted before it was
    carried) reads as None: the decision is then not checked against what was shown."""
    head, _, seconds = value.rpartition(":")
    approval_id, _, seen = head.partition(":")
    offered = {str(int(s)): s for _, s in REMEMBER_CHOICES}
    if not approval_id or seconds not in offered:
        return None
    return approval_id, seen or None, offered[seconds]


def read_approve_value(value: str) -> tuple[str, str | None]:
    """(approval id, the arguments' hash the message showed, or None) from an Approve button."""
    approval_id, _, seen = value.partition(":")
    return approval_id, seen or None


def _outcome(approval: Approval, review: Review) -> tuple[str | None, list[Block]]:
    """Once decided: the outcome line (with changes, remembered) and what follows it (diff, approvers)."""
    if approval.status == "pending":
        return None, [_changes(approval)] if approval.edited_json is not None else []
    approved = "Approved with changes" if approval.edited_json is not None else "Approved"
    also = ""
    grant = review.remembered
    if grant is not None and approval.status in _APPROVED:
        lasting = render.duration(grant.expires_at - grant.created_at)
        also = f" and remembered for {lasting} (grant `{escape(grant.id)}`, until {when(grant.expires_at)})"
    after: list[Block] = []
    if approval.edited_json is not None:
        after.append(_changes(approval))
    if len(review.state.votes) > 1 and approval.status in _APPROVED:
        after.append({"type": "context", "elements": [mrkdwn(f"*Approvals:* {_voters(review.state.votes)}")]})
    return blocks.outcome_text(approval, approved=approved, also=also), after


def _changes(approval: Approval) -> Block:
    """The reviewer's edit: each changed path, before → after (values cut; the inbox has them whole)."""
    editor = escape(fit(render.visible(approval.edited_by or "a reviewer"), MAX_NAME))
    if approval.status == "pending":
        head = f"*Edited by {editor}* (approvals count for the edited arguments):"
    else:
        head = f"*Changed by {editor} before approving:*"
    changes = diff_arguments(approval.arguments, approval.release_arguments)
    lines, used = [head], blocks.text_length(head)
    for n, change in enumerate(changes):
        path = escape(fit(render.visible(change.path), MAX_NAME))
        line = f"• `{path}`: {_side(change.before)} → {_side(change.after)}"
        if used + blocks.text_length(line) + 60 > blocks.MAX_TEXT:  # room for the "more" line
            lines.append(f"…and {len(changes) - n} more: see the inbox")
            break
        lines.append(line)
        used += blocks.text_length(line) + 1
    if not changes:
        lines.append("(no difference in the arguments)")
    return {"type": "section", "text": mrkdwn("\n".join(lines))}


def _side(value: str | None) -> str:
    return "_(absent)_" if value is None else f"`{fit(escape(value), MAX_VALUE)}`"
