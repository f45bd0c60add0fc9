"""The reviewer dashboard: its figures on a seeded history (computed by hand), its bounded reads,
the page through a real gateway, the `viewed` event, and the page in headless Chromium (no CSP
violation, the charts drawn with the expected numbers)."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from approvals.core.model import Approval, AuditEvent, new_approval_id
from approvals.web import inbox_charts as charts
from approvals.web import inbox_dashboard as dashboard
from approvals.web.inbox_stats import DAY, Timing, Window, figures, quantile
from tests.approvals_kit import Held, start_held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, WAIT, StartGateway, mcp_client
from tests.inbox_kit import SECURITY_HEADERS, Reviewer
from tests.replica_kit import fresh_database
from tests.test_inbox import EMAIL, add_approval, settle
from tests.test_inbox_browser import browser, watch  # noqa: F401 (browser: test_inbox_browser's fixture)

NOW = datetime(2026, 12, 4, 15, 0, tzinfo=UTC).timestamp()
WEEK = Window.ending(NOW, 7)  # 2026-11-28 00:00 UTC (day 0) to 2026-12-04 (day 6, today)


def made(tool: str, day: int, hour: int, status: str = "pending", **fields: Any) -> Approval:
    """A record made on `day` of WEEK at `hour`; `after` = seconds from the request to its decision."""
    created = WEEK.day_start(day) + hour * 3600
    after = fields.pop("after", None)
    record: dict[str, Any] = {
        "id": new_approval_id(),
        "upstream": "demo",
        "tool": tool,
        "arguments_json": "{}",
        "args_sha256": "h",
        "tool_json": "",
        "tool_sha256": "",
        "grant": "agent-a",
        "owner": None,
        "session_id": "s",
        "rule": tool,
        "explanation": "",
        "status": status,
        "created_at": created,
        "expires_at": created + 600,
        "decided_at": None if after is None else created + after,
        **fields,
    }
    return Approval(**record)


def event(approval: Approval, name: str, actor: str, after: float, seq: int) -> AuditEvent:
    return AuditEvent(seq, approval.created_at + after, approval.id, name, actor, "web", "h", None)


def seeded() -> tuple[list[Approval], list[AuditEvent], list[Approval]]:
    """A week of requests (ids a1…a9), their views and approvals, and those waiting now."""
    a1 = made("send_email", 5, 10, "completed", decided_by="alice", after=10)
    a2 = made("send_email", 5, 11, "completed", decided_by="alice", after=20)
    a3 = made("send_email", 6, 9, "denied", decided_by="bob", after=60)
    a4 = made("create_refund", 6, 10, "released", decided_by="bob", after=120)
    a5 = made("create_refund", 4, 8, "expired")
    a6 = made("send_email", 4, 9, "cancelled")
    a7 = made("drop_db", 6, 12)  # waiting
    a8 = replace(
        made("send_email", 0, 0, "completed", decided_by="alice", after=1), created_at=WEEK.since - 3600
    )
    a9 = made("send_email", 3, 1, "expired", decided_by="alice", after=30)  # approved, then lapsed
    events = [
        event(a1, "viewed", "alice", 8, 1),
        event(a1, "viewed", "bob", 9, 2),  # bob only looked
        event(a1, "approved", "alice", 10, 3),
        event(a2, "viewed", "alice", 17, 4),
        event(a2, "viewed", "alice", 19, 5),  # a second view (another replica): the first counts
        event(a2, "approved", "alice", 20, 6),
        event(a9, "viewed", "alice", 26, 7),
        event(a9, "approved", "alice", 30, 8),
        event(a3, "viewed", "bob", 30, 9),
        event(a3, "denied", "bob", 60, 10),
        event(a4, "approved", "bob", 120, 11),  # from Slack: never opened, no open-to-approve time
        event(a8, "viewed", "alice", 0, 12),  # outside the window: ignored
        event(a8, "approved", "alice", 1, 13),
    ]
    return [a1, a2, a3, a4, a5, a6, a7, a8, a9], events, [a7]


def rounded(t: Timing) -> tuple[int, float | None, float | None]:
    """A timing with its figures rounded (p90 interpolation is not exact in binary)."""
    median, p90 = (None if v is None else round(v, 6) for v in (t.median, t.p90))
    return (t.count, median, p90)


# ---- the figures, by hand --------------------------------------------------------------------


def test_quantiles_interpolate_between_the_nearest_ranks() -> None:
    """p90 of 1..10 is 9.1, the median of four values is the mean of the middle two; none is None."""
    assert quantile([float(n) for n in range(1, 11)], 0.9) == pytest.approx(9.1)
    assert quantile([10.0, 20.0, 30.0, 60.0], 0.5) == 25.0
    assert quantile([], 0.5) is None
    assert Timing.of([7.0]) == Timing(1, 7.0, 7.0)


def test_the_window_is_whole_utc_days_today_included() -> None:
    """Seven days end today: the first starts at midnight UTC six days ago; late clocks clamp."""
    assert WEEK.since == datetime(2026, 11, 28, tzinfo=UTC).timestamp()
    assert WEEK.day_of(NOW) == 6
    assert WEEK.day_of(NOW + DAY) == 6
    assert Window.ending(NOW, 30).since == datetime(2026, 11, 5, tzinfo=UTC).timestamp()


def test_figures_of_a_seeded_week_match_the_hand_count() -> None:
    """Counts, rate, medians and p90s, per day, tool and reviewer, as worked out by hand below."""
    approvals, events, waiting = seeded()
    stats = figures(approvals, events, waiting, WEEK)
    # a8 was made before the window: 8 requests. Approved a1 a2 a4 a9 (a9 lapsed after approval).
    assert (stats.requests, stats.approved, stats.denied) == (8, 4, 1)
    assert (stats.expired, stats.cancelled, stats.undecided) == (1, 1, 1)
    assert stats.approval_rate == 4 / 5
    # Decisions after 10, 20, 60, 120, 30 s: sorted 10 20 30 60 120; p90 at rank 3.6 = 60 + 0.6 * 60.
    assert rounded(stats.time_to_decision) == (5, 30.0, 96.0)
    assert stats.series == ("send_email", "create_refund", "drop_db")
    assert stats.per_day == ((0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (1, 1, 1))
    email, refund, drop = stats.tools
    assert (email.name, email.requests, email.approved, email.denied, email.expired) == (
        "send_email",
        5,
        3,
        1,
        0,
    )
    # send_email: 10 20 60 30 → 10 20 30 60: median 25, p90 at rank 2.7 = 30 + 0.7 * 30.
    assert rounded(email.time_to_decision) == (4, 25.0, 51.0)
    assert (refund.requests, refund.approved, refund.expired, refund.approval_rate) == (2, 1, 1, 1.0)
    assert (drop.requests, drop.approval_rate, drop.time_to_decision) == (1, None, Timing(0, None, None))
    alice, bob = stats.reviewers
    assert (alice.name, alice.approved, alice.denied) == ("alice", 3, 0)
    assert rounded(alice.time_to_decision) == (3, 20.0, 28.0)  # 10 20 30
    assert rounded(alice.open_to_approve) == (3, 3.0, 3.8)  # 2, 3 (first view), 4
    assert (bob.name, bob.approved, bob.denied, bob.approval_rate) == ("bob", 1, 1, 0.5)
    assert rounded(bob.time_to_decision) == (2, 90.0, 114.0)  # 60 120
    assert bob.open_to_approve == Timing(0, None, None)  # approved from Slack without opening
    assert [(f.reviewer, f.kind, f.total) for f in stats.flags] == [("alice", "fast", 3)]
    assert stats.waiting == 1
    assert stats.oldest is not None
    assert stats.oldest.tool == "drop_db"


def test_a_reviewer_approving_almost_everything_of_a_rule_is_flagged() -> None:
    """At least 95% approved of at least 10 decisions on one rule flags; 90%, or 9 decisions, does not."""
    records = []
    for name, yes, no in (("carol", 10, 0), ("dave", 19, 1), ("erin", 18, 2), ("frank", 9, 0)):
        records += [made("send_email", 2, 1, "completed", decided_by=name, after=60) for _ in range(yes)]
        records += [made("send_email", 2, 1, "denied", decided_by=name, after=60) for _ in range(no)]
    stats = figures(records, [], [], WEEK)
    flagged = [(f.reviewer, f.kind, f.rule, f.approved, f.total) for f in stats.flags]
    assert flagged == [
        ("dave", "risky_rule", "send_email", 19, 20),
        ("carol", "risky_rule", "send_email", 10, 10),
    ]


def test_the_busiest_tools_are_named_and_the_rest_drawn_as_others() -> None:
    """Seven tools: the six busiest get their own colour, the last is counted under "other tools"."""
    records = [made(f"tool_{n}", 6, 1) for n in range(7) for _ in range(7 - n)]
    stats = figures(records, [], [], WEEK)
    assert stats.series == ("tool_0", "tool_1", "tool_2", "tool_3", "tool_4", "tool_5", "")
    assert stats.per_day[6] == (7, 6, 5, 4, 3, 2, 1)
    assert charts.series_name("") == "other tools"


def test_charts_draw_one_bar_per_tool_and_day_with_the_totals() -> None:
    """Stacked bars per non-empty (day, tool), totals on top, the p90 and median bars per reviewer."""
    approvals, events, waiting = seeded()
    stats = figures(approvals, events, waiting, WEEK)
    daily = charts.daily_requests(stats)
    assert len(daily.rects) == 7
    assert [t.text for t in daily.labels if t.css == "total"] == ["1", "2", "2", "3"]
    assert {r.css for r in daily.rects} == {"series-0", "series-1", "series-2"}
    assert "Tue 1: send_email, 1 request" in [r.title for r in daily.rects]
    times = charts.timings([(r.name, r.time_to_decision) for r in stats.reviewers])
    assert [r.css for r in times.rects] == ["p90", "median", "p90", "median"]
    assert "median 20 s · p90 28 s" in [t.text for t in times.labels]
    assert charts.nice_ceiling(3) == 5
    assert charts.nice_ceiling(0) == 1
    assert charts.short("x" * 40) == "x" * 27 + "…"


# ---- a real gateway and a seeded history -------------------------------------------------------

HOSTILE_TOOL = '<script>alert("t")</script>'
HOSTILE_REVIEWER = "<img src=x onerror=alert(1)>"


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    return await start_held(start_gateway, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
async def any_held(
    request: pytest.FixtureRequest, start_gateway: StartGateway, tmp_path: Path
) -> AsyncIterator[Held]:
    """The held gateway on SQLite, and on PostgreSQL (a database of this test's own)."""
    if request.param == "sqlite":
        yield await start_held(start_gateway, tmp_path)
        return
    async with fresh_database() as url:
        yield await start_held(start_gateway, tmp_path, store={"url": url})


@pytest.fixture
async def reviewers(held: Held) -> AsyncIterator[Callable[[str | None], Awaitable[Reviewer]]]:
    """`await reviewers(token)`: a browser-less reviewer, logged in with `token` (None: anonymous)."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(token: str | None) -> Reviewer:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        reviewer = Reviewer(held.gateway.base, http)
        if token is not None:
            assert (await reviewer.login(token)).status == 303
        return reviewer

    yield make
    for http in sessions:
        await http.close()


def approved(by: str, after: float) -> Callable[[float], list[tuple[str, dict[str, Any]]]]:
    def path(created: float) -> list[tuple[str, dict[str, Any]]]:
        decided = created + after
        return [
            ("approved", {"decided_by": by, "decided_at": decided, "decided_via": "web"}),
            ("released", {"released_at": decided}),
            ("completed", {"finished_at": decided + 1}),
        ]

    return path


def denied(by: str, after: float) -> Callable[[float], list[tuple[str, dict[str, Any]]]]:
    def path(created: float) -> list[tuple[str, dict[str, Any]]]:
        fields = {"decided_by": by, "decided_at": created + after, "decided_via": "web", "reason": "no"}
        return [("denied", fields)]

    return path


def expired(created: float) -> list[tuple[str, dict[str, Any]]]:
    return [("expired", {"finished_at": created + 600, "reason": "no decision before the timeout"})]


async def seed(
    held: Held,
    tool: str,
    days_ago: int,
    hour: int,
    path: Callable[[float], list[tuple[str, dict[str, Any]]]] | None = None,
) -> Approval:
    """A request made `days_ago` whole UTC days before today at `hour`, moved along `path`."""
    now = time.time()
    created = math.floor(now / DAY) * DAY - days_ago * DAY + hour * 3600
    approval = await add_approval(
        held, tool=tool, created_at=created, expires_at=now + 3600, arguments={"n": new_approval_id()}
    )
    await settle(held, approval, *(path(created) if path else []))
    return approval


async def seed_history(held: Held) -> Approval:
    """Requests per day (3, 2, 1 days ago, today): 1, 2, 3, 1; decisions after 30 90 600 60 45 s
    (median 60 s, p90 at rank 3.6 = 90 + 0.6 * 510 = 396 s); 4 approved of 5 decided; 1 expired;
    one waiting (returned)."""
    await seed(held, "create_refund", 3, 8, expired)
    await seed(held, "send_email", 2, 10, approved("alice", 30))
    await seed(held, "send_email", 2, 11, approved("alice", 90))
    await seed(held, "send_email", 1, 9, denied("bob", 600))
    await seed(held, "create_refund", 1, 10, approved("bob", 60))
    await seed(held, HOSTILE_TOOL, 1, 12, approved(HOSTILE_REVIEWER, 45))
    today = math.floor(time.time() / DAY) * DAY
    return await add_approval(held, tool="drop_db", created_at=max(today, time.time() - 7200))


def figure(page: str, name: str) -> str:
    found = re.search(rf'data-figure="{name}">([^<]*)<', page)
    assert found is not None, name
    return found.group(1)


# ---- the bounded reads -----------------------------------------------------------------------


async def test_the_audit_log_is_bisected_on_its_time_stamps(any_held: Held) -> None:
    """Reading starts right before the first event stamped at or after the time asked for."""
    for hour in range(5):
        await seed(any_held, "send_email", 1, hour, approved("alice", 30))
    service = any_held.gateway.service
    log = await service.audit(limit=1000)
    assert len(log) == 5 * 4  # created, approved, released, completed
    for previous, event in itertools.pairwise(log):
        assert await dashboard.first_seq_before(service, event.at) == previous.seq
    assert await dashboard.first_seq_before(service, log[0].at) == 0
    assert await dashboard.first_seq_before(service, log[-1].at + 1) == log[-1].seq


async def test_the_window_is_read_within_its_bounds(any_held: Held, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the window's requests are read; past a bound the reads stop, and the page says so."""
    records = [await seed(any_held, "send_email", 1, hour) for hour in range(3)]
    old = await seed(any_held, "send_email", 9, 1)  # before the week
    service = any_held.gateway.service
    week = Window.ending(time.time(), 7)
    whole = await dashboard.read_window(service, week)
    assert {a.id for a in whole.approvals} == {a.id for a in records}
    assert {a.id for a in whole.waiting} == {a.id for a in [*records, old]}
    assert (whole.approvals_cut, whole.events_cut, whole.waiting_cut) == (False, False, False)
    for name, value in (("MAX_APPROVALS", 2), ("MAX_WAITING", 2), ("BATCH", 1), ("MAX_EVENTS", 2)):
        monkeypatch.setattr(dashboard, name, value)
    cut = await dashboard.read_window(service, week)
    newest = sorted(records, key=lambda a: a.created_at, reverse=True)[:2]
    assert [a.id for a in cut.approvals] == [a.id for a in newest]
    assert (cut.approvals_cut, cut.events_cut, cut.waiting_cut) == (True, True, True)
    assert len(cut.waiting) == 2
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        bob = Reviewer(any_held.gateway.base, http)
        assert (await bob.login(BOB_TOKEN)).status == 303
        page = await bob.get("/inbox/stats")
    assert 'data-cut="approvals"' in page.text  # the page says the figures cover the newest 2
    assert 'data-cut="events"' in page.text
    assert figure(page.text, "waiting") == "2+"


# ---- the page --------------------------------------------------------------------------------


async def test_the_page_shows_a_seeded_week_to_reviewers_only(
    held: Held, reviewers: Callable[[str | None], Awaitable[Reviewer]]
) -> None:
    """200 with the hand-counted figures for a reviewer, names escaped; login first otherwise; a
    window the page does not offer is a 400 naming those it does."""
    waiting = await seed_history(held)
    anonymous = await reviewers(None)
    page = await anonymous.get("/inbox/stats?days=30")
    assert page.status == 303
    assert page.headers["Location"] == "/inbox/login?next=%2Finbox%2Fstats%3Fdays%3D30"
    bob = await reviewers(BOB_TOKEN)
    page = await bob.get("/inbox/stats")
    assert page.status == 200
    for header, value in SECURITY_HEADERS.items():
        assert page.headers[header] == value
    text = page.text
    assert (figure(text, "requests"), figure(text, "approval-rate"), figure(text, "expired")) == (
        "7",
        "80%",
        "1",
    )
    assert (figure(text, "time-to-decision"), figure(text, "time-to-decision-p90")) == ("1 min", "6.6 min")
    assert figure(text, "waiting") == "1"
    assert f'href="/inbox/approvals/{waiting.id}">drop_db</a>' in text
    assert re.findall(r'<text class="total"[^>]*>(\d+)</text>', text) == ["1", "2", "3", "1"]
    assert 'href="/inbox/stats" aria-current="page">Stats</a>' in text
    assert HOSTILE_TOOL not in text
    assert HOSTILE_REVIEWER not in text
    assert "&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "data-flags-none" in text
    month = await bob.get("/inbox/stats?days=30")
    assert month.status == 200
    assert figure(month.text, "requests") == "7"
    for bad in ("14", "seven", "7;drop"):
        refused = await bob.get(f"/inbox/stats?days={bad}")
        assert refused.status == 400
        assert "days must be one of 7, 30" in refused.text


async def test_opening_a_request_is_logged_once_and_fast_approvals_are_flagged(
    held: Held, reviewers: Callable[[str | None], Awaitable[Reviewer]]
) -> None:
    """The `viewed` event is written once per reviewer per request; a reviewer who approves three
    requests within seconds of opening them is flagged on the dashboard."""
    bob, alice = await reviewers(BOB_TOKEN), await reviewers(ALICE_TOKEN)
    async with mcp_client(held.url()) as client:
        decided: set[str] = set()
        for n in range(3):
            call = asyncio.create_task(client.call_tool("send_email", {**EMAIL, "subject": f"n{n}"}))
            approval = await held.recorder.wait_for(lambda a: a.status == "pending" and a.id not in decided)
            for reviewer in (bob, bob, alice, bob):
                assert (await reviewer.get(f"/inbox/approvals/{approval.id}")).status == 200
            assert (await bob.decide(approval.id, "approve")).status == 303
            decided.add(approval.id)
            assert not (await asyncio.wait_for(call, WAIT)).is_error
    _, body = await held.api("GET", f"/api/audit?approval_id={approval.id}")
    views = [(e["actor"], e["channel"]) for e in body["events"] if e["event"] == "viewed"]
    assert views == [("bob", "web"), ("alice", "web")]
    page = await alice.get("/inbox/stats")
    flags = re.findall(r'<li data-flag="(\w+)"><strong>(\w+)</strong>', page.text)
    assert flags == [("fast", "bob")]


# ---- the page in Chromium ----------------------------------------------------------------------

CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective));
"""


async def test_the_dashboard_in_chromium_draws_its_charts_without_a_csp_violation(
    browser: Browser,  # noqa: F811 (the fixture imported above)
    held: Held,
    tmp_path: Path,
) -> None:
    """The charts are inline SVG with the seeded numbers; no CSP violation, no script error, no
    dialog from the hostile names (kept as docs/inbox-stats.png on request)."""
    await seed_history(held)
    tab = await watch(
        browser, held.gateway.base, viewport={"width": 1200, "height": 1400}, device_scale_factor=1
    )
    await tab.context.add_init_script(CSP_WATCH)
    await tab.login()
    await tab.page.get_by_role("link", name="Stats").click()
    await expect(tab.page).to_have_url(f"{held.gateway.base}/inbox/stats")
    daily = tab.page.locator('svg[data-chart="daily"]')
    await expect(daily.locator("rect")).to_have_count(6)
    await expect(daily.locator("text.total")).to_have_text(["1", "2", "3", "1"])
    await expect(tab.page.locator('svg[data-chart="outcomes"] rect')).to_have_count(4)
    await expect(tab.page.locator('[data-figure="approval-rate"]')).to_have_text("80%")
    await expect(tab.page.locator('svg[data-chart="tool-times"] text.name')).to_contain_text([HOSTILE_TOOL])
    assert await daily.evaluate("svg => svg.getBoundingClientRect().width") > 600
    await tab.page.get_by_role("link", name="30 days").click()
    await expect(tab.page.locator('svg[data-chart="daily"] text.total')).to_have_text(["1", "2", "3", "1"])
    await tab.page.get_by_role("link", name="7 days").click()
    await tab.page.screenshot(path=tmp_path / "inbox-stats.png", full_page=True, animations="disabled")
    assert await tab.page.evaluate("window.__csp") == []
    tab.assert_clean()
    if target := os.environ.get("APPROVALS_SCREENSHOTS"):
        shutil.copy(tmp_path / "inbox-stats.png", Path(target) / "inbox-stats.png")
