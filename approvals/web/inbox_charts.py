"""The dashboard's charts as shapes (pure): rectangles, lines and labels in an SVG's coordinates.

The template (stats.html, macro `chart`) draws them as inline SVG: every number here is computed,
every text (tool and reviewer names included) goes into <text> and <title> elements through the
template engine's autoescape, and colours come from classes styled in stats.css — no `style`
attributes, so the inbox's CSP (style-src 'self') stays as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from approvals.core import render
from approvals.web.inbox_stats import Stats, Timing

WIDTH = 720
NAME_CHARS = 28  # longer tool or reviewer names are cut (with …) in charts; tables show them whole
Anchor = Literal["start", "middle", "end"]


@dataclass(frozen=True, slots=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str  # the tooltip (<title>)


@dataclass(frozen=True, slots=True)
class Label:
    x: float
    y: float
    text: str
    css: str = ""
    anchor: Anchor = "start"


@dataclass(frozen=True, slots=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    css: str = "grid"


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    rects: tuple[Rect, ...] = ()
    labels: tuple[Label, ...] = ()
    lines: tuple[Line, ...] = ()


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times 10^k that is at least `value` (1 for nothing), for an axis's top."""
    if value <= 1:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if step * power >= value)


def short(name: str) -> str:
    """A name as a chart shows it: hidden characters marked, cut to NAME_CHARS."""
    shown = render.visible(name)
    return shown if len(shown) <= NAME_CHARS else shown[: NAME_CHARS - 1] + "…"


def series_name(name: str) -> str:
    return short(name) if name else "other tools"


def _r(value: float) -> float:
    return round(value, 1)


def day_label(at: float, days: int) -> str:
    """ "Mon 4" over a week, "4 Dec" over a month."""
    when = datetime.fromtimestamp(at, UTC)
    return f"{when:%a} {when.day}" if days <= 7 else f"{when.day} {when:%b}"


def daily_requests(stats: Stats) -> Chart:
    """Requests per day, stacked by tool (the chart's series), with each day's total on top."""
    left, right, top, bottom, height = 34.0, 8.0, 18.0, 24.0, 220
    window = stats.window
    totals = [sum(day) for day in stats.per_day]
    peak = nice_ceiling(max(totals, default=0))
    plot_h = height - top - bottom
    slot = (WIDTH - left - right) / window.days
    bar_w = slot * 0.7
    rects: list[Rect] = []
    labels: list[Label] = []
    lines: list[Line] = []
    for tick in (0.0, peak / 2, peak):
        y = _r(top + plot_h * (1 - tick / peak))
        lines.append(Line(left, y, WIDTH - right, y))
        labels.append(Label(left - 6, y + 4, f"{tick:g}", "axis", "end"))
    label_every = 1 if window.days <= 7 else 5
    for index, day in enumerate(stats.per_day):
        x = left + index * slot + (slot - bar_w) / 2
        day_text = day_label(window.day_start(index), window.days)
        base = top + plot_h
        for column, count in enumerate(day):
            if not count:
                continue
            h = plot_h * count / peak
            base -= h
            title = f"{day_text}: {series_name(stats.series[column])}, {count} request{'s' * (count != 1)}"
            rects.append(Rect(_r(x), _r(base), _r(bar_w), _r(h), f"series-{column}", title))
        center = _r(x + bar_w / 2)
        if totals[index]:
            labels.append(Label(center, _r(base - 4), str(totals[index]), "total", "middle"))
        last = index == window.days - 1
        if index % label_every == 0 or last:
            labels.append(Label(center, height - 6, "today" if last else day_text, "axis", "middle"))
    return Chart(WIDTH, height, tuple(rects), tuple(labels), tuple(lines))


OUTCOMES = ("approved", "denied", "expired", "cancelled", "pending")


def outcomes(stats: Stats) -> Chart:
    """One bar split by what became of the window's requests."""
    counts = dict(zip(OUTCOMES, _outcome_counts(stats), strict=True))
    height, bar_h = 34, 26.0
    total = sum(counts.values())
    rects: list[Rect] = []
    x = 0.0
    for name, count in counts.items():
        if not count:
            continue
        w = WIDTH * count / total
        rects.append(
            Rect(_r(x), 4.0, _r(w), bar_h, f"outcome-{name}", f"{name}: {count} ({count / total:.0%})")
        )
        x += w
    return Chart(WIDTH, height, tuple(rects))


def _outcome_counts(stats: Stats) -> tuple[int, ...]:
    return (stats.approved, stats.denied, stats.expired, stats.cancelled, stats.undecided)


def timings(rows: Sequence[tuple[str, Timing]]) -> Chart:
    """Time to decision per name: the p90 as a pale bar, the median over it, both in words at the end."""
    shown = [
        (name, t.median, t.p90, t.count) for name, t in rows if t.median is not None and t.p90 is not None
    ]
    left, right, row_h, bar_h = 190.0, 170.0, 30.0, 16.0
    height = int(row_h * max(len(shown), 1) + 8)
    longest = max((p90 for _, _, p90, _ in shown), default=0.0)
    scale = (WIDTH - left - right) / longest if longest > 0 else 0.0
    rects: list[Rect] = []
    labels: list[Label] = []
    for index, (name, median, p90, count) in enumerate(shown):
        y = 4 + index * row_h
        words = f"median {render.duration(median)} · p90 {render.duration(p90)}"
        title = f"{short(name)}: {words} over {count} decision{'s' * (count != 1)}"
        rects.append(Rect(left, _r(y), _r(max(p90 * scale, 1.0)), bar_h, "p90", title))
        rects.append(Rect(left, _r(y), _r(max(median * scale, 1.0)), bar_h, "median", title))
        labels.append(Label(left - 8, _r(y + 12), short(name), "name", "end"))
        labels.append(Label(_r(left + max(p90 * scale, 1.0) + 6), _r(y + 12), words, "value"))
    return Chart(WIDTH, height, tuple(rects), tuple(labels))


# ---- figures in words (the templates' filters) -------------------------------------------------


def percent(share: float | None) -> str:
    """ "83%", or "—" when there is nothing to divide."""
    return "—" if share is None else f"{share:.0%}"


def seconds(value: float | None) -> str:
    """ "2.5 s", "1.5 min", or "—" when nothing was measured."""
    return "—" if value is None else render.duration(value)
