"""The Slack messages of an approval, as Block Kit JSON — pure: values in, values out, no I/O, no clock.

The words are approvals.core.render's, shared with the inbox, the CLI and the agent; this module
adds the Slack markup. Everything a requester controls (tool arguments, the tool's name and
description as the upstream lists them, reasons, names) goes through :func:`escape` before it
reaches a mrkdwn text, so it cannot mention anyone (``<!channel>``, ``<@U…>``), disguise a link
(``<http://evil|innocent>``), or close the code block it is shown in. Our own markup (the inbox
link, dates) is added after escaping. Mrkdwn texts are ``verbatim`` so Slack does not turn bare
names into mentions either.

Every text is cut to its Block Kit limit (measured in UTF-16 units, as Slack counts), never
inside an HTML entity; a message has at most a dozen blocks, well under the 50 allowed. Long
arguments end with a note and a link to the inbox, which shows them in full.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from approvals.core import render
from approvals.core.model import Approval

__all__ = [
    "ACTION_APPROVE",
    "ACTION_DENY",
    "DENY_VIEW",
    "MAX_BLOCKS",
    "MAX_TEXT",
    "Message",
    "already_decided",
    "approval_message",
    "decision_buttons",
    "deny_modal",
    "escape",
    "fit",
    "outcome_text",
    "read_deny_submission",
    "superseded_message",
    "text_length",
]

Block = dict[str, Any]

ACTION_APPROVE = "approvals_approve"
ACTION_DENY = "approvals_deny"
DENY_VIEW = "approvals_deny_reason"
REASON_BLOCK = "reason"
REASON_INPUT = "reason_input"

# Block Kit limits (https://docs.slack.dev/reference/block-kit).
MAX_BLOCKS = 50
MAX_TEXT = 3000  # a section's text, a context element
MAX_FIELD = 2000  # each of a section's fields
MAX_HEADER = 150
MAX_BUTTON = 75
MAX_MODAL_TITLE = 24
MAX_FALLBACK = 500  # the notification text; Slack allows more, a notification shows less
MAX_REASON = render.MAX_REASON_CHARS  # as the API and the inbox accept
# Shorter than the limits on purpose: a reviewer should see the arguments first.
MAX_DESCRIPTION = 600
MAX_NAME = 200
ELLIPSIS = "…"
# A backtick could close the code block the arguments are shown in: show a look-alike instead
# (U+02CB MODIFIER LETTER GRAVE ACCENT). The inbox shows the exact text.
BACKTICK_STANDIN = "\u02cb"

_HEADERS = {
    "pending": "Approval needed",
    "approved": "Approved",
    "released": "Approved",
    "completed": "Approved",
    "failed": "Approved, but the call failed",
    "denied": "Denied",
    "expired": "Expired",
    "cancelled": "Cancelled",
}
_ICONS = {"approved": "✅", "released": "✅", "completed": "✅", "failed": "⚠️", "denied": "⛔"}
_ICONS |= {"expired": "⌛", "cancelled": "🚫"}
_APPROVED = frozenset({"approved", "released", "completed", "failed"})
_SENT = frozenset({"released", "completed", "failed"})  # states with an outcome worth a line
GATEWAY = "gateway"  # who "decided" what no reviewer did (a deny on timeout)


@dataclass(frozen=True, slots=True)
class Message:
    """What chat.postMessage and chat.update take: a notification text and the blocks."""

    text: str
    blocks: list[Block]

    def as_kwargs(self) -> dict[str, Any]:
        return {"text": self.text, "blocks": self.blocks}


# ---- text ---------------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Untrusted text made inert for mrkdwn: ``& < >`` as entities, backticks as a look-alike."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("`", BACKTICK_STANDIN)


def text_length(text: str) -> int:
    """The length Slack counts: UTF-16 code units (an emoji outside the BMP counts two)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def fit(text: str, limit: int) -> str:
    """``text`` if it is within ``limit``, else cut to end with "…" — never inside an entity."""
    if text_length(text) <= limit:
        return text
    budget = limit - text_length(ELLIPSIS)
    cut: list[str] = []
    used = 0
    for char in text:
        size = 2 if ord(char) > 0xFFFF else 1
        if used + size > budget:
            break
        cut.append(char)
        used += size
    kept = "".join(cut)
    # `&amp;` cut to `&am` would render as garbage; drop the partial entity.
    amp = kept.rfind("&", max(0, len(kept) - 5))
    if amp != -1 and ";" not in kept[amp:]:
        kept = kept[:amp]
    return kept + ELLIPSIS


def plain(text: str, limit: int) -> Block:
    """A plain_text object (headers, buttons, modal titles): never parsed, only cut to its limit."""
    return {"type": "plain_text", "text": fit(text, limit), "emoji": True}


def mrkdwn(text: str, limit: int = MAX_TEXT) -> Block:
    # verbatim: no automatic linking of names, channels or URLs in anything we did not mark up.
    return {"type": "mrkdwn", "text": fit(text, limit), "verbatim": True}


def link(url: str, label: str) -> str:
    """Our own link markup; the URL is escaped too, so a `|` or `>` in it cannot change the label."""
    return f"<{escape(url).replace('|', '%7C')}|{escape(label)}>"


def when(at: float) -> str:
    """A time shown in each reader's own time zone, with a UTC fallback for old clients."""
    fallback = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))
    return f"<!date^{int(at)}^{{date_short_pretty}} at {{time}}|{fallback}>"


def _via(channel: str | None) -> str:
    return f" via {escape(render.channel_name(channel))}" if channel else ""


# ---- the request message ------------------------------------------------------------------------


def approval_message(
    approval: Approval,
    *,
    url: str,
    now: float,
    lead: Sequence[Block] = (),
    context: Sequence[Block] = (),
    controls: Sequence[Block] | None = None,
    outcome: str | None = None,
    after: Sequence[Block] = (),
    fallback: str | None = None,
) -> Message:
    """The message for an approval in any state: buttons while pending, else who decided and why.

    The review parts (``approvals.channels.slack_review``) come in as blocks: ``lead`` after the
    header, ``context`` after the request, ``controls`` instead of Approve / Deny while pending,
    ``outcome`` instead of the plain outcome line and ``after`` below it once decided.
    """
    blocks: list[Block] = [
        {"type": "header", "text": plain(_header(approval), MAX_HEADER)},
        *lead,
        *_request_blocks(approval, url=url, now=now),
        *context,
    ]
    if approval.status == "pending":
        if approval.note:  # e.g. it came back because the tool's definition changed
            blocks.append({"type": "context", "elements": [mrkdwn(f"⚠️ {escape(approval.note)}")]})
        blocks.extend(controls if controls is not None else [decision_buttons(approval)])
    else:
        said = outcome if outcome is not None else outcome_text(approval)
        blocks.append({"type": "section", "text": mrkdwn(said)})
        blocks.extend(after)
    footer = _footer(approval, url)
    # The footer (the inbox link) survives any cut.
    return Message(fit(fallback or _fallback(approval), MAX_FALLBACK), [*blocks[: MAX_BLOCKS - 1], footer])


def superseded_message(approval: Approval, *, url: str, now: float) -> Message:
    """The old message of a request that came back for review and was posted again."""
    why = escape(approval.note or "it came back for a new review")
    blocks: list[Block] = [
        {"type": "header", "text": plain("Back for review", MAX_HEADER)},
        *_request_blocks(approval, url=url, now=now),
        {"type": "section", "text": mrkdwn(f"↩️ Sent back for review: {why}. See the newer message.")},
        _footer(approval, url),
    ]
    return Message(_fallback(approval), blocks)


def _header(approval: Approval) -> str:
    return _HEADERS.get(approval.status, escape(approval.status))


def _fallback(approval: Approval) -> str:
    """The notification text (and what screen readers and old clients show)."""
    who, tool, where = escape(approval.grant), escape(approval.tool), escape(approval.upstream)
    if approval.status == "pending":
        return fit(f"Approval needed: {who} wants to call {tool} on {where}", MAX_FALLBACK)
    return fit(f"{_header(approval)}: {tool} on {where} for {who}", MAX_FALLBACK)


def _request_blocks(approval: Approval, *, url: str, now: float) -> list[Block]:
    """What was asked, by whom, under which rule: the same in every state of the message."""
    owner = f" (run by *{escape(approval.owner)}*)" if approval.owner else ""
    who = (
        f"*{escape(fit(approval.grant, MAX_NAME))}*{owner} wants to call "
        f"`{escape(fit(approval.tool, MAX_NAME))}` on *{escape(fit(approval.upstream, MAX_NAME))}*."
    )
    blocks: list[Block] = [{"type": "section", "text": mrkdwn(who)}]
    description = _description(approval.tool_json)
    if description:
        text = f"*Tool description* (from the upstream)\n{escape(fit(description, MAX_DESCRIPTION))}"
        blocks.append({"type": "section", "text": mrkdwn(text)})
    blocks.append({"type": "section", "text": mrkdwn(_arguments(approval, url))})
    rule = f"*Rule*\n`{escape(fit(approval.rule, MAX_NAME))}`"
    if approval.explanation:
        rule += f" — {escape(approval.explanation)}"
    fields = [mrkdwn(rule, MAX_FIELD), mrkdwn(f"*Requested*\n{when(approval.created_at)}", MAX_FIELD)]
    if approval.status == "pending":
        # Relative to the request, not to `now`: a message is not re-rendered as time passes.
        lifetime = render.duration(approval.expires_at - approval.created_at)
        expires = f"*Expires*\n{when(approval.expires_at)} ({lifetime} after the request)"
        if now >= approval.expires_at:
            expires += " — overdue, closing"
        fields.append(mrkdwn(expires, MAX_FIELD))
    blocks.append({"type": "section", "fields": fields})
    return blocks


def _description(tool_json: str) -> str:
    try:
        definition = json.loads(tool_json) if tool_json else None
    except ValueError:
        return ""
    if isinstance(definition, dict) and isinstance(definition.get("description"), str):
        return str(definition["description"]).strip()
    return ""


def _arguments(approval: Approval, url: str) -> str:
    """Pretty JSON in a code block; when too long, cut with a note that links to the whole in the inbox.

    An edited call shows the arguments as edited: those are what an approval now releases.
    """
    raw = approval.edited_json if approval.edited_json is not None else approval.arguments_json
    try:
        pretty = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        pretty = raw
    body = escape(pretty)
    head, tail = "*Arguments*\n```", "```"
    if approval.edited_json is not None:
        editor = escape(fit(approval.edited_by or "a reviewer", MAX_NAME))
        head = f"*Arguments* (as edited by *{editor}*; the changes are listed below)\n```"
    if text_length(head + body + tail) <= MAX_TEXT:
        return head + body + tail
    note = (
        f"\n_Cut to fit Slack: {text_length(pretty):,} characters in all._ "
        f"{link(url, 'See them in full in the inbox')}"
    )
    room = MAX_TEXT - text_length(head + tail + note)
    return head + fit(body, room) + tail + note


def outcome_text(approval: Approval, *, approved: str = "Approved", also: str = "") -> str:
    """Who decided, when and why — or what the gateway did (expired, cancelled, denied on timeout).

    ``approved`` names an approval ("Approved with changes"); ``also`` is added after it (what
    was remembered). Both are mrkdwn the caller escaped.
    """
    icon, status = _ICONS.get(approval.status, "•"), approval.status
    by = f" by *{escape(render.decider(approval))}*{_via(approval.decided_via)}"
    decided = f" {when(approval.decided_at)}" if approval.decided_at is not None else ""
    if status in _APPROVED:
        line = f"{icon} *{approved}*{by}{decided}{also}"
        if status in _SENT:
            line += f"\n*Outcome:* {escape(render.outcome(approval))}"
    elif status == "denied" and approval.decided_by in (None, GATEWAY):
        # A rule with on_timeout = "deny": no reviewer decided; the gateway denied it at the timeout.
        at = approval.decided_at if approval.decided_at is not None else approval.finished_at
        line = f"{icon} *Denied: no decision in time*{f' {when(at)}' if at is not None else ''}"
    elif status == "denied":
        line = f"{icon} *Denied*{by}{decided}"
    else:
        finished = f" {when(approval.finished_at)}" if approval.finished_at is not None else ""
        line = f"{icon} *{_header(approval)}*{finished}"
        if approval.decided_by:  # approved, then expired waiting for room under a rate limit
            line += f" (approved{by})"
    # A failed call's reason ("timeout", "interrupted") is already in the outcome's words.
    if approval.reason and status != "failed":
        line += f"\n*Reason:* {escape(fit(render.visible(approval.reason), MAX_REASON))}"
    return line


def decision_buttons(approval: Approval) -> Block:
    # The values name the approval (and Approve the hash of the arguments the message shows):
    # everything else is read from the store when the click comes, so a tampered or stale message
    # can never change what is decided — a click on a message older than an edit is refused.
    return {
        "type": "actions",
        "block_id": "approvals_decide",
        "elements": [
            {
                "type": "button",
                "action_id": ACTION_APPROVE,
                "text": plain("Approve", MAX_BUTTON),
                "style": "primary",
                # What the message shows: a click after an edit it has not shown yet is refused.
                "value": f"{approval.id}:{approval.release_sha256}",
            },
            {
                "type": "button",
                "action_id": ACTION_DENY,
                "text": plain("Deny", MAX_BUTTON),
                "style": "danger",
                "value": approval.id,
            },
        ],
    }


def _footer(approval: Approval, url: str) -> Block:
    text = f"{link(url, 'Open in the inbox')} · approval `{escape(approval.id)}`"
    return {"type": "context", "elements": [mrkdwn(text)]}


# ---- the deny modal -----------------------------------------------------------------------------


def deny_modal(approval: Approval, *, channel: str) -> Block:
    """The view views.open shows on Deny: one required reason, which reaches the agent."""
    metadata = json.dumps({"approval_id": approval.id, "channel": channel})
    question = (
        f"Deny `{escape(fit(approval.tool, MAX_NAME))}` for *{escape(approval.grant)}*? "
        "Your reason is shown to the agent."
    )
    return {
        "type": "modal",
        "callback_id": DENY_VIEW,
        "private_metadata": metadata,
        "title": plain("Deny the call", MAX_MODAL_TITLE),
        "submit": plain("Deny", MAX_MODAL_TITLE),
        "close": plain("Cancel", MAX_MODAL_TITLE),
        "blocks": [
            {"type": "section", "text": mrkdwn(question)},
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": plain("Reason", MAX_BUTTON),
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": MAX_REASON,
                },
            },
        ],
    }


def read_deny_submission(view: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(approval id, channel, reason) from a submitted deny modal, or None if it is not one."""
    try:
        metadata = json.loads(view.get("private_metadata") or "")
        value = view["state"]["values"][REASON_BLOCK][REASON_INPUT]["value"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(metadata, dict):
        return None
    approval_id, channel = metadata.get("approval_id"), metadata.get("channel")
    if not (isinstance(approval_id, str) and isinstance(channel, str) and isinstance(value, str)):
        return None
    return approval_id, channel, value.strip()[:MAX_REASON]


# ---- ephemeral answers to a click (the rest are in slack_answers) -------------------------------


def already_decided(approval: Approval) -> str:
    return escape(render.already_decided(approval))
