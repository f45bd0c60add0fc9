"""How the inbox shows approvals: argument trees, folds, results, times, exports (pure).

The wording every channel shares (durations, decisions, outcomes, argument summaries, markers for
hidden characters) is approvals.core.render's; this module adds what only the inbox shows. It takes
values (and `now`) and returns plain strings or structures that the templates render as text;
nothing here produces HTML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from approvals.core import render
from approvals.core.model import Approval, AuditEvent

FOLD_CHARS = 600  # strings longer than this (or with many lines) are folded in a <details>
FOLD_LINES = 12
MAX_DEPTH = 24  # deeper JSON is shown as indented text instead of a tree
RESULT_CHARS = 20_000  # the detail page shows this much of a kept result; the API has all of it
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


# One wording for every channel: these live in approvals.core.render and are re-exported here for
# the templates and the inbox's modules.
visible = render.visible
segments = render.segments
one_line = render.one_line
summary = render.summary
json_chunks = render.json_chunks
decision_text = render.decision_text
outcome = render.outcome
_hidden = render.is_hidden


def count_hidden(value: Any) -> int:
    """How many hidden characters the strings (and keys) of a JSON value hold."""
    return sum(1 for text in walk_strings(value) for c in text if _hidden(c))


def arguments(approval: Approval) -> Any:
    """The arguments as a JSON value (the raw text if, unexpectedly, it does not parse).

    RecursionError too: a record stored before the gateway bounded nesting may be deeper than
    json.loads manages from here; its text is still shown, in full, for review.
    """
    try:
        return json.loads(approval.arguments_json)
    except (ValueError, RecursionError):
        return approval.arguments_json


def release_arguments(approval: Approval) -> Any:
    """The arguments a release sends: a reviewer's edit when there is one, else as received."""
    if approval.edited_json is None:
        return arguments(approval)
    try:
        return json.loads(approval.edited_json)
    except (ValueError, RecursionError):
        return approval.edited_json


def release_summary(approval: Approval) -> str:
    """One line of what a release would send, marked "(edited) " when a reviewer changed it: the
    list's rows and the batch's result lines, whose readers must not take an edit for the call."""
    marked = "(edited) " if approval.edited_json is not None else ""
    return marked + summary(release_arguments(approval))


def pretty_json(value: Any) -> str:
    """Indented JSON text, hidden characters escaped (`\\u202e`), so nothing is drawn invisibly."""
    return "".join(json_chunks(value, indent=2)).translate(_ESCAPES)


Token = tuple[str, str]


def json_tokens(value: Any, max_depth: int = MAX_DEPTH) -> list[Token]:
    """A JSON value as a flat list of (kind, text) for the tree view, deeper levels as indented text.

    Kinds: obj, /obj, key (text: the key), /key, arr, /arr, item, /item, str, num, lit, deep (text:
    the indented JSON of a value nested deeper than `max_depth`). Flat and built with an explicit
    stack, so neither this nor the template recurses, however deep the value.
    """
    out: list[Token] = []
    todo: list[tuple[Any, int]] = [(value, 0)]  # (value, depth), or (token, _EMIT) to emit as is
    while todo:
        node, depth = todo.pop()
        if depth == _EMIT:
            out.append(node)
        elif not (isinstance(node, dict | list) and node):
            out.append(_scalar_token(node))
        elif depth > max_depth:
            out.append(("deep", pretty_json(node)))
        elif isinstance(node, dict):
            out.append(("obj", ""))
            todo.append((("/obj", ""), _EMIT))
            for key, inner in reversed(list(node.items())):
                todo.extend(((("/key", ""), _EMIT), (inner, depth + 1), (("key", str(key)), _EMIT)))
        else:
            out.append(("arr", ""))
            todo.append((("/arr", ""), _EMIT))
            for inner in reversed(node):
                todo.extend(((("/item", ""), _EMIT), (inner, depth + 1), (("item", ""), _EMIT)))
    return out


_EMIT = -1


def _scalar_token(value: Any) -> Token:
    if isinstance(value, str):
        return ("str", value)
    if value is None or isinstance(value, bool | dict | list):
        return ("lit", render.json_scalar(value))
    if isinstance(value, int | float):
        return ("num", json.dumps(value))
    return ("str", str(value))


class _Escapes(dict[int, str]):
    def __missing__(self, code: int) -> str:
        char = chr(code)
        self[code] = f"\\u{code:04x}" if _hidden(char) and char not in "\n" else char
        return self[code]


_ESCAPES = _Escapes()


def is_long(text: str) -> bool:
    return len(text) > FOLD_CHARS or text.count("\n") >= FOLD_LINES


def fold_label(text: str) -> str:
    first = one_line(text[:80])
    lines = text.count("\n") + 1
    return f"{first}… ({len(text):,} characters, {lines:,} line{'s' if lines != 1 else ''})"


def tool_definition(approval: Approval) -> tuple[str, str, Any]:
    """(title, description, input schema) of the tool as the upstream listed it."""
    try:
        definition = json.loads(approval.tool_json) if approval.tool_json else {}
    except ValueError:
        definition = {}
    if not isinstance(definition, dict):
        definition = {}
    title = definition.get("title") if isinstance(definition.get("title"), str) else ""
    description = definition.get("description") if isinstance(definition.get("description"), str) else ""
    return title or "", description or "", definition.get("inputSchema")


# ---- times -----------------------------------------------------------------------------------


def iso(ts: float | None) -> str:
    """2026-11-02 14:03:05 UTC (empty for None)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_machine(ts: float | None) -> str:
    """For <time datetime> and exports: 2026-11-02T14:03:05Z."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(approval: Approval, now: float) -> str:
    return render.ago(approval.created_at, now)


def time_left(approval: Approval, now: float) -> str:
    return render.time_left(approval.expires_at, now)


# ---- outcomes --------------------------------------------------------------------------------


def _kept(approval: Approval) -> dict[str, Any] | None:
    if not approval.result_json:
        return None
    try:
        kept = json.loads(approval.result_json)
    except ValueError:
        return None
    return kept if isinstance(kept, dict) else None


def result_value(approval: Approval) -> Any:
    """The kept upstream answer (result or error), or None."""
    kept = _kept(approval)
    if kept is None or approval.status not in ("completed", "failed"):
        return None
    return kept.get("result", kept.get("error"))


def result_view(approval: Approval) -> dict[str, str]:
    """The detail page's Result panel as plain text: {state, text, note}.

    state: "none" (no call was made, or not yet decided: no panel), "waiting", "shown", "truncated"
    (text is the first RESULT_CHARS characters) or "dropped" (no longer kept; note says why).
    """
    status = approval.status
    if status in ("approved", "released"):
        return {"state": "waiting", "text": "", "note": "The upstream has not answered yet."}
    if status not in ("completed", "failed"):
        return {"state": "none", "text": "", "note": ""}
    value = result_value(approval)
    if value is None:
        return {"state": "dropped", "text": "", "note": _dropped_note(approval)}
    text = pretty_json(value)
    kept = f"Kept until {iso(approval.result_expires_at)}." if approval.result_expires_at else ""
    if len(text) <= RESULT_CHARS:
        return {"state": "shown", "text": text, "note": kept}
    note = (
        f"Showing the first {RESULT_CHARS:,} of {len(text):,} characters; "
        f"GET /api/approvals/{approval.id} has all of it. {kept}"
    )
    return {"state": "truncated", "text": text[:RESULT_CHARS], "note": note.strip()}


def _dropped_note(approval: Approval) -> str:
    why = f" ({one_line(approval.note)})" if approval.note else ""
    note = f"The result is no longer kept{why}."
    if approval.result_expires_at is not None:
        note += f" It was kept until {iso(approval.result_expires_at)}."
    return note


def args_note(status: str) -> str:
    """What became of the arguments shown, in the approval's state (after the sha256 on the page)."""
    if status == "pending":
        return "exactly these arguments are sent if you approve."
    if status == "approved":
        return "exactly these arguments were approved and are being sent."
    if status in ("released", "completed", "failed"):
        return "exactly these arguments were sent."
    return "these arguments were not sent."


def timeline(events: Iterable[AuditEvent]) -> list[dict[str, str]]:
    """The History panel: every audit event but views, oldest first, as plain text."""
    return [
        {
            "event": visible(e.event),
            "actor": visible(e.actor),
            "channel": visible(e.channel or ""),
            "at": iso(e.at),
            "detail": visible(e.detail or ""),
        }
        for e in events
        if e.event != "viewed"
    ]


# ---- exports ---------------------------------------------------------------------------------


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or tab, CR) gets a leading '."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(CSV_TRIGGERS) else text


def walk_strings(value: Any) -> Iterator[str]:
    """Every key and string in a JSON value (for search), in no set order; any depth (no recursion)."""
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield str(k)
                todo.append(v)
        elif isinstance(node, list):
            todo.extend(node)
