"""The inbox's pending list over plain HTTP: filters, each review at a glance, and batch review.

Requests are held through the gatekeeper (the policy, then `ApprovalService.admit`), as a real
agent's calls are, so approving one releases it to the demo upstream for real.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.config import Principal, sha256_hex
from approvals.core.model import Approval, ToolCall
from approvals.core.review import Escalation, ReviewRule
from approvals.web.inbox_batch import MAX_BATCH
from tests.approvals_kit import Held, start_held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, WAIT, StartGateway
from tests.inbox_kit import Page, Reviewer, csrf_of
from tests.test_inbox import add_approval, read_event

CAROL_TOKEN = "carol-reviewer-token-0123456789a"
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "send_email": {"action": "require_approval"},
        "delete_file": {"action": "require_approval", "approval": {"quorum": 2}},
        "get_time": {},
        "list_files": {},
    },
}
REVIEWERS = [
    {"name": "alice", "token_sha256": sha256_hex(ALICE_TOKEN), "slack_user_id": "U0ALICE"},
    {"name": "bob", "token_sha256": sha256_hex(BOB_TOKEN), "slack_user_id": "U0BOB"},
    {"name": "carol", "token_sha256": sha256_hex(CAROL_TOKEN), "slack_user_id": "U0CAROL"},
]


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """send_email held for one approval, delete_file for two; room for 100 pending per agent."""
    return await start_held(
        start_gateway,
        tmp_path,
        policy=POLICY,
        approvals={"max_pending_per_grant": 100},
        reviewers=REVIEWERS,
    )


@pytest.fixture
async def reviewers(held: Held) -> AsyncIterator[Callable[[str], Any]]:
    """`await login(token)`: a browser-less reviewer (own cookie jar) logged in to the held gateway."""
    sessions: list[aiohttp.ClientSession] = []

    async def login(token: str) -> Reviewer:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        reviewer = Reviewer(held.gateway.base, http)
        assert (await reviewer.login(token)).status == 303
        return reviewer

    yield login
    for http in sessions:
        await http.close()


async def hold(held: Held, tool: str = "send_email", grant: str = "agent-a", n: int = 0) -> Approval:
    """An agent's call held for approval through the gatekeeper, as the proxy holds one."""
    arguments: dict[str, object] = (
        {"to": f"user{n}@example.com", "subject": f"Report {n}", "body": "Attached."}
        if tool == "send_email"
        else {"path": f"reports/{n}.txt"}
    )
    admission = await held.gate.admit(ToolCall("demo", grant, f"session-{n}", tool, arguments))
    assert admission.hold is not None, admission
    admission.hold.close()
    approval = await held.gateway.service.get(admission.hold.approval_id)
    assert approval is not None
    assert approval.status == "pending"
    return approval


def principal(held: Held, name: str) -> Principal:
    return next(r for r in held.gateway.service.settings.reviewers if r.name == name)


def row_ids(page: str) -> list[str]:
    return re.findall(r'<li class="item" data-id="([0-9a-f]{32})"', page)


def outcomes(page: str) -> dict[str, str]:
    """The result page's rows: id → outcome kind."""
    return dict(re.findall(r'<tr data-id="([^"]*)" data-outcome="([a-z_]+)">', page))


def options(page: str, name: str) -> list[str]:
    select = re.search(rf'<select name="{name}">(.*?)</select>', page, re.S)
    assert select is not None
    return re.findall(r'<option value="([^"]*)"', select.group(1))


async def post(reviewer: Reviewer, fields: list[tuple[str, str]], origin: str | None = "") -> Page:
    """POST /inbox/batch with these fields in order (`ids` repeated); `origin` as Reviewer.post."""
    headers = {} if origin is None else {"Origin": origin or reviewer.origin}
    async with reviewer.http.post(
        f"{reviewer.base}/inbox/batch", data=fields, headers=headers, allow_redirects=False
    ) as response:
        return Page(response.status, await response.text(), response.headers)


async def batch(
    reviewer: Reviewer, ids: list[str], action: str = "approve", reason: str = "", **form: str
) -> Page:
    """POST /inbox/batch as the list's form does."""
    fields = [("csrf", form.pop("csrf", None) or await reviewer.csrf()), ("action", action)]
    fields += [("ids", i) for i in ids] + [("reason", reason)] + list(form.items())
    return await post(reviewer, fields)


# ---- the list: filters and the review at a glance -------------------------------------------------


async def test_filters_offer_the_pending_tools_and_agents_and_narrow_the_list(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Select boxes list the tools and agents of pending requests; ?tool= and ?agent= narrow the rows."""
    mail_a = await hold(held, "send_email", "agent-a", 1)
    delete_a = await hold(held, "delete_file", "agent-a", 2)
    mail_b = await hold(held, "send_email", "agent-b", 3)
    decided = await add_approval(held, tool="drop_table", arguments={"t": 1})
    await held.gateway.service.decide(
        decided.id, principal(held, "carol"), approve=False, reason="no", channel="api"
    )
    bob = await reviewers(BOB_TOKEN)

    page = await bob.get("/inbox")
    assert page.status == 200
    assert row_ids(page.text) == [mail_b.id, delete_a.id, mail_a.id]
    assert options(page.text, "tool") == ["", "delete_file", "send_email"]  # not the decided drop_table
    assert options(page.text, "agent") == ["", "agent-a", "agent-b"]
    assert row_ids((await bob.get("/inbox?tool=send_email")).text) == [mail_b.id, mail_a.id]
    both = await bob.get("/inbox?tool=send_email&agent=agent-a")
    assert row_ids(both.text) == [mail_a.id]
    assert "<title>(1) approvals</title>" in both.text
    assert options(both.text, "tool") == ["", "delete_file", "send_email"]  # still every pending tool
    assert 'data-list-live="/inbox/pending/events?tool=send_email&amp;agent=agent-a"' in both.text
    assert 'name="back" value="?tool=send_email&amp;agent=agent-a"' in both.text
    assert row_ids((await bob.get("/inbox?agent=nobody")).text) == []


async def test_the_live_feed_of_a_filtered_list_sends_only_matching_requests(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """/inbox/pending/events?tool=: a request of another tool is never sent; rows carry their review."""
    bob = await reviewers(BOB_TOKEN)
    async with bob.http.get(f"{held.gateway.base}/inbox/pending/events?tool=delete_file") as stream:
        assert stream.status == 200
        assert await read_event(stream) == ("snapshot", {"items": [], "count": 0})
        other = await hold(held, "send_email", "agent-a", 1)
        wanted = await hold(held, "delete_file", "agent-a", 2)
        name, item = await read_event(stream)
        assert (name, item["id"]) == ("created", wanted.id)
        assert item["progress"] == "0 of 2 approvals, waiting for another reviewer"
        assert (item["escalated"], item["read_only"]) == ("", "")
        await held.gateway.service.decide(
            wanted.id, principal(held, "bob"), approve=True, reason=None, channel="api"
        )
        name, item = await read_event(stream)
        assert (name, item["id"], item["status"]) == ("updated", wanted.id, "pending")
        assert item["progress"] == "1 of 2 approvals, waiting for another reviewer"
        assert "bob has already approved this call" in item["read_only"]  # for bob: nothing left to do
    assert other.id != wanted.id


async def test_rows_show_quorum_progress_escalation_and_who_may_only_look(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Progress, an escalated badge, and read-only rows (own agent, vote already counted) with the reason."""
    voted = await hold(held, "delete_file", "agent-a", 1)
    await held.gateway.service.decide(
        voted.id, principal(held, "bob"), approve=True, reason=None, channel="web"
    )
    own = await hold(held, "send_email", "agent-b", 2)  # bob runs agent-b
    rule = ReviewRule(reviewers=("payments",), escalate=(Escalation(600.0, ("oncall",)),))
    escalated = await add_approval(held, review_json=rule.to_json(), escalated=1, arguments={"e": 1})
    plain = await hold(held, "send_email", "agent-a", 3)
    page = (await bob_page(reviewers)).text

    def row(approval: Approval) -> str:
        found = re.search(rf'<li class="item" data-id="{approval.id}".*?</li>', page, re.S)
        assert found is not None
        return found.group(0)

    assert "1 of 2 approvals, waiting for another reviewer</span>" in row(voted)
    assert re.search(r"data-pick disabled title=\"bob has already approved this call", row(voted))
    assert re.search(r'data-pick disabled title="bob runs agent agent-b', row(own))
    assert "read-only: bob runs agent agent-b" in row(own)
    assert 'data-field="escalated">escalated to oncall</span>' in row(escalated)
    assert re.search(
        r'data-pick disabled title="only oncall or payments may decide this call"', row(escalated)
    )
    assert "data-pick>" in row(plain)
    assert 'data-field="read-only" hidden' in row(plain)


async def bob_page(reviewers: Callable[[str], Any]) -> Any:
    bob = await reviewers(BOB_TOKEN)
    page = await bob.get("/inbox")
    assert page.status == 200
    return page


# ---- batch decisions -----------------------------------------------------------------------------


async def test_a_batch_of_50_approves_45_and_reports_the_5_decided_elsewhere(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Each request is decided on its own: those decided meanwhile keep that decision and are reported."""
    approvals = [await hold(held, "send_email", "agent-a", n) for n in range(50)]
    bob = await reviewers(BOB_TOKEN)
    page = await bob.get("/inbox")
    assert len(row_ids(page.text)) == 50
    csrf = csrf_of(page.text)
    elsewhere = approvals[::10]  # 5, decided through Slack after bob's page was drawn
    carol = principal(held, "carol")
    for approval in elsewhere:
        await held.gateway.service.decide(approval.id, carol, approve=True, reason=None, channel="slack")

    result = await batch(bob, [a.id for a in approvals], csrf=csrf)
    assert result.status == 200, result.text
    kinds = outcomes(result.text)
    assert list(kinds) == [a.id for a in approvals]  # in the order given
    assert sorted(i for i, k in kinds.items() if k == "already_decided") == sorted(a.id for a in elsewhere)
    assert sum(k == "approved" for k in kinds.values()) == 45
    assert '<span class="tally">45 approved</span><span class="tally">5 already decided</span>' in result.text
    assert result.text.count("This request was already approved by carol via Slack.") == 5
    await held.gateway.service.settled()
    for approval in approvals:
        record = await held.gateway.service.get(approval.id)
        assert record is not None
        expected = ("carol", "slack") if approval in elsewhere else ("bob", "web")
        assert (record.decided_by, record.decided_via) == expected, record.id
        assert record.status in ("approved", "released", "completed")
    assert len(held.sent()) == 50  # each released once, by whoever approved it


async def test_a_batch_counts_a_vote_short_of_the_quorum_and_refuses_what_is_not_yours(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Quorum of 2: "counted (1 of 2 approvals…)"; bob's own agent's call and an unknown id are refused."""
    quorum = await hold(held, "delete_file", "agent-a", 1)
    own = await hold(held, "send_email", "agent-b", 2)
    bob = await reviewers(BOB_TOKEN)
    result = await batch(bob, [quorum.id, own.id, "f" * 32, "<script>x</script>"])
    assert result.status == 200
    assert outcomes(result.text) == {
        quorum.id: "counted",
        own.id: "refused",
        "f" * 32: "unknown",
        "&lt;script&gt;x&lt;/script&gt;": "unknown",
    }
    assert "counted (1 of 2 approvals, waiting for another reviewer)" in result.text
    assert "bob runs agent agent-b: a reviewer may not approve their own agent" in result.text
    assert "<script>x" not in result.text
    assert await status(held, quorum.id) == "pending"
    assert await status(held, own.id) == "pending"


async def test_a_batch_denial_needs_a_reason_and_tells_each_agent(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Deny without a reason: 400, nothing denied. With one: every request denied with that reason."""
    approvals = [await hold(held, "send_email", "agent-a", n) for n in range(3)]
    ids = [a.id for a in approvals]
    bob = await reviewers(BOB_TOKEN)
    refused = await batch(bob, ids, "deny", reason="   ")
    assert refused.status == 400
    assert "Say why you deny them" in refused.text
    assert [await status(held, i) for i in ids] == ["pending"] * 3
    denied = await batch(bob, ids, "deny", reason="not <today>", back="?tool=send_email&evil=1")
    assert denied.status == 200
    assert set(outcomes(denied.text).values()) == {"denied"}
    assert "not &lt;today&gt;" in denied.text
    assert 'href="/inbox?tool=send_email"' in denied.text  # back to the filtered list, nothing else kept
    for approval_id in ids:
        record = await held.gateway.service.get(approval_id)
        assert record is not None
        assert (record.status, record.decided_by, record.reason) == ("denied", "bob", "not <today>")


async def test_a_batch_is_refused_whole_when_empty_too_large_or_of_an_unknown_action(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """400 for no ids, more than MAX_BATCH, a form far too large, or an action not approve / deny."""
    approval = await hold(held)
    bob = await reviewers(BOB_TOKEN)
    empty = await batch(bob, [])
    assert (empty.status, "Select at least one request." in empty.text) == (400, True)
    blanks = await batch(bob, ["", "  "])
    assert blanks.status == 400
    many = [approval.id] + [f"{n:032x}" for n in range(MAX_BATCH)]
    too_many = await batch(bob, many)
    assert too_many.status == 400
    assert f"At most {MAX_BATCH} requests can be decided in one batch; {MAX_BATCH + 1} were selected" in (
        too_many.text
    )
    far_too_many = await batch(bob, [f"{n:032x}" for n in range(3 * MAX_BATCH)])
    assert far_too_many.status == 400
    assert "the form has more than" in far_too_many.text
    for action in ("explode", ""):
        wrong = await batch(bob, [approval.id], action)
        assert wrong.status == 400
        assert "action must be approve or deny" in wrong.text
    assert await status(held, approval.id) == "pending"


async def test_a_batch_needs_a_session_the_csrf_token_and_an_own_origin(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """403 without the CSRF token, with a forged one, from another origin or without a session."""
    approval = await hold(held)
    bob = await reviewers(BOB_TOKEN)
    fields = [("action", "approve"), ("ids", approval.id)]
    assert (await post(bob, fields)).status == 403
    assert (await post(bob, [("csrf", "forged"), *fields])).status == 403
    token = await bob.csrf()
    signed = [("csrf", token), *fields]
    assert (await post(bob, signed, origin="https://evil.example")).status == 403
    assert (await post(bob, signed, origin=None)).status == 403
    async with aiohttp.ClientSession() as anonymous:
        assert (await post(Reviewer(held.gateway.base, anonymous), signed)).status == 403
    assert await status(held, approval.id) == "pending"
    ok = await post(bob, signed)
    assert ok.status == 200
    assert await status(held, approval.id) in ("approved", "released", "completed")
    await asyncio.wait_for(held.gateway.service.settled(), WAIT)


async def status(held: Held, approval_id: str) -> str:
    record = await held.gateway.service.get(approval_id)
    assert record is not None
    return record.status


async def test_malformed_batch_forms_and_list_queries_get_a_clear_4xx_never_a_500(
    held: Held, reviewers: Callable[[str], Any]
) -> None:
    """Other body types and charsets (415), bytes that are not UTF-8 (400), junk ids and filters."""
    approval = await hold(held)
    bob = await reviewers(BOB_TOKEN)
    token = await bob.csrf()
    url, origin = f"{held.gateway.base}/inbox/batch", {"Origin": bob.origin}
    bodies: list[tuple[bytes, str, int]] = [
        (b"csrf=x", "multipart/form-data; boundary=x", 415),
        (
            f"csrf={token}&action=approve&ids={approval.id}".encode(),
            "application/x-www-form-urlencoded; charset=latin-1",
            415,
        ),
        (f"csrf={token}&action=approve&ids=%ff%fe".encode(), "application/x-www-form-urlencoded", 400),
        (f"csrf={token}&action=approve&ids=".encode() + b"\xff", "application/x-www-form-urlencoded", 400),
        (
            f"csrf={token}&action=approve&ids=%00{'x' * 5000}".encode(),
            "application/x-www-form-urlencoded",
            200,
        ),
        (f"csrf={token}&ids={approval.id}".encode(), "application/x-www-form-urlencoded", 400),
        (
            f"csrf={token}&action=approve&action=deny&ids={approval.id}".encode(),
            "application/x-www-form-urlencoded",
            400,
        ),
    ]
    for body, content_type, expected in bodies:
        headers = {**origin, "Content-Type": content_type}
        async with bob.http.post(url, data=body, headers=headers, allow_redirects=False) as response:
            text = await response.text()
            assert response.status == expected, (body[:80], response.status, text[:300])
            assert "Traceback" not in text
    assert await status(held, approval.id) == "pending"
    for query in (
        "?tool=%00",
        "?agent=" + "a" * 4000,
        "?tool=<script>&agent=%E2%80%AE",
        "?upstream=&tool=&agent=",
    ):
        page = await bob.get(f"/inbox{query}")
        assert page.status == 200, (query, page.status)
        assert "<script>" not in page.text.split("<body", 1)[1].replace('<script src="', "")
