"""Batch review in headless Chromium (Playwright): filter the list, select all shown, approve them.

Every tab is watched for dialogs, script errors and CSP reports (tests.test_inbox_browser.watch).
Set APPROVALS_SCREENSHOTS to a directory (e.g. docs) to keep the README's screenshots.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.approvals_kit import Held, start_held
from tests.conftest import BOB_TOKEN, StartGateway
from tests.test_inbox_batch import POLICY, REVIEWERS, hold, status
from tests.test_inbox_browser import browser, watch

__all__ = ["browser"]  # fixtures shared with the modules they come from


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    return await start_held(
        start_gateway,
        tmp_path,
        policy=POLICY,
        approvals={"max_pending_per_grant": 100},
        reviewers=REVIEWERS,
    )


async def test_filter_by_tool_select_all_shown_and_approve_them(
    browser: Browser, held: Held, tmp_path: Path
) -> None:
    """Filtered live list, a read-only row skipped by "select all", checks before posting, the result page."""
    mails = [await hold(held, "send_email", "agent-a", n) for n in range(3)]
    own = await hold(held, "send_email", "agent-b", 3)  # bob runs agent-b: read-only for him
    deletes = [await hold(held, "delete_file", "agent-a", n) for n in range(4, 6)]
    tab = await watch(browser, held.gateway.base, viewport={"width": 1200, "height": 820})
    await tab.login(BOB_TOKEN)
    page = tab.page
    rows = page.locator(".item")
    await expect(rows).to_have_count(6)
    await expect(page.locator(f'.item[data-id="{deletes[0].id}"] [data-field="progress"]')).to_have_text(
        "0 of 2 approvals, waiting for another reviewer"
    )
    await page.mouse.move(0, 0)
    await page.screenshot(path=tmp_path / "inbox-batch-glance.png", animations="disabled")

    await page.get_by_label("Tool").select_option("send_email")
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_title("(4) approvals")
    await expect(rows).to_have_count(4)
    await expect(page.locator("[data-live-status]")).to_contain_text("Live")
    # Live, with the filter: a delete_file request is not added, a send_email one is.
    await hold(held, "delete_file", "agent-a", 6)
    late = await hold(held, "send_email", "agent-a", 7)
    await expect(page.locator(f'.item[data-id="{late.id}"]')).to_be_visible()
    await expect(rows).to_have_count(5)
    await expect(page.locator(".item", has_text="delete_file")).to_have_count(0)
    await expect(page).to_have_title("(5) approvals")

    own_box = page.locator(f'.item[data-id="{own.id}"] [data-pick]')
    await expect(own_box).to_be_disabled()
    await expect(own_box).to_have_attribute(
        "title", "bob runs agent agent-b: a reviewer may not approve their own agent's calls"
    )
    error = page.locator("[data-batch-error]")
    await page.get_by_role("button", name="Approve selected").click()
    await expect(error).to_have_text("Select at least one request.")
    await page.get_by_label("Select all shown").check()
    await expect(page.locator("[data-picked]")).to_have_text("4 selected")
    await expect(own_box).not_to_be_checked()
    await page.get_by_role("button", name="Deny selected").click()
    await expect(error).to_have_text("Say why you deny them: each agent is told the reason.")
    await expect(page.locator("#batch-reason")).to_be_focused()
    await page.mouse.move(0, 0)
    await page.screenshot(path=tmp_path / "inbox-batch.png", animations="disabled")

    await page.get_by_role("button", name="Approve selected").click()
    await expect(page.locator("h1")).to_contain_text("Approve selected")
    await expect(page.locator("[data-tally]")).to_have_text("4 approved")
    await expect(page.locator('tr[data-outcome="approved"]')).to_have_count(4)
    await page.screenshot(path=tmp_path / "inbox-batch-result.png", animations="disabled")
    await page.get_by_role("link", name="Back to pending").click()
    await expect(page).to_have_url(f"{held.gateway.base}/inbox?tool=send_email")
    await expect(rows).to_have_count(1)  # bob's own agent's call, still waiting for someone else

    await held.gateway.service.settled()
    for approval in [*mails, late]:
        assert await status(held, approval.id) in ("approved", "released", "completed")
    assert [await status(held, a.id) for a in (own, *deletes)] == ["pending"] * 3
    tab.assert_clean()
    if target := os.environ.get("APPROVALS_SCREENSHOTS"):
        for name in ("inbox-batch.png", "inbox-batch-result.png"):
            shutil.copy(tmp_path / name, Path(target) / name)
