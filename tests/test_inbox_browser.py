"""The inbox in headless Chromium (Playwright): a reviewer logs in, sees held calls arrive live, decides them.

Each test drives a real MCP client through the gateway to the demo upstream and watches the page as
a person would. Every page is watched for dialogs (alert/confirm/prompt: hostile text must never
run), uncaught script errors and CSP reports in the console. Set APPROVALS_SCREENSHOTS to a
directory (e.g. docs) to keep the README's screenshots.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Response, async_playwright, expect

from approvals.core.model import Approval
from tests.approvals_kit import Held, start_held
from tests.conftest import BOB_TOKEN, WAIT, StartGateway, mcp_client
from tests.inbox_kit import SECURITY_HEADERS
from tests.test_inbox import EMAIL, add_approval, settle, status_of

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TIMEOUT_MS = WAIT * 1000
RLO = "invoice_\u202egnp.exe"
HOSTILE = {
    "to": "javascript:alert(1)",
    "subject": "<script>alert(1)</script>",
    "body": '"><img src=x onerror=alert(1)> ' + RLO + " " + "A" * 6000 + " [end of the long body]",
}


CHROMIUM_MISSING = not Path(CHROMIUM).exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless (Playwright's own browser download is not used)."""
    if CHROMIUM_MISSING:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    return await start_held(start_gateway, tmp_path)


@dataclass
class Watched:
    """A browser tab and everything it did that a test must check afterwards."""

    context: BrowserContext
    page: Page
    base: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No dialog ever opened, no script error, no CSP violation."""
        assert self.dialogs == []
        assert self.errors == []

    async def login(self, token: str = BOB_TOKEN) -> None:
        await self.page.goto(f"{self.base}/inbox/login")
        await self.page.fill("#token", token)
        await self.page.get_by_role("button", name="Log in").click()
        await expect(self.page).to_have_url(f"{self.base}/inbox")


async def watch(browser: Browser, base: str, **options: Any) -> Watched:
    context = await browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    watched = Watched(context, page, base)

    async def on_dialog(dialog: Any) -> None:
        watched.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watched.errors.append(f"pageerror: {error}"))
    page.on(
        "console",
        lambda message: (
            watched.errors.append(f"console: {message.text}")
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    page.on("response", lambda response: watched.responses.append(response))
    return watched


async def pending(held: Held) -> Approval:
    return await held.recorder.status("pending")


async def test_reviewer_approves_a_held_call_and_the_agent_gets_its_result(
    browser: Browser, held: Held
) -> None:
    """Log in, see the agent's pending call, open it, approve: the agent gets the tool's result."""
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        approval = await pending(held)
        row = tab.page.locator(f'.item[data-id="{approval.id}"]')
        await expect(row).to_contain_text("send_email")
        await expect(row).to_contain_text('to: "ops@example.com"')
        await expect(row).to_contain_text("agent-a")
        await expect(tab.page).to_have_title("(1) approvals")
        await row.get_by_role("link").click()
        await expect(tab.page.locator("h1")).to_contain_text("send_email")
        await expect(tab.page.locator(".json-tree").first).to_contain_text("Quarterly numbers")
        await tab.page.get_by_role("button", name="Approve").click()
        await expect(tab.page.locator("[data-done]")).to_contain_text("You approved this call")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert result.content[0].text.startswith("queued message")
    await expect(tab.page.locator('.detail-head [data-field="status"]')).to_have_text("completed")
    assert len(held.sent()) == 1
    tab.assert_clean()


async def test_reviewer_denies_with_a_reason_using_the_keyboard(browser: Browser, held: Held) -> None:
    """`a` asks for confirmation (Escape cancels); `d` goes to the reason; the agent gets the denial."""
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        approval = await pending(held)
        await tab.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await tab.page.keyboard.press("a")
        dialog = tab.page.locator("#confirm-approve")
        await expect(dialog).to_be_visible()
        await expect(dialog.get_by_role("button", name="Approve")).to_be_focused()
        await tab.page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        assert await status_of(held, approval.id) == "pending"
        await tab.page.keyboard.press("d")
        reason = tab.page.locator("#reason")
        await expect(reason).to_be_focused()
        await tab.page.keyboard.type("not this week")
        await tab.page.get_by_role("button", name="Deny").click()
        await expect(tab.page.locator("[data-done]")).to_contain_text("You denied this call")
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    assert (
        result.content[0].text == "Denied by bob: the call to send_email was not made. Reason: not this week"
    )
    assert held.sent() == []
    tab.assert_clean()


async def test_new_requests_appear_and_decided_ones_leave_without_a_reload(
    browser: Browser, held: Held
) -> None:
    """The list updates live (SSE): a new call appears, a denied one leaves; the title counts."""
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    await expect(tab.page.locator("[data-empty]")).to_be_visible()
    await expect(tab.page.locator("[data-live-status]")).to_contain_text("Live")
    await tab.page.evaluate("window.__sameDocument = true")
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        approval = await pending(held)
        row = tab.page.locator(f'.item[data-id="{approval.id}"]')
        await expect(row).to_contain_text("send_email")
        await expect(row.get_by_role("link")).to_have_attribute("href", f"/inbox/approvals/{approval.id}")
        await expect(tab.page).to_have_title("(1) approvals")
        await expect(tab.page.locator("[data-empty]")).to_be_hidden()
        status, _ = await held.api("POST", f"/api/approvals/{approval.id}/deny", body={"reason": "no"})
        assert status == 200
        await expect(row).to_have_count(0)
        await expect(tab.page).to_have_title("(0) approvals")
        await asyncio.wait_for(call, WAIT)
    assert await tab.page.evaluate("window.__sameDocument") is True  # never reloaded
    tab.assert_clean()


async def test_hostile_text_is_shown_as_text_and_never_runs(browser: Browser, held: Held) -> None:
    """Script tags, event handlers, javascript: links, huge strings and RLO tricks are inert, visible text."""
    hostile_tool = {
        "name": "x",
        "description": "<img src=x onerror=alert(1)> <a href='javascript:alert(1)'>docs</a>",
        "inputSchema": {"properties": {"<script>alert(1)</script>": {"type": "string"}}},
    }
    stored = await add_approval(
        held,
        tool="<script>alert(1)</script>",
        tool_json=__import__("json").dumps(hostile_tool),
        arguments={"link": "javascript:alert(1)"},
        rule="<b onmouseover=alert(1)>rule</b>",
    )
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    await expect(tab.page.locator(f'.item[data-id="{stored.id}"]')).to_contain_text(
        "<script>alert(1)</script>"
    )
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", HOSTILE))
        approval = await pending(held)
        row = tab.page.locator(f'.item[data-id="{approval.id}"]')  # built live by the script
        await expect(row).to_contain_text('subject: "<script>alert(1)</script>"')
        await expect(row).to_contain_text("⟦U+202E⟧")
        await row.get_by_role("link").click()
        page = tab.page
        await expect(page.locator(".json-tree").first).to_contain_text("<script>alert(1)</script>")
        await expect(page.locator(".json-tree").first).to_contain_text("javascript:alert(1)")
        await expect(page.get_by_role("note").first).to_contain_text("1 invisible or direction-changing")
        fold = page.locator("details.fold").first
        await fold.locator("summary").click()
        await expect(fold).to_contain_text("[end of the long body]")  # folded, never cut
        assert await page.locator(".hidden-char", has_text="U+202E").count() >= 1
        await page.goto(f"{held.gateway.base}/inbox/approvals/{stored.id}")
        await expect(page.locator(".description")).to_contain_text("<img src=x onerror=alert(1)>")
        await expect(page.locator("h1")).to_contain_text("<script>alert(1)</script>")
        await page.locator("details.raw summary", has_text="Input schema").click()
        for url in (f"/inbox/approvals/{approval.id}", f"/inbox/approvals/{stored.id}", "/inbox"):
            await page.goto(f"{held.gateway.base}{url}")
            assert await page.locator("img").count() == 0
            assert await page.locator("a[href^='javascript:' i]").count() == 0
            assert await page.locator("script:not([src^='/inbox/static/'])").count() == 0
            assert await page.locator("[onerror], [onload], [onmouseover]").count() == 0
        status, _ = await held.api(
            "POST", f"/api/approvals/{approval.id}/deny", body={"reason": "<script>x</script>"}
        )
        assert status == 200
        await asyncio.wait_for(call, WAIT)
    await page.goto(f"{held.gateway.base}/inbox/history")
    await expect(page.locator("table.history")).to_contain_text("<script>x</script>")
    tab.assert_clean()


async def test_forged_requests_are_refused_and_nothing_is_decided(browser: Browser, held: Held) -> None:
    """No session, no CSRF token, or a cross-site form: 403, and the approval stays pending."""
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        approval = await pending(held)
        approve = f"{held.gateway.base}/inbox/approvals/{approval.id}/approve"
        anonymous = await watch(browser, held.gateway.base)
        response = await anonymous.page.request.post(
            approve, form={"csrf": "x"}, headers={"Origin": held.gateway.base}
        )
        assert response.status == 403
        tab = await watch(browser, held.gateway.base)
        await tab.login()
        for form in ({}, {"csrf": "forged"}):
            response = await tab.page.request.post(approve, form=form, headers={"Origin": held.gateway.base})
            assert response.status == 403
        # A page on another site that posts a form to the inbox: the session cookie stays home
        # (SameSite=Strict) and the Origin is not the gateway's.
        attacker = "http://attacker.test/"
        form_html = (
            f'<form method="post" action="{approve}"><input name="csrf" value="x"><button>win</button></form>'
        )
        await tab.page.route(attacker, lambda route: route.fulfill(body=form_html, content_type="text/html"))
        await tab.page.goto(attacker)
        async with tab.page.expect_response(approve) as answer:
            await tab.page.get_by_role("button", name="win").click()
        assert (await answer.value).status == 403
        assert await status_of(held, approval.id) == "pending"
        call.cancel()
    assert held.sent() == []


async def test_security_headers_and_cookie_flags_on_every_page(browser: Browser, held: Held) -> None:
    """Every inbox response has the CSP and friends; the session cookie is HttpOnly and SameSite=Strict."""
    stored = await add_approval(held)
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    for path in (f"/inbox/approvals/{stored.id}", "/inbox/history", "/inbox/approvals/nope", "/inbox"):
        await tab.page.goto(f"{held.gateway.base}{path}")
        await expect(tab.page.locator("main")).to_be_visible()
    inbox_responses = [r for r in tab.responses if "/inbox" in r.url]
    assert {re.sub(r"\?.*", "", r.url.removeprefix(held.gateway.base)) for r in inbox_responses} >= {
        "/inbox/login",
        "/inbox",
        "/inbox/static/inbox.css",
        "/inbox/static/inbox.js",
        "/inbox/history",
        f"/inbox/approvals/{stored.id}",
        "/inbox/approvals/nope",
    }
    for response in inbox_responses:
        headers = await response.all_headers()
        for name, value in SECURITY_HEADERS.items():
            assert headers.get(name.lower()) == value, (response.url, name)
    cookies = {c["name"]: c for c in await tab.context.cookies()}
    session = cookies["approvals_session"]
    assert (session["httpOnly"], session["sameSite"], session["secure"], session["path"]) == (
        True,
        "Strict",
        False,
        "/inbox",
    )
    assert session["expires"] > 0  # a persistent cookie with a short life, not forever
    tab.assert_clean()


async def test_screenshots_of_the_list_and_the_detail_page(
    browser: Browser, held: Held, tmp_path: Path
) -> None:
    """The list and the detail page render with realistic requests (kept as docs/*.png on request)."""
    now = held.gate.clock()
    await add_approval(
        held,
        tool="generate_image",
        grant="agent-b",
        owner="bob",
        created_at=now - 420,
        arguments={"prompt": "A watercolor fox in a snowy forest, morning light", "size": "1024x1024"},
    )
    await add_approval(
        held,
        tool="delete_file",
        created_at=now - 95,
        expires_at=now + 300,
        arguments={"path": "reports/2024-q3-final.xlsx"},
    )
    tab = await watch(
        browser, held.gateway.base, viewport={"width": 1200, "height": 760}, device_scale_factor=1
    )
    await tab.login()
    email = {
        "to": "finance-team@acme-corp.com",
        "subject": "Q3 numbers before the board meeting",
        "body": "Hi all,\n\nAttached are the Q3 numbers. Revenue is up 12% on Q2; costs are flat.\n"
        "Please keep these confidential until Thursday's board meeting.\n\nThanks,\nThe finance agent",
    }
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", email))
        approval = await pending(held)
        await expect(tab.page.locator(f'.item[data-id="{approval.id}"]')).to_be_visible()
        await expect(tab.page).to_have_title("(3) approvals")
        await tab.page.mouse.move(0, 0)
        await tab.page.screenshot(path=tmp_path / "inbox.png", animations="disabled")
        alice = await watch(browser, held.gateway.base)
        await alice.login("alice-reviewer-token-0123456789")
        await alice.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await tab.page.set_viewport_size({"width": 1200, "height": 1000})
        await tab.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await expect(tab.page.locator("[data-viewers]")).to_contain_text("alice")
        await tab.page.screenshot(path=tmp_path / "inbox-detail.png", animations="disabled")
        phone = await watch(
            browser, held.gateway.base, viewport={"width": 390, "height": 844}, is_mobile=True
        )
        await phone.login()
        await phone.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await phone.page.screenshot(path=tmp_path / "inbox-phone.png", full_page=True)
        status, _ = await held.api(
            "POST", f"/api/approvals/{approval.id}/deny", body={"reason": "Not before Thursday"}
        )
        assert status == 200
        await asyncio.wait_for(call, WAIT)
        await tab.page.set_viewport_size({"width": 1200, "height": 560})
        await tab.page.goto(f"{held.gateway.base}/inbox/history")
        await expect(tab.page.locator("table.history")).to_contain_text("Not before Thursday")
        await tab.page.screenshot(path=tmp_path / "inbox-history.png", animations="disabled")
    if target := os.environ.get("APPROVALS_SCREENSHOTS"):
        for name in ("inbox.png", "inbox-detail.png", "inbox-phone.png"):
            shutil.copy(tmp_path / name, Path(target) / name)
    for tab_ in (tab, alice, phone):
        tab_.assert_clean()


# ---- issue 11: live history and result panels, the history table's wrapping -----------------------


async def test_every_panel_follows_the_live_badge_and_the_result_is_shown(
    browser: Browser, held: Held, tmp_path: Path
) -> None:
    """Approved elsewhere: badge, history, wording and the tool's result all update without a reload."""
    tab = await watch(browser, held.gateway.base, viewport={"width": 1200, "height": 900})
    await tab.login()
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        approval = await pending(held)
        await tab.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await expect(tab.page.locator("[data-result]")).to_be_hidden()
        await tab.page.evaluate("window.__sameDocument = true")
        status, _ = await held.api("POST", f"/api/approvals/{approval.id}/approve", body={})
        assert status == 200
        await asyncio.wait_for(call, WAIT)
    page = tab.page
    await expect(page.locator('.detail-head [data-field="status"]')).to_have_text("completed")
    timeline = page.locator(".timeline .ev")
    await expect(timeline).to_have_text(["created", "approved", "released", "completed"])
    await expect(page.locator('[data-field="args-note"]')).to_have_text("exactly these arguments were sent.")
    await expect(page.locator('[data-result] [data-field="result-text"]')).to_contain_text("queued message")
    await expect(page.locator('[data-field="decision"]')).to_have_text("Approved by bob via the API")
    assert await page.evaluate("window.__sameDocument") is True  # never reloaded
    await page.reload()
    await expect(timeline).to_have_text(["created", "approved", "released", "completed"])
    await expect(page.locator('[data-result] [data-field="result-text"]')).to_contain_text("queued message")
    await page.mouse.move(0, 0)
    await page.screenshot(path=tmp_path / "inbox-result.png", animations="disabled")
    if target := os.environ.get("APPROVALS_SCREENSHOTS"):
        shutil.copy(tmp_path / "inbox-result.png", Path(target) / "inbox-result.png")
    tab.assert_clean()


SPLIT_WORDS = """() => {
  const split = [];
  for (const cell of document.querySelectorAll("table.history td")) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const word of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, word.index);
        range.setEnd(node, word.index + word[0].length);
        const lines = new Set(Array.from(range.getClientRects(), (r) => Math.round(r.top)));
        if (lines.size > 1) split.push(word[0]);
      }
    }
  }
  return split;
}"""


@pytest.mark.parametrize("width", [1280, 1024, 880])
async def test_history_cells_never_break_a_word(browser: Browser, held: Held, width: int) -> None:
    """The history table wraps Outcome (and every cell) between words, never inside one."""
    now = held.gate.clock()
    approved = {"decided_by": "bob", "decided_at": now, "decided_via": "web"}
    kept = '{"jsonrpc":"2.0","result":{"content":[],"isError":true}}'
    for n in range(3):
        arguments = {"to": f"everyone-{n}@example.com", "subject": "Quarterly numbers " * 5}
        approval = await add_approval(held, arguments=arguments)
        await settle(
            held, approval, ("approved", approved), ("released", {}), ("completed", {"result_json": kept})
        )
    reason = "this needs a second look from finance before anything is sent to the whole company"
    denied = await add_approval(held, arguments={"to": "all@example.com"})
    await settle(held, denied, ("denied", {**approved, "reason": reason}))
    tab = await watch(browser, held.gateway.base, viewport={"width": width, "height": 900})
    await tab.login()
    await tab.page.goto(f"{held.gateway.base}/inbox/history")
    await expect(tab.page.locator("table.history")).to_contain_text("the tool reported an error")
    assert await tab.page.evaluate(SPLIT_WORDS) == []
    tab.assert_clean()
