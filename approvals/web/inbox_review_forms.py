"""The detail page's review forms, read and judged: edit before approve, approve (deny) and remember.

Pure: values in (the posted fields, the approval's arguments), values out — what to ask the service
for, or what is wrong and where, with the form as it was typed so the page can show it again.

Edit (POST …/approve):
    arguments       the JSON text of the arguments to approve instead (an object)

Remember (POST …/approve or …/deny; the detail page's GET takes the same fields):
    remember        POST: "preview" (show the confirmation page) or "confirm" (save the grant);
                    GET /inbox/approvals/{id}: "approve" / "deny" (the confirmation page),
                    "form" (the page with the form filled in and open)
    args_sha256     the hash of the arguments the form was made for (a form made before an edit
                    is refused rather than applied to other arguments)
    remember_for    seconds, one of deciding.REMEMBER_CHOICES
    max_uses        optional, an integer from 1 to deciding.MAX_USES_LIMIT
    reason          deny: what the agent is told (required); approve: a note kept with the grant
    c{i}_op         for the i-th top-level argument (sorted by name): eq (default) | any | prefix |
                    range | in
    c{i}_prefix     prefix: the text the value must start with
    c{i}_min, c{i}_max   range: JSON numbers, either may be blank
    c{i}_in         in: JSON values separated by commas, or one per line (a bare word is text)

The constraints are built as the untrusted JSON that `standing.parse_constraints` checks, and then
each must hold on the call being decided: a grant that would not cover the very call it is made
from is a mistake, not a widening.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias
from urllib.parse import urlencode

from approvals.core import render
from approvals.core.deciding import MAX_USES_LIMIT, REMEMBER_CHOICES, RememberRequest
from approvals.core.model import canonical_json
from approvals.core.standing import MAX_CONSTRAINTS, Constraint, Effect, parse_constraints
from approvals.jsonrpc import JsonInputError, decode_text
from approvals.web.inbox_auth import MAX_FORM_FIELDS

__all__ = [
    "Remember",
    "RememberForm",
    "Row",
    "blank_form",
    "edit_text",
    "judge",
    "parse_edit",
    "read_form",
]

MAX_REASON = render.MAX_REASON_CHARS
SHOWN_CHARS = 200
MAX_TEXT = 20_000  # one prefix or list of values; longer is refused, not cut
FIXED_FIELDS = 6  # csrf, remember, args_sha256, remember_for, max_uses, reason
Kind: TypeAlias = Literal["string", "number", "scalar", "compound"]
# The widenings each kind of value may take (eq and any for every kind).
OPS: Mapping[Kind, tuple[str, ...]] = {
    "string": ("eq", "any", "prefix", "in"),
    "number": ("eq", "any", "range", "in"),
    "scalar": ("eq", "any", "in"),
    "compound": ("eq", "any"),
}
OP_LABELS: Mapping[str, str] = {
    "eq": "exactly this value",
    "any": "any value",
    "prefix": "starts with…",
    "range": "between…",
    "in": "one of…",
}
# The inputs each kind of row posts besides its op (so a form's size is known before it is drawn).
_INPUTS: Mapping[Kind, tuple[str, ...]] = {
    "string": ("prefix", "in"),
    "number": ("min", "max", "in"),
    "scalar": ("in",),
    "compound": (),
}


# ---- edit before approve ------------------------------------------------------------------------


def parse_edit(text: str) -> dict[str, Any] | str:
    """The edited arguments, or what is wrong with the text and where (line and column)."""
    if not text.strip():
        return "the arguments are empty: write a JSON object, {} for none"
    try:
        value = decode_text(text)
    except JsonInputError as exc:  # JSON, but past the gateway's bounds (depth, numbers)
        return f"not accepted: {exc.message}"
    except json.JSONDecodeError as exc:
        return f"not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except ValueError as exc:  # NaN, Infinity
        return f"not JSON: {exc}"
    if not isinstance(value, dict):
        return f"the arguments must be a JSON object ({{…}}), not {_json_kind(value)}"
    return value


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return "a number"


class _Escapes(dict[int, str]):
    """Hidden characters as JSON escapes (astral ones as a surrogate pair), so the editor's text
    shows them and still parses to the same value."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if not render.is_hidden(char):
            self[code] = char
        elif code > 0xFFFF:
            high, low = divmod(code - 0x10000, 0x400)
            self[code] = f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
        else:
            self[code] = f"\\u{code:04x}"
        return self[code]


_ESCAPES = _Escapes()


def edit_text(value: Any) -> str:
    """The arguments as the editor starts with them: indented JSON, hidden characters escaped."""
    return "".join(render.json_chunks(value, indent=2)).translate(_ESCAPES)


# ---- approve (deny) and remember ----------------------------------------------------------------


def kind_of(value: object) -> Kind:
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    if isinstance(value, dict | list):
        return "compound"
    return "scalar"


@dataclass(frozen=True, slots=True)
class Row:
    """One top-level argument of the call and how far the grant widens it (as typed)."""

    index: int
    field: str
    value: Any  # the value in the call being decided
    op: str = "eq"
    prefix: str = ""
    min: str = ""
    max: str = ""
    choices: str = ""  # the `in` text

    @property
    def kind(self) -> Kind:
        return kind_of(self.value)

    @property
    def ops(self) -> tuple[tuple[str, str], ...]:
        """(op, label) pairs offered for this argument."""
        return tuple((op, OP_LABELS[op]) for op in OPS[self.kind])

    @property
    def shown(self) -> str:
        """The value in the call as JSON, its first SHOWN_CHARS characters (the page has it all)."""
        out: list[str] = []
        size = 0
        for chunk in render.json_chunks(self.value):
            out.append(chunk)
            size += len(chunk)
            if size > SHOWN_CHARS:
                return "".join(out)[:SHOWN_CHARS] + "…"
        return "".join(out)

    def fields(self) -> list[tuple[str, str]]:
        out = [(f"c{self.index}_op", self.op)]
        given = {"prefix": self.prefix, "min": self.min, "max": self.max, "in": self.choices}
        out.extend((f"c{self.index}_{name}", given[name]) for name in _INPUTS[self.kind])
        return out


@dataclass(frozen=True, slots=True)
class RememberForm:
    """The "remember for this agent" form, as typed (every value a string, shown back as is)."""

    effect: Effect
    args_sha256: str
    seconds: str = str(int(REMEMBER_CHOICES[0][1]))
    max_uses: str = ""
    reason: str = ""
    rows: tuple[Row, ...] = ()
    widen: bool = True  # False: too many arguments for one form; the grant is the exact call

    def fields(self) -> list[tuple[str, str]]:
        """Every field but csrf and `remember`, to carry through a confirmation page or a link."""
        out = [
            ("args_sha256", self.args_sha256),
            ("remember_for", self.seconds),
            ("max_uses", self.max_uses),
            ("reason", self.reason),
        ]
        if self.widen:
            out.extend(field for row in self.rows for field in row.fields())
        return out

    def query(self, remember: str) -> str:
        """The detail page's query for this form (`remember` = approve, deny or form)."""
        return urlencode([("remember", remember), *self.fields()])

    @property
    def choices(self) -> tuple[tuple[str, str], ...]:
        """(seconds, label) of the durations offered."""
        return tuple((str(int(seconds)), label) for label, seconds in REMEMBER_CHOICES)


@dataclass(frozen=True, slots=True)
class Remember:
    """A judged form: the grant to ask for, and its words for the confirmation page."""

    form: RememberForm
    request: RememberRequest
    constraints: tuple[Constraint, ...]


def blank_form(effect: Effect, arguments: Mapping[str, Any], args_sha256: str) -> RememberForm:
    """The form as first drawn: the exact call, for the shortest time, no use limit."""
    rows = tuple(Row(i, name, arguments[name]) for i, name in enumerate(sorted(arguments)))
    size = FIXED_FIELDS + sum(1 + len(_INPUTS[row.kind]) for row in rows)
    # The inbox reads at most MAX_FORM_FIELDS fields; past that (or past what a grant may hold)
    # only the exact call can be remembered.
    widen = size <= MAX_FORM_FIELDS and len(rows) <= MAX_CONSTRAINTS
    return RememberForm(effect, args_sha256, rows=rows, widen=widen)


def read_form(
    fields: Mapping[str, object], effect: Effect, arguments: Mapping[str, Any], args_sha256: str
) -> RememberForm:
    """The form as posted (or given in a query), every value kept as typed; nothing judged yet."""

    def get(name: str) -> str:
        value = fields.get(name)
        return value if isinstance(value, str) else ""

    blank = blank_form(effect, arguments, args_sha256)
    rows = blank.rows
    if blank.widen:
        rows = tuple(
            replace(
                row,
                op=get(f"c{row.index}_op").strip() or "eq",
                prefix=get(f"c{row.index}_prefix"),
                min=get(f"c{row.index}_min"),
                max=get(f"c{row.index}_max"),
                choices=get(f"c{row.index}_in"),
            )
            for row in rows
        )
    return replace(
        blank,
        args_sha256=get("args_sha256").strip(),
        seconds=get("remember_for").strip() or blank.seconds,
        max_uses=get("max_uses").strip(),
        reason=get("reason").strip()[:MAX_REASON],
        rows=rows,
    )


def judge(form: RememberForm, arguments: Mapping[str, Any]) -> Remember | str:
    """The standing grant the form asks for, or the first thing wrong with it (naming the field)."""
    seconds = {str(int(s)): s for _, s in REMEMBER_CHOICES}.get(form.seconds)
    if seconds is None:
        labels = ", ".join(label for label, _ in REMEMBER_CHOICES)
        return f"remember for: choose one of {labels}"
    max_uses: int | None = None
    if form.max_uses:
        if not (form.max_uses.isascii() and form.max_uses.isdigit()) or not (
            1 <= int(form.max_uses) <= MAX_USES_LIMIT
        ):
            return f"at most … uses: a whole number from 1 to {MAX_USES_LIMIT:,}, or blank for no limit"
        max_uses = int(form.max_uses)
    if form.effect == "deny" and not form.reason:
        return "reason: say why you deny it (the agent is told, now and on every call the grant refuses)"
    raw: list[dict[str, Any]] = []
    for row in form.rows:
        item = _constraint(row) if form.widen else {"field": row.field, "op": "eq", "value": row.value}
        if isinstance(item, str):
            return f"{_name(row.field)}: {item}"
        raw.append(item)
    parsed = parse_constraints(raw)
    if isinstance(parsed, str):
        return _located(parsed, form.rows)
    for constraint in parsed:
        if not constraint.holds(arguments):
            verb = "denying" if form.effect == "deny" else "approving"
            return (
                f"{_name(constraint.field)}: the value you are {verb} "
                f"({_short(canonical_json(arguments.get(constraint.field)))}) does not match "
                f"“{constraint.describe()}”; a grant must cover the call it is made from"
            )
    return Remember(form, RememberRequest(seconds, max_uses, parsed), parsed)


def _constraint(row: Row) -> dict[str, Any] | str:
    op = row.op
    if op not in OPS[row.kind]:
        names = [OP_LABELS[o].rstrip("…") for o in OPS[row.kind]]
        return f"for this value choose {', '.join(names[:-1])} or {names[-1]}"
    if op == "eq":
        return {"field": row.field, "op": "eq", "value": row.value}
    if op == "any":
        return {"field": row.field, "op": "any"}
    if op == "prefix":
        if not row.prefix:
            return "starts with: write the text the value must start with"
        if len(row.prefix) > MAX_TEXT:
            return f"starts with: at most {MAX_TEXT:,} characters"
        return {"field": row.field, "op": "prefix", "value": row.prefix}
    if op == "range":
        low, high = _number(row.min), _number(row.max)
        if isinstance(low, str) or isinstance(high, str):
            return f"between: {'min' if isinstance(low, str) else 'max'} must be a number (like 0 or 12.5)"
        if low is None and high is None:
            return "between: give a minimum, a maximum or both"
        return {"field": row.field, "op": "range", "value": [low, high]}
    values = _values(row.choices)
    if isinstance(values, str):
        return f"one of: {values}"
    return {"field": row.field, "op": "in", "value": values}


def _number(text: str) -> float | int | str | None:
    """A bound: None when blank, the number, or "" when it is not a finite JSON number."""
    text = text.strip()
    if not text:
        return None
    try:
        value = decode_text(text)
    except ValueError:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return value


def _values(text: str) -> list[Any] | str:
    """The `in` list: JSON values separated by commas, or one per line; a bare word is text."""
    if len(text) > MAX_TEXT:
        return f"at most {MAX_TEXT:,} characters"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "list the values allowed, separated by commas or one per line"
    if len(lines) == 1:
        try:
            whole = decode_text(f"[{lines[0]}]")
        except ValueError:
            lines = [piece.strip() for piece in lines[0].split(",") if piece.strip()]
        else:
            return whole if isinstance(whole, list) and whole else "list at least one value"
    values: list[Any] = []
    for line in lines:
        try:
            values.append(decode_text(line))
        except ValueError:
            values.append(line)  # `eu` for "eu": a reviewer should not have to quote words
    return values


_INDEX = re.compile(r"^constraints\[(\d+)\](?:\.value)?(?:\.\w+)?: ?")


def _located(problem: str, rows: Sequence[Row]) -> str:
    """parse_constraints' "constraints[2].value: …" as "the argument "amount": …"."""
    found = _INDEX.match(problem)
    if found is None or int(found.group(1)) >= len(rows):
        return problem
    return f"{_name(rows[int(found.group(1))].field)}: {problem[found.end() :]}"


def _name(field: str) -> str:
    return f"the argument “{render.one_line(field)}”"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
