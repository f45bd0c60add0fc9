"""The change feed of replicas that share one PostgreSQL database.

    this replica ──publish──▶ SharedFeed ──▶ its watches and listeners, at once
    any replica ──COMMIT (NOTIFY approvals 'id:version:event')──▶ LISTEN ──read the record──▶ …

One connection of its own listens. When it drops (a restart of the database, a terminated
backend), the feed reconnects with a growing pause, and then re-reads every approval this replica
is following and publishes it as it is now: a decision taken while the feed was deaf still reaches
the call held here. Listeners (the inbox, Slack) are views of the store and catch up as they do
after any gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from approvals.core.feed import SharedFeed
from approvals.core.ports import Change
from approvals.errors import StoreError
from approvals.store.postgres import CHANNEL, PostgresStore

__all__ = ["PostgresFeed"]

log = logging.getLogger(__name__)

RECONNECT_FIRST_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 5.0


class PostgresFeed(SharedFeed):
    """A LocalFeed that also publishes what any replica commits, through LISTEN/NOTIFY."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__()
        self._store = store
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, store: PostgresStore) -> PostgresFeed:
        """The feed, listening (raises StoreError when the database cannot be reached)."""
        feed = cls(store)
        await feed._listen()
        feed._keeper = asyncio.create_task(feed._keep_listening(), name="postgres-change-feed")
        return feed

    async def _listen(self) -> None:
        try:
            conn = await asyncpg.connect(self._store.url)
            await conn.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot listen for approval changes: {exc}") from exc
        conn.add_termination_listener(lambda _: self._lost.set())
        self._conn = conn
        self._lost.clear()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        approval_id, _, rest = str(payload).partition(":")
        version_text, _, event = rest.partition(":")
        if not version_text.isdigit() or (approval_id, int(version_text)) in self._published:
            return  # published here already (this replica made it), or not ours to read
        self._read(approval_id, event)

    def _read(self, approval_id: str, event: str) -> None:
        task = asyncio.create_task(self._publish_current(approval_id, event))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _publish_current(self, approval_id: str, event: str) -> None:
        try:
            approval = await self._store.get_approval(approval_id)
        except StoreError:
            log.exception("reading approval %s after its change was announced failed", approval_id)
            self._lost.set()  # treat as a gap: everything followed is read again on reconnect
            return
        if approval is not None:
            self.publish(Change(approval, event, here=False))

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("the approval change feed lost its database connection; reconnecting")
            pause = RECONNECT_FIRST_SECONDS
            while True:
                try:
                    await self._listen()
                    break
                except StoreError as exc:
                    log.warning("reconnecting the change feed failed (%s); again in %.2f s", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RECONNECT_MAX_SECONDS)
            # Changes committed while deaf: what this replica follows is read as it is now.
            for approval_id in self.watched_ids():
                self._read(approval_id, "reconnected")

    async def aclose(self) -> None:
        """Stop listening and end every listener."""
        tasks = [*self._reads, *([self._keeper] if self._keeper else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self.close()
