"""The README's review-workflow screenshots, as real tests: a gateway in front of a small payments
upstream is put in each state through a real MCP client, the API and the inbox in headless
Chromium, and each test asserts what the page shows before it is photographed.

Set APPROVALS_SCREENSHOTS to a directory (e.g. docs) to keep the pictures as review-<feature>.png.
Every tab is watched for dialogs, script errors and CSP reports (tests.test_inbox_browser.watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Locator, Page, expect

from approvals.core.model import Approval
from tests.approvals_kit import Recorder
from tests.conftest import BOB_TOKEN, TOKEN_A, WAIT, Running, StartGateway, mcp_client
from tests.review_kit import CAROL_TOKEN, DAVE_TOKEN, ERIN_TOKEN, REVIEWERS
from tests.test_inbox_browser import Watched, browser, watch

__all__ = ["browser"]  # the fixture, shared with test_inbox_browser

# A payments service's tools, each with the MCP annotations a real one would declare. Written to a
# file and run over stdio by the gateway; every call only echoes what it would have done.
PAYMENTS_SERVER = """
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

server: MCPServer[Any] = MCPServer("payments")
RISKY = ToolAnnotations(destructive_hint=True, open_world_hint=True, idempotent_hint=False)


@server.tool(title="Create refund", description="Refund part or all of an order to the customer's card.",
             annotations=RISKY)
def create_refund(
    order_id: Annotated[str, Field(description="The order, ord_...", pattern="^ord_[0-9]+$")],
    amount: Annotated[float, Field(description="How much to refund.", gt=0, le=5000)],
    currency: Literal["EUR", "USD", "GBP"],
    reason: Annotated[str, Field(description="Shown on the customer's statement.", max_length=200)],
) -> str:
    return f"refunded {amount:.2f} {currency} on {order_id}"


@server.tool(title="Send payment", description="Send money to a bank account (SEPA transfer).",
             annotations=RISKY)
def send_payment(iban: str, amount: float, currency: Literal["EUR", "USD", "GBP"], memo: str) -> str:
    return f"sent {amount:.2f} {currency} to {iban}"


@server.tool(title="Export customers", description="Export customer records as CSV.",
             annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
def export_customers(segment: str, fields: list[str]) -> str:
    return f"exported {segment}: {', '.join(fields)}"


@server.tool(title="Close account", description="Close a customer account for good.",
             annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
def close_account(account_id: str, note: str) -> str:
    return f"closed {account_id}"


@server.tool(title="Rotate API key", description="Revoke a service's API key and issue a new one.",
             annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
def rotate_api_key(service: str) -> str:
    return f"rotated the key of {service}"


if __name__ == "__main__":
    server.run()
"""

# One rule per feature (see the README's "Review workflows").
POLICY: dict[str, Any] = {
    "version": "1",
    "default": "deny",
    "tools": {
        "create_refund": {
            "approval_if": [{"path": "args.amount", "op": "gt", "value": 500}],
            "approval": {"reviewers": ["payments"]},
        },
        "send_payment": {
            "action": "require_approval",
            "approval": {"quorum": 2, "from": ["payments", "security"]},
        },
        "export_customers": {"action": "require_approval", "approval": {"reviewers": ["security"]}},
        "close_account": {
            "action": "require_approval",
            "approval": {"reviewers": ["payments"], "via": ["inbox"]},
        },
        "rotate_api_key": {
            "action": "require_approval",
            "approval": {
                "reviewers": ["payments"],
                "timeout": "30m",
                "escalate": [{"after": "10m", "to": ["oncall"]}],
                "on_timeout": "deny",
            },
        },
    },
}
REFUND = {"order_id": "ord_1093", "amount": 900, "currency": "EUR", "reason": "Arrived damaged"}
PAYMENT = {"iban": "DE89370400440532013000", "amount": 12500, "currency": "EUR", "memo": "Invoice 2024-117"}
VIEWPORT = {"width": 1200, "height": 1000}  # as docs/inbox-detail.png


@dataclass
class Payments:
    """The gateway in front of the payments upstream, its clock's shift, and what its feed said."""

    gateway: Running
    recorder: Recorder
    shift: list[float]  # seconds added to the real time: the gateway's clock, moved by a test
    shots: Path

    @property
    def url(self) -> str:
        return self.gateway.url("payments")

    def page(self, approval_id: str, query: str = "") -> str:
        return f"{self.gateway.base}/inbox/approvals/{approval_id}{query}"

    async def api(self, method: str, path: str, body: Any = None, token: str = BOB_TOKEN) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method, f"{self.gateway.base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
            ) as response,
        ):
            return response.status, await response.json()

    async def shot(self, page: Page, name: str) -> None:
        """Photograph the page as review-<name>.png (kept when APPROVALS_SCREENSHOTS is set)."""
        await page.mouse.move(0, 0)  # no hover or focus ring in the picture
        await page.evaluate("() => document.activeElement && document.activeElement.blur()")
        path = self.shots / f"review-{name}.png"
        await page.screenshot(path=path, animations="disabled")
        if target := os.environ.get("APPROVALS_SCREENSHOTS"):
            shutil.copy(path, Path(target) / path.name)


@pytest.fixture
async def payments(start_gateway: StartGateway, tmp_path: Path) -> Payments:
    """The payments upstream over stdio behind a gateway with POLICY, reviewers in groups (alice and
    bob: payments, carol: payments, dave: security, erin: oncall; alice runs agent-a) and a clock
    a test may move (the real time plus a shift, so the pages' times read as the browser's)."""
    server = tmp_path / "payments_server.py"
    server.write_text(PAYMENTS_SERVER)
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    shift = [0.0]
    gateway = await start_gateway(
        {"payments": {"command": [sys.executable, str(server)], "policy": "policy.json"}},
        clock=lambda: time.time() + shift[0],
        reviewers=REVIEWERS,
        approvals={"hold_seconds": 40},
    )
    shots = tmp_path / "shots"
    shots.mkdir()
    return Payments(gateway, Recorder.following(gateway.service.feed), shift, shots)


@contextlib.asynccontextmanager
async def held(
    payments: Payments, tool: str, arguments: dict[str, Any]
) -> AsyncIterator[tuple[Approval, asyncio.Task[Any]]]:
    """agent-a's real MCP call, held for review: its pending record and the task awaiting the result."""
    async with mcp_client(payments.url, TOKEN_A) as client:
        call = asyncio.create_task(client.call_tool(tool, arguments))
        try:
            pending = await payments.recorder.wait_for(
                lambda a: a.status == "pending" and a.tool == tool and a.arguments == arguments
            )
            yield pending, call
        finally:
            if not call.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await call


async def decided_call(payments: Payments, tool: str, arguments: dict[str, Any], verdict: str) -> Any:
    """A held call decided through the API by bob ("approve", or "deny" with a reason); its result."""
    async with held(payments, tool, arguments) as (pending, call):
        body = {"reason": "Over this month's goodwill budget"} if verdict == "deny" else {}
        status, record = await payments.api("POST", f"/api/approvals/{pending.id}/{verdict}", body)
        assert status == 200, record
        return await asyncio.wait_for(call, WAIT)


async def reviewer_tab(browser: Browser, payments: Payments, token: str = BOB_TOKEN) -> Watched:
    tab = await watch(browser, payments.gateway.base, viewport=VIEWPORT, device_scale_factor=1)
    await tab.login(token)
    return tab


async def scroll_to(locator: Locator) -> None:
    """Bring a panel to the top of the view, just under the sticky header, so the picture shows it
    and what follows."""
    await locator.evaluate(
        """element => {
            const header = document.querySelector("header.top, body > header");
            const below = header ? header.getBoundingClientRect().bottom : 0;
            window.scrollBy(0, element.getBoundingClientRect().top - below - 16);
        }"""
    )


def meta_of(result: Any) -> dict[str, Any]:
    return dict((result.meta or {}).get("approvals") or {})


# ---- why a call was held ------------------------------------------------------------------------


async def test_why_panel_shows_rule_value_hints_diff_and_tally(browser: Browser, payments: Payments) -> None:
    """A refund over 500: the rule and the value that fired it, the tool's destructive and
    open-world hints, the difference from the last approved refund, and the 30-day tally."""
    last = {"order_id": "ord_1041", "amount": 620, "currency": "EUR", "reason": "Arrived damaged"}
    assert not (await decided_call(payments, "create_refund", last, "approve")).is_error
    big = {"order_id": "ord_1077", "amount": 2400, "currency": "EUR", "reason": "Goodwill"}
    assert (await decided_call(payments, "create_refund", big, "deny")).is_error
    tab = await reviewer_tab(browser, payments)
    async with held(payments, "create_refund", REFUND) as (pending, _):
        page = tab.page
        await page.goto(payments.page(pending.id))
        why = page.locator("[data-why]")
        await expect(why.locator("[data-explanation]")).to_have_text(
            "rule create_refund: approval_if args.amount gt 500 (value 900)"
        )
        hints = why.locator("[data-hint]")
        await expect(hints).to_have_text(["destructive", "open world", "not idempotent"])
        await expect(why.locator('[data-hint="destructive"]')).to_have_class("hint hint-deny")
        rows = why.locator("[data-why-diff] tbody tr")
        await expect(rows.locator("th")).to_have_text(["amount", "order_id"])
        await expect(rows.nth(0)).to_contain_text("620")
        await expect(rows.nth(0)).to_contain_text("900")
        await expect(why.locator("[data-tally]")).to_have_text("Last 30 days: 1 approved, 1 denied")
        await payments.shot(page, "why")
        status, record = await payments.api("GET", f"/api/approvals/{pending.id}")
        assert status == 200
        assert record["why"]["annotations"] == {
            "destructiveHint": True,
            "openWorldHint": True,
            "idempotentHint": False,
        }
        assert record["why"]["recent"] == {"approved": 1, "denied": 1}
    tab.assert_clean()


# ---- reviewer groups ----------------------------------------------------------------------------


async def test_reviewer_outside_the_rules_groups_sees_the_request_read_only(
    browser: Browser,
    payments: Payments,
) -> None:
    """export_customers is security's to decide: bob (payments) sees it with no buttons and the
    reason, and the API refuses him with 403; dave (security) may decide it."""
    tab = await reviewer_tab(browser, payments)
    arguments = {"segment": "churned-2024", "fields": ["email", "name", "last_order"]}
    async with held(payments, "export_customers", arguments) as (pending, call):
        page = tab.page
        await page.goto(payments.page(pending.id))
        await expect(page.locator("[data-read-only]")).to_have_text(
            "You can look but not decide: only security may decide this call."
        )
        await expect(page.locator("[data-approve-form]")).to_have_count(0)
        await expect(page.locator("[data-rule]")).to_contain_text("Decided by security.")
        await payments.shot(page, "groups")
        status, refused = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {})
        assert (status, refused["kind"]) == (403, "not_eligible")
        status, _ = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {}, DAVE_TOKEN)
        assert status == 200
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    tab.assert_clean()


# ---- quorum -------------------------------------------------------------------------------------


async def test_quorum_shows_progress_and_who_approved(browser: Browser, payments: Payments) -> None:
    """send_payment needs one approval from payments and one from security: after bob's, the page
    says "1 of 2 approvals, waiting for someone in security" and names bob; carol (payments too)
    may not fill security's place; dave's approval releases the call, once."""
    async with held(payments, "send_payment", PAYMENT) as (pending, call):
        status, counted = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {})
        assert (status, counted["status"]) == (200, "pending")
        assert counted["review"]["progress"] == "1 of 2 approvals, waiting for someone in security"
        status, refused = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {}, CAROL_TOKEN)
        assert (status, refused["kind"]) == (403, "not_eligible")
        tab = await reviewer_tab(browser, payments, DAVE_TOKEN)
        page = tab.page
        await page.goto(payments.page(pending.id))
        review = page.locator("[data-review-state]")
        await expect(review.locator("[data-progress]")).to_have_text(
            "1 of 2 approvals, waiting for someone in security"
        )
        await expect(review.locator("[data-votes]")).to_contain_text("bob approved")
        await expect(review.locator("[data-votes]")).to_contain_text("via the API")
        await expect(review.locator("[data-rule]")).to_contain_text(
            "Needs 2 approvals from different reviewers, one from each of payments and security."
        )
        await payments.shot(page, "quorum")
        await page.locator("[data-approve]").click()
        await expect(page.locator("[data-done]")).to_contain_text("You approved this call")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    await payments.recorder.status("completed", pending.id)
    _, audit = await payments.api("GET", f"/api/audit?approval_id={pending.id}")
    events = [e["event"] for e in audit["events"] if e["event"] != "viewed"]
    assert events == ["created", "voted", "approved", "released", "completed"]
    tab.assert_clean()


# ---- step-up ------------------------------------------------------------------------------------


async def test_step_up_rule_is_decided_in_the_inbox_only(browser: Browser, payments: Payments) -> None:
    """close_account takes decisions only through the inbox: the API's approve is 403 step_up, the
    page says so in the review panel, and the inbox's approval releases the call."""
    arguments = {"account_id": "acct_88213", "note": "Customer asked to close; balance is zero"}
    async with held(payments, "close_account", arguments) as (pending, call):
        status, refused = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {})
        assert (status, refused["kind"]) == (403, "step_up")
        assert refused["error"] == "this call's rule accepts decisions only through the inbox"
        tab = await reviewer_tab(browser, payments)
        page = tab.page
        await page.goto(payments.page(pending.id))
        await expect(page.locator("[data-rule]")).to_contain_text("Decisions only through the inbox.")
        await expect(page.locator("[data-approve]")).to_be_visible()
        await payments.shot(page, "step-up")
        await page.locator("[data-approve]").click()
        await expect(page.locator("[data-done]")).to_contain_text("You approved this call")
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    tab.assert_clean()


# ---- edit before approve ------------------------------------------------------------------------


async def test_edit_before_approve_shows_the_schema_and_then_the_diff(
    browser: Browser,
    payments: Payments,
) -> None:
    """?edit=1 opens the editor beside the tool's inputSchema; a refund cut from 900 to 450 is
    approved, the upstream gets 450, the agent is told (edited_by_reviewer) and the page shows
    the difference."""
    tab = await reviewer_tab(browser, payments)
    async with held(payments, "create_refund", REFUND) as (pending, call):
        page = tab.page
        await page.goto(payments.page(pending.id, "?edit=1"))
        editor = page.locator("#arguments")
        await expect(editor).to_be_visible()
        await expect(page.locator(".edit-schema pre")).to_contain_text('"exclusiveMinimum": 0')
        edited = {**REFUND, "amount": 450, "reason": "Arrived damaged (half refunded: one item kept)"}
        await editor.fill(json.dumps(edited, indent=2))
        await expect(page.locator("[data-edit-status]")).to_contain_text("A JSON object")
        await scroll_to(page.locator("#edit"))
        await payments.shot(page, "edit")
        await page.get_by_role("button", name="Approve with these arguments").click()
        await expect(page.locator("[data-done]")).to_contain_text("with the arguments you edited")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert result.content[0].text == "refunded 450.00 EUR on ord_1093"
    meta = meta_of(result)
    assert (meta["code"], meta["edited_by"]) == ("edited_by_reviewer", "bob")
    assert "changed the arguments before approving" in result.content[-1].text
    page = tab.page
    await expect(page.locator('.detail-head [data-field="status"]')).to_have_text("completed")
    diff = page.locator("[data-edit-diff] tbody tr")
    await expect(diff.locator("th")).to_have_text(["amount", "reason"])
    await expect(diff.nth(0)).to_contain_text("450")
    await page.reload()
    await expect(page.locator("[data-edited-mark]")).to_have_text("as edited by bob")
    await payments.shot(page, "edit-result")
    tab.assert_clean()


# ---- approve and remember, standing grants ----------------------------------------------------


async def test_approve_and_remember_with_a_widened_grant(browser: Browser, payments: Payments) -> None:
    """Remember for 8 hours, at most 20 uses, any EUR refund of an ord_ order up to 1,000: the form,
    the confirmation page in words, then a later refund of 700 passes with no reviewer and the
    agent's _meta names the grant."""
    tab = await reviewer_tab(browser, payments)
    async with held(payments, "create_refund", REFUND) as (pending, call):
        page = tab.page
        await page.goto(payments.page(pending.id))
        await page.get_by_text("Remember for this agent").click()
        form = page.locator("[data-remember-form]")
        await form.get_by_label("8 hours").check()
        await form.locator('input[name="max_uses"]').fill("20")
        rows = form.locator("[data-row]")  # amount, currency, order_id, reason (sorted)
        await expect(rows.locator("th")).to_have_text(["amount", "currency", "order_id", "reason"])
        await rows.nth(0).locator("select").select_option("range")
        await rows.nth(0).locator('input[name="c0_min"]').fill("0")
        await rows.nth(0).locator('input[name="c0_max"]').fill("1000")
        await rows.nth(2).locator("select").select_option("prefix")
        await rows.nth(2).locator('input[name="c2_prefix"]').fill("ord_")
        await rows.nth(3).locator("select").select_option("any")
        await scroll_to(page.locator("#remember"))
        await payments.shot(page, "remember")
        await form.get_by_role("button", name="Approve and remember…").click()
        words = page.locator("[data-grant-constraints] li")
        await expect(words).to_have_text(
            ["0 ≤ amount ≤ 1000", 'currency = "EUR"', 'order_id starts with "ord_"', "reason: any value"]
        )
        await expect(page.locator("[data-grant-uses]")).to_have_text("at most 20 uses")
        await expect(page.locator("[data-grant-until]")).to_contain_text("8 h from now")
        await payments.shot(page, "remember-confirm")
        await page.get_by_role("button", name="Confirm: approve and remember").click()
        await expect(page.locator("[data-grant-flash]")).to_contain_text("Remembered as sg_")
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    (grant,) = await payments.gateway.service.list_standing(active=True)
    async with mcp_client(payments.url, TOKEN_A) as client:
        later = await client.call_tool(
            "create_refund", {"order_id": "ord_1102", "amount": 700, "currency": "EUR", "reason": "Late"}
        )
    assert not later.is_error
    meta = meta_of(later)
    assert (meta["code"], meta["standing_grant"], meta["uses"]) == ("allowed_by_standing_grant", grant.id, 1)
    _, events = await payments.api("GET", f"/api/audit?approval_id={grant.id}")
    assert [e["event"] for e in events["events"]] == ["granted", "used"]
    tab.assert_clean()


async def test_grants_page_lists_an_active_and_a_revoked_grant(browser: Browser, payments: Payments) -> None:
    """Two grants made through the API (approve and remember; deny and remember), one revoked in
    the inbox: the page shows both, the revoked one under "Recently ended"; export gives the rule."""
    async with held(payments, "create_refund", REFUND) as (first, call):
        remember = {
            "for": "8h",
            "max_uses": 20,
            "constraints": [
                {"field": "amount", "op": "range", "value": [0, 1000]},
                {"field": "currency", "op": "eq", "value": "EUR"},
                {"field": "order_id", "op": "prefix", "value": "ord_"},
                {"field": "reason", "op": "any"},
            ],
        }
        status, approved = await payments.api(
            "POST", f"/api/approvals/{first.id}/approve", {"remember": remember}
        )
        assert status == 200, approved
        assert not (await asyncio.wait_for(call, WAIT)).is_error
    kept = approved["standing_grant"]["id"]
    goodwill = {"order_id": "ord_2001", "amount": 4000, "currency": "USD", "reason": "Goodwill"}
    async with held(payments, "create_refund", goodwill) as (second, call):
        deny = {
            "reason": "Goodwill refunds over 1,000 go through finance",
            "remember": {"for": "24h", "constraints": [
                {"field": "amount", "op": "range", "value": [1000, None]},
                {"field": "currency", "op": "any"},
                {"field": "order_id", "op": "any"},
                {"field": "reason", "op": "in", "value": ["Goodwill", "Gesture"]},
            ]},
        }  # fmt: skip
        status, denied = await payments.api("POST", f"/api/approvals/{second.id}/deny", deny)
        assert status == 200, denied
        assert (await asyncio.wait_for(call, WAIT)).is_error
    revoked = denied["standing_grant"]["id"]
    tab = await reviewer_tab(browser, payments)
    page = tab.page
    await page.get_by_role("link", name="Standing grants").click()
    await page.locator(f'[data-active] [data-grant="{revoked}"]').get_by_role("button", name="Revoke").click()
    await expect(page.locator("[data-revoked-flash]")).to_contain_text(revoked)
    active = page.locator(f'[data-active] [data-grant="{kept}"]')
    await expect(active).to_contain_text('order_id starts with "ord_"')
    await expect(active.locator("[data-uses]")).to_have_text("0 of 20")
    ended = page.locator(f'[data-past] [data-grant="{revoked}"]')
    await expect(ended).to_contain_text("revoked by bob")
    await expect(ended).to_contain_text("Goodwill refunds over 1,000 go through finance")
    await payments.shot(page, "grants")
    status, rule = await payments.api("GET", f"/api/standing-grants/{kept}/policy")
    assert status == 200
    assert rule["tools"]["create_refund"] == {
        "action": "allow",
        "approval_if": [
            {"path": "args.amount", "op": "lt", "value": 0},
            {"path": "args.amount", "op": "gt", "value": 1000},
            {"path": "args.currency", "op": "neq", "value": "EUR"},
            {"path": "args.order_id", "op": "regex", "value": "^(?!ord_)"},
        ],
    }
    tab.assert_clean()


# ---- escalation and timeouts --------------------------------------------------------------------


async def test_escalated_request_is_highlighted_and_then_denied_on_timeout(
    browser: Browser,
    payments: Payments,
) -> None:
    """rotate_api_key undecided for 10 minutes is escalated to oncall (the clock is moved and the
    service asked, never waited on): highlighted in the list and on its page, and erin (oncall)
    may decide it now; at 30 minutes it is denied, and the agent is told nobody decided in time."""
    payments.shift[0] = -601.0  # the request is made 10 min ago; after the move the clock is the browser's
    tab = await reviewer_tab(browser, payments, ERIN_TOKEN)
    async with held(payments, "rotate_api_key", {"service": "billing-webhooks"}) as (pending, call):
        status, refused = await payments.api("POST", f"/api/approvals/{pending.id}/approve", {}, ERIN_TOKEN)
        assert (status, refused["kind"]) == (403, "not_eligible")
        payments.shift[0] = 0.0
        await payments.gateway.service.escalate_due()
        await payments.recorder.wait_for(lambda a: a.id == pending.id and a.escalated == 1)
        page = tab.page
        await page.goto(f"{payments.gateway.base}/inbox")
        row = page.locator(f'.item[data-id="{pending.id}"]')
        await expect(row.locator('[data-field="escalated"]')).to_have_text("escalated to oncall")
        await page.goto(payments.page(pending.id))
        await expect(page.locator("body")).to_have_class("escalated")
        await expect(page.locator("[data-escalated]")).to_have_text(
            "Escalated to oncall: nobody decided in time."
        )
        await expect(page.locator("[data-rule]")).to_contain_text("Denied when nobody decides in time.")
        await expect(page.locator("[data-approve]")).to_be_visible()  # erin may decide it now
        await payments.shot(page, "escalated")
        payments.shift[0] = 21 * 60.0  # past the 30 minutes' timeout
        await payments.gateway.service.expire_due()
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert meta_of(result)["code"] == "denied_on_timeout"
    tab.assert_clean()
