"""One SQLite connection on a thread of its own, with group commit.

The store used to run on aiosqlite, which moves one statement at a time to its worker thread; a
decision was half a dozen such round trips, and every durable transaction paid its own fsync
(3 to 4 ms here) while the others queued behind it: about 150 decisions a second at most. Here a *job* is
the whole work of one store call — a plain function of the connection — so each call crosses to
the thread once, and write jobs commit in groups:

    the thread takes every job queued so far (up to MAX_BATCH), runs the writes among them in one
    ``BEGIN IMMEDIATE … COMMIT``, each inside its own SAVEPOINT, and only then answers them all.

While one group is being fsynced the next one queues, so under load a single fsync makes a whole
group durable, and with no load a lone job commits at once (no timer, no added latency). A job
that raises is rolled back to its savepoint and gets its own exception; the others in its group
are unaffected. If the COMMIT itself fails, every job of the group gets that error: nothing is
answered before it is on disk.

Durability is per group: ``synchronous=FULL`` when any write in it asked to be durable, NORMAL
otherwise (set between transactions; SQLite refuses the change inside one). Reads run on the same
connection in queue order, so a read sees every write answered before it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["MAX_BATCH", "Job", "SqliteThread", "ThreadClosedError"]

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
# Bounds the work one fsync waits for, so a flood of writes still answers the first ones promptly.
MAX_BATCH = 256


class ThreadClosedError(sqlite3.OperationalError):
    """The store was closed; an sqlite3 error so callers' error handling covers it."""


@dataclass(slots=True)
class _Task:
    job: Job[Any]
    future: asyncio.Future[Any]
    write: bool
    durable: bool
    outcome: Any = None
    error: BaseException | None = field(default=None)


class SqliteThread:
    """Runs jobs on one connection owned by one thread; see the module docstring."""

    def __init__(self, path: pathlib.Path, configure: Job[None]) -> None:
        self._path = path
        self._configure = configure
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="approvals-store", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._closing = False
        self._synchronous: str | None = None

    async def start(self) -> None:
        """Open the connection on the thread and run ``configure`` on it; raises what they raise."""
        self._loop = asyncio.get_running_loop()
        self._opened = self._loop.create_future()
        self._closed = self._loop.create_future()
        self._thread.start()
        try:
            await self._opened
        except BaseException:
            self._closing = True
            await asyncio.shield(self._closed)
            self._thread.join()  # it has answered its last future and is returning
            raise

    async def read(self, job: Job[T]) -> T:
        """Run ``job`` in queue order; its answer, or what it raised.

        A read grouped with writes is answered after their commit, and fails if that commit fails:
        what it read was not yet on disk.
        """
        return await self._submit(job, write=False, durable=False)

    async def write(self, job: Job[T], *, durable: bool) -> T:
        """Run ``job`` in a transaction; answered once its group is committed (fsynced if ``durable``)."""
        return await self._submit(job, write=True, durable=durable)

    async def close(self) -> None:
        """Finish the queued jobs, then close the connection (SQLite checkpoints the WAL)."""
        if self._closed is None or self._closing:
            return
        self._closing = True
        self._tasks.put(None)
        await asyncio.shield(self._closed)
        self._thread.join()  # it has answered its last future and is returning

    def _submit(self, job: Job[T], *, write: bool, durable: bool) -> asyncio.Future[T]:
        if self._loop is None or self._closing:
            raise ThreadClosedError("the store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._tasks.put(_Task(job, future, write, durable))
        # A caller that stops waiting does not stop the job: once queued, a write happens (or
        # fails) as a whole, exactly as if the caller had waited; only its answer is dropped.
        return future

    # ---- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except BaseException as exc:  # handed to the opener, who raises it
            self._answer(self._opened, exc)
            self._answer(self._closed)
            return
        try:
            self._configure(conn)
        except BaseException as exc:  # handed to the opener, who raises it
            conn.close()
            self._answer(self._opened, exc)
            self._answer(self._closed)
            return
        self._answer(self._opened)
        try:
            self._serve(conn)
        finally:
            # Also if the thread dies of a bug: new calls then fail at once instead of waiting forever.
            self._closing = True
            conn.close()
            self._answer(self._closed)

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._tasks.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is None:
                    stop = True
                    break
                batch.append(task)
            self._run(conn, batch)
            self._call_soon(_deliver, batch)
            if stop:
                return

    def _run(self, conn: sqlite3.Connection, batch: list[_Task]) -> None:
        writes = [task for task in batch if task.write]
        if not writes:
            for task in batch:
                _call(conn, task)
            return
        try:
            self._set_synchronous(conn, "FULL" if any(task.durable for task in writes) else "NORMAL")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for task in batch:
                task.error = exc
            return
        try:
            for task in batch:
                if not task.write:
                    _call(conn, task)
                    continue
                conn.execute("SAVEPOINT job")
                if _call(conn, task):
                    conn.execute("RELEASE job")
                else:
                    conn.execute("ROLLBACK TO job")  # this job's changes only
                    conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except BaseException as exc:  # the group failed as a whole: tell every job
            if conn.in_transaction:
                conn.rollback()
            for task in batch:
                if task.error is None:  # a job's own error says more than the group's
                    task.outcome, task.error = None, exc

    def _set_synchronous(self, conn: sqlite3.Connection, level: str) -> None:
        if self._synchronous != level:
            conn.execute(f"PRAGMA synchronous={level}")  # one of two fixed words
            self._synchronous = level

    def _answer(self, future: asyncio.Future[None] | None, error: BaseException | None = None) -> None:
        assert future is not None
        self._call_soon(_settle, future, None, error)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left waiting for the answer
            self._loop.call_soon_threadsafe(callback, *args)


def _call(conn: sqlite3.Connection, task: _Task) -> bool:
    try:
        task.outcome = task.job(conn)
    except Exception as exc:  # the caller gets it through its future
        task.error = exc
        return False
    return True


def _deliver(batch: list[_Task]) -> None:
    for task in batch:
        _settle(task.future, task.outcome, task.error)


def _settle(future: asyncio.Future[Any], outcome: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)
