"""The inbox's request page for review workflows, over plain HTTP: why a call was held, quorum
progress, read-only views, edit before approve, approve (deny) and remember, standing grants."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import markupsafe
import pytest

from approvals.config import sha256_hex
from approvals.core.model import Approval
from approvals.core.review import Escalation, ReviewRule
from approvals.core.standing import Constraint, StandingGrant, constraints_to_json, new_standing_id
from approvals.web import inbox_review_forms as forms
from tests.approvals_kit import Held, start_held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TOKEN_A, WAIT, StartGateway, mcp_client
from tests.inbox_kit import Reviewer, csrf_of
from tests.test_inbox import EMAIL, add_approval, read_event, settle, status_of

CAROL_TOKEN = "carol-reviewer-token-0123456789"
DAVE_TOKEN = "dave-reviewer-token-0123456789ab"
# alice runs agent-a (the agent every test's calls come from), so bob and dave decide them; carol
# is in no group.
REVIEWERS = [
    {"name": "alice", "token_sha256": sha256_hex(ALICE_TOKEN), "groups": ["payments"]},
    {"name": "bob", "token_sha256": sha256_hex(BOB_TOKEN), "groups": ["payments"]},
    {"name": "carol", "token_sha256": sha256_hex(CAROL_TOKEN)},
    {"name": "dave", "token_sha256": sha256_hex(DAVE_TOKEN), "groups": ["payments", "oncall"]},
]
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "send_email": {"action": "require_approval"},
        "delete_file": {"action": "require_approval", "approval": {"reviewers": ["payments"], "quorum": 2}},
        "generate_image": {"action": "require_approval", "approval": {"edit": False, "remember": False}},
        "get_time": {},
        "list_files": {},
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
    "required": ["to", "subject", "body"],
}
HIDDEN = re.compile(r'<input type="hidden" name="([^"]*)" value="([^"]*)">')


async def start_review(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """The demo upstream behind a policy with review rules, and four reviewers (see REVIEWERS)."""
    # Held long enough for a test's reviewers to decide while the agent still waits.
    approvals = {"hold_seconds": 40}
    return await start_held(start_gateway, tmp_path, policy=POLICY, approvals=approvals, reviewers=REVIEWERS)


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    return await start_review(start_gateway, tmp_path)


@pytest.fixture
async def login(held: Held) -> AsyncIterator[Callable[[str], Any]]:
    """`await login(token)`: a logged-in browser-less reviewer with its own cookie jar."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(token: str) -> Reviewer:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        reviewer = Reviewer(held.gateway.base, http)
        assert (await reviewer.login(token)).status == 303
        return reviewer

    yield make
    for http in sessions:
        await http.close()


@contextlib.asynccontextmanager
async def held_call(
    held: Held, tool: str, arguments: dict[str, Any]
) -> AsyncIterator[tuple[Approval, asyncio.Task[Any]]]:
    """A real MCP call by agent-a held for review: its pending record and the task awaiting it."""
    async with mcp_client(held.url(), TOKEN_A) as client:
        call = asyncio.create_task(client.call_tool(tool, arguments))
        try:
            pending = await held.recorder.wait_for(
                lambda a: a.status == "pending" and a.tool == tool and a.arguments == arguments
            )
            yield pending, call
        finally:
            if not call.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await call


def rule(**fields: Any) -> str:
    return ReviewRule(**fields).to_json()


def tool_json(annotations: dict[str, bool] | None = None, name: str = "send_email") -> str:
    return json.dumps({"name": name, "inputSchema": SCHEMA, "annotations": annotations or {}})


def section(page: str, marker: str, ends: tuple[str, ...] = ("</section>", "</details>")) -> str:
    """The page from the element carrying `marker` (an attribute) to the first of `ends` after it."""
    start = page.index(marker)
    found = [i for i in (page.find(tag, start) for tag in ends) if i != -1]
    return page[start : min(found, default=len(page))]


def hidden_fields(page: str) -> dict[str, str]:
    return {html.unescape(k): html.unescape(v) for k, v in HIDDEN.findall(page)}


def flash_query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


# ---- why it was held ----------------------------------------------------------------------------


async def test_why_shows_the_rule_tool_hints_diff_from_the_last_approved_call_and_tally(
    held: Held, login: Callable[[str], Any]
) -> None:
    """Rule and explanation, the tool's hints ("destructive" in red), a path/before/after diff
    against the last approved call of the tool by the agent, and the last 30 days' tally."""
    now = held.gate.clock()
    approved = {"decided_by": "bob", "decided_at": now, "decided_via": "web"}
    hints = {"destructiveHint": True, "openWorldHint": True}
    earlier = await add_approval(held, arguments={"to": "a@example.com", "subject": "Old"})
    await settle(held, earlier, ("approved", approved), ("released", {}), ("completed", {}))
    refused = await add_approval(held, arguments={"to": "b@example.com", "subject": "Spam"})
    await settle(held, refused, ("denied", {**approved, "reason": "no"}))
    pending = await add_approval(
        held,
        arguments={"to": "a@example.com", "subject": "New", "cc": "<b>boss</b>"},
        tool_json=tool_json(hints),
        explanation="tools.send_email: action require_approval",
    )
    bob = await login(BOB_TOKEN)
    page = await bob.get(f"/inbox/approvals/{pending.id}")
    assert page.status == 200
    why = section(page.text, "data-why")
    assert "tools.send_email: action require_approval" in why
    assert '<span class="hint hint-deny" title="destructiveHint: true" data-hint="destructive">' in why
    assert 'data-hint="open world"' in why
    diff = section(page.text, "data-why-diff")
    rows = re.findall(r"<tr>\s*<th scope=\"row\"><code>([^<]*)</code></th>(.*?)</tr>", diff, re.S)
    assert [path for path, _ in rows] == ["cc", "subject"]
    assert "&lt;b&gt;boss&lt;/b&gt;" in rows[0][1]
    assert "(absent)" in rows[0][1]
    assert "&#34;Old&#34;" in rows[1][1]
    assert "&#34;New&#34;" in rows[1][1]
    assert f'href="/inbox/approvals/{earlier.id}"' in why
    assert "Last 30 days: 1 approved, 1 denied" in why


async def test_why_says_first_call_and_same_arguments(held: Held, login: Callable[[str], Any]) -> None:
    """No approved call before: "first call"; the same arguments as the last approved one: said so."""
    first = await add_approval(held, tool="delete_file", arguments={"path": "a.txt"})
    bob = await login(BOB_TOKEN)
    page = await bob.get(f"/inbox/approvals/{first.id}")
    assert "data-first-call" in page.text
    assert "The tool declares none." in page.text
    now = held.gate.clock()
    await settle(
        held,
        first,
        ("approved", {"decided_by": "bob", "decided_at": now}),
        ("released", {}),
        ("completed", {}),
    )
    again = await add_approval(held, tool="delete_file", arguments={"path": "a.txt"})
    page = await bob.get(f"/inbox/approvals/{again.id}")
    assert "data-same-call" in page.text
    assert "Last 30 days: 1 approved" in page.text


# ---- review progress and read-only views --------------------------------------------------------


async def test_quorum_progress_names_who_approved_and_through_which_channel(
    held: Held, login: Callable[[str], Any]
) -> None:
    """Quorum of 2 from payments: bob's approval is counted (the page says 1 of 2 and who), bob
    again is 409, the owner alice and carol (no group) may only look, dave's approval releases."""
    async with held_call(held, "delete_file", {"path": "gone.txt"}) as (pending, call):
        bob = await login(BOB_TOKEN)
        counted = await bob.decide(pending.id, "approve")
        assert counted.status == 303
        assert flash_query(counted.headers["Location"]) == {"done": "voted"}
        page = await bob.get(counted.headers["Location"])
        assert "Your approval is counted: 1 of 2 approvals" in page.text
        review = section(page.text, "data-review-state")
        assert "1 of 2 approvals, waiting for someone in payments" in review
        assert re.search(r"<strong>bob</strong> approved <span[^>]*>[^<]* via the inbox</span>", review)
        assert "Needs 2 approvals from different reviewers." in review
        twice = await bob.decide(pending.id, "approve")
        assert twice.status == 409
        assert "Already counted" in twice.text
        alice = await login(ALICE_TOKEN)
        assert "data-own-agent" in (await alice.get(f"/inbox/approvals/{pending.id}")).text
        carol = await login(CAROL_TOKEN)
        assert "only payments may decide" in (await carol.get(f"/inbox/approvals/{pending.id}")).text
        dave = await login(DAVE_TOKEN)
        done = await dave.decide(pending.id, "approve")
        assert done.status == 303
        assert flash_query(done.headers["Location"]) == {"done": "approved"}
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    record = await held.gateway.service.store.get_approval(pending.id)
    assert record is not None
    assert record.decided_by == "dave"


async def test_a_detail_pages_live_events_carry_the_quorum_progress(
    held: Held, login: Callable[[str], Any]
) -> None:
    """/inbox/events?id=: the snapshot and the event after a vote carry the progress line."""
    approval = await add_approval(held, review_json=rule(reviewers=("payments",), quorum=2))
    bob = await login(BOB_TOKEN)
    async with bob.http.get(f"{held.gateway.base}/inbox/events?id={approval.id}") as stream:
        name, snapshot = await read_event(stream)
        assert name == "snapshot"
        assert snapshot["items"][0]["progress"] == "0 of 2 approvals, waiting for someone in payments"
        assert (await bob.decide(approval.id, "approve")).status == 303
        name, item = await read_event(stream)
    assert (name, item["status"]) == ("updated", "pending")
    assert item["progress"] == "1 of 2 approvals, waiting for someone in payments"


async def test_escalated_requests_are_highlighted(held: Held, login: Callable[[str], Any]) -> None:
    """After an escalation step the page says to whom, and the page itself carries a highlight class."""
    escalate = (Escalation(600.0, ("oncall",)),)
    approval = await add_approval(
        held, review_json=rule(reviewers=("payments",), escalate=escalate), escalated=1
    )
    bob = await login(BOB_TOKEN)
    page = await bob.get(f"/inbox/approvals/{approval.id}")
    assert re.search(r'<body data-page="detail"[^>]* class="escalated"', page.text)
    assert "Escalated to <strong>oncall</strong>" in section(page.text, "data-review-state")


async def test_a_reviewer_outside_the_groups_sees_it_read_only_and_their_post_is_refused(
    held: Held, login: Callable[[str], Any]
) -> None:
    """carol is in no group: no buttons, no editor, no remember form, the reason shown; her
    approve, edit and remember posts are 403 pages naming why; nothing changes."""
    approval = await add_approval(
        held, arguments=EMAIL, review_json=rule(reviewers=("payments",)), tool_json=tool_json()
    )
    carol = await login(CAROL_TOKEN)
    page = await carol.get(f"/inbox/approvals/{approval.id}")
    assert page.status == 200
    assert "You can look but not decide: only payments may decide this call." in page.text
    for marker in ("data-approve-form", "data-edit-form", "data-remember-form", "deny-form"):
        assert marker not in page.text
    csrf = csrf_of(page.text)
    refused = await carol.post(f"/inbox/approvals/{approval.id}/approve", {"csrf": csrf})
    assert refused.status == 403
    assert "only payments may decide this call" in refused.text
    edit = {"csrf": csrf, "arguments": json.dumps({**EMAIL, "to": "y@example.com"})}
    assert (await carol.post(f"/inbox/approvals/{approval.id}/approve", edit)).status == 403
    remember = {"csrf": csrf, "remember": "preview", "args_sha256": approval.args_sha256}
    assert (await carol.post(f"/inbox/approvals/{approval.id}/approve", remember)).status == 403
    assert await status_of(held, approval.id) == "pending"


# ---- edit before approve ------------------------------------------------------------------------


async def test_edit_that_is_not_json_is_400_with_the_text_kept(
    held: Held, login: Callable[[str], Any]
) -> None:
    """Not JSON: 400 naming line and column; not an object: 400; the text typed is kept, escaped."""
    approval = await add_approval(held, tool_json=tool_json())
    bob = await login(BOB_TOKEN)
    csrf = await bob.csrf()
    typed = '{\n  "to": "<b>x</b>",\n  "subject" "no colon"\n}'
    page = await bob.post(f"/inbox/approvals/{approval.id}/approve", {"csrf": csrf, "arguments": typed})
    assert page.status == 400
    assert "line 3, column 13" in section(page.text, "data-edit-error")
    assert str(markupsafe.escape(typed)) in page.text
    assert '<details class="card edit" id="edit" data-review-form open>' in page.text
    page = await bob.post(f"/inbox/approvals/{approval.id}/approve", {"csrf": csrf, "arguments": "[1, 2]"})
    assert page.status == 400
    assert "must be a JSON object" in page.text
    assert await status_of(held, approval.id) == "pending"


async def test_edit_against_the_schema_is_400_naming_the_path(
    held: Held, login: Callable[[str], Any]
) -> None:
    """The service judges the edit against the tool's inputSchema: 400, the path named, text kept."""
    approval = await add_approval(held, tool_json=tool_json(), arguments=EMAIL)
    bob = await login(BOB_TOKEN)
    typed = json.dumps({**EMAIL, "subject": 42})
    page = await bob.post(
        f"/inbox/approvals/{approval.id}/approve", {"csrf": await bob.csrf(), "arguments": typed}
    )
    assert page.status == 400
    error = section(page.text, "data-edit-error")
    assert "subject" in error
    assert "inputSchema" in error
    assert str(markupsafe.escape(typed)) in page.text
    assert await status_of(held, approval.id) == "pending"


async def test_edit_forbidden_by_the_rule_is_not_offered_and_refused(
    held: Held, login: Callable[[str], Any]
) -> None:
    """`edit: false`: no editor on the page, and a posted edit is a 403 page."""
    approval = await add_approval(held, review_json=rule(edit=False, remember=False), tool_json=tool_json())
    bob = await login(BOB_TOKEN)
    page = await bob.get(f"/inbox/approvals/{approval.id}")
    assert "data-edit-form" not in page.text
    assert "data-remember-form" not in page.text
    edit = {"csrf": csrf_of(page.text), "arguments": json.dumps({**EMAIL, "to": "y@example.com"})}
    refused = await bob.post(f"/inbox/approvals/{approval.id}/approve", edit)
    assert refused.status == 403
    assert "edit: false" in refused.text


async def test_edit_and_approve_releases_the_edited_call(held: Held, login: Callable[[str], Any]) -> None:
    """A valid edit: approved, the record keeps the edited JSON, the upstream gets exactly it, and
    the page shows the difference, original → edited."""
    async with held_call(held, "send_email", EMAIL) as (pending, call):
        bob = await login(BOB_TOKEN)
        page = await bob.get(f"/inbox/approvals/{pending.id}?edit=1")
        assert '<details class="card edit" id="edit" data-review-form open>' in page.text
        assert '"subject": "Quarterly numbers"' in html.unescape(page.text)
        edited = {**EMAIL, "subject": "Quarterly numbers (draft)"}
        done = await bob.post(
            f"/inbox/approvals/{pending.id}/approve",
            {"csrf": csrf_of(page.text), "arguments": json.dumps(edited, indent=2)},
        )
        assert done.status == 303
        assert flash_query(done.headers["Location"]) == {"done": "approved"}
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    record = await held.recorder.status("completed", pending.id)
    assert record.edited_json is not None
    assert json.loads(record.edited_json) == edited
    assert record.edited_by == "bob"
    assert [m["subject"] for m in held.sent()] == ["Quarterly numbers (draft)"]
    page = await bob.get(f"/inbox/approvals/{pending.id}")
    assert "as edited by bob" in page.text
    diff = section(page.text, "data-edit-diff")
    assert "subject" in diff
    assert "(draft)" in diff


# ---- approve (deny) and remember ----------------------------------------------------------------


async def test_approve_and_remember_goes_through_a_confirmation_page_and_saves_the_grant(
    held: Held, login: Callable[[str], Any]
) -> None:
    """The remember form → a confirmation page listing the grant in words (form carried in hidden
    fields) → Confirm: approved, the grant saved and named in the flash; a later matching call
    passes without anyone."""
    async with held_call(held, "send_email", EMAIL) as (pending, call):
        bob = await login(BOB_TOKEN)
        page = await bob.get(f"/inbox/approvals/{pending.id}")
        remember = section(page.text, "data-remember-form")
        assert [f for f in re.findall(r'name="(c\d+_\w+)"', remember)] == [
            "c0_op", "c0_prefix", "c0_in", "c1_op", "c1_prefix", "c1_in", "c2_op", "c2_prefix", "c2_in",
        ]  # fmt: skip
        form = {
            "csrf": csrf_of(page.text),
            "remember": "preview",
            "args_sha256": pending.args_sha256,
            "remember_for": "28800",
            "max_uses": "5",
            "c0_op": "any",  # body
            "c1_op": "eq",  # subject
            "c2_op": "prefix",  # to
            "c2_prefix": "ops@",
        }
        confirm = await bob.post(f"/inbox/approvals/{pending.id}/approve", form)
        assert confirm.status == 200
        words = section(confirm.text, "data-grant-constraints")
        assert "body: any value" in words
        assert "subject = &#34;Quarterly numbers&#34;" in words
        assert "to starts with &#34;ops@&#34;" in words
        assert "at most 5 uses" in confirm.text
        assert "8 h from now" in confirm.text
        assert await status_of(held, pending.id) == "pending"  # nothing decided before Confirm
        carried = hidden_fields(confirm.text)
        assert carried["remember"] == "confirm"
        assert carried["c2_prefix"] == "ops@"
        done = await bob.post(f"/inbox/approvals/{pending.id}/approve", carried)
        assert done.status == 303
        flash = flash_query(done.headers["Location"])
        assert flash["done"] == "approved"
        assert flash["grant"].startswith("sg_")
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    grant = await held.gateway.service.get_standing(flash["grant"])
    assert grant is not None
    assert (grant.effect, grant.grant, grant.max_uses, grant.created_by) == ("allow", "agent-a", 5, "bob")
    assert grant.expires_at - grant.created_at == 28800
    assert grant.source_approval == pending.id
    page = await bob.get(done.headers["Location"])
    assert f'Remembered as <a href="/inbox/grants#{grant.id}"><code>{grant.id}</code></a>' in page.text
    async with mcp_client(held.url(), TOKEN_A) as client:  # matches: no reviewer asked
        later = await asyncio.wait_for(
            client.call_tool("send_email", {**EMAIL, "to": "ops@example.org", "body": "Again."}), WAIT
        )
    assert not later.is_error
    used = await held.gateway.service.get_standing(grant.id)
    assert used is not None
    assert used.uses == 1


async def test_invalid_widening_is_400_with_the_message_and_the_form_kept(
    held: Held, login: Callable[[str], Any]
) -> None:
    """A prefix the approved value does not start with, min > max, a bound that is not a number,
    a deny without a reason: 400 naming the argument, the typed values still in the form."""
    approval = await add_approval(
        held, arguments={"amount": 900, "to": "ops@example.com"}, tool_json=tool_json()
    )
    bob = await login(BOB_TOKEN)
    base = {"csrf": await bob.csrf(), "remember": "preview", "args_sha256": approval.args_sha256}
    path = f"/inbox/approvals/{approval.id}/approve"
    cases = [
        ({"c1_op": "prefix", "c1_prefix": "zzz-<i>"}, "the argument “to”: the value you are approving"),
        ({"c0_op": "range", "c0_min": "1000", "c0_max": "10"}, "min must not be greater than max"),
        ({"c0_op": "range", "c0_min": "lots"}, "min must be a number"),
        ({"c0_op": "in", "c0_in": "1, 2"}, "does not match"),
        ({"remember_for": "999999"}, "remember for: choose one of"),
        ({"max_uses": "0"}, "a whole number from 1"),
    ]
    for fields, message in cases:
        page = await bob.post(path, {**base, **fields})
        assert page.status == 400, fields
        assert message in html.unescape(section(page.text, "data-remember-error")), (fields, page.text[:300])
        assert '<details class="card remember" id="remember" data-review-form open>' in page.text
    page = await bob.post(path, {**base, "c1_op": "prefix", "c1_prefix": "zzz-<i>"})
    assert 'value="zzz-&lt;i&gt;"' in page.text  # kept, escaped
    denied = await bob.post(f"/inbox/approvals/{approval.id}/deny", {**base, "reason": ""})
    assert denied.status == 400
    assert "say why you deny it" in denied.text
    assert await status_of(held, approval.id) == "pending"


async def test_deny_and_remember_saves_a_deny_grant(held: Held, login: Callable[[str], Any]) -> None:
    """Deny and remember with a reason: the request is denied and a deny grant is saved."""
    approval = await add_approval(held, arguments={"to": "spam@example.com"}, tool_json=tool_json())
    bob = await login(BOB_TOKEN)
    link = f"/inbox/approvals/{approval.id}?remember=deny&args_sha256={approval.args_sha256}&reason=spam"
    confirm = await bob.get(link)  # the confirmation page is reachable by a link, too
    assert confirm.status == 200
    assert "Deny and remember?" in confirm.text
    done = await bob.post(f"/inbox/approvals/{approval.id}/deny", hidden_fields(confirm.text))
    assert done.status == 303
    flash = flash_query(done.headers["Location"])
    assert flash["done"] == "denied"
    grant = await held.gateway.service.get_standing(flash["grant"])
    assert grant is not None
    assert (grant.effect, grant.reason) == ("deny", "spam")
    assert await status_of(held, approval.id) == "denied"


async def test_remember_is_not_offered_where_the_rule_forbids_it(
    held: Held, login: Callable[[str], Any]
) -> None:
    """`remember: false` and quorum rules: no remember form; a posted one is a 403 page."""
    for review in (rule(remember=False), rule(quorum=2)):
        approval = await add_approval(held, arguments={"to": review or "x"}, review_json=review)
        bob = await login(BOB_TOKEN)
        page = await bob.get(f"/inbox/approvals/{approval.id}")
        assert "data-remember-form" not in page.text
        for step in ("preview", "confirm"):
            form = {"csrf": csrf_of(page.text), "remember": step, "args_sha256": approval.args_sha256}
            refused = await bob.post(f"/inbox/approvals/{approval.id}/approve", form)
            assert refused.status == 403, (review, step)
            assert "does not allow standing grants" in refused.text
        assert await status_of(held, approval.id) == "pending"


async def test_review_forms_need_the_csrf_token(held: Held, login: Callable[[str], Any]) -> None:
    """Edit and remember posts without the session's CSRF token are 403 and decide nothing."""
    approval = await add_approval(held, tool_json=tool_json())
    bob = await login(BOB_TOKEN)
    path = f"/inbox/approvals/{approval.id}/approve"
    assert (await bob.post(path, {"arguments": "{}"})).status == 403
    remember = {"remember": "confirm", "args_sha256": approval.args_sha256, "csrf": "forged"}
    assert (await bob.post(path, remember)).status == 403
    assert await status_of(held, approval.id) == "pending"


# ---- standing grants ------------------------------------------------------------------------------


async def make_grant(held: Held, **fields: Any) -> StandingGrant:
    now = held.gate.clock()
    values: dict[str, Any] = {
        "id": new_standing_id(),
        "effect": "allow",
        "upstream": "demo",
        "tool": "send_email",
        "grant": "agent-a",
        "constraints_json": constraints_to_json([Constraint("to", "prefix", "ops-<b>")]),
        "rule": "send_email",
        "reason": None,
        "created_by": "bob",
        "created_via": "web",
        "created_at": now,
        "expires_at": now + 3600,
        "max_uses": 50,
        "uses": 0,
        "source_approval": "",
    }
    values.update(fields)
    grant = StandingGrant(**values)
    await held.gateway.service.store.create_standing(grant, actor=grant.created_by, channel="web")
    return grant


async def test_grants_page_lists_revokes_and_exports(held: Held, login: Callable[[str], Any]) -> None:
    """Active grants with their words, uses and source; ended ones below; Revoke → flash and moved;
    revoking again → 409; export → the policy rule as a JSON attachment; bad ids → 404."""
    source = await add_approval(held)
    now = held.gate.clock()
    active = await make_grant(held, source_approval=source.id)
    ended = await make_grant(held, created_at=now - 7200, expires_at=now - 3600, tool="delete_file")
    bob = await login(BOB_TOKEN)
    page = await bob.get("/inbox/grants")
    assert page.status == 200
    listed = section(page.text, "data-active", ("</table>",))
    assert f'data-grant="{active.id}"' in listed
    assert ended.id not in listed
    assert "to starts with &#34;ops-&lt;b&gt;&#34;" in listed
    assert "0 of 50" in listed
    assert f'href="/inbox/approvals/{source.id}"' in listed
    assert f'data-grant="{ended.id}" data-state="expired"' in section(page.text, "data-past", ("</table>",))
    assert 'href="/inbox/grants" aria-current="page">Standing grants' in page.text

    exported = await bob.get(f"/inbox/grants/{active.id}/export")
    assert exported.status == 200
    assert exported.headers["Content-Type"].startswith("application/json")
    assert exported.headers["Content-Disposition"] == f'attachment; filename="policy-rule-{active.id}.json"'
    assert json.loads(exported.text) == active.as_policy_rule()

    csrf = csrf_of(page.text)
    assert (await bob.post(f"/inbox/grants/{active.id}/revoke", {})).status == 403  # no CSRF token
    done = await bob.post(f"/inbox/grants/{active.id}/revoke", {"csrf": csrf})
    assert done.status == 303
    assert done.headers["Location"] == f"/inbox/grants?revoked={active.id}"
    page = await bob.get(done.headers["Location"])
    assert "data-revoked-flash" in page.text
    assert active.id in page.text
    assert "data-no-active" in page.text
    assert f'data-grant="{active.id}" data-state="revoked"' in section(page.text, "data-past", ("</table>",))
    again = await bob.post(f"/inbox/grants/{active.id}/revoke", {"csrf": csrf})
    assert again.status == 409
    assert "bob revoked this standing grant first" in again.text

    for bad in ("sg_nope", "sg_" + "0" * 32, "../x"):
        assert (await bob.get(f"/inbox/grants/{bad}/export")).status == 404, bad
        assert (await bob.post(f"/inbox/grants/{bad}/revoke", {"csrf": csrf})).status == 404, bad


def test_the_remember_form_is_exact_by_default_and_read_back_as_typed() -> None:
    """A blank form remembers the exact call; a typed one keeps every value for the page to show."""
    args = {"amount": 900, "to": "ops@example.com", "tags": ["a"], "urgent": True}
    blank = forms.blank_form("allow", args, "sha")
    judged = forms.judge(blank, args)
    assert isinstance(judged, forms.Remember)
    assert [c.describe() for c in judged.constraints] == [
        "amount = 900", 'tags = ["a"]', 'to = "ops@example.com"', "urgent = true",
    ]  # fmt: skip
    typed = forms.read_form(
        {"args_sha256": "sha", "c0_op": "range", "c0_min": "", "c0_max": "1000",
         "c1_op": "any", "c2_op": "in", "c2_in": "ops@example.com\nx@example.com", "c3_op": "in",
         "c3_in": "true, false"},
        "allow", args, "sha",
    )  # fmt: skip
    judged = forms.judge(typed, args)
    assert isinstance(judged, forms.Remember), judged
    assert [c.describe() for c in judged.constraints] == [
        "amount ≤ 1000", "tags: any value", 'to is one of "ops@example.com", "x@example.com"',
        "urgent is one of true, false",
    ]  # fmt: skip
    assert forms.parse_edit('{"a": NaN}') == "not JSON: NaN is not valid JSON"
    assert forms.parse_edit(forms.edit_text({"x": "a\u202eb\U000e0041"})) == {"x": "a\u202eb\U000e0041"}


def test_a_call_with_more_arguments_than_a_grant_may_hold_cannot_be_remembered() -> None:
    """Past the 64 constraints a grant may hold, the form has no widening inputs and says why."""
    args = {f"a{i:02}": f"v{i}" for i in range(80)}
    blank = forms.blank_form("allow", args, "sha")
    assert not blank.widen
    assert [name for name, _ in blank.fields()] == ["args_sha256", "remember_for", "max_uses", "reason"]
    typed = forms.read_form({"args_sha256": "sha", "c0_op": "any"}, "allow", args, "sha")
    assert forms.judge(typed, args) == "constraints: at most 64 constraints"


async def test_approving_a_page_older_than_an_edit_is_refused(
    held: Held, login: Callable[[str], Any]
) -> None:
    """Quorum 2: bob opens the request; dave edits it and approves (one of two, for his edit); bob's
    approve from the page he still has open names the arguments it showed, so it is refused (409)
    rather than counted for arguments he never saw. Reloaded, the page shows the edit, and his
    approval completes the quorum."""
    async with held_call(held, "delete_file", {"path": "old.txt"}) as (pending, call):
        bob, dave = await login(BOB_TOKEN), await login(DAVE_TOKEN)
        page = await bob.get(f"/inbox/approvals/{pending.id}")
        shown = hidden_fields(section(page.text, "data-approve-form", ("</form>",)))
        assert shown["seen_sha256"] == pending.release_sha256
        edit_page = await dave.get(f"/inbox/approvals/{pending.id}?edit=1")
        edited = await dave.post(
            f"/inbox/approvals/{pending.id}/approve",
            {"csrf": csrf_of(edit_page.text), "arguments": json.dumps({"path": "new.txt"})},
        )
        assert flash_query(edited.headers["Location"]) == {"done": "voted"}
        stale = await bob.post(
            f"/inbox/approvals/{pending.id}/approve", {"csrf": csrf_of(page.text), **shown}
        )
        assert stale.status == 409
        assert "The arguments changed" in stale.text
        assert "dave changed the arguments you were shown" in stale.text
        fresh = await bob.get(f"/inbox/approvals/{pending.id}")
        seen = hidden_fields(section(fresh.text, "data-approve-form", ("</form>",)))["seen_sha256"]
        done = await bob.post(
            f"/inbox/approvals/{pending.id}/approve", {"csrf": csrf_of(fresh.text), "seen_sha256": seen}
        )
        assert flash_query(done.headers["Location"]) == {"done": "approved"}
        await asyncio.wait_for(call, WAIT)
    record = await held.recorder.status("completed", pending.id)
    assert record.release_arguments == {"path": "new.txt"}
