"""The change feed inside one process: every publish reaches every watch and listener at once.

    service ──publish(Change)──▶ LocalFeed ──▶ watches of that approval (held calls, task polls)
                                           └─▶ listeners (the inbox's live list, Slack, …)

Watches are kept per approval id, so ten thousand held calls cost a dict look-up per change, not
a scan. A store shared by several processes wraps this feed with a poller that publishes the
changes other processes made (``approvals.store.sqlite_feed``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from approvals.core.model import FINAL, Approval
from approvals.core.ports import Change

__all__ = ["LISTENER_BACKLOG", "LocalFeed", "SharedFeed"]

# Changes a listener may fall behind by before it is ended (its owner starts over from the store).
LISTENER_BACKLOG = 10_000


class _Watch:
    __slots__ = ("_feed", "_final", "latest")

    def __init__(self, feed: LocalFeed, approval: Approval) -> None:
        self._feed = feed
        self.latest = approval
        self._final: asyncio.Future[Change] = asyncio.get_running_loop().create_future()
        if approval.status in FINAL:
            self._final.set_result(Change(approval, approval.status))

    def push(self, change: Change) -> None:
        if change.approval.version < self.latest.version or self._final.done():
            return  # older than what is known (another process's change arriving late)
        self.latest = change.approval
        if change.approval.status in FINAL:
            self._final.set_result(change)

    async def final(self, timeout: float) -> Change | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._final), timeout)
        return None

    def close(self) -> None:
        self._feed._unwatch(self)


class _Listener:
    __slots__ = ("_feed", "_items", "_overflowed", "_waiter")

    def __init__(self, feed: LocalFeed) -> None:
        self._feed = feed
        self._items: collections.deque[Change | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False

    def push(self, item: Change | None) -> None:
        if self._overflowed:
            return
        if item is not None and len(self._items) >= LISTENER_BACKLOG:
            self._overflowed = True
            item = None  # too far behind: end, rather than grow without bound
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[Change]:
        while True:
            while not self._items:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._items.popleft()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self._feed._listeners.discard(self)
        self.push(None)


class LocalFeed:
    """The in-process ChangeFeed."""

    def __init__(self) -> None:
        self._watches: dict[str, set[_Watch]] = {}
        self._listeners: set[_Listener] = set()

    def publish(self, change: Change) -> None:
        for watch in self._watches.get(change.approval.id, ()):
            watch.push(change)
        for listener in self._listeners:
            listener.push(change)

    def watch(self, approval: Approval) -> _Watch:
        watch = _Watch(self, approval)
        self._watches.setdefault(approval.id, set()).add(watch)
        return watch

    def _unwatch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.latest.id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.latest.id]  # the map holds only approvals being watched

    def listen(self) -> _Listener:
        listener = _Listener(self)
        self._listeners.add(listener)
        return listener

    def watched(self) -> int:
        """How many approvals are being watched now (for health and tests of boundedness)."""
        return len(self._watches)

    def close(self) -> None:
        """End every listener (shutdown)."""
        for listener in list(self._listeners):
            listener.close()


class SharedFeed(LocalFeed):
    """A LocalFeed for processes that share a store: an adapter also publishes, here, the changes
    other processes made. A change this process published itself may come back that way too; it is
    published once: (approval, version) pairs already published are remembered, a bounded number."""

    REMEMBERED = 4096  # a few looks' worth of a burst; forgetting costs a harmless repeat

    def __init__(self) -> None:
        super().__init__()
        self._published: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def publish(self, change: Change) -> None:
        key = (change.approval.id, change.approval.version)
        if key in self._published:
            return
        self._published[key] = None
        if len(self._published) > self.REMEMBERED:
            self._published.popitem(last=False)
        super().publish(change)

    async def aclose(self) -> None:
        """Stop hearing other processes (the adapter's part), then end every listener."""
        self.close()

    def watched_ids(self) -> list[str]:
        """The approvals followed in this process (to re-read after missing changes)."""
        return list(self._watches)
