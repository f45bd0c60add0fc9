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

from approvals.channels import ChangeKind, kind_of
from approvals.core.model import Approval
from approvals.core.ports import ChangeFeed
from approvals.gatekeeper import Gatekeeper
from tests.conftest import BOB_TOKEN, DEMO_COMMAND, WAIT, Running, StartGateway

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
    """Follows the change feed (as the gateway's own channels do) and lets a test wait on what it
    saw, without polling."""

    name = "test-recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[ChangeKind, Approval]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def following(cls, feed: ChangeFeed) -> Recorder:
        """A recorder of every change on `feed` from now on (it stops when the feed closes)."""
        recorder = cls()
        listener = feed.listen()

        async def follow() -> None:
            async for change in listener:
                await recorder.announce(change.approval, kind_of(change))

        recorder._task = asyncio.create_task(follow())
        return recorder

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
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
    running = await start_gateway(upstreams, env=env, **gatekeeper, **extra)
    recorder = Recorder.following(running.service.feed)
    return Held(running, running.gatekeeper, recorder, outbox)
