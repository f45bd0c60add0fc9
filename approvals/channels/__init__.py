"""Where approvals are announced: the notification seam between the queue and Slack, the inbox, …

The queue tells every channel when an approval is created (or comes back for a new look) and when
it reaches a final state. A channel that fails is logged and audited; it never changes a decision
and never blocks the queue: each notification runs in its own task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Literal, Protocol

from approvals.store import ApprovalStore
from approvals.store.records import Approval

log = logging.getLogger(__name__)

Change = Literal["created", "updated"]


class Channel(Protocol):
    name: str

    async def announce(self, approval: Approval, change: Change) -> None:
        """`created`: a new approval (or one back for a new look); `updated`: any other change of state."""
        ...


class Channels:
    """Fan-out to every configured channel, fire and forget."""

    def __init__(self, store: ApprovalStore, channels: Sequence[Channel] = ()) -> None:
        self._store = store
        self.channels = list(channels)
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, channel: Channel) -> None:
        self.channels.append(channel)

    def announce(self, approval: Approval, change: Change) -> None:
        for channel in self.channels:
            task = asyncio.create_task(self._one(channel, approval, change), name=f"notify-{channel.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, channel: Channel, approval: Approval, change: Change) -> None:
        try:
            await channel.announce(approval, change)
        except Exception as exc:  # a channel failing must never affect the approval itself
            log.exception("channel %s failed to announce approval %s", channel.name, approval.id)
            try:
                await self._store.append_audit(
                    approval.id,
                    "notify_failed",
                    actor="gateway",
                    channel=channel.name,
                    args_sha256=approval.args_sha256,
                    detail=f"{type(exc).__name__}: {exc}"[:500],
                )
            except Exception:
                log.exception("could not audit the failed notification of %s", approval.id)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
