"""How the inbox shows approvals: one-line summaries, times, outcomes, visible invisibles (pure).

Everything here takes values (and `now`) and returns plain strings or structures that the templates
render as text; nothing here produces HTML. Untrusted text can carry characters a reviewer cannot
see — bidirectional overrides that reorder what follows, zero-width characters, control
characters — so they are turned into visible markers (`⟦U+202E⟧`) or marked segments.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from approvals.store.records import Approval

SUMMARY_WIDTH = 140
FOLD_CHARS = 600  # strings longer than this (or with many lines) are folded in a <details>
FOLD_LINES = 12
MAX_DEPTH = 24  # deeper JSON is shown as indented text instead of a tree
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
    if isinstance(value, str):
        return sum(1 for c in value if _hidden(c))
    if isinstance(value, dict):
        return sum(count_hidden(k) + count_hidden(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(count_hidden(v) for v in value)
    return 0


def arguments(approval: Approval) -> Any:
    """The arguments as a JSON value (the raw text if, unexpectedly, it does not parse)."""
    try:
        return json.loads(approval.arguments_json)
    except ValueError:
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
    return one_line(json.dumps(value, ensure_ascii=False)[:400])


def pretty_json(value: Any) -> str:
    """Indented JSON text, hidden characters escaped (`\\u202e`), so nothing is drawn invisibly."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).translate(_ESCAPES)


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


# ---- exports ---------------------------------------------------------------------------------


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or tab, CR) gets a leading '."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(CSV_TRIGGERS) else text


def walk_strings(value: Any) -> Iterator[str]:
    """Every key and string in a JSON value (for search)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_strings(v)
