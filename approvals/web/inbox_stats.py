"""The reviewer dashboard's figures (pure): what a window of approvals and their audit log say.

Takes values — the approvals created in the window, their audit events, the requests waiting now,
and `now` — and returns a :class:`Stats`; no I/O, no clock. Reading them (with a bound on rows)
is inbox_dashboard's job; drawing them is inbox_charts'.

Definitions, also said on the page:

- The window is the last N calendar days in UTC, today included (N in WINDOWS); a request belongs
  to the day it was made.
- A request was *approved* when a reviewer approved it (`decided_by` set and not denied), even if
  it then lapsed waiting for a rate-limit window; *denied* when a reviewer denied it; *expired*
  when its time ran out with no decision. Approval rate = approved / (approved + denied).
- Time to decision: from the request to the reviewer's decision. Median and p90 interpolate
  linearly between the nearest ranks (p90 of 1..10 is 9.1).
- Opening a request: the reviewer's first `viewed` audit event on it (the inbox writes one when a
  reviewer first opens a request's page). Open-to-approve: from that to the reviewer's approval.
  Approvals decided without opening the page (Slack, the API, the CLI) have no such time.
- Rubber-stamping, two flags: a median open-to-approve under FAST_APPROVAL_SECONDS over at least
  MIN_FAST_SAMPLES approvals; or at least RISKY_APPROVE_PERCENT % of at least MIN_RULE_DECISIONS
  decisions on one rule approved. Every rule that sends calls to a reviewer is one the policy
  marks as risky, so each rule is looked at.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from approvals.core.model import Approval, AuditEvent

DAY = 86_400.0
WINDOWS = (7, 30)
FAST_APPROVAL_SECONDS = 5.0
MIN_FAST_SAMPLES = 3
RISKY_APPROVE_PERCENT = 95  # an integer: 19 of 20 is exactly 95%, with no float rounding
MIN_RULE_DECISIONS = 10
TOP_TOOLS = 6  # the daily chart names the busiest tools; the rest are drawn as "other tools"


@dataclass(frozen=True, slots=True)
class Window:
    """The last `days` UTC calendar days up to `now`: [since, now]."""

    days: int
    since: float  # midnight UTC that starts the first day
    now: float

    @classmethod
    def ending(cls, now: float, days: int) -> Window:
        today = math.floor(now / DAY) * DAY
        return cls(days=days, since=today - (days - 1) * DAY, now=now)

    def day_of(self, at: float) -> int:
        """The index of the day `at` falls on (clamped into the window: clocks can disagree)."""
        return min(max(int((at - self.since) // DAY), 0), self.days - 1)

    def day_start(self, index: int) -> float:
        return self.since + index * DAY


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds measured `count` times: their median and p90 (None when there are none)."""

    count: int
    median: float | None
    p90: float | None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Timing:
        ordered = sorted(seconds)
        return cls(len(ordered), quantile(ordered, 0.5), quantile(ordered, 0.9))


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted values, linear between the nearest ranks; None for no values."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rate(approved: int, denied: int) -> float | None:
    """Approved share of the decisions, None when there were none."""
    decided = approved + denied
    return approved / decided if decided else None


@dataclass(slots=True)
class Tally:
    """The requests of one tool, or the decisions of one reviewer."""

    name: str
    requests: int = 0
    approved: int = 0
    denied: int = 0
    expired: int = 0
    decision_seconds: list[float] = field(default_factory=list)

    @property
    def approval_rate(self) -> float | None:
        return rate(self.approved, self.denied)

    @property
    def time_to_decision(self) -> Timing:
        return Timing.of(self.decision_seconds)


@dataclass(frozen=True, slots=True)
class Flag:
    """One reason to look at how a reviewer decides."""

    reviewer: str
    kind: Literal["fast", "risky_rule"]
    rule: str | None  # the rule, for "risky_rule"
    approved: int
    total: int
    median_seconds: float | None  # for "fast"


@dataclass(frozen=True, slots=True)
class ReviewerFigures:
    name: str
    approved: int
    denied: int
    approval_rate: float | None
    time_to_decision: Timing
    open_to_approve: Timing
    flags: tuple[Flag, ...]


@dataclass(frozen=True, slots=True)
class Stats:
    """Everything the dashboard shows for one window."""

    window: Window
    requests: int
    approved: int
    denied: int
    expired: int
    cancelled: int
    undecided: int  # still pending
    approval_rate: float | None
    time_to_decision: Timing
    series: tuple[str, ...]  # the daily chart's tools, busiest first; "" stands for the others
    per_day: tuple[tuple[int, ...], ...]  # [day][series] request counts
    tools: tuple[Tally, ...]  # busiest first
    reviewers: tuple[ReviewerFigures, ...]  # most decisions first
    flags: tuple[Flag, ...]
    waiting: int  # requests pending now (any age)
    oldest: Approval | None  # the longest-waiting of them


def decision_of(approval: Approval) -> Literal["approved", "denied"] | None:
    """What a reviewer decided, None if no one did (pending, expired, cancelled)."""
    if approval.status == "denied":
        return "denied"
    return "approved" if approval.decided_by is not None else None


def figures(
    approvals: Iterable[Approval], events: Iterable[AuditEvent], waiting: Sequence[Approval], window: Window
) -> Stats:
    """The dashboard's figures for the approvals created in `window` (others are ignored), their
    audit `events` (others are ignored) and the requests `waiting` now (newest first, as listed)."""
    inside = [a for a in approvals if a.created_at >= window.since]
    tools: dict[str, Tally] = {}
    reviewers: dict[str, Tally] = {}
    by_rule: Counter[tuple[str, str, str]] = Counter()  # (reviewer, rule, decision)
    statuses: Counter[str] = Counter()
    for a in inside:
        tool = tools.setdefault(a.tool, Tally(a.tool))
        tool.requests += 1
        decision = decision_of(a)
        if decision is None:
            statuses[a.status] += 1
            tool.expired += a.status == "expired"
            continue
        statuses[decision] += 1
        assert a.decided_by is not None  # decision_of: a decision has its reviewer
        reviewer = reviewers.setdefault(a.decided_by, Tally(a.decided_by))
        seconds = max((a.decided_at or a.created_at) - a.created_at, 0.0)
        for tally in (tool, reviewer):
            tally.approved += decision == "approved"
            tally.denied += decision == "denied"
            tally.decision_seconds.append(seconds)
        by_rule[(a.decided_by, a.rule, decision)] += 1
    opened = _open_to_approve({a.id for a in inside}, events)
    ranked_tools = sorted(tools.values(), key=lambda t: (-t.requests, t.name))
    series = tuple(t.name for t in ranked_tools[:TOP_TOOLS]) + (
        ("",) if len(ranked_tools) > TOP_TOOLS else ()
    )
    people = [_reviewer(t, opened.get(t.name, []), by_rule) for t in reviewers.values()]
    # A reviewer who only opened requests in the window still has a row (and maybe a flag).
    people += [
        _reviewer(Tally(name), times, by_rule) for name, times in opened.items() if name not in reviewers
    ]
    people.sort(key=lambda r: (-(r.approved + r.denied), r.name))
    approved, denied = statuses["approved"], statuses["denied"]
    return Stats(
        window=window,
        requests=len(inside),
        approved=approved,
        denied=denied,
        expired=statuses["expired"],
        cancelled=statuses["cancelled"],
        undecided=statuses["pending"],
        approval_rate=rate(approved, denied),
        time_to_decision=Timing.of(s for t in tools.values() for s in t.decision_seconds),
        series=series,
        per_day=_per_day(inside, series, window),
        tools=tuple(ranked_tools),
        reviewers=tuple(people),
        flags=tuple(f for r in people for f in r.flags),
        waiting=len(waiting),
        oldest=min(waiting, key=lambda a: (a.created_at, a.id), default=None),
    )


def _per_day(
    inside: Sequence[Approval], series: tuple[str, ...], window: Window
) -> tuple[tuple[int, ...], ...]:
    column = {name: i for i, name in enumerate(series) if name}
    other = len(series) - 1  # only used when series ends with "" (the other tools)
    counts = [[0] * len(series) for _ in range(window.days)]
    for a in inside:
        counts[window.day_of(a.created_at)][column.get(a.tool, other)] += 1
    return tuple(tuple(day) for day in counts)


def _open_to_approve(ids: set[str], events: Iterable[AuditEvent]) -> dict[str, list[float]]:
    """Per reviewer, the seconds from first opening each request to approving it (first approval
    after the opening; the log is oldest first). Requests approved without opening are left out."""
    first_view: dict[tuple[str, str], float] = {}
    approved_at: dict[tuple[str, str], float] = {}
    for e in events:
        key = (e.approval_id, e.actor)
        if e.approval_id not in ids:
            continue
        if e.event == "viewed":
            first_view[key] = min(first_view.get(key, e.at), e.at)
        elif e.event == "approved" and key in first_view and key not in approved_at:
            approved_at[key] = e.at
    seconds: dict[str, list[float]] = defaultdict(list)
    for (approval_id, actor), at in approved_at.items():
        seconds[actor].append(max(at - first_view[(approval_id, actor)], 0.0))
    return dict(seconds)


def _reviewer(tally: Tally, opened: list[float], by_rule: Counter[tuple[str, str, str]]) -> ReviewerFigures:
    open_to_approve = Timing.of(opened)
    flags: list[Flag] = []
    fast = open_to_approve.median
    if open_to_approve.count >= MIN_FAST_SAMPLES and fast is not None and fast < FAST_APPROVAL_SECONDS:
        flags.append(Flag(tally.name, "fast", None, open_to_approve.count, open_to_approve.count, fast))
    rules = sorted({rule for (who, rule, _) in by_rule if who == tally.name})
    for rule in rules:
        yes, no = by_rule[(tally.name, rule, "approved")], by_rule[(tally.name, rule, "denied")]
        if yes + no >= MIN_RULE_DECISIONS and yes * 100 >= RISKY_APPROVE_PERCENT * (yes + no):
            flags.append(Flag(tally.name, "risky_rule", rule, yes, yes + no, None))
    return ReviewerFigures(
        name=tally.name,
        approved=tally.approved,
        denied=tally.denied,
        approval_rate=tally.approval_rate,
        time_to_decision=tally.time_to_decision,
        open_to_approve=open_to_approve,
        flags=tuple(flags),
    )
