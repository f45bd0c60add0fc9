"""The inbox's state that every replica shares: used login links, ended sessions, the signing key.

    open a login link ──use_login_link──▶ store (insert if absent): True once, whichever replica
    log out ──end_inbox_session──▶ store ──refresh, once a second──▶ every replica's copy
    every inbox request ──session_ended(id)──▶ this replica's copy, in memory: no round trip

Login links are rare, so each use is one write to the store, and the store decides: a link used on
one replica is refused on every other, and after a restart. Sessions are checked on every inbox
request (pages, the live feed, exports, and again as the cookie slides), by a synchronous
``InboxAuth.session``; so each replica keeps the ended sessions in memory and refreshes them from
the store every ``REFRESH_SECONDS``. The set is small (sessions logged out before their cookie
expires), the refresh is one query a second per replica whatever the traffic, the replica that
served a logout refuses the cookie at once, and the others within a second. LISTEN/NOTIFY would be
immediate, but needs a connection of its own and a reconnect that reads everything again anyway,
which is this refresh; one mechanism for every store is simpler to trust.

Failing closed: when the copy could not be refreshed for ``STALE_SECONDS`` (the database is
unreachable), a logout on another replica might be unseen, so every session is refused and the
login forms say why (``fresh`` is False) until a refresh succeeds.

Rows carry the expiry of what they record (the link's, the session's latest possible one) and are
pruned ``PRUNE_GRACE_SECONDS`` after it, a margin for replicas whose clocks disagree.

The key that signs cookies and links is derived from the gateway's secret
(`approvals.gateway_secret`): ``APPROVALS_SESSION_SECRET``, else one kept in the shared database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["InboxState", "InboxStateStore"]

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
STALE_SECONDS = 10.0  # no good refresh for this long: every session is refused
PRUNE_EVERY_SECONDS = 600.0
PRUNE_GRACE_SECONDS = 3600.0


@runtime_checkable
class InboxStateStore(Protocol):
    """Where the used login links and ended sessions live (the gateway's store, every replica's)."""

    async def use_login_link(self, nonce: str, expires_at: float) -> bool:
        """Record the link as used; False when it was used already (on any replica), atomically."""
        ...

    async def login_link_used(self, nonce: str) -> bool:
        """Whether the link was used (by the confirmation page, which must not use it up)."""
        ...

    async def end_inbox_session(self, session_id: str, expires_at: float) -> None:
        """Record a session as ended until ``expires_at`` (a later expiry of the same id wins)."""
        ...

    async def ended_inbox_sessions(self, now: float) -> dict[str, float]:
        """Every ended session whose record has not expired by ``now``, with its expiry."""
        ...

    async def prune_inbox_state(self, before: float) -> int:
        """Delete the used links and ended sessions that expired before ``before``; how many."""
        ...


class InboxState:
    """This replica's view of the shared state: ended sessions in memory, links in the store."""

    def __init__(
        self,
        store: InboxStateStore,
        clock: Callable[[], float] = time.time,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock  # the gateway's clock, which the records' expiries are in
        self._monotonic = monotonic  # how long since the last refresh, whatever a test does to `clock`
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self._ended: dict[str, float] = {}
        self._fresh_at = monotonic()
        self._pruned_at = monotonic()
        self._started = 0  # refreshes begun, and the last that ended well (for next_refresh)
        self._finished = 0
        self._refreshed = asyncio.Condition()
        self._keeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        store: InboxStateStore,
        clock: Callable[[], float] = time.time,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> InboxState:
        """The state, read once from the store and kept fresh (raises StoreError when unreachable)."""
        state = cls(store, clock, refresh_seconds=refresh_seconds, monotonic=monotonic)
        await state.refresh()
        state._keeper = asyncio.create_task(state._keep_fresh(), name="inbox-state-refresh")
        return state

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None

    # ---- sessions -----------------------------------------------------------------------------

    @property
    def fresh(self) -> bool:
        """Whether logouts on other replicas are known (always, for a state that is not kept fresh)."""
        return self._keeper is None or self._monotonic() - self._fresh_at < self.stale_seconds

    def session_ended(self, session_id: str) -> bool:
        """Whether the session was logged out (or cannot be known not to be: failing closed)."""
        return session_id in self._ended or not self.fresh

    async def end_session(self, session_id: str, expires_at: float) -> None:
        """Log a session out on every replica: here at once, elsewhere at their next refresh."""
        await self._store.end_inbox_session(session_id, expires_at)
        self._ended[session_id] = max(expires_at, self._ended.get(session_id, expires_at))

    async def refresh(self) -> None:
        """Read the ended sessions from the store (one query), adding to what is known here."""
        self._started += 1
        number, began = self._started, self._monotonic()
        now = self._clock()
        rows = await self._store.ended_inbox_sessions(now)
        # Merged, never replaced: a logout served here while the query ran is kept.
        merged = {**self._ended, **rows}
        self._ended = {sid: exp for sid, exp in merged.items() if exp > now}
        self._fresh_at = max(self._fresh_at, began)
        async with self._refreshed:
            self._finished = max(self._finished, number)
            self._refreshed.notify_all()

    async def next_refresh(self) -> None:
        """Wait until a refresh begun after this call has ended well (what a logout elsewhere needs)."""
        target = self._started + 1
        async with self._refreshed:
            await self._refreshed.wait_for(lambda: self._finished >= target)

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
                if self._monotonic() - self._pruned_at >= PRUNE_EVERY_SECONDS:
                    self._pruned_at = self._monotonic()
                    await self._store.prune_inbox_state(self._clock() - PRUNE_GRACE_SECONDS)
            except Exception:  # the top of a task: it must outlive a database outage
                log.exception("the inbox could not refresh its ended sessions from the store")

    # ---- login links --------------------------------------------------------------------------

    async def use_login_link(self, nonce: str, expires_at: float) -> bool:
        """Use a login link up, on every replica; False when it was used already."""
        return await self._store.use_login_link(nonce, expires_at)

    async def login_link_used(self, nonce: str) -> bool:
        return await self._store.login_link_used(nonce)
