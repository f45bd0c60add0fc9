"""Group commit on the store's thread: writes queued together share one durable commit, and yet each
succeeds or fails on its own, and nothing is answered before it is on disk.

Each test parks the store's thread on a job that waits for a `threading.Event`, queues its writes
behind it, then lets the thread go: the queued writes are then one group, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from approvals.core.model import Approval
from approvals.errors import StoreError
from approvals.store.sqlite import SqliteStore
from tests.test_store_approvals import NOW, created, make_approval

T = TypeVar("T")


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    yield opened
    await opened.close()


@dataclass
class Group:
    """The store calls queued while the thread is parked, and the SQL the thread ran for them."""

    statements: list[str] = field(default_factory=list)
    calls: list[asyncio.Future[Any]] = field(default_factory=list)

    def queue(self, *calls: Awaitable[T]) -> list[asyncio.Future[T]]:
        started = queued(*calls)
        self.calls += started
        return started


@contextlib.asynccontextmanager
async def one_group(store: SqliteStore) -> AsyncIterator[Group]:
    """Park the thread; on exit let it run what was queued meanwhile, tracing its SQL."""
    group = Group()
    await store._db.read(lambda conn: conn.set_trace_callback(group.statements.append))
    started, go = threading.Event(), threading.Event()

    def park(_: sqlite3.Connection) -> bool:
        started.set()
        return go.wait(10)

    parked = asyncio.ensure_future(store._db.read(park))
    # Parked on a group of its own: what is queued from now on forms the next group.
    assert await asyncio.to_thread(started.wait, 10)
    try:
        yield group
    finally:
        go.set()
        assert await parked, "the thread was parked longer than the test allows"
        # Each call is answered after its group's COMMIT: only then is the whole group traced.
        # (A job queued earlier could join the group and stop the trace before its COMMIT.)
        await asyncio.gather(*group.calls, return_exceptions=True)
        await store._db.read(lambda conn: conn.set_trace_callback(None))


def queued(*calls: Awaitable[T]) -> list[asyncio.Future[T]]:
    """Start each store call; each has put its job on the queue after one turn of the loop."""
    return [asyncio.ensure_future(call) for call in calls]


async def settled(futures: list[asyncio.Future[T]]) -> list[T | BaseException]:
    return await asyncio.gather(*futures, return_exceptions=True)


def commits(statements: list[str]) -> int:
    return sum(statement == "COMMIT" for statement in statements)


async def approve(store: SqliteStore, approval: Approval) -> Approval | None:
    return await store.transition(
        approval.id, from_=("pending",), to="approved", actor="bob", channel="api", decided_by="bob"
    )


async def test_writes_queued_together_share_one_durable_commit(store: SqliteStore) -> None:
    """Twenty decisions taken at once are twenty records and audit events, made durable by one fsync."""
    approvals = [await created(store, id=f"appr_{n:02d}") for n in range(20)]
    async with one_group(store) as group:
        decisions = group.queue(*(approve(store, approval) for approval in approvals))
        await asyncio.sleep(0)  # one turn of the loop: every call above has queued its job
    results = await settled(decisions)
    assert all(isinstance(result, Approval) and result.status == "approved" for result in results)
    assert commits(group.statements) == 1
    levels = [s for s in group.statements if s.startswith("PRAGMA synchronous")]
    assert levels in ([], ["PRAGMA synchronous=FULL"])
    for approval in approvals:
        events = await store.audit_events(approval_id=approval.id)
        assert [event.event for event in events] == ["created", "approved"]


async def test_a_failing_write_fails_alone_and_leaves_no_trace(store: SqliteStore) -> None:
    """A duplicate id in the middle of a group is refused; the writes around it all commit."""
    before, duplicate = await created(store, id="appr_first"), make_approval(id="appr_first")
    after = await created(store, id="appr_after")
    async with one_group(store) as group:
        first, clash, last = group.queue(
            approve(store, before),
            store.create_approval(duplicate, actor="agent-a", channel="mcp"),
            approve(store, after),
        )
        await asyncio.sleep(0)
    assert isinstance(await first, Approval)
    assert isinstance(await last, Approval)
    with pytest.raises(StoreError, match="cannot create an approval: UNIQUE constraint failed"):
        await clash
    assert commits(group.statements) == 1
    events = await store.audit_events()
    assert [(e.approval_id, e.event) for e in events] == [
        ("appr_first", "created"),
        ("appr_after", "created"),
        ("appr_first", "approved"),
        ("appr_after", "approved"),
    ]


async def test_a_failed_commit_fails_every_write_of_its_group(store: SqliteStore) -> None:
    """Nothing is answered before it is on disk: when COMMIT fails, no write of the group stands."""
    approval = await created(store)

    def dangling_reference(conn: sqlite3.Connection) -> None:
        # A deferred foreign key is checked only at COMMIT: the one way to make COMMIT itself fail.
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS child (parent INTEGER REFERENCES parent (id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute("INSERT INTO child VALUES (42)")

    async with one_group(store) as group:
        poisoned = store._db.write(dangling_reference, durable=False)
        decision, poison = group.queue(approve(store, approval), poisoned)
        await asyncio.sleep(0)
    with pytest.raises(StoreError, match="FOREIGN KEY constraint failed"):
        await decision
    with pytest.raises(sqlite3.IntegrityError):
        await poison
    assert await store.get_approval(approval.id) == approval  # still pending, as if never asked
    assert [event.event for event in await store.audit_events()] == ["created"]
    assert await approve(store, approval) is not None  # and the store goes on working


async def test_a_caller_that_stops_waiting_does_not_undo_its_write(store: SqliteStore) -> None:
    """Cancellation drops the answer, never half a write: the queued decision still commits whole."""
    approval = await created(store)
    async with one_group(store) as group:
        (decision,) = group.queue(approve(store, approval))
        await asyncio.sleep(0)
        decision.cancel()
    with pytest.raises(asyncio.CancelledError):
        await decision
    record = await store.get_approval(approval.id)
    assert record is not None
    assert record.status == "approved"
    assert [event.event for event in await store.audit_events()] == ["created", "approved"]


async def test_durable_writes_run_at_full_and_others_at_normal(store: SqliteStore) -> None:
    """The fsync level a write job sees is the one its durability asked for (2 = FULL, 1 = NORMAL)."""

    def level(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    assert await store._db.write(level, durable=True) == 2
    assert await store._db.write(level, durable=False) == 1
    async with one_group(store) as group:
        mixed = group.queue(store._db.write(level, durable=False), store._db.write(level, durable=True))
        await asyncio.sleep(0)
    assert await settled(mixed) == [2, 2]  # one durable write makes its whole group durable


async def test_close_finishes_queued_writes_then_refuses_new_ones(tmp_path: pathlib.Path) -> None:
    """Writes queued before close are committed; a call after close is a clear StoreError."""
    path = tmp_path / "approvals.db"
    store = await SqliteStore.open(path, clock=lambda: NOW)
    approval = await created(store)
    (decision,) = queued(approve(store, approval))
    await asyncio.sleep(0)
    await store.close()
    assert isinstance(await decision, Approval)
    with pytest.raises(StoreError, match="cannot read an approval: the store is closed"):
        await store.get_approval(approval.id)
    reopened = await SqliteStore.open(path)
    try:
        record = await reopened.get_approval(approval.id)
        assert record is not None
        assert record.status == "approved"
    finally:
        await reopened.close()


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = {thread.name for thread in threading.enumerate()}
    yield
    assert "approvals-store" not in {t.name for t in threading.enumerate()} - before


@pytest.mark.usefixtures("no_thread_leak")
async def test_a_file_that_cannot_be_opened_is_a_store_error(tmp_path: pathlib.Path) -> None:
    """A directory where the database should be: a StoreError naming the path, and no thread left."""
    (tmp_path / "approvals.db").mkdir()
    with pytest.raises(StoreError, match=r"cannot open .*approvals\.db"):
        await SqliteStore.open(tmp_path / "approvals.db")
