"""The approval core as its listeners see it: every listener follows the change feed, a decision
taken through one service wakes a hold in another on the same SQLite file, and nothing the
service keeps grows with the number of approvals it has finished."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from approvals.channels import ChangeKind, Channels
from approvals.config import Principal, Settings
from approvals.core.feed import SharedFeed
from approvals.core.model import Approval, ToolCall
from approvals.core.ports import Store
from approvals.core.review import DEFAULT_REVIEW
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused
from approvals.jsonrpc import JsonObject
from approvals.limits import RateLimiter
from approvals.policy import Decision
from approvals.runtime import open_store
from approvals.store.postgres import PostgresStore
from approvals.tool_catalog import ToolCatalog
from approvals.web.live import Filters, LiveFeed
from tests.conftest import WAIT, settings_for

UPSTREAM = "up"
SEND: JsonObject = {"name": "send", "inputSchema": {"type": "object"}}
BOB = Principal("bob", "0" * 64)
HELD = Decision(
    action="require_approval",
    rule="send",
    code="approval_required",
    reason=None,
    explanation="held for review",
    limits=(),
    review=DEFAULT_REVIEW,
)


class Upstream:
    """Lists `send` and answers every call at once; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": 1, "result": {"tools": [SEND]}}
        self.calls += 1
        return {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "sent"}]}}


@dataclass
class Node:
    """One process's share of a gateway: its own connection to the file, feed and service."""

    store: Store
    feed: SharedFeed
    limiter: RateLimiter
    service: ApprovalService


@asynccontextmanager
async def node(settings: Settings, upstream: Upstream, poll_interval: float = 0.01) -> AsyncIterator[Node]:
    store, feed = await open_store(settings, poll_interval)
    limiter = RateLimiter(store)
    await limiter.start()
    service = await ApprovalService.open(
        settings,
        store=store,
        counters=limiter,
        upstreams=upstream,
        catalog=ToolCatalog(upstream),
        feed=feed,
        limits_for=lambda *_: (),
    )
    try:
        yield Node(store, feed, limiter, service)
    finally:
        await service.close()
        await feed.aclose()
        await limiter.close()
        await store.close()


def settings_of(tmp_path: Path, url: str | None = None) -> Settings:
    # Many held at once in the tests below: the per-grant bound of pending calls is not their subject.
    store = {"url": url} if url else {}
    extra = {"approvals": {"max_pending_per_grant": 10_000}, "store": store}
    return settings_for(tmp_path, {UPSTREAM: {"command": ["true"]}}, **extra)


@pytest.fixture(params=["sqlite", "postgres"])
async def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings whose store every node shares: one SQLite file, or one (emptied) PostgreSQL database."""
    if request.param == "sqlite":
        return settings_of(tmp_path)
    url = request.getfixturevalue("postgres_url")
    store = await PostgresStore.open(url)
    await store.empty()
    await store.close()
    return settings_of(tmp_path, url)


def call(n: int) -> ToolCall:
    return ToolCall(UPSTREAM, "agent-a", f"session-{n % 7}", "send", {"n": n})


async def test_a_decision_through_one_service_wakes_the_hold_in_another(
    settings: Settings,
) -> None:
    """Two services on one SQLite file (as two processes would be): a call held by A is released
    by B's decision, and A's held call gets the result through the feed, not by asking."""
    upstream = Upstream()
    async with node(settings, upstream) as a, node(settings, upstream) as b:
        admission = await a.service.admit(call(1), HELD)
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        waiting = asyncio.create_task(admission.hold.wait(WAIT))
        await b.service.decide(approval_id, BOB, approve=True, reason=None, channel="api")
        outcome = await asyncio.wait_for(waiting, WAIT)
        admission.hold.close()
    assert outcome is not None
    assert outcome["result"]["content"][0]["text"] == "sent"
    assert upstream.calls == 1


async def test_a_denial_in_another_process_reaches_the_hold_and_the_inbox_of_this_one(
    settings: Settings,
) -> None:
    """A denial taken through B reaches A's held call and A's inbox live list (a view), and A's
    notifier (Slack's place) hears nothing of a change it did not make."""
    upstream = Upstream()
    async with node(settings, upstream) as a, node(settings, upstream) as b:
        inbox = LiveFeed()
        notifier = Recorder()
        channels = Channels.start(a.store, a.feed, views=[inbox], notifiers=[notifier])
        try:
            async with inbox_page(inbox) as page:
                admission = await a.service.admit(call(2), HELD)
                assert admission.hold is not None
                approval_id = admission.hold.approval_id
                await b.service.decide(approval_id, BOB, approve=False, reason="no", channel="api")
                outcome = await admission.hold.wait(WAIT)
                admission.hold.close()
                assert outcome is not None
                assert outcome["result"]["isError"] is True
                seen = await page.until(lambda a: a.status == "denied")
                assert seen.decided_by == "bob"
            assert await notifier.until(lambda a: a.status == "pending")
            assert all(a.status == "pending" for _, a in notifier.seen)  # the denial was B's to tell
        finally:
            await channels.close()


async def test_a_refused_decision_says_its_kind(settings: Settings) -> None:
    """Unknown id, the agent's own reviewer, a second decision: each refusal carries its kind."""
    owner = Principal("alice", "1" * 64)  # settings_for makes alice the owner of agent-a
    async with node(settings, Upstream()) as a:
        admission = await a.service.admit(call(3), HELD)
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        admission.hold.close()
        kinds = []
        for approval, who in (("nope", BOB), (approval_id, owner)):
            with pytest.raises(DecisionRefused) as refused:
                await a.service.decide(approval, who, approve=True, reason=None, channel="api")
            kinds.append(refused.value.kind)
        await a.service.decide(approval_id, BOB, approve=False, reason="no", channel="api")
        with pytest.raises(DecisionRefused) as again:
            await a.service.decide(approval_id, BOB, approve=True, reason=None, channel="api")
    assert kinds == ["unknown", "own_agent"]
    assert again.value.kind == "already_decided"


async def test_nothing_kept_grows_with_finished_approvals(tmp_path: Path) -> None:
    """10,000 approvals held, decided and delivered after a warm-up: no watch, arrival or task is
    left, and the heap is back where it was."""
    upstream = Upstream()
    async with node(settings_of(tmp_path), upstream) as a:

        async def one(n: int) -> None:
            admission = await a.service.admit(call(n), HELD)
            assert admission.hold is not None
            hold = admission.hold
            try:
                await a.service.decide(hold.approval_id, BOB, approve=n % 2 == 0, reason="r", channel="api")
                assert await hold.wait(WAIT) is not None
                hold.delivered()
            finally:
                hold.close()

        # Warm: caches, pools, and the feed's bounded memory of what it published, filled.
        for batch in range(0, 2_000, 500):
            await asyncio.gather(*(one(n) for n in range(batch, batch + 500)))
        await a.service.settled()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for batch in range(2_000, 12_000, 500):
            await asyncio.gather(*(one(n) for n in range(batch, batch + 500)))
        await a.service.settled()
        gc.collect()
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        assert a.feed.watched() == 0
        assert a.service.footprint() == {"arrivals": 0, "background": 0}
    assert upstream.calls == 6_000
    # Under 200 bytes per approval, where the feed's bounded memory of what it published (4,096
    # entries, refilled as they churn) is most of what is measured: nothing is kept per approval.
    assert grown < 2 * 1024 * 1024


class Recorder:
    """A channel that records what it is told."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[ChangeKind, Approval]] = []
        self._changed = asyncio.Event()

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
        self.seen.append((change, approval))
        self._changed.set()

    async def until(self, predicate: Callable[[Approval], bool]) -> Approval:
        async with asyncio.timeout(WAIT):
            while True:
                for _, approval in self.seen:
                    if predicate(approval):
                        return approval
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Page:
    events: asyncio.Queue[Any]

    async def until(self, predicate: Callable[[Approval], bool]) -> Approval:
        async with asyncio.timeout(WAIT):
            while True:
                item = await self.events.get()
                if item is not None and predicate(item[1]):
                    return item[1]  # type: ignore[no-any-return]


@asynccontextmanager
async def inbox_page(inbox: LiveFeed) -> AsyncIterator[Page]:
    """An open inbox page's subscription to the live feed (what /inbox/events streams)."""
    with inbox.subscription(Filters()) as subscriber:
        yield Page(subscriber.events)


class Blocking(Upstream):
    """An upstream whose tools/call waits until `answer` is set (a call in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.received = asyncio.Event()

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        if method == "tools/call":
            self.received.set()
            await self.answer.wait()
        return await super().call(upstream, method, params, prefer_session=prefer_session)


async def test_a_starting_process_leaves_a_live_owners_release_alone(settings: Settings) -> None:
    """B starts while A's released call is in flight: A's lease stands, the call is not failed as
    interrupted, and A's answer completes it."""
    upstream = Blocking()
    async with node(settings, upstream) as a:
        admission = await a.service.admit(call(4), HELD)
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        await a.service.decide(approval_id, BOB, approve=True, reason=None, channel="api")
        await asyncio.wait_for(upstream.received.wait(), WAIT)
        async with node(settings, upstream) as b:
            await b.service.expire_due()  # what a start-up and the lease sweep do
            released = await b.service.get(approval_id)
            assert released is not None
            assert (released.status, released.lease_owner) == ("released", a.service.owner)
            upstream.answer.set()
            outcome = await admission.hold.wait(WAIT)
            admission.hold.close()
    assert outcome is not None
    assert "error" not in outcome


@pytest.mark.parametrize("owner", ["elsewhere:1:dead", "{host}:{pid}:earlier-start"])
async def test_a_release_whose_owner_is_gone_ends_interrupted(settings: Settings, owner: str) -> None:
    """A released record whose lease ran out (an owner on another host), or whose owner was an
    earlier start of a process on this host, is ended as interrupted, never sent again."""
    upstream = Upstream()
    async with node(settings, upstream) as a:
        admission = await a.service.admit(call(5), HELD)
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        admission.hold.close()
        await a.store.transition(approval_id, from_=("pending",), to="approved", actor="bob", channel="api")
        lease_owner = owner.format(host=socket.gethostname(), pid=os.getpid())
        expires = time.time() + (-1 if owner.startswith("elsewhere") else 3600)
        await a.store.transition(
            approval_id,
            from_=("approved",),
            to="released",
            actor="gateway",
            channel="gateway",
            lease_owner=lease_owner,
            lease_expires_at=expires,
        )
        await a.service.expire_due()
        ended = await a.service.get(approval_id)
    assert ended is not None
    assert (ended.status, ended.reason) == ("failed", "interrupted")
    assert upstream.calls == 0


async def test_a_dropped_feed_connection_still_delivers_the_decision(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL: the feed's listening connection is terminated (pg_terminate_backend) while a call
    is held; a decision taken meanwhile through another replica still reaches the held call, once
    the feed has reconnected and read again what it follows."""
    store = await PostgresStore.open(postgres_url)
    await store.empty()
    await store.close()
    settings = settings_of(tmp_path, postgres_url)
    upstream = Upstream()
    async with node(settings, upstream) as a, node(settings, upstream) as b:
        admission = await a.service.admit(call(6), HELD)
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        admin = await asyncpg.connect(postgres_url)
        try:
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert ended >= 1
        await b.service.decide(approval_id, BOB, approve=True, reason=None, channel="api")
        outcome = await admission.hold.wait(WAIT)
        admission.hold.close()
    assert outcome is not None
    assert outcome["result"]["content"][0]["text"] == "sent"
    assert upstream.calls == 1


class Stopped:
    """An upstream caller for a process that stops right after its decision: never called."""

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        raise AssertionError("a stopped process sends nothing")


@pytest.mark.parametrize("decider", ["this host, gone", "another host, lease run out", "alive"])
async def test_an_approval_whose_decider_stopped_is_released_once_by_another(
    settings: Settings, decider: str
) -> None:
    """A approves and stops before releasing (its `_release` never runs): B's sweep releases the
    call once — at once when A ran on this host, when A's lease ran out otherwise — and leaves it
    alone while A lives."""
    upstream = Upstream()
    async with node(settings, upstream) as b:
        async with node(settings, upstream) as a:
            a.service._start_release = lambda approval: None  # type: ignore[method-assign]
            admission = await a.service.admit(call(6), HELD)
            assert admission.hold is not None
            approval_id = admission.hold.approval_id
            admission.hold.close()
            if decider == "another host, lease run out":
                lease = {"lease_owner": "elsewhere:1:dead", "lease_expires_at": time.time() - 1}
                await a.store.transition(
                    approval_id, from_=("pending",), to="approved", actor="bob", channel="api", **lease
                )
            else:
                await a.service.decide(approval_id, BOB, approve=True, reason=None, channel="api")
            if decider == "alive":
                await b.service.expire_due()
                approved = await b.service.get(approval_id)
                assert approved is not None
                assert approved.status == "approved"
                assert upstream.calls == 0
                return
        await b.service.expire_due()
        await b.service.expire_due()  # a second sweep (or another survivor's) sends nothing more
        await b.service.settled()
        released = await b.service.get(approval_id)
    assert released is not None
    assert released.status == "completed"
    assert upstream.calls == 1
