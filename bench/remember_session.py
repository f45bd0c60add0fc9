"""One agent's session in which a remembered grant turns 50 prompts into 1:
`python bench/remember_session.py [--calls 50]`.

Starts a gateway in this process on 127.0.0.1 (a free port), on a temporary directory with its
SQLite store, in front of the bundled demo upstream (stdio), with a policy that holds every
`send_email` for approval. One agent (the `mcp` SDK's `Client`) sends 50 emails to ops-0@…,
ops-1@…, … The first is held; a reviewer approves it through the JSON API with `remember` — for
1 h, at most 100 uses, `to` starting with "ops-" and any subject and body — and the other 49 go
through on that standing grant without asking anyone.

Prints the prompts reviewers got (approval requests created: 1), the calls the grant allowed (49),
what the demo upstream sent (50), and the audit log lines behind them (GET /api/audit) compactly;
exits 1 unless the numbers are 1 and 49 (and 50 sent). tests/test_review_workflows.py runs the
same session in process (`run_session`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from approvals.config import parse_settings, sha256_hex
from approvals.core.ports import Change
from approvals.web.app import create_app
from approvals.web.keys import SERVICE

WAIT = 30.0  # the bound on every wait
TOOL = "send_email"
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {TOOL: {"action": "require_approval", "approval": {"timeout": "15m"}}},
}
# What the reviewer remembers: this agent's emails to ops-*, whatever the subject and body.
REMEMBER = {
    "for": "1h",
    "max_uses": 100,
    "constraints": [
        {"field": "to", "op": "prefix", "value": "ops-"},
        {"field": "subject", "op": "any"},
        {"field": "body", "op": "any"},
    ],
}
SHOWN_USES = 3  # "used" lines printed in full; the rest are counted


@dataclass
class Report:
    """What the session came to."""

    calls: int  # calls the agent made
    prompts: int = 0  # approval requests created (what reviewers were asked)
    allowed_by_grant: int = 0  # calls answered with _meta.approvals.code "allowed_by_standing_grant"
    sent: int = 0  # emails the demo upstream really queued (its outbox)
    grant_id: str = ""
    audit: list[dict[str, Any]] = field(default_factory=list)
    # What the agent waited for each call the grant let through (its whole round trip, the demo
    # upstream included): no reviewer in the loop.
    granted_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """One prompt, every other call allowed by the grant, and every call sent once."""
        return (self.prompts, self.allowed_by_grant, self.sent) == (1, self.calls - 1, self.calls)


def email(n: int) -> dict[str, str]:
    return {"to": f"ops-{n}@example.com", "subject": f"Deploy {n} finished", "body": f"Build {n} is live."}


async def run_session(workdir: Path, calls: int = 50, echo: Callable[[str], None] = print) -> Report:
    """The session on a gateway in ``workdir``: ``calls`` emails, the first approved with remember."""
    agent_token, reviewer_token = secrets.token_hex(16), secrets.token_hex(16)
    outbox = workdir / "outbox.jsonl"
    (workdir / "policy.json").write_text(json.dumps(POLICY))
    settings = parse_settings(
        {
            "server": {"host": "127.0.0.1", "port": 0, "public_url": "http://127.0.0.1:8080"},
            "store": {"path": str(workdir / "approvals.db")},
            "upstreams": {
                "demo": {
                    "command": [sys.executable, "-m", "approvals.demo_server"],
                    "policy": "policy.json",
                    "env": {"APPROVALS_DEMO_OUTBOX": str(outbox)},
                }
            },
            "grants": [{"name": "deploy-bot", "token_sha256": sha256_hex(agent_token), "owner": "alice"}],
            "reviewers": [
                {"name": "alice", "token_sha256": sha256_hex(secrets.token_hex(16))},  # runs the agent
                {"name": "bob", "token_sha256": sha256_hex(reviewer_token)},
            ],
        },
        workdir / "gateway.toml",
        env={},
    )
    app = await create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        # The reviewer hears of the request as the inbox and Slack do: on the change feed.
        listener = app[SERVICE].feed.listen()
        report = Report(calls)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {reviewer_token}"}) as api:
            async with agent(f"{base}/mcp/demo", agent_token) as client:
                first = asyncio.create_task(client.call_tool(TOOL, email(0)))
                created = await asyncio.wait_for(_first_created(listener), WAIT)
                listener.close()
                echo(f"reviewer asked: approval {created.approval.id} for {TOOL} to {email(0)['to']}")
                async with api.post(
                    f"{base}/api/approvals/{created.approval.id}/approve",
                    json={"reason": "routine deploy notices to ops", "remember": REMEMBER},
                ) as response:
                    decided = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"approve-and-remember refused: {response.status} {decided}")
                report.grant_id = decided["standing_grant"]["id"]
                described = "; ".join(decided["standing_grant"]["described"])
                echo(f"bob approved and remembered it: {report.grant_id} ({described})")
                result = await asyncio.wait_for(first, WAIT)
                if result.is_error:
                    raise RuntimeError(f"the approved call failed: {result.content}")
                for n in range(1, calls):
                    started = time.perf_counter()
                    result = await client.call_tool(TOOL, email(n))
                    report.granted_seconds.append(time.perf_counter() - started)
                    meta = result.model_dump(by_alias=True).get("_meta") or {}
                    if (
                        not result.is_error
                        and meta.get("approvals", {}).get("code") == "allowed_by_standing_grant"
                    ):
                        report.allowed_by_grant += 1
            async with api.get(f"{base}/api/approvals?limit=500") as response:
                report.prompts = len((await response.json())["approvals"])
            async with api.get(f"{base}/api/audit?limit=1000") as response:
                report.audit = (await response.json())["events"]
        report.sent = len(outbox.read_text().splitlines()) if outbox.exists() else 0
    finally:
        await runner.cleanup()
    for line in summary(report):
        echo(line)
    return report


@asynccontextmanager
async def agent(url: str, token: str) -> AsyncIterator[Client]:
    """The SDK's Client in its default auto mode, over Streamable HTTP with the agent's token."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(WAIT))
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


async def _first_created(listener: Any) -> Change:
    async for change in listener:
        if change.event == "created":
            return change  # type: ignore[no-any-return]
    raise RuntimeError("the change feed ended before any request was created")


def summary(report: Report) -> list[str]:
    """The numbers, and the audit log lines behind them (the "used" ones counted past the first few)."""
    lines = [
        f"calls made by the agent:               {report.calls}",
        f"prompts to reviewers (requests made):  {report.prompts}",
        f"calls allowed by the standing grant:   {report.allowed_by_grant}",
        f"emails the upstream sent:              {report.sent}",
    ]
    if report.granted_seconds:
        waits = sorted(report.granted_seconds)
        p50, p95 = waits[len(waits) // 2], waits[min(len(waits) - 1, int(len(waits) * 0.95))]
        lines.append(
            f"what the agent waited per call the grant allowed: p50 {p50 * 1000:.1f} ms,"
            f" p95 {p95 * 1000:.1f} ms (no reviewer; the demo upstream over stdio included)"
        )
    lines.append("audit log (GET /api/audit):")
    used = 0
    for event in report.audit:
        if event["event"] == "used":
            used += 1
            if used > SHOWN_USES:
                continue
        detail = f"  {event['detail']}" if event["detail"] else ""
        lines.append(
            f"  #{event['seq']:<3} {event['event']:<9} {event['approval_id'][:11]}…  by {event['actor']} "
            f"via {event['channel']}{detail}"
        )
    if used > SHOWN_USES:
        lines.append(f'  … and {used - SHOWN_USES} more "used" lines ({used} in all) on {report.grant_id}')
    verdict = (
        f"OK: {report.calls} prompts became 1"
        if report.ok
        else (f"UNEXPECTED: expected 1 prompt and {report.calls - 1} calls allowed by the grant")
    )
    lines.append(verdict)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="emails the agent sends (default 50)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="approvals-remember-") as workdir:
        report = asyncio.run(run_session(Path(workdir), options.calls))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
