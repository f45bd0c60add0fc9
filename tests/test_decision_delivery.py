"""A decision reaches the waiting agent at once, the pending limit is exact, and a release that the
upstream never answers ends: the promises of a held call that a person feels."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import approvals.proxy.hold
from approvals.proxy.keys import GATEWAY
from tests.approvals_kit import Held, start_held
from tests.conftest import PROBE_COMMAND, TOKEN_A, WAIT, StartGateway, mcp_client
from tests.rawmcp import RawSession

EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}
# Far beyond WAIT: a call that is answered only at the next sign of life, or only when the hold
# runs out, fails these tests instead of passing late.
NEVER = 3600.0


@pytest.fixture(autouse=True)
def _no_sign_of_life(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals.proxy.hold, "SIGN_OF_LIFE_SECONDS", NEVER)


def _meta(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


def _set_hold_seconds(held: Held, seconds: float) -> None:
    # The proxy reads hold_seconds on every call; changing it between two calls lets one test
    # show a short hold and then a long one on the same approval.
    gateway = held.gateway.app[GATEWAY]
    gateway.settings = dataclasses.replace(
        gateway.settings, approvals=dataclasses.replace(gateway.settings.approvals, hold_seconds=seconds)
    )


@pytest.mark.parametrize("approve", [True, False])
async def test_a_decision_reaches_the_held_call_before_the_next_sign_of_life(
    start_gateway: StartGateway, tmp_path: Path, approve: bool
) -> None:
    """Approve or deny: the held call's answer is written at once, not at the next progress tick."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        verb = "approve" if approve else "deny"
        assert (await held.api("POST", f"/api/approvals/{pending.id}/{verb}", body={"reason": "r"}))[0] == 200
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error is not approve


async def test_a_kept_result_reaches_the_repeat_call_at_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The repeat call of a completed approval gets the kept result without waiting for a tick."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.05})
    async with mcp_client(held.url()) as client:
        first = await client.call_tool("send_email", EMAIL)
        approval_id = _meta(first)["approval_id"]
        assert (await held.api("POST", f"/api/approvals/{approval_id}/approve"))[0] == 200
        await held.recorder.status("completed", approval_id)
        _set_hold_seconds(held, NEVER)
        again = await asyncio.wait_for(client.call_tool("send_email", EMAIL), WAIT)
    assert not again.is_error


async def test_shutdown_answers_held_calls_at_once(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Draining the gateway (SIGTERM's first step) answers a held call with the pending result now."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": NEVER})
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        await held.recorder.status("pending")
        held.gateway.app[GATEWAY].drain()
        result = await asyncio.wait_for(call, WAIT)
    assert _meta(result)["code"] == "approval_pending"


async def test_the_pending_limit_is_exact_under_concurrent_calls(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """100 different held calls at once against max_pending_per_grant = 20: exactly 20 become pending."""
    held = await start_held(
        start_gateway, tmp_path, approvals={"hold_seconds": 0.05, "max_pending_per_grant": 20}
    )
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), TOKEN_A)
        await raw.initialize()
        calls = [
            raw.request("tools/call", {"name": "send_email", "arguments": {**EMAIL, "subject": f"n{i}"}})
            for i in range(100)
        ]
        replies = await asyncio.wait_for(asyncio.gather(*calls), WAIT)
    codes = [r.last["result"]["_meta"]["approvals"]["code"] for r in replies]
    assert codes.count("approval_pending") == 20
    assert codes.count("too_many_pending") == 80
    _, body = await held.api("GET", "/api/approvals?status=pending&limit=200")
    assert len(body["approvals"]) == 20


async def test_identical_concurrent_calls_from_many_sessions_open_one_request(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Sixteen sessions (a grant's most) send the same held call at once: one approval, all attached."""
    held = await start_held(start_gateway, tmp_path, approvals={"hold_seconds": 0.05})
    async with aiohttp.ClientSession() as http:
        sessions = [RawSession(http, held.url(), TOKEN_A) for _ in range(16)]
        await asyncio.gather(*(s.initialize() for s in sessions))
        params = {"name": "send_email", "arguments": EMAIL}
        replies = await asyncio.wait_for(
            asyncio.gather(*(s.request("tools/call", params) for s in sessions)), WAIT
        )
    ids = {r.last["result"]["_meta"]["approvals"]["approval_id"] for r in replies}
    assert len(ids) == 1


async def test_a_release_the_upstream_never_answers_fails_with_timeout(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An approved call whose upstream never answers ends failed/timeout after call_timeout, the
    upstream is told to cancel it, and the agent's repeat call is told it was sent, not that it
    "has not been made"."""
    policy = {"version": "1", "default": "allow", "tools": {"block": {"action": "require_approval"}}}
    held = await start_held(
        start_gateway,
        tmp_path,
        policy=policy,
        command=PROBE_COMMAND,
        approvals={"hold_seconds": 0.05},
        upstream={"call_timeout": 0.3},
    )
    async with mcp_client(held.url()) as client:
        first = await client.call_tool("block", {"key": "never"})
        approval_id = _meta(first)["approval_id"]
        assert (await held.api("POST", f"/api/approvals/{approval_id}/approve"))[0] == 200
        failed = await held.recorder.status("failed", approval_id)
        assert failed.reason == "timeout"
        again = await asyncio.wait_for(client.call_tool("block", {"key": "never"}), WAIT)
        # The upstream was told the gateway stopped waiting: its work was cancelled, not left running.
        mark = await client.call_tool("await_mark", {"key": "never", "mark": "cancelled"})
        assert mark.content[0].text == "cancelled"  # type: ignore[union-attr]
    meta = _meta(again)
    assert meta["code"] == "upstream_timeout"
    assert json.loads(failed.result_json or "{}")["result"]["isError"] is True
