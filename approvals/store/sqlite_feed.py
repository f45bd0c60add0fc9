"""The change feed of processes that share one SQLite file.

    this process ──publish──▶ LocalFeed ──▶ its watches and listeners, at once
    other process ──commit──▶ SQLite ──poll (data_version, audit after seq)──▶ LocalFeed ──▶ …

SQLite has no notifications, so a poller looks every ``interval`` seconds: one read of ``PRAGMA
data_version``, which changes only when another connection committed, and only then the audit
events since the last look, each published with its approval as it is now. A change this process
made and published itself comes back through the poll too (another process's commit bumps the
version, and the audit log holds both); `SharedFeed` publishes it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from approvals.core.feed import SharedFeed
from approvals.core.ports import Change
from approvals.store.sqlite import SqliteStore

__all__ = ["POLL_SECONDS", "SqliteFeed"]

log = logging.getLogger(__name__)

# How often other processes' changes are looked for: the delay a decision taken in one process
# adds before a call held in another hears of it.
POLL_SECONDS = 0.05


class SqliteFeed(SharedFeed):
    """A LocalFeed that also publishes what other processes commit to the same SQLite file."""

    def __init__(self, store: SqliteStore, after_seq: int, interval: float) -> None:
        super().__init__()
        self._store = store
        self._seq = after_seq
        self._data_version: int | None = None
        self._interval = interval
        self._poller: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, store: SqliteStore, interval: float = POLL_SECONDS) -> SqliteFeed:
        """The feed, following changes from now on."""
        feed = cls(store, await store.last_audit_seq(), interval)
        feed._poller = asyncio.create_task(feed._poll_forever(), name="sqlite-change-feed")
        return feed

    async def poll(self) -> None:
        """One look for other processes' changes (the poller's step; tests call it directly)."""
        self._data_version, self._seq, changes = await self._store.changes_after(
            self._seq, self._data_version
        )
        for event, approval in changes:
            self.publish(Change(approval, event, here=False))

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a store hiccup must not end the feed: look again shortly
                log.exception("reading other processes' approval changes failed")
            await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        """Stop polling and end every listener."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self.close()
