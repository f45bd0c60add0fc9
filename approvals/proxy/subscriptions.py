"""`subscriptions/listen` streams (2026-07-28): their bound per grant, and the fan-out that serves
them from an initialize-era upstream session.

Each stream holds an upstream connection open for as long as the client keeps it, so one grant
may not open them without end (`ListenLimit`). A client that goes away without a word is noticed
on the next write to its stream: the upstream's next notification, or the keepalive comment sent
after `keepalive_seconds` of quiet. Its slot, and the upstream's stream, are given back then.

In front of an initialize-era upstream, the notifications a listen stream carries are those the
grant's pooled session gets outside any request (its list changes): `Fanout` reads them from the
session as its one client stream and hands each to every listen stream on that session.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from contextlib import contextmanager

from approvals.jsonrpc import INVALID_REQUEST, JsonObject, RequestId, error_response
from approvals.proxy.session import Outbox, Session, refuse_upstream_request

MAX_LISTENS_PER_GRANT = 8  # open subscriptions/listen streams per grant, in one process
KEEPALIVE_SECONDS = 15.0


class ListenLimit:
    """Open `subscriptions/listen` streams per grant: each holds an upstream connection open."""

    def __init__(
        self, per_grant: int = MAX_LISTENS_PER_GRANT, keepalive_seconds: float = KEEPALIVE_SECONDS
    ) -> None:
        self.per_grant = per_grant
        self.keepalive_seconds = keepalive_seconds
        self.open: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    @contextmanager
    def slot(self, grant: str) -> Iterator[bool]:
        """Yields whether the grant may open one more; the slot is given back at the end."""
        if self.open[grant] >= self.per_grant:
            yield False
            return
        self.open[grant] += 1
        try:
            yield True
        finally:
            self.open[grant] -= 1
            if not self.open[grant]:
                del self.open[grant]
            asyncio.get_running_loop().create_task(self._notify())

    def refusal(self, request_id: RequestId) -> JsonObject:
        """The error for a listen request over the bound (HTTP 429)."""
        return error_response(
            request_id,
            INVALID_REQUEST,
            f"this grant has {self.per_grant} subscriptions/listen streams open, the most the gateway"
            " allows; close one first",
        )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, grant: str, count: int) -> None:
        """Until `grant` has `count` streams open (for tests and shutdown; no polling)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.open[grant] == count)


MAX_LISTENER_BACKLOG = 256  # notifications a listen stream may fall behind before it is ended


class Fanout:
    """One pooled session's notifications outside any request, to every listen stream on it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._outbox = session.open_stream()
        self._listeners: set[Outbox] = set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"fanout-{session.id[:8]}")

    def join(self) -> Outbox:
        """A listener's outbox: every notification from now on; None when the session ends."""
        listener = Outbox()
        self._listeners.add(listener)
        return listener

    def leave(self, listener: Outbox) -> bool:
        """Stop delivering to `listener`; True when no listener is left (the fan-out is ended)."""
        self._listeners.discard(listener)
        if self._listeners:
            return False
        self.session.close_stream(self._outbox)
        self._outbox.put_nowait(None)
        return True

    async def _run(self) -> None:
        while (message := await self._outbox.get()) is not None:
            if "id" in message:  # a request of the upstream's own: no listen stream can answer it
                refuse_upstream_request(self.session, message)
                continue
            for listener in list(self._listeners):
                if len(listener) >= MAX_LISTENER_BACKLOG:
                    # A client that does not read: its stream ends (it listens again and refetches).
                    self._listeners.discard(listener)
                    listener.put_nowait(None)
                else:
                    listener.put_nowait(message)
        for listener in self._listeners:
            listener.put_nowait(None)


class Fanouts:
    """The fan-out of each pooled session that has listen streams."""

    def __init__(self) -> None:
        self._by_session: dict[str, Fanout] = {}

    def join(self, session: Session) -> tuple[Fanout, Outbox]:
        fanout = self._by_session.get(session.id)
        if fanout is None or fanout.session is not session:
            fanout = self._by_session[session.id] = Fanout(session)
        return fanout, fanout.join()

    def leave(self, fanout: Fanout, listener: Outbox) -> None:
        if fanout.leave(listener) and self._by_session.get(fanout.session.id) is fanout:
            del self._by_session[fanout.session.id]


def honored(requested: JsonObject, server: JsonObject) -> JsonObject:
    """The part of a listen filter the gateway keeps: the list changes the upstream announces.

    Resource subscriptions (`resources/subscribe` in the upstream's era) are not bridged: the
    acknowledgement leaves them out, as the spec has it for what a server does not honor.
    """
    capabilities = server.get("capabilities")
    capabilities = capabilities if isinstance(capabilities, dict) else {}
    kept: JsonObject = {}
    for field, (_, capability) in LIST_CHANGES.items():
        declared = capabilities.get(capability)
        if (
            requested.get(field) is True
            and isinstance(declared, dict)
            and declared.get("listChanged") is True
        ):
            kept[field] = True
    return kept


# A listen filter's field → the notification it lets through, and the capability announcing it.
LIST_CHANGES = {
    "toolsListChanged": ("notifications/tools/list_changed", "tools"),
    "promptsListChanged": ("notifications/prompts/list_changed", "prompts"),
    "resourcesListChanged": ("notifications/resources/list_changed", "resources"),
}


def wanted(kept: JsonObject) -> frozenset[str]:
    """The notification methods a kept filter lets through."""
    return frozenset(method for field, (method, _) in LIST_CHANGES.items() if kept.get(field) is True)
