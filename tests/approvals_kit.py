"""Shared parts for approval tests: a gateway whose policy holds calls, and a channel to wait on."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from approvals.channels import Change
from approvals.gatekeeper import Gatekeeper
from approvals.store.records import Approval
from tests.conftest import BOB_TOKEN, DEMO_COMMAND, WAIT, Running, StartGateway, settings_for

HELD_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "send_email": {"action": "require_approval"},
        "get_time": {},
        "list_files": {},
    },
}


class Recorder:
    """A channel that lets a test wait, without polling, for what the queue announces."""

    name = "test-recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[Change, Approval]] = []
        self._changed = asyncio.Condition()

    async def announce(self, approval: Approval, change: Change) -> None:
        async with self._changed:
            self.seen.append((change, approval))
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Approval], bool], timeout: float = WAIT) -> Approval:
        """The first announced approval (past or future) matching `predicate`."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for _, approval in self.seen:
                    if predicate(approval):
                        return approval
                await self._changed.wait()

    async def status(self, status: str, approval_id: str | None = None) -> Approval:
        return await self.wait_for(lambda a: a.status == status and approval_id in (None, a.id))


@dataclass
class Held:
    """A gateway whose policy requires approval for send_email, and what to watch it with."""

    gateway: Running
    gate: Gatekeeper
    recorder: Recorder
    outbox: Path

    def url(self) -> str:
        return self.gateway.url("demo")

    def sent(self) -> list[dict[str, Any]]:
        """What the demo upstream really sent (its outbox)."""
        if not self.outbox.exists():
            return []
        return [json.loads(line) for line in self.outbox.read_text().splitlines()]

    async def api(self, method: str, path: str, token: str = BOB_TOKEN, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method, f"{self.gateway.base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
            ) as response,
        ):
            return response.status, await response.json()


StartHeld = Callable[..., Awaitable[Held]]


async def start_held(
    start_gateway: StartGateway,
    tmp_path: Path,
    policy: dict[str, Any] | None = None,
    command: list[str] = DEMO_COMMAND,
    approvals: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **gatekeeper: Any,
) -> Held:
    """The gateway on the demo upstream (or `command`) with `policy`, and a recorder on its queue.

    `approvals` adds to the [approvals] table, `upstream` to the upstream's own table.
    """
    outbox = tmp_path / "outbox.jsonl"
    (tmp_path / "policy.json").write_text(json.dumps(policy or HELD_POLICY))
    env = {**os.environ, "APPROVALS_DEMO_OUTBOX": str(outbox)}
    upstreams = {
        "demo": {
            "command": command,
            "policy": "policy.json",
            "env": {"APPROVALS_DEMO_OUTBOX": str(outbox)},
            **(upstream or {}),
        }
    }
    extra = {"approvals": {"hold_seconds": 10, **(approvals or {})}}
    gate = Gatekeeper(settings_for(tmp_path, upstreams, env, **extra), **gatekeeper)
    recorder = Recorder()
    gate.channel_list.append(recorder)
    running = await start_gateway(upstreams, gate=gate, env=env, **extra)
    return Held(running, gate, recorder, outbox)
