"""An approval in words for people — the one wording the inbox, Slack, the CLI and the agent share.

Pure: values in, plain text out; no I/O, and `now` is always passed in. Nothing here is markup:
each channel escapes for its own medium (HTML autoescape in the inbox, mrkdwn in Slack).

Untrusted text (tool names, arguments, reasons, names) can carry characters a reviewer cannot
see — bidirectional overrides that reorder what follows, zero-width characters, control
characters — so :func:`visible` and :func:`segments` turn them into markers (``⟦U+202E⟧``).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Literal

from approvals.core.model import Approval

__all__ = [
    "MAX_REASON_CHARS",
    "SUMMARY_WIDTH",
    "Segment",
    "ago",
    "already_decided",
    "channel_name",
    "decided",
    "decider",
    "decision_text",
    "duration",
    "expires_in",
    "is_hidden",
    "json_chunks",
    "json_scalar",
    "one_line",
    "outcome",
    "reason_error",
    "segments",
    "span",
    "summary",
    "time_left",
    "visible",
]

# The longest reason a reviewer may give, in characters: the API refuses a longer one, the inbox's
# form and Slack's modal stop typing at it. Long enough for a paragraph an agent can act on.
MAX_REASON_CHARS = 2000
SUMMARY_WIDTH = 140
JUST_NOW_SECONDS = 5
_SCALAR_CHARS = 400  # of one argument value, before the summary is cut to its width

# Largest unit first, so 7200 s reads "2 h" rather than "120 min".
_UNITS = (("d", 86400.0), ("h", 3600.0), ("min", 60.0))
_CHANNELS = {
    "api": "the API",
    "cli": "the CLI",
    "web": "the inbox",
    "inbox": "the inbox",
    "slack": "Slack",
    "gateway": "the gateway",
}
# A call was made (or is being made) in these states, so the decision was an approval.
_APPROVED = frozenset({"approved", "released", "completed", "failed"})
_KEEP = frozenset("\n\t")
Segment = tuple[Literal["text", "mark"], str]


# ---- durations ---------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A length as configured: "23 s", "1.5 min", "2 h", "1 d" (largest unit, one decimal at most).

    For lengths that are set rather than counted (a timeout, an approval's lifetime), where cutting
    90 s to "1 min" would misstate the setting.
    """
    for unit, size in _UNITS:
        if abs(seconds) >= size:
            return f"{_trim(seconds / size)} {unit}"
    return f"{_trim(seconds)} s"


def _trim(amount: float) -> str:
    return f"{amount:.1f}".removesuffix(".0")


def span(seconds: float) -> str:
    """A time counted by a clock: "40 s", "3 min", "2 h", "4 d" — whole units, rounded down.

    Rounded down so a countdown never promises more time than is left; never negative.
    (The inbox's script ticks these in the browser with the same rule.)
    """
    seconds = max(seconds, 0.0)
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def ago(at: float, now: float) -> str:
    """ "just now" or "3 min ago"."""
    return "just now" if now - at < JUST_NOW_SECONDS else f"{span(now - at)} ago"


def time_left(until: float, now: float) -> str:
    """ "9 min left", or "expiring" once the time is up (the gateway closes it shortly)."""
    return "expiring" if until - now <= 0 else f"{span(until - now)} left"


def expires_in(until: float, now: float) -> str:
    """ "in 9 min", or "now" once the time is up: reads after "expires"."""
    return "now" if until - now <= 0 else f"in {span(until - now)}"


# ---- who decided, and how --------------------------------------------------------------------


def channel_name(channel: str | None) -> str:
    """The channel a decision came through, in words: "the API", "Slack", "the inbox"."""
    if not channel:
        return ""
    return _CHANNELS.get(channel, visible(channel))


def decider(approval: Approval) -> str:
    """Who decided, or "a reviewer" when the record does not say (never empty in a sentence)."""
    return visible(approval.decided_by) if approval.decided_by else "a reviewer"


def decided(status: str) -> str:
    """The decision a state records, in the past tense: "approved" for any state after approval."""
    return "approved" if status in _APPROVED else status


def decision_text(approval: Approval) -> str:
    """ "Denied by bob via Slack", "Approved by alice via the API", or the state itself ("Expired")."""
    if not approval.decided_by:
        return approval.status.capitalize()
    verb = "Denied" if approval.status == "denied" else "Approved"
    via = f" via {channel_name(approval.decided_via)}" if approval.decided_via else ""
    return f"{verb} by {visible(approval.decided_by)}{via}"


def already_decided(approval: Approval) -> str:
    """Why a second decision was not recorded: "This request was already approved by bob via Slack."."""
    if not approval.decided_by:
        if approval.status == "expired":
            return "This request has already expired without a decision."
        return f"This request was already {approval.status}."
    via = f" via {channel_name(approval.decided_via)}" if approval.decided_via else ""
    return f"This request was already {decided(approval.status)} by {visible(approval.decided_by)}{via}."


def own_agent(approval: Approval, reviewer: str) -> str:
    """Why the agent's owner may not decide its calls."""
    return (
        f"{visible(reviewer)} runs agent {visible(approval.grant)}: a reviewer may not approve "
        "their own agent's calls"
    )


def reason_error(reason: str) -> str | None:
    """Why `reason` cannot be recorded (it is over the limit), or None when it can."""
    if len(reason) <= MAX_REASON_CHARS:
        return None
    return f"reason must be at most {MAX_REASON_CHARS} characters (got {len(reason)})"


# ---- what became of the call -----------------------------------------------------------------


def outcome(approval: Approval) -> str:
    """What became of an approved call, in a few words; "" when no call was made or will be.

    completed · completed: the tool reported an error · completed (result no longer kept) ·
    failed: <the upstream's error> · failed: no answer from the upstream in time ·
    failed: the gateway stopped before the upstream answered · and the two states on the way.
    """
    status = approval.status
    if status == "approved":
        return "approved, waiting to be sent"
    if status == "released":
        return "sent, waiting for the upstream's answer"
    if status == "completed":
        return _completed(approval)
    if status == "failed":
        return _failed(approval)
    return ""


def _kept(approval: Approval) -> dict[str, Any] | None:
    try:
        kept = approval.result
    except ValueError:
        return None
    return kept if isinstance(kept, dict) else None


def _completed(approval: Approval) -> str:
    kept = _kept(approval)
    if kept is None:
        return "completed (result no longer kept)"
    result = kept.get("result")
    if isinstance(result, dict) and result.get("isError") is True:
        return "completed: the tool reported an error"
    return "completed"


def _failed(approval: Approval) -> str:
    # The gateway's own reasons first: their kept result is the gateway's message to the agent.
    if approval.reason == "timeout":
        return "failed: no answer from the upstream in time"
    if approval.reason == "interrupted":
        return "failed: the gateway stopped before the upstream answered"
    kept = _kept(approval)
    error = kept.get("error") if kept else None
    message = error.get("message") if isinstance(error, dict) else None
    why = message if isinstance(message, str) and message.strip() else approval.reason
    if why:
        return f"failed: {one_line(why)}"
    return "failed" if kept else "failed (result no longer kept)"


# ---- untrusted text, made visible --------------------------------------------------------------


def is_hidden(char: str) -> bool:
    """Characters that are invisible or change how the text around them is drawn."""
    return char not in _KEEP and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def _code(char: str) -> str:
    return f"U+{ord(char):04X}"


def segments(text: str) -> list[Segment]:
    """`text` split into plain runs and one marker per hidden character (for marked-up views)."""
    out: list[Segment] = []
    run: list[str] = []
    for char in text:
        if is_hidden(char):
            if run:
                out.append(("text", "".join(run)))
                run = []
            out.append(("mark", _code(char)))
        else:
            run.append(char)
    if run:
        out.append(("text", "".join(run)))
    return out


def visible(text: object) -> str:
    """`text` with every hidden character shown as ⟦U+XXXX⟧ (for names, summaries, reasons)."""
    value = "" if text is None else str(text)
    if not any(is_hidden(c) for c in value):
        return value
    return "".join(f"⟦{_code(c)}⟧" if is_hidden(c) else c for c in value)


def one_line(text: str) -> str:
    """`text` made visible on one line: runs of whitespace (newlines, tabs) become one space."""
    return " ".join(visible(text).replace("\t", " ").split())


def summary(value: Any, width: int = SUMMARY_WIDTH) -> str:
    """Arguments on one line: `to: "ops@example.com", subject: "Numbers"`, cut with … past `width`.

    A preview, hidden characters marked (never cut through a marker); the inbox's detail page and
    the API have the arguments in full.
    """
    if isinstance(value, dict):
        text = ", ".join(f"{one_line(str(k))}: {_scalar(v)}" for k, v in value.items())
    else:
        text = _scalar(value)
    text = text or "(no arguments)"
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    start = cut.rfind("⟦")
    if start != -1 and "⟧" not in cut[start:]:
        cut = cut[:start]
    return cut.rstrip() + "…"


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return f'"{one_line(value[:_SCALAR_CHARS])}"'
    return one_line(_first(json_chunks(value), _SCALAR_CHARS))


def _first(chunks: Iterable[str], limit: int) -> str:
    """The first `limit` characters of the joined chunks, without producing the rest."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        out.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return "".join(out)[:limit]


_END = object()


def json_chunks(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> Iterator[str]:
    """json.dumps's text for `value` (with `indent`: its indented form), piece by piece.

    An explicit stack, not recursion: json.dumps fails on values nested a few hundred levels deep,
    and such a request must still be shown to be reviewed.
    """
    encode = encode_basestring_ascii if ensure_ascii else encode_basestring
    item_sep = "," if indent is not None else ", "
    stack: list[tuple[Iterator[tuple[Any, Any]], str]] = []
    node, first = value, True
    while True:
        if node is not _END:
            if isinstance(node, dict) and node:
                yield "{"
                stack.append((iter(node.items()), "}"))
                first = True
            elif isinstance(node, list | tuple) and node:
                yield "["
                stack.append((((_END, v) for v in node), "]"))
                first = True
            else:
                yield json_scalar(node, encode)
        if not stack:
            return
        pairs, closer = stack[-1]
        key, node = next(pairs, (_END, _END))
        if node is _END:
            stack.pop()
            yield _newline(indent, len(stack)) + closer
            continue
        yield ("" if first else item_sep) + _newline(indent, len(stack))
        first = False
        if key is not _END:
            yield encode(str(key)) + ": "


INDENT_LEVELS = 40  # indented JSON text indents no further than this


def _newline(indent: int | None, level: int) -> str:
    # Indentation stops growing at INDENT_LEVELS: a value n levels deep would otherwise take n² spaces.
    return "" if indent is None else "\n" + " " * (indent * min(level, INDENT_LEVELS))


def json_scalar(value: Any, encode: Any = encode_basestring) -> str:
    """The JSON text of a value that is not a non-empty container."""
    if isinstance(value, str):
        return str(encode(value))
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    return str(encode(str(value)))  # not JSON (never from json.loads): shown as its text
