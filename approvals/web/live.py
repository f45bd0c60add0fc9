"""The inbox's live feed: a notification channel that streams changes to open pages (server-sent events).

    queue ──announce(approval, change)──▶ LiveFeed ──▶ one bounded queue per open page ──▶ SSE

Each page subscribes with its filters. On connect it first gets a `snapshot` (what matches now),
then `created` / `updated` events, each one approval as JSON; the page builds its DOM from them
with textContent only. A page that falls too far behind is disconnected (its browser reconnects and
gets a fresh snapshot) rather than letting its queue grow. Announcing never blocks the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from approvals.channels import ChangeKind
from approvals.core.model import Approval

BACKLOG = 256  # events a slow page may fall behind before it is disconnected
HEARTBEAT_SECONDS = 15.0
RETRY_MS = 3000


@dataclass(frozen=True, slots=True)
class Filters:
    """What a page shows: every given field must match (the same query string as the page's)."""

    upstream: str | None = None
    tool: str | None = None
    agent: str | None = None
    approval_id: str | None = None

    def query(self) -> str:
        """The list filters as a page's query string ("?tool=x&agent=y"; "" when none is set)."""
        given = {"upstream": self.upstream, "tool": self.tool, "agent": self.agent}
        present = {name: value for name, value in given.items() if value}
        return f"?{urlencode(present)}" if present else ""

    def matches(self, approval: Approval) -> bool:
        return (
            self.upstream in (None, approval.upstream)
            and self.tool in (None, approval.tool)
            and self.agent in (None, approval.grant)
            and self.approval_id in (None, approval.id)
        )


class _Subscriber:
    def __init__(self, filters: Filters) -> None:
        self.filters = filters
        self.events: asyncio.Queue[tuple[ChangeKind, Approval] | None] = asyncio.Queue(BACKLOG)
        self.ended = False

    def push(self, item: tuple[ChangeKind, Approval] | None) -> None:
        try:
            self.events.put_nowait(item)
        except asyncio.QueueFull:
            self.ended = True  # too far behind: end the stream; the browser reconnects and resyncs
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.events.put_nowait(None)


class LiveFeed:
    """The inbox's Channel: fans approvals out to every open page whose filters they match."""

    name = "inbox"

    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()
        self._closed = False

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.ended and subscriber.filters.matches(approval):
                subscriber.push((change, approval))

    @contextlib.contextmanager
    def subscription(self, filters: Filters) -> Iterator[_Subscriber]:
        subscriber = _Subscriber(filters)
        if self._closed:
            subscriber.push(None)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    async def close(self, _app: web.Application | None = None) -> None:
        """End every stream (on shutdown, so open pages do not hold the server up)."""
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.push(None)

    async def stream(
        self,
        request: web.Request,
        filters: Filters,
        snapshot: Callable[[], Awaitable[dict[str, Any]]],
        item: Callable[[Approval], Awaitable[dict[str, Any]]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Serve one page's event stream until it leaves or the server stops."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
                **headers,
            }
        )
        # Subscribe before reading the snapshot, so nothing that happens in between is missed
        # (an event already in the snapshot arrives again; pages apply events idempotently).
        with self.subscription(filters) as subscriber:
            await response.prepare(request)
            try:
                await response.write(f"retry: {RETRY_MS}\n\n".encode())
                await _send(response, "snapshot", await snapshot())
                while True:
                    try:
                        event = await asyncio.wait_for(subscriber.events.get(), HEARTBEAT_SECONDS)
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")  # also finds pages that left
                        continue
                    if event is None:
                        break
                    change, approval = event
                    await _send(response, change, await item(approval))
            except ConnectionResetError:
                pass  # the page went away
        return response


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    # json.dumps never emits a raw line break, so one `data:` line always carries the whole event.
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    await response.write(f"event: {event}\ndata: {text}\n\n".encode())
