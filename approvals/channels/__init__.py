"""Where approvals are announced — Slack, the inbox's live list, … — each following the change feed.

    ChangeFeed ──listen──▶ Channels ──one task per change──▶ channel.announce(approval, change)

Nothing calls a channel by name: `Channels` subscribes to the feed. A *view* (the inbox's live
list, one per process) is told of every change, whichever process made it; a *notifier* (Slack,
which posts once for all processes) only of the changes made in its own process — the store holds
where each message is, so any process can edit it. `created` is a new approval (or one back for a new look),
`updated` any other change of state. A channel that fails is logged and audited; it never changes
a decision and never blocks the feed: each announcement runs in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Literal, Protocol

from approvals.core.model import Approval
from approvals.core.ports import ApprovalStore, Change, ChangeFeed

log = logging.getLogger(__name__)

ChangeKind = Literal["created", "updated"]
_CREATED_EVENTS = frozenset({"created", "tool_changed"})


class Channel(Protocol):
    name: str

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
        """`created`: a new approval (or one back for a new look); `updated`: any other change of state."""
        ...


def kind_of(change: Change) -> ChangeKind:
    return "created" if change.event in _CREATED_EVENTS else "updated"


class Channels:
    """Every channel, told of every change on the feed. Made running by :meth:`start`."""

    def __init__(
        self, store: ApprovalStore, feed: ChangeFeed, views: Sequence[Channel], notifiers: Sequence[Channel]
    ) -> None:
        self._store = store
        self._feed = feed
        self.views = list(views)
        self.notifiers = list(notifiers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._follower: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls,
        store: ApprovalStore,
        feed: ChangeFeed,
        views: Sequence[Channel] = (),
        notifiers: Sequence[Channel] = (),
    ) -> Channels:
        started = cls(store, feed, views, notifiers)
        started._follower = asyncio.create_task(started._follow(), name="channels")
        return started

    async def _follow(self) -> None:
        while True:
            listener = self._feed.listen()
            try:
                async for change in listener:
                    kind = kind_of(change)
                    for channel in (*self.views, *(self.notifiers if change.here else ())):
                        self._announce(channel, change.approval, kind)
            finally:
                listener.close()
            # The listener fell behind and was ended: channels catch up from the store as pages
            # reload and messages are next updated; follow on from here.
            log.warning("channels fell behind the change feed; following on from now")

    def _announce(self, channel: Channel, approval: Approval, change: ChangeKind) -> None:
        task = asyncio.create_task(self._one(channel, approval, change), name=f"notify-{channel.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, channel: Channel, approval: Approval, change: ChangeKind) -> None:
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
        tasks = [*self._tasks, *([self._follower] if self._follower else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
