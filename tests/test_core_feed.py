"""The in-process change feed (LocalFeed): watches of one approval and listeners of every change."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from approvals.core import feed as feed_module
from approvals.core.feed import LocalFeed
from approvals.core.model import Approval, Status
from approvals.core.ports import Change, Listener
from tests.test_store_approvals import make_approval

WAIT = 30.0


def at(approval: Approval, status: Status, version: int) -> Change:
    """The change that brought ``approval`` to ``status`` at ``version``."""
    return Change(dataclasses.replace(approval, status=status, version=version), status)


async def drain(listener: Listener) -> list[Change]:
    """Every change the listener yields until it ends (bounded)."""
    async with asyncio.timeout(WAIT):
        return [change async for change in listener]


async def test_watch_follows_changes_and_resolves_with_the_final_one() -> None:
    """A watch tracks the newest state and resolves with the change that made the approval final."""
    feed = LocalFeed()
    approval = make_approval()
    watch = feed.watch(approval)
    feed.publish(at(approval, "approved", 1))
    assert watch.latest.status == "approved"
    assert await watch.final(0) is None
    feed.publish(at(make_approval(), "denied", 1))  # another approval's change is not this watch's
    assert await watch.final(0) is None
    done = at(approval, "released", 2), at(approval, "completed", 3)
    for change in done:
        feed.publish(change)
    assert await watch.final(WAIT) == done[-1]
    assert watch.latest == done[-1].approval
    watch.close()


async def test_watch_ignores_changes_older_than_what_it_knows() -> None:
    """A change of an older version (another process's, arriving late) moves nothing, final or not."""
    feed = LocalFeed()
    approval = make_approval(status="approved", version=2)
    watch = feed.watch(approval)
    feed.publish(at(approval, "denied", 1))
    feed.publish(at(approval, "pending", 1))
    assert watch.latest == approval
    assert await watch.final(0) is None
    feed.publish(at(approval, "expired", 3))
    change = await watch.final(WAIT)
    assert change is not None
    assert (change.approval.status, change.approval.version) == ("expired", 3)
    watch.close()


async def test_watch_ignores_changes_after_the_final_one() -> None:
    """Once final, the watch's answer and latest state stay what they were."""
    feed = LocalFeed()
    approval = make_approval()
    watch = feed.watch(approval)
    denied = at(approval, "denied", 1)
    feed.publish(denied)
    feed.publish(at(approval, "expired", 2))
    assert await watch.final(0) == denied
    assert watch.latest == denied.approval
    watch.close()


async def test_watch_on_an_already_final_approval_resolves_at_once() -> None:
    """Following a record read as final answers at once, with the record as read."""
    feed = LocalFeed()
    approval = make_approval(status="cancelled", version=1)
    watch = feed.watch(approval)
    change = await watch.final(0)
    assert change is not None
    assert (change.approval, change.event) == (approval, "cancelled")
    watch.close()


async def test_every_watch_of_an_approval_gets_its_final_change() -> None:
    """Two calls held on one approval both hear the decision."""
    feed = LocalFeed()
    approval = make_approval()
    first, second = feed.watch(approval), feed.watch(approval)
    waiting = asyncio.gather(first.final(WAIT), second.final(WAIT))
    denied = at(approval, "denied", 1)
    feed.publish(denied)
    assert list(await waiting) == [denied, denied]


async def test_closing_every_watch_returns_the_map_to_empty() -> None:
    """Watches are kept per approval only while one is open; closing twice is harmless."""
    feed = LocalFeed()
    one, other = make_approval(), make_approval()
    watches = [feed.watch(one), feed.watch(one), feed.watch(other)]
    assert feed.watched() == 2
    watches[0].close()
    assert feed.watched() == 2
    watches[2].close()
    assert feed.watched() == 1
    watches[1].close()
    watches[1].close()
    assert feed.watched() == 0
    feed.publish(at(one, "denied", 1))  # nobody watches: nothing kept
    assert feed.watched() == 0


async def test_listener_gets_every_change_in_order_and_ends_at_close() -> None:
    """A listener hears every change published after it began, in order, until the feed closes."""
    feed = LocalFeed()
    approval = make_approval()
    feed.publish(at(approval, "approved", 1))  # before the listener: not heard
    listener = feed.listen()
    changes = [at(approval, "released", 2), at(make_approval(), "denied", 1), at(approval, "failed", 3)]
    for change in changes:
        feed.publish(change)
    feed.close()
    assert await drain(listener) == changes


async def test_a_closed_listener_ends_and_the_others_go_on() -> None:
    """Closing one listener ends it alone; it hears nothing after its close."""
    feed = LocalFeed()
    approval = make_approval()
    leaving, staying = feed.listen(), feed.listen()
    first = at(approval, "approved", 1)
    feed.publish(first)
    leaving.close()
    second = at(approval, "released", 2)
    feed.publish(second)
    feed.close()
    assert await drain(leaving) == [first]
    assert await drain(staying) == [first, second]


async def test_a_listener_that_falls_too_far_behind_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LISTENER_BACKLOG unread changes the listener ends (its owner starts over from the store)."""
    monkeypatch.setattr(feed_module, "LISTENER_BACKLOG", 3)
    feed = LocalFeed()
    approval = make_approval()
    listener = feed.listen()
    changes = [at(approval, "pending", version) for version in range(5)]
    for change in changes:
        feed.publish(change)
    assert await drain(listener) == changes[:3]


async def test_a_listener_that_keeps_up_is_never_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backlog bounds what is unread, not what is heard: a reader that keeps up hears it all."""
    monkeypatch.setattr(feed_module, "LISTENER_BACKLOG", 3)
    feed = LocalFeed()
    approval = make_approval()
    listener = feed.listen()
    heard: list[Change] = []
    caught_up = asyncio.Event()

    async def read() -> None:
        async for change in listener:
            heard.append(change)
            caught_up.set()

    reader = asyncio.create_task(read())
    changes = [at(approval, "pending", version) for version in range(10)]
    for n in range(0, 10, 2):
        caught_up.clear()
        feed.publish(changes[n])
        feed.publish(changes[n + 1])
        async with asyncio.timeout(WAIT):
            while len(heard) < n + 2:
                await caught_up.wait()
                caught_up.clear()
    feed.close()
    async with asyncio.timeout(WAIT):
        await reader
    assert heard == changes
