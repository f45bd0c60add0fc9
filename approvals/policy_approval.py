"""A policy rule's ``approval`` object → :class:`approvals.core.review.ReviewRule`. Pure, no I/O.

    "approval": {
      "timeout": "30m",                          a duration (default: [approvals] timeout)
      "reviewers": ["payments"],                 groups whose members may decide (default: anyone)
      "quorum": 2,                               distinct approvals needed, 1 to 20
      "from": ["payments", "security"],          one approval from each (quorum defaults to their number)
      "via": ["inbox"],                          channels a decision may come through: inbox, slack, api
      "remember": false, "edit": false,          whether standing grants / edited arguments are offered
      "escalate": [{"after": "10m", "to": ["oncall"]}],   strictly later steps, each before the timeout
      "on_timeout": "deny"                       or "expire" (the default)
    }

Every problem is reported through the policy parser with its path
(``tools.x.approval.escalate[1].after``), as the rest of the policy is; group names are checked
against the config's ``[[reviewers]]`` where both are known (approvals.policy_files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeGuard

from approvals.core.review import DEFAULT_REVIEW, VIA_NAMES, Escalation, OnTimeout, ReviewRule
from approvals.durations import parse_duration

__all__ = [
    "APPROVAL_FIELDS",
    "GROUP_NAME",
    "GROUP_NAME_HINT",
    "MAX_QUORUM",
    "Checker",
    "group_names",
    "parse_approval",
]

# Group names appear in Slack messages, the inbox and error messages: a plain alphabet keeps them
# safe to show anywhere without escaping surprises.
GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
GROUP_NAME_HINT = "a group name of letters, digits and _ . -"
MAX_QUORUM = 20  # more distinct approvals than this is a typo, not a review process
APPROVAL_FIELDS = (
    "timeout",
    "reviewers",
    "quorum",
    "from",
    "via",
    "remember",
    "edit",
    "escalate",
    "on_timeout",
)
_ESCALATE_FIELDS = ("after", "to")
_ON_TIMEOUT: dict[str, OnTimeout] = {"deny": "deny", "expire": "expire"}

Fail = Callable[[str, str], None]


class Checker(Protocol):
    """What the policy parser offers: record an issue, report unknown fields, require an object."""

    def fail(self, path: str, message: str) -> None: ...

    def fields(self, raw: Mapping[Any, object], path: str, known: tuple[str, ...]) -> None: ...

    def object(self, value: object, path: str, hint: str = "") -> TypeGuard[dict[str, Any]]: ...


def parse_approval(check: Checker, raw: object, path: str) -> ReviewRule:
    """The rule ``raw`` (a rule's ``approval`` value at ``path``) spells; issues go to ``check``.

    Whatever could not be read is left at its default: the caller rejects the policy anyway once
    an issue is recorded, so the rule returned then is never used.
    """
    if not check.object(raw, path):
        return DEFAULT_REVIEW
    check.fields(raw, path, APPROVAL_FIELDS)
    fail = check.fail
    timeout = _duration(fail, raw["timeout"], f"{path}.timeout") if "timeout" in raw else None
    reviewers = (
        group_names(fail, raw["reviewers"], f"{path}.reviewers", non_empty=True) if "reviewers" in raw else ()
    )
    from_groups = group_names(fail, raw["from"], f"{path}.from") if "from" in raw else ()
    quorum = _quorum(fail, raw, path, len(from_groups))
    return ReviewRule(
        timeout=timeout,
        reviewers=reviewers,
        quorum=quorum,
        from_groups=from_groups,
        via=_via(fail, raw["via"], f"{path}.via") if "via" in raw else (),
        remember=_flag(fail, raw, "remember", path),
        edit=_flag(fail, raw, "edit", path),
        escalate=_escalate(check, raw["escalate"], f"{path}.escalate", timeout, raw.get("timeout"))
        if "escalate" in raw
        else (),
        on_timeout=_on_timeout(fail, raw, path),
    )


def group_names(fail: Fail, value: object, path: str, *, non_empty: bool = False) -> tuple[str, ...]:
    """A list of distinct group names (also the config's ``[[reviewers]] groups``)."""
    what = "a non-empty list of group names" if non_empty else "a list of group names"
    if not isinstance(value, list) or (non_empty and not value):
        fail(path, f"must be {what} (got {_json(value)})")
        return ()
    names: list[str] = []
    for i, item in enumerate(value):
        if not (isinstance(item, str) and GROUP_NAME.fullmatch(item)):
            fail(f"{path}[{i}]", f"must be {GROUP_NAME_HINT} (got {_json(item)})")
        elif item in names:
            fail(f"{path}[{i}]", f'"{item}" is listed twice')
        else:
            names.append(item)
    return tuple(names)


def _duration(fail: Fail, value: object, path: str) -> float | None:
    try:
        return parse_duration(value)  # type: ignore[arg-type]  # anything else raises ValueError
    except ValueError as exc:
        fail(path, str(exc))
        return None


def _quorum(fail: Fail, raw: Mapping[str, object], path: str, groups: int) -> int:
    """``quorum``, or one approval per ``from`` group when it is left out."""
    if "quorum" not in raw:
        return max(1, groups)
    value = raw["quorum"]
    # bool is an int subclass, and `true` is not a count; 2.0 is refused so the count is exact.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUORUM:
        fail(f"{path}.quorum", f"must be a whole number from 1 to {MAX_QUORUM} (got {_json(value)})")
        return max(1, groups)
    if value < groups:
        fail(f"{path}.quorum", f'must be at least {groups}: one approval from each group in "from"')
    return value


def _via(fail: Fail, value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        fail(path, f"must be a non-empty list of {', '.join(VIA_NAMES)} (got {_json(value)})")
        return ()
    channels: list[str] = []
    for i, item in enumerate(value):
        if not (isinstance(item, str) and item in VIA_NAMES):
            fail(f"{path}[{i}]", f"must be one of {', '.join(VIA_NAMES)} (got {_json(item)})")
        elif item in channels:
            fail(f"{path}[{i}]", f'"{item}" is listed twice')
        else:
            channels.append(item)
    return tuple(channels)


def _flag(fail: Fail, raw: Mapping[str, object], field: str, path: str) -> bool:
    value = raw.get(field, True)
    if isinstance(value, bool):
        return value
    fail(f"{path}.{field}", f"must be true or false (got {_json(value)})")
    return True


def _on_timeout(fail: Fail, raw: Mapping[str, object], path: str) -> OnTimeout:
    value = raw.get("on_timeout", "expire")
    if isinstance(value, str) and value in _ON_TIMEOUT:
        return _ON_TIMEOUT[value]
    fail(f"{path}.on_timeout", f"must be one of {', '.join(_ON_TIMEOUT)} (got {_json(value)})")
    return "expire"


def _escalate(
    check: Checker, value: object, path: str, timeout: float | None, timeout_text: object
) -> tuple[Escalation, ...]:
    """Escalation steps, each strictly later than the one before and, with a timeout, before it
    (a step at or after the timeout would announce a request that is already over)."""
    if not isinstance(value, list):
        check.fail(path, 'must be a list of steps like {"after": "10m", "to": ["oncall"]}')
        return ()
    steps: list[Escalation] = []
    previous: tuple[float, int] | None = None  # (after, index) of the last step read
    for i, raw in enumerate(value):
        where = f"{path}[{i}]"
        if not check.object(raw, where, ' like {"after": "10m", "to": ["oncall"]}'):
            continue
        check.fields(raw, where, _ESCALATE_FIELDS)
        for field in _ESCALATE_FIELDS:
            if field not in raw:
                check.fail(f"{where}.{field}", "missing required field")
        after = _duration(check.fail, raw["after"], f"{where}.after") if "after" in raw else None
        to = group_names(check.fail, raw["to"], f"{where}.to", non_empty=True) if "to" in raw else ()
        if after is None:
            continue
        if previous is not None and after <= previous[0]:
            # Compared with the latest step so far: each step must come after every earlier one.
            earlier = _json(value[previous[1]].get("after"))
            check.fail(f"{where}.after", f"must be later than {path}[{previous[1]}].after ({earlier})")
            continue
        if timeout is not None and after >= timeout:
            check.fail(f"{where}.after", f"must be shorter than the rule's timeout ({_json(timeout_text)})")
        previous = (after, i)
        if to:
            steps.append(Escalation(after, to))
    return tuple(steps)


def _json(value: object, limit: int = 80) -> str:
    """``value`` as JSON for messages, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):  # non-string keys, cycles, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"
