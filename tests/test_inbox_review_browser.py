"""The inbox's review workflows in headless Chromium: edit and approve, approve and remember
through the confirmation page, revoke a standing grant.

Each page is watched as in test_inbox_browser: no dialog, no script error, no CSP report.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.approvals_kit import Held
from tests.conftest import WAIT, StartGateway
from tests.test_inbox import EMAIL
from tests.test_inbox_browser import browser, watch  # noqa: F401 (browser: test_inbox_browser's fixture)
from tests.test_inbox_review import held_call, make_grant, start_review


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """test_inbox_review's gateway: review rules in the policy, reviewers in groups."""
    return await start_review(start_gateway, tmp_path)


async def test_reviewer_edits_the_arguments_and_approves(browser: Browser, held: Held) -> None:  # noqa: F811
    """Open the editor, see bad JSON flagged as it is typed, approve the fixed edit: the agent's
    call goes out with the edited arguments and the page shows what changed."""
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    async with held_call(held, "send_email", EMAIL) as (approval, call):
        await tab.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await tab.page.get_by_text("Edit arguments").click()
        editor = tab.page.locator("#arguments")
        await expect(editor).to_be_visible()
        status = tab.page.locator("[data-edit-status]")
        await expect(status).to_contain_text("A JSON object")
        await editor.fill('{"to": "ops@example.com",')
        await expect(status).to_contain_text("Not JSON yet")
        edited = {**EMAIL, "subject": "Quarterly numbers (final)"}
        await editor.fill(json.dumps(edited, indent=2))
        await expect(status).to_contain_text("A JSON object")
        await tab.page.get_by_role("button", name="Approve with these arguments").click()
        await expect(tab.page.locator("[data-done]")).to_contain_text("with the arguments you edited")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert [m["subject"] for m in held.sent()] == ["Quarterly numbers (final)"]
    await expect(tab.page.locator("[data-edit-diff]")).to_contain_text("Quarterly numbers (final)")
    await expect(tab.page.locator("[data-edited-mark]")).to_contain_text("as edited by bob")
    tab.assert_clean()


async def test_reviewer_approves_and_remembers_through_the_confirmation_page(
    browser: Browser,  # noqa: F811
    held: Held,
) -> None:
    """Widen `to` to a prefix and `body` to any value, for 8 hours, 3 uses: the confirmation page
    says so in words; Confirm approves, saves the grant and names it; the grants page lists it."""
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    async with held_call(held, "send_email", EMAIL) as (approval, call):
        await tab.page.goto(f"{held.gateway.base}/inbox/approvals/{approval.id}")
        await tab.page.get_by_text("Remember for this agent").click()
        form = tab.page.locator("[data-remember-form]")
        await form.get_by_label("8 hours").check()
        await form.locator('input[name="max_uses"]').fill("3")
        rows = form.locator("[data-row]")
        body, to = rows.nth(0), rows.nth(2)
        await body.locator("select").select_option("any")
        prefix = to.locator('input[name="c2_prefix"]')
        await expect(prefix).to_be_hidden()  # only the chosen widening's inputs are shown
        await to.locator("select").select_option("prefix")
        await expect(prefix).to_be_visible()
        await prefix.fill("ops@")
        await form.get_by_role("button", name="Approve and remember…").click()
        words = tab.page.locator("[data-grant-constraints]")
        await expect(words).to_contain_text("body: any value")
        await expect(words).to_contain_text('to starts with "ops@"')
        await expect(tab.page.locator("[data-grant-uses]")).to_have_text("at most 3 uses")
        await expect(tab.page.locator("[data-grant-until]")).to_contain_text("8 h from now")
        await tab.page.get_by_role("button", name="Confirm: approve and remember").click()
        flash = tab.page.locator("[data-grant-flash]")
        await expect(flash).to_contain_text("Remembered as sg_")
        result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    (grant,) = await held.gateway.service.list_standing(active=True)
    assert (grant.max_uses, grant.source_approval) == (3, approval.id)
    await flash.get_by_role("link").click()
    row = tab.page.locator(f'[data-grant="{grant.id}"]')
    await expect(row).to_contain_text('to starts with "ops@"')
    await expect(row.locator("[data-uses]")).to_have_text("0 of 3")
    tab.assert_clean()


async def test_reviewer_revokes_a_standing_grant(browser: Browser, held: Held) -> None:  # noqa: F811
    """Revoke on the grants page: the flash names it and it moves to the ended list at once."""
    grant = await make_grant(held)
    tab = await watch(browser, held.gateway.base)
    await tab.login()
    await tab.page.get_by_role("link", name="Standing grants").click()
    row = tab.page.locator(f'[data-active] [data-grant="{grant.id}"]')
    await expect(row).to_contain_text('to starts with "ops-<b>"')
    await row.get_by_role("button", name="Revoke").click()
    await expect(tab.page.locator("[data-revoked-flash]")).to_contain_text(grant.id)
    await expect(tab.page.locator(f'[data-past] [data-grant="{grant.id}"]')).to_contain_text("revoked")
    await expect(tab.page.locator("[data-no-active]")).to_be_visible()
    revoked = await held.gateway.service.get_standing(grant.id)
    assert revoked is not None
    assert revoked.revoked_by == "bob"
    tab.assert_clean()
