"""The reviewers' web inbox over plain HTTP: logins, sessions, CSRF and Origin, pages, decisions, exports."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.config import sha256_hex
from approvals.core.model import Approval, new_approval_id, sha256_of
from approvals.web.inbox_auth import InboxAuth
from approvals.web.inbox_login import safe_next
from approvals.web.inbox_views import INBOX
from tests.approvals_kit import Held, start_held
from tests.conftest import (
    ALICE_TOKEN,
    BOB_TOKEN,
    DEMO_COMMAND,
    TOKEN_A,
    WAIT,
    Running,
    StartGateway,
    mcp_client,
)
from tests.inbox_kit import SECURITY_HEADERS, Reviewer, csrf_of

EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}
SECRET = "session-secret-0123456789abcdef0123456789"


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """The gateway holding send_email for approval (demo upstream), as in test_approvals."""
    return await start_held(start_gateway, tmp_path)


@pytest.fixture
async def reviewers(held: Held) -> AsyncIterator[Callable[[], Reviewer]]:
    """`reviewers()`: a new browser-less reviewer (own cookie jar) for the held gateway."""
    sessions: list[aiohttp.ClientSession] = []

    def make() -> Reviewer:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        return Reviewer(held.gateway.base, http)

    yield make
    for http in sessions:
        await http.close()


async def bob(reviewers: Callable[[], Reviewer]) -> Reviewer:
    reviewer = reviewers()
    assert (await reviewer.login(BOB_TOKEN)).status == 303
    return reviewer


async def add_approval(held: Held, **fields: Any) -> Approval:
    """A pending record written straight to the store (for list, history and rendering tests)."""
    arguments = fields.pop("arguments", {"to": "x@example.com"})
    now = held.gate.clock()
    record = {
        "id": new_approval_id(),
        "upstream": "demo",
        "tool": "send_email",
        "arguments_json": json.dumps(arguments, ensure_ascii=False),
        "args_sha256": sha256_of(arguments),
        "tool_json": "",
        "tool_sha256": "",
        "grant": "agent-a",
        "owner": None,
        "session_id": "s",
        "rule": "send_email",
        "explanation": "tools.send_email: action require_approval",
        "status": "pending",
        "created_at": now,
        "expires_at": now + 600,
    }
    record.update(fields)
    approval = Approval(**record)
    created = await held.gateway.service.store.create_approval(approval, actor=approval.grant, channel="mcp")
    # The store may attach an identical open request instead: give each record its own arguments.
    assert created in (None, approval), "an identical request is already open"
    return approval


async def settle(held: Held, approval: Approval, *path: tuple[str, dict[str, Any]]) -> None:
    """Move a store-made record along `path` (status, fields) with compare-and-set transitions."""
    store, current = held.gateway.service.store, approval.status
    for status, fields in path:
        moved = await store.transition(
            approval.id,
            from_=(current,),
            to=status,
            actor=fields.get("decided_by", "gateway"),
            channel="test",
            **fields,  # type: ignore[arg-type]
        )
        assert moved is not None
        current = status


async def status_of(held: Held, approval_id: str) -> str:
    approval = await held.gateway.service.store.get_approval(approval_id)
    assert approval is not None
    return approval.status


# ---- logins and sessions -----------------------------------------------------------------------


async def test_no_page_shows_anything_without_a_session(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Pages redirect to the login, feeds and exports are 401, posts are 403; nothing is decided."""
    approval = await add_approval(held, arguments={"secret": "do-not-show"})
    anonymous = reviewers()
    for path in ("/inbox", f"/inbox/approvals/{approval.id}", "/inbox/history?q=x"):
        page = await anonymous.get(path)
        assert page.status == 303
        assert page.headers["Location"].startswith("/inbox/login?next=")
        assert "do-not-show" not in page.text
        assert "send_email" not in page.text
    for path in ("/inbox/events", "/inbox/history.csv", "/inbox/history.json"):
        page = await anonymous.get(path)
        assert page.status == 401
        assert "send_email" not in page.text
    refused = await anonymous.post(f"/inbox/approvals/{approval.id}/deny", {"reason": "no", "csrf": "x"})
    assert refused.status == 403
    assert await status_of(held, approval.id) == "pending"


async def test_login_sets_a_strict_http_only_session_cookie(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """A reviewer token logs in: HttpOnly, SameSite=Strict, 8 h, no Secure over http; back to `next`."""
    reviewer = reviewers()
    done = await reviewer.login(BOB_TOKEN, next_path="/inbox/history?q=x")
    assert done.status == 303
    assert done.headers["Location"] == "/inbox/history?q=x"
    (session,) = [c for c in done.cookies if c.startswith("approvals_session=")]
    assert "HttpOnly" in session
    assert "SameSite=Strict" in session
    assert "Path=/inbox" in session
    assert "Max-Age=28800" in session
    assert "Secure" not in session
    page = await reviewer.get("/inbox")
    assert page.status == 200
    assert 'class="who-name"' in page.text
    assert ">bob<" in page.text


async def test_login_is_refused_for_unknown_and_agent_tokens_and_forged_forms(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Unknown token 401, an agent's token 403, no login CSRF or a foreign Origin 403: no session."""
    reviewer = reviewers()
    for token, status in (("not-a-token-at-all-0123", 401), (TOKEN_A, 403)):
        page = await reviewer.login(token)
        assert page.status == status
        assert not any(c.startswith("approvals_session=") for c in page.cookies)
    form = await reviewer.get("/inbox/login")
    data = {"csrf": csrf_of(form.text), "token": BOB_TOKEN}
    assert (await reviewer.post("/inbox/login", {"token": BOB_TOKEN})).status == 403
    assert (await reviewer.post("/inbox/login", data, origin=None)).status == 403
    assert (await reviewer.post("/inbox/login", data, origin="http://127.0.0.1:1")).status == 403
    assert (await reviewer.get("/inbox")).status == 303


async def test_each_login_gets_a_new_session_and_csrf_token(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Logging in again gives a new session id and CSRF token; the old session ends."""
    reviewer = await bob(reviewers)
    first_cookie = reviewer.session_cookie()
    first_csrf = await reviewer.csrf()
    assert (await reviewer.login(BOB_TOKEN)).status == 303
    second_cookie = reviewer.session_cookie()
    assert second_cookie != first_cookie
    assert await reviewer.csrf() != first_csrf
    stale = await reviewer.get("/inbox", cookies={"approvals_session": first_cookie})
    assert stale.status == 303


async def test_logout_needs_csrf_and_ends_the_session(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """POST /inbox/logout without the CSRF token is refused; with it the cookie is cleared and revoked."""
    reviewer = await bob(reviewers)
    cookie = reviewer.session_cookie()
    assert (await reviewer.post("/inbox/logout", {})).status == 403
    assert (await reviewer.get("/inbox")).status == 200
    out = await reviewer.post("/inbox/logout", {"csrf": await reviewer.csrf()})
    assert out.status == 303
    assert out.headers["Location"] == "/inbox/login"
    assert any(c.startswith("approvals_session=") and "Max-Age=0" in c for c in out.cookies)
    assert (await reviewer.get("/inbox")).status == 303
    assert (await reviewer.get("/inbox", cookies={"approvals_session": cookie})).status == 303


async def test_sessions_slide_and_expire(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A session lasts session_hours after the last request, and 24 h after login at most."""
    now = [1_900_000_000.0]
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    upstreams = {"demo": {"command": DEMO_COMMAND, "policy": "policy.json"}}
    extra = {"inbox": {"session_hours": 2}}
    running = await start_gateway(upstreams, clock=lambda: now[0], **extra)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        reviewer = Reviewer(running.base, http)
        login = await reviewer.login(BOB_TOKEN)
        assert any("Max-Age=7200" in c for c in login.cookies)
        for _ in range(14):  # a request every 1.9 h keeps it alive, up to 24 h after login
            now[0] += 1.9 * 3600
            page = await reviewer.get("/inbox")
            if now[0] - 1_900_000_000.0 < 24 * 3600:
                assert page.status == 200
                assert any(c.startswith("approvals_session=") for c in page.cookies)  # slid
            else:
                assert page.status == 303
        assert (await reviewer.login(BOB_TOKEN)).status == 303
        now[0] += 2.01 * 3600  # idle past session_hours
        assert (await reviewer.get("/inbox")).status == 303


async def test_cookies_are_secure_behind_https(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """X-Forwarded-Proto: https (or an https public URL) makes every inbox cookie Secure."""
    reviewer = reviewers()
    https = {"X-Forwarded-Proto": "https"}
    form = await reviewer.get("/inbox/login", headers=https)
    assert all("Secure" in c for c in form.cookies)
    assert form.cookies
    origin = "https://" + held.gateway.base.removeprefix("http://")
    done = await reviewer.post(
        "/inbox/login",
        {"csrf": csrf_of(form.text), "token": BOB_TOKEN},
        origin=origin,
        headers=https,
        # The jar keeps Secure cookies for https; this test speaks http to the proxy's backend.
        cookies={
            "approvals_login": next(c for c in form.cookies if "approvals_login" in c)
            .split(";")[0]
            .split("=", 1)[1]
        },
    )
    assert done.status == 303
    assert done.cookies
    assert all("Secure" in c for c in done.cookies)


def test_sessions_outlive_a_restart_only_with_a_configured_secret() -> None:
    """The same APPROVALS_SESSION_SECRET verifies a session in a new process; a random key does not."""
    from approvals.config import Principal

    reviewer = Principal("bob", sha256_hex(BOB_TOKEN))
    _, cookie = InboxAuth([reviewer], SECRET, 8).new_session(reviewer, 100.0)
    assert InboxAuth([reviewer], SECRET, 8).session(cookie, 200.0) is not None
    _, cookie = InboxAuth([reviewer], None, 8).new_session(reviewer, 100.0)
    assert InboxAuth([reviewer], None, 8).session(cookie, 200.0) is None
    changed = Principal("bob", sha256_hex(BOB_TOKEN + "-rotated"))
    _, cookie = InboxAuth([reviewer], SECRET, 8).new_session(reviewer, 100.0)
    assert InboxAuth([changed], SECRET, 8).session(cookie, 200.0) is None  # a new token ends old sessions
    assert InboxAuth([reviewer], SECRET, 8).session(cookie[:-2] + "xx", 200.0) is None


def test_after_login_only_inbox_paths_are_followed() -> None:
    """`next` never leads off the inbox (open redirect)."""
    assert safe_next("/inbox/approvals/abc?x=1") == "/inbox/approvals/abc?x=1"
    for hostile in (
        "https://evil.example/inbox",
        "//evil.example/inbox",
        "/\\evil.example",
        "/inboxes",
        "javascript:alert(1)",
        "/inbox/login",
        "/inbox//evil",
        None,
        "",
    ):
        assert safe_next(hostile) == "/inbox"


async def test_one_time_login_link(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A link minted with the shared secret lands on a confirm page, logs in once, and never again."""
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    upstreams = {"demo": {"command": DEMO_COMMAND, "policy": "policy.json"}}
    env = {"APPROVALS_SESSION_SECRET": SECRET}
    running: Running = await start_gateway(upstreams, env=env)
    inbox = running.app[INBOX]
    link = inbox.auth.mint_link(inbox.auth.reviewers["bob"], inbox.now())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        reviewer = Reviewer(running.base, http)
        landing = await reviewer.get(f"/inbox/login/link?t={link}")
        assert landing.status == 200
        assert "Continue as bob" in landing.text
        assert not any(c.startswith("approvals_session=") for c in landing.cookies)  # a GET logs nobody in
        data = {"csrf": csrf_of(landing.text), "link": link}
        assert (await reviewer.post("/inbox/login/link", data)).status == 303
        assert (await reviewer.get("/inbox")).status == 200
        assert (await reviewer.post("/inbox/login/link", data)).status == 403
        assert (await reviewer.get(f"/inbox/login/link?t={link}")).status == 403
        assert (await reviewer.get(f"/inbox/login/link?t={link[:-3]}abc")).status == 403


# ---- CSRF, Origin and headers --------------------------------------------------------------------


async def test_decisions_need_the_csrf_token_and_an_own_origin(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """No or wrong CSRF token, no Origin, or another origin: 403 and nothing decided."""
    approval = await add_approval(held)
    reviewer = await bob(reviewers)
    csrf = await reviewer.csrf()
    path = f"/inbox/approvals/{approval.id}/deny"
    other = await bob(reviewers)  # another session's token is not this session's
    cases = [
        ({"reason": "r"}, ""),
        ({"reason": "r", "csrf": "forged"}, ""),
        ({"reason": "r", "csrf": await other.csrf()}, ""),
        ({"reason": "r", "csrf": csrf}, None),
        ({"reason": "r", "csrf": csrf}, "http://127.0.0.1:1"),
        ({"reason": "r", "csrf": csrf}, "https://evil.example"),
        ({"reason": "r", "csrf": csrf}, "null"),
    ]
    for data, origin in cases:
        page = await reviewer.post(path, data, origin=origin)
        assert page.status == 403, (data, origin)
    assert await status_of(held, approval.id) == "pending"
    # The public URL's origin is accepted, like the request's own.
    ok = await reviewer.post(path, {"reason": "r", "csrf": csrf}, origin="http://127.0.0.1:8080")
    assert ok.status == 303
    assert await status_of(held, approval.id) == "denied"


async def test_every_inbox_response_has_the_security_headers(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """CSP without inline script or style, no framing, no sniffing, same-origin referrers: everywhere."""
    approval = await add_approval(held)
    anonymous = reviewers()
    reviewer = await bob(reviewers)
    pages = [
        await anonymous.get("/inbox/login"),
        await anonymous.get("/inbox"),
        await anonymous.get("/inbox/history.csv"),
        await anonymous.post("/inbox/logout", {}),
        await reviewer.get("/inbox"),
        await reviewer.get(f"/inbox/approvals/{approval.id}"),
        await reviewer.get("/inbox/approvals/unknown"),
        await reviewer.get("/inbox/history"),
        await reviewer.get("/inbox/history.csv"),
        await reviewer.get("/inbox/history.json"),
        await reviewer.get("/inbox/static/inbox.css"),
        await reviewer.get("/inbox/static/inbox.js"),
        await reviewer.get("/inbox/nowhere"),
    ]
    for page in pages:
        for name, value in SECURITY_HEADERS.items():
            assert page.headers.get(name) == value, (page.status, name)
    assert pages[4].headers["Cache-Control"] == "no-store"
    async with reviewer.http.get(f"{held.gateway.base}/inbox/events") as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


# ---- the pending list and the live feed -----------------------------------------------------------


async def test_pending_list_is_newest_first_and_filters_by_query(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Upstream, tool and agent filters; newest first; the count in the title."""
    now = held.gate.clock()
    first = await add_approval(
        held, tool="send_email", created_at=now - 30, arguments={"to": "one@example.com"}
    )
    second = await add_approval(held, tool="delete_file", created_at=now - 20, arguments={"path": "a.txt"})
    third = await add_approval(held, tool="send_email", grant="agent-b", created_at=now - 10)
    decided = await add_approval(held, tool="send_email", created_at=now - 5)
    await settle(held, decided, ("denied", {"decided_by": "alice", "decided_at": now, "reason": "no"}))
    reviewer = await bob(reviewers)

    def ids(text: str) -> list[str]:
        return re.findall(r'<li class="item" data-id="([0-9a-f]{32})"', text)

    page = await reviewer.get("/inbox")
    assert ids(page.text) == [third.id, second.id, first.id]
    assert "<title>(3) approvals</title>" in page.text
    assert "path: &#34;a.txt&#34;" in page.text or "path: &quot;a.txt&quot;" in page.text
    assert ids((await reviewer.get("/inbox?tool=send_email")).text) == [third.id, first.id]
    assert ids((await reviewer.get("/inbox?agent=agent-b")).text) == [third.id]
    assert ids((await reviewer.get("/inbox?upstream=other")).text) == []
    filtered = await reviewer.get("/inbox?tool=send_email&agent=agent-a")
    assert ids(filtered.text) == [first.id]
    assert "<title>(1) approvals</title>" in filtered.text


async def read_event(stream: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next server-sent event (name, JSON data), skipping comments."""
    name, data = "message", ""
    async with asyncio.timeout(WAIT):
        while True:
            line = (await stream.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                return name, json.loads(data)


async def test_live_feed_sends_new_and_decided_items(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """/inbox/events: a snapshot, then `created` for a held call and `updated` once it is denied."""
    reviewer = await bob(reviewers)
    async with reviewer.http.get(f"{held.gateway.base}/inbox/events?tool=send_email") as stream:
        assert stream.status == 200
        assert await read_event(stream) == ("snapshot", {"items": [], "count": 0})
        async with mcp_client(held.url()) as client:
            call = asyncio.create_task(client.call_tool("send_email", EMAIL))
            name, item = await read_event(stream)
            assert (name, item["tool"], item["agent"], item["owner"]) == (
                "created",
                "send_email",
                "agent-a",
                "alice",
            )
            assert item["summary"] == 'to: "ops@example.com", subject: "Quarterly numbers", body: "Attached."'
            status, _ = await held.api("POST", f"/api/approvals/{item['id']}/deny", body={"reason": "no"})
            assert status == 200
            name, update = await read_event(stream)
            assert (name, update["id"], update["status"], update["decided_by"]) == (
                "updated",
                item["id"],
                "denied",
                "bob",
            )
            await asyncio.wait_for(call, WAIT)


# ---- the detail page and decisions ----------------------------------------------------------------


async def test_detail_page_shows_the_call_in_full_and_who_looked(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Tool description and schema, every argument (long ones folded, not cut), rule, history, viewers."""
    long_body = "line of the report\n" * 400
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", {**EMAIL, "body": long_body}))
        pending = await held.recorder.status("pending")
        reviewer = await bob(reviewers)
        page = await reviewer.get(f"/inbox/approvals/{pending.id}")
        assert page.status == 200
        text = page.text
        assert "Send an email to one recipient (shaped like a real outbound email)." in text
        assert "Recipient email address." in text  # the input schema
        assert pending.explanation in text
        assert '<details class="fold">' in text
        assert long_body in text
        assert "No other reviewer has opened this yet." in text
        alice = reviewers()
        assert (await alice.login(ALICE_TOKEN)).status == 303
        seen = await alice.get(f"/inbox/approvals/{pending.id}")
        assert re.search(r"data-viewers><li><strong>bob</strong>", seen.text)
        assert "another reviewer must decide" in seen.text  # alice runs agent-a
        await reviewer.get(f"/inbox/approvals/{pending.id}")  # a second look soon after is not logged again
        _, body = await held.api("GET", f"/api/audit?approval_id={pending.id}")
        views = [(e["event"], e["actor"], e["channel"]) for e in body["events"] if e["event"] == "viewed"]
        assert views == [("viewed", "bob", "web"), ("viewed", "alice", "web")]
        call.cancel()


async def test_deny_from_the_inbox_reaches_the_agent(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Deny needs a reason; with one, the agent is told who and why and the page says it was denied."""
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        reviewer = await bob(reviewers)
        assert (await reviewer.decide(pending.id, "deny")).status == 400
        assert await status_of(held, pending.id) == "pending"
        done = await reviewer.decide(pending.id, "deny", reason="not this week")
        assert done.status == 303
        assert done.headers["Location"] == f"/inbox/approvals/{pending.id}?done=denied"
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert (
        result.content[0].text == "Denied by bob: the call to send_email was not made. Reason: not this week"
    )
    page = await reviewer.get(done.headers["Location"])
    assert "You denied this call." in page.text
    denied = await held.recorder.status("denied", pending.id)
    assert denied.decided_via == "web"


async def test_approve_from_the_inbox_releases_the_call(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Approve: the call goes upstream once and the agent gets the tool's result."""
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        reviewer = await bob(reviewers)
        assert (await reviewer.decide(pending.id, "approve")).status == 303
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert result.content[0].text.startswith("queued message")
    await held.recorder.status("completed", pending.id)
    page = await reviewer.get(f"/inbox/approvals/{pending.id}")
    assert "What the upstream answered" in page.text
    assert "queued message" in page.text


async def test_unknown_approval_is_404(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """An unknown id is a 404 page for the detail and for both decisions."""
    reviewer = await bob(reviewers)
    assert (await reviewer.get("/inbox/approvals/0123456789abcdef")).status == 404
    assert (await reviewer.decide("0123456789abcdef", "approve")).status == 404
    assert (await reviewer.decide("0123456789abcdef", "deny", reason="r")).status == 404


async def test_a_reviewer_may_not_decide_their_own_agents_call(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """alice runs agent-a: approving or denying its call is a 403 page, as in the API; nothing changes."""
    approval = await add_approval(held, owner="alice")
    alice = reviewers()
    assert (await alice.login(ALICE_TOKEN)).status == 303
    for verdict in ("approve", "deny"):
        page = await alice.decide(approval.id, verdict, reason="mine")
        assert page.status == 403
        assert "Not yours to decide" in page.text
    assert await status_of(held, approval.id) == "pending"


async def test_race_loser_sees_who_decided(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """A decision after another reviewer's gets 409 with who decided, when and why; nothing changes."""
    approval = await add_approval(held)
    reviewer = await bob(reviewers)
    csrf = await reviewer.csrf()  # bob's page is open...
    status, _ = await held.api(
        "POST", f"/api/approvals/{approval.id}/deny", token=ALICE_TOKEN, body={"reason": "too late"}
    )
    assert status == 200  # ...when alice denies it first
    page = await reviewer.decide(approval.id, "approve", csrf=csrf)
    assert page.status == 409
    assert re.search(r"<strong>alice</strong> denied this call first \(via the API\)", page.text)
    assert "too late" in page.text
    assert await status_of(held, approval.id) == "denied"


async def test_untrusted_text_is_escaped(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Tool names, descriptions, arguments and reasons are text in the HTML, hidden characters marked."""
    hostile_tool = {"name": "<b>x</b>", "description": "<img src=x onerror=alert(1)>", "inputSchema": {}}
    approval = await add_approval(
        held,
        tool="<script>alert(1)</script>",
        tool_json=json.dumps(hostile_tool),
        arguments={"<i>key</i>": '"><svg onload=alert(1)>', "rlo": "abc\u202etxt.exe"},
    )
    reviewer = await bob(reviewers)
    for path in ("/inbox", f"/inbox/approvals/{approval.id}"):
        page = await reviewer.get(path)
        assert page.status == 200
        for raw in ("<script>alert", "<img src=x", "<svg onload", "<i>key", "\u202e"):
            assert raw not in page.text, (path, raw)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert 'title="hidden character U+202E">U+202E</span>' in page.text
    assert "contain 1 invisible or direction-changing character," in page.text


# ---- history and exports --------------------------------------------------------------------------


async def history_fixture(held: Held) -> dict[str, Approval]:
    """Decided records of every kind (and one still pending)."""
    now = held.gate.clock()
    made = {
        "denied": await add_approval(
            held, arguments={"to": "ceo@example.com", "body": '=HYPERLINK("http://x")'}
        ),
        "completed": await add_approval(held, tool="generate_image", arguments={"prompt": "a red fox"}),
        "tool_error": await add_approval(held, tool="delete_file", arguments={"path": "@notes.txt"}),
        "failed": await add_approval(held, grant="agent-b", arguments={"to": "+1 555"}),
        "expired": await add_approval(held),
        "pending": await add_approval(held, arguments={"to": "pending@example.com"}),
    }
    approved = {"decided_by": "bob", "decided_at": now, "decided_via": "web"}

    def response(result: dict[str, Any]) -> str:
        return json.dumps({"jsonrpc": "2.0", **result})

    await settle(
        held,
        made["denied"],
        ("denied", {"decided_by": "alice", "decided_at": now, "reason": "-2+3 is not allowed"}),
    )
    await settle(
        held,
        made["completed"],
        ("approved", approved),
        ("released", {}),
        ("completed", {"result_json": response({"result": {"content": [], "isError": False}})}),
    )
    await settle(
        held,
        made["tool_error"],
        ("approved", approved),
        ("released", {}),
        ("completed", {"result_json": response({"result": {"content": [], "isError": True}})}),
    )
    await settle(
        held,
        made["failed"],
        ("approved", {**approved, "decided_by": "alice"}),
        ("released", {}),
        ("failed", {"result_json": response({"error": {"code": -32000, "message": "upstream exploded"}})}),
    )
    await settle(held, made["expired"], ("expired", {"reason": "no decision before the timeout"}))
    return made


async def test_history_lists_decisions_and_upstream_outcomes(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """Every decided call with decision, reviewer, reason and (for released ones) the upstream's outcome."""
    made = await history_fixture(held)
    reviewer = await bob(reviewers)
    page = await reviewer.get("/inbox/history")
    assert page.status == 200
    assert "5 decided requests" in page.text
    assert made["pending"].id not in page.text
    rows = dict(re.findall(r'<tr data-id="([0-9a-f]{32})">(.*?)</tr>', page.text, re.S))
    assert "completed: the tool reported an error" in rows[made["tool_error"].id]
    assert "failed: upstream exploded" in rows[made["failed"].id]
    assert re.search(r'data-label="Outcome">completed<', rows[made["completed"].id])
    assert "-2+3 is not allowed" in rows[made["denied"].id]
    assert "alice" in rows[made["denied"].id]
    assert "badge-expired" in rows[made["expired"].id]


async def test_history_search_and_filters(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Text in the arguments, tool, agent, reviewer and decision narrow the history."""
    made = await history_fixture(held)
    reviewer = await bob(reviewers)

    async def found(query: str) -> set[str]:
        page = await reviewer.get(f"/inbox/history?{query}")
        return set(re.findall(r'<tr data-id="([0-9a-f]{32})">', page.text))

    assert await found("q=RED+FOX") == {made["completed"].id}
    assert await found("q=ceo%40example") == {made["denied"].id}
    assert await found("q=exploded") == set()  # the upstream's answer is not searched, the request is
    assert await found("tool=delete_file") == {made["tool_error"].id}
    assert await found("agent=agent-b") == {made["failed"].id}
    assert await found("reviewer=alice") == {made["denied"].id, made["failed"].id}
    assert await found("status=approved") == {made["completed"].id, made["tool_error"].id, made["failed"].id}
    assert await found("status=denied&q=ceo") == {made["denied"].id}
    assert await found("q=pending%40example") == set()  # pending items are not history


async def test_history_exports_csv_and_json_without_formula_injection(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """CSV and JSON carry the same filtered rows; CSV cells starting with = + - @ get a leading '."""
    made = await history_fixture(held)
    reviewer = await bob(reviewers)
    exported = await reviewer.get("/inbox/history.csv")
    assert exported.status == 200
    assert exported.headers["Content-Type"].startswith("text/csv")
    assert exported.headers["Content-Disposition"] == 'attachment; filename="approvals-history.csv"'
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 5
    by_id = {row["id"]: row for row in rows}
    assert by_id[made["denied"].id]["reason"] == "'-2+3 is not allowed"
    assert by_id[made["denied"].id]["arguments"].startswith('{"to"')  # JSON text starts safely
    assert by_id[made["tool_error"].id]["outcome"] == "completed: the tool reported an error"
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@")), value
    filtered = list(
        csv.DictReader(io.StringIO((await reviewer.get("/inbox/history.csv?reviewer=alice")).text))
    )
    assert {row["id"] for row in filtered} == {made["denied"].id, made["failed"].id}
    as_json = await reviewer.get("/inbox/history.json?reviewer=alice")
    body = json.loads(as_json.text)
    assert {a["id"] for a in body["approvals"]} == {made["denied"].id, made["failed"].id}
    denied = next(a for a in body["approvals"] if a["id"] == made["denied"].id)
    assert denied["reason"] == "-2+3 is not allowed"  # JSON keeps the value as it is
    assert denied["arguments"]["body"] == '=HYPERLINK("http://x")'


async def test_csv_cells_are_neutralised() -> None:
    """csv_cell: a leading = + - @ tab or CR is prefixed with '; anything else is left alone."""
    from approvals.web.inbox_format import csv_cell

    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "ok", None, "a=b")] == [
        "'=1+1",
        "'+1",
        "'-1",
        "'@SUM(A1)",
        "'\t=1",
        "'\r=1",
        "ok",
        "",
        "a=b",
    ]


async def test_login_link_command_prints_a_link_the_gateway_accepts(
    start_gateway: StartGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`approvals login-link bob` with the gateway's secret prints a working link; without it, exit 1."""
    from approvals.cli import main

    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    upstreams = {"demo": {"command": DEMO_COMMAND, "policy": "policy.json"}}
    running = await start_gateway(upstreams, env={"APPROVALS_SESSION_SECRET": SECRET})
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[server]\npublic_url = "{running.base}"\n'
        '[upstreams.demo]\ncommand = ["python", "-m", "approvals.demo_server"]\npolicy = "policy.json"\n'
        f'[[reviewers]]\nname = "bob"\ntoken_sha256 = "{sha256_hex(BOB_TOKEN)}"\n'
    )
    monkeypatch.delenv("APPROVALS_SESSION_SECRET", raising=False)
    with pytest.raises(SystemExit) as failed:
        main(["login-link", "bob", "--config", str(config)])
    assert failed.value.code == 1
    assert "APPROVALS_SESSION_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("APPROVALS_SESSION_SECRET", SECRET)
    with pytest.raises(SystemExit) as unknown:
        main(["login-link", "mallory", "--config", str(config)])
    assert unknown.value.code == 1
    capsys.readouterr()
    main(["login-link", "bob", "--config", str(config)])
    link = capsys.readouterr().out.strip()
    assert link.startswith(f"{running.base}/inbox/login/link?t=")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        reviewer = Reviewer(running.base, http)
        landing = await reviewer.get(link.removeprefix(running.base))
        assert landing.status == 200
        assert "Continue as bob" in landing.text
        done = await reviewer.post(
            "/inbox/login/link", {"csrf": csrf_of(landing.text), "link": link.split("t=", 1)[1]}
        )
        assert done.status == 303
        assert (await reviewer.get("/inbox")).status == 200


# ---- issue 11: deep arguments, wording, results, live history, sorting, export filters ----------


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` levels of alternating objects and arrays."""
    value = leaf
    for level in range(depth):
        value = {"level": value} if level % 2 else [value]
    return value


async def test_deeply_nested_arguments_can_be_reviewed(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Arguments 600 levels deep (and deeper than json.loads manages) render, search and export: no 500."""
    deep = await add_approval(held, arguments={"payload": nested(600, "the-deep-value\u202e")})
    text = "[" * 5000 + '"past-the-parser"' + "]" * 5000
    deeper = await add_approval(held, arguments={}, arguments_json=text, args_sha256="0" * 64)
    reviewer = await bob(reviewers)
    page = await reviewer.get(f"/inbox/approvals/{deep.id}")
    assert page.status == 200
    assert "the-deep-value" in page.text
    assert "contain 1 invisible" in page.text  # hidden characters are counted at any depth
    assert '<pre class="json-deep">' in page.text  # past the tree's depth: indented JSON text
    page = await reviewer.get(f"/inbox/approvals/{deeper.id}")
    assert page.status == 200
    assert "past-the-parser" in page.text
    assert (await reviewer.get("/inbox")).status == 200
    await settle(held, deep, ("expired", {"reason": "no decision"}))
    await settle(held, deeper, ("expired", {"reason": "no decision"}))
    found = await reviewer.get("/inbox/history?q=the-deep-value")
    assert found.status == 200
    assert re.findall(r'<tr data-id="([0-9a-f]{32})">', found.text) == [deep.id]
    exported = await reviewer.get("/inbox/history.json?q=the-deep-value")
    assert exported.status == 200
    assert json.loads(exported.text)["approvals"][0]["id"] == deep.id
    everything = json.loads((await reviewer.get("/inbox/history.json")).text)["approvals"]
    assert {a["id"]: a["arguments"] for a in everything}[deeper.id] == text


def args_note(page: str) -> str:
    found = re.search(r'data-field="args-note">([^<]*)<', page)
    assert found is not None
    return found.group(1)


async def test_argument_wording_fits_the_state(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Pending: sent if you approve; approved: being sent; released/completed: were sent; else not sent."""
    now = held.gate.clock()
    approved = {"decided_by": "bob", "decided_at": now, "decided_via": "web"}
    cases: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "pending": [],
        "approved": [("approved", approved)],
        "released": [("approved", approved), ("released", {})],
        "completed": [("approved", approved), ("released", {}), ("completed", {})],
        "denied": [("denied", {**approved, "reason": "no"})],
        "expired": [("expired", {})],
        "cancelled": [("cancelled", {})],
    }
    reviewer = await bob(reviewers)
    notes = {}
    for status, path in cases.items():
        approval = await add_approval(held, arguments={"case": status})
        await settle(held, approval, *path)
        page = await reviewer.get(f"/inbox/approvals/{approval.id}")
        assert page.status == 200
        notes[status] = args_note(page.text)
    assert notes["pending"] == "exactly these arguments are sent if you approve."
    assert notes["approved"] == "exactly these arguments were approved and are being sent."
    assert notes["released"] == notes["completed"] == "exactly these arguments were sent."
    assert notes["denied"] == notes["expired"] == notes["cancelled"] == "these arguments were not sent."


async def completed(held: Held, result_json: str | None, **fields: Any) -> Approval:
    """A store-made record approved, released and completed with `result_json` kept (or not)."""
    approval = await add_approval(held, arguments={"result": result_json, **fields})
    now = held.gate.clock()
    approved = {"decided_by": "bob", "decided_at": now, "decided_via": "web"}
    done = {"result_json": result_json, "finished_at": now, **fields}
    await settle(held, approval, ("approved", approved), ("released", {}), ("completed", done))
    return approval


def result_panel(page: str) -> str:
    found = re.search(r"<section class=\"card\" data-result>(.*?)</section>", page, re.S)
    assert found is not None, "no result panel shown"
    return found.group(1)


async def test_detail_page_shows_the_kept_result_escaped_and_bounded(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """The kept result is shown as text (escaped), cut with a note past its bound; a dropped one is said."""
    from approvals.web.inbox_format import RESULT_CHARS

    def kept(text: str) -> str:
        content = [{"type": "text", "text": text}]
        return json.dumps({"jsonrpc": "2.0", "result": {"content": content, "isError": False}})

    now = held.gate.clock()
    small = await completed(held, kept("<script>alert(1)</script> sent"), result_expires_at=now + 3600)
    big = await completed(held, kept("x" * (RESULT_CHARS * 2) + "THE-END"), result_expires_at=now + 3600)
    gone = await completed(held, None, result_expires_at=now - 1, note="result expired")
    reviewer = await bob(reviewers)
    panel = result_panel((await reviewer.get(f"/inbox/approvals/{small.id}")).text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; sent" in panel
    assert "<script>" not in panel
    panel = result_panel((await reviewer.get(f"/inbox/approvals/{big.id}")).text)
    assert f"Showing the first {RESULT_CHARS:,} of" in panel
    assert "THE-END" not in panel
    assert len(panel) < RESULT_CHARS + 2000
    panel = result_panel((await reviewer.get(f"/inbox/approvals/{gone.id}")).text)
    assert "no longer kept (result expired)" in panel


async def test_a_detail_pages_live_event_carries_its_history_and_result(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """/inbox/events?id=: the event that changes the badge also carries the history, wording and result."""
    reviewer = await bob(reviewers)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        url = f"{held.gateway.base}/inbox/events?id={pending.id}"
        async with reviewer.http.get(url) as stream:
            name, snapshot = await read_event(stream)
            assert name == "snapshot"
            assert [e["event"] for e in snapshot["items"][0]["timeline"]] == ["created"]
            status, _ = await held.api("POST", f"/api/approvals/{pending.id}/approve", body={})
            assert status == 200
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["status"] != "completed":
                name, item = await read_event(stream)
                seen.append(item)
        await asyncio.wait_for(call, WAIT)
    for item in seen:  # every event's panels agree with its badge
        events = [e["event"] for e in item["timeline"]]
        assert item["status"] in events, (item["status"], events)
    final = seen[-1]
    assert final["args_note"] == "exactly these arguments were sent."
    assert final["decision"] == "Approved by bob via the API"
    assert final["result"]["state"] == "shown"
    assert "queued message" in final["result"]["text"]


async def test_history_is_sorted_by_its_decided_column(held: Held, reviewers: Callable[[], Reviewer]) -> None:
    """Newest decision first, whatever order the requests were made in; expired ones by when they ended."""
    now = held.gate.clock()
    asked_first = await add_approval(held, created_at=now - 300, arguments={"n": 1})
    asked_second = await add_approval(held, created_at=now - 200, arguments={"n": 2})
    asked_third = await add_approval(held, created_at=now - 100, arguments={"n": 3})
    await settle(held, asked_first, ("denied", {"decided_by": "bob", "decided_at": now - 10, "reason": "no"}))
    await settle(held, asked_second, ("expired", {"finished_at": now - 50}))
    await settle(held, asked_third, ("denied", {"decided_by": "bob", "decided_at": now - 90, "reason": "no"}))
    reviewer = await bob(reviewers)
    page = await reviewer.get("/inbox/history")
    order = re.findall(r'<tr data-id="([0-9a-f]{32})">', page.text)
    assert order == [asked_first.id, asked_second.id, asked_third.id]
    exported = json.loads((await reviewer.get("/inbox/history.json")).text)
    assert [a["id"] for a in exported["approvals"]] == order


async def test_history_exports_accept_decision_and_refuse_unknown_values(
    held: Held, reviewers: Callable[[], Reviewer]
) -> None:
    """`decision=` filters as `status=` does (page, CSV, JSON); unknown values: a 400 naming the allowed."""
    made = await history_fixture(held)
    reviewer = await bob(reviewers)
    rows = list(csv.DictReader(io.StringIO((await reviewer.get("/inbox/history.csv?decision=denied")).text)))
    assert [row["id"] for row in rows] == [made["denied"].id]
    as_json = json.loads((await reviewer.get("/inbox/history.json?decision=expired")).text)
    assert [a["id"] for a in as_json["approvals"]] == [made["expired"].id]
    assert as_json["filters"] == {"status": "expired"}
    page = await reviewer.get("/inbox/history?decision=denied")
    assert re.findall(r'<tr data-id="([0-9a-f]{32})">', page.text) == [made["denied"].id]
    assert len(json.loads((await reviewer.get("/inbox/history.json?status=all")).text)["approvals"]) == 5
    for path in ("/inbox/history.csv", "/inbox/history.json", "/inbox/history"):
        for query in ("decision=bogus", "status=denied&decision=expired", "status=pending"):
            refused = await reviewer.get(f"{path}?{query}")
            assert refused.status == 400, (path, query)
        assert all(name in refused.text for name in ("approved", "completed", "failed", "denied", "expired"))
