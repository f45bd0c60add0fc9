"""How the inbox shows approvals: one-line summaries, times, outcomes, visible invisibles (pure).

Everything here takes values (and `now`) and returns plain strings or structures that the templates
render as text; nothing here produces HTML. Untrusted text can carry characters a reviewer cannot
see — bidirectional overrides that reorder what follows, zero-width characters, control
characters — so they are turned into visible markers (`⟦U+202E⟧`) or marked segments.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Literal

from approvals.store.records import Approval, AuditEvent

SUMMARY_WIDTH = 140
FOLD_CHARS = 600  # strings longer than this (or with many lines) are folded in a <details>
FOLD_LINES = 12
MAX_DEPTH = 24  # deeper JSON is shown as indented text instead of a tree
INDENT_LEVELS = 40  # indented JSON text indents no further than this
RESULT_CHARS = 20_000  # the detail page shows this much of a kept result; the API has all of it
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_KEEP = frozenset("\n\t")
Segment = tuple[Literal["text", "mark"], str]


def _hidden(char: str) -> bool:
    """Characters that are invisible or change how the text around them is drawn."""
    return char not in _KEEP and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def _code(char: str) -> str:
    return f"U+{ord(char):04X}"


def segments(text: str) -> list[Segment]:
    """`text` split into plain runs and one marker per hidden character, for the argument view."""
    out: list[Segment] = []
    run: list[str] = []
    for char in text:
        if _hidden(char):
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
    if not any(_hidden(c) for c in value):
        return value
    return "".join(f"⟦{_code(c)}⟧" if _hidden(c) else c for c in value)


def one_line(text: str) -> str:
    return " ".join(visible(text).replace("\t", " ").split())


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


def summary(value: Any, width: int = SUMMARY_WIDTH) -> str:
    """One line for the list: `to: "ops@example.com", subject: "Numbers"`, cut with … past `width`.

    The list is a preview; the detail page always shows the arguments in full.
    """
    if isinstance(value, dict):
        text = ", ".join(f"{one_line(str(k))}: {_scalar(v)}" for k, v in value.items())
    else:
        text = _scalar(value)
    text = text or "(no arguments)"
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return f'"{one_line(value[:400])}"'
    return one_line(_first(json_chunks(value), 400))


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


def pretty_json(value: Any) -> str:
    """Indented JSON text, hidden characters escaped (`\\u202e`), so nothing is drawn invisibly."""
    return "".join(json_chunks(value, indent=2)).translate(_ESCAPES)


_END = object()


def json_chunks(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> Iterator[str]:
    """json.dumps's text for `value` (with `indent`: its indented form), piece by piece.

    An explicit stack, not recursion: json.dumps (and a recursive template) fail on values nested a
    few hundred levels deep, and such a request must still be shown to be reviewed.
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
                yield _json_scalar(node, encode)
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


def _newline(indent: int | None, level: int) -> str:
    # Indentation stops growing at INDENT_LEVELS: a value n levels deep would otherwise take n² spaces.
    return "" if indent is None else "\n" + " " * (indent * min(level, INDENT_LEVELS))


def _json_scalar(value: Any, encode: Any) -> str:
    if isinstance(value, str):
        return str(encode(value))
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    return str(encode(str(value)))  # not JSON (never from json.loads): shown as its text


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
        return ("lit", _json_scalar(value, encode_basestring))
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


def span(seconds: float) -> str:
    """A whole-unit duration: "40 s", "3 min", "2 h", "4 d"."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def age(approval: Approval, now: float) -> str:
    return "just now" if now - approval.created_at < 5 else f"{span(now - approval.created_at)} ago"


def time_left(approval: Approval, now: float) -> str:
    left = approval.expires_at - now
    return "expiring" if left <= 0 else f"{span(left)} left"


# ---- outcomes --------------------------------------------------------------------------------


def outcome(approval: Approval) -> str:
    """What became of a decided call, in a few words (the upstream's answer for released calls)."""
    status = approval.status
    if status == "approved":
        return "approved, waiting to be released"
    if status == "released":
        return "released, waiting for the upstream"
    if status not in ("completed", "failed"):
        return ""
    kept = _kept(approval)
    if status == "failed":
        error = kept.get("error") if kept else None
        message = error.get("message") if isinstance(error, dict) else None
        why = message if isinstance(message, str) else approval.reason
        return f"failed: {one_line(why)}" if why else "failed"
    if kept is None:
        return "completed (result no longer kept)"
    result = kept.get("result")
    if isinstance(result, dict) and result.get("isError") is True:
        return "completed: the tool reported an error"
    return "completed"


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


def decision_text(approval: Approval) -> str:
    """ "Denied by bob via web", "Approved by alice", or the state itself ("Expired")."""
    if not approval.decided_by:
        return approval.status.capitalize()
    verb = "Denied" if approval.status == "denied" else "Approved"
    via = f" via {visible(approval.decided_via)}" if approval.decided_via else ""
    return f"{verb} by {visible(approval.decided_by)}{via}"


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
