"""The embedded store: one SQLite file through aiosqlite.

The connection runs in autocommit mode (``isolation_level=None``) and every write is an explicit
``BEGIN IMMEDIATE … COMMIT`` taken under one asyncio lock: the connection is shared by every
coroutine, and SQLite has one transaction per connection, so two coroutines must never interleave
statements of their transactions. ``BEGIN IMMEDIATE`` takes the write lock up front, so a second
process on the same file waits ``busy_timeout`` instead of failing half-way through.

Durability is chosen per transaction. The connection runs at ``synchronous=NORMAL``, which under
WAL survives a crash of the process but may lose the last commits on a power cut — fine for
counters, written behind every second. Approval and audit writes are *durable* transactions: the
connection is switched to ``synchronous=FULL`` just before ``BEGIN`` (SQLite refuses the change
inside a transaction) and back to NORMAL after, all under the lock, so their commit fsyncs the WAL
before the call returns. That is what makes ``approved → released`` single use across a power cut.
A durable commit also fsyncs every NORMAL commit before it, since they share the one WAL.

The approvals and audit SQL is in :mod:`approvals.store.sqlite_approvals`; this module keeps the
connection discipline and the schema history.

Schema changes are the ordered scripts in :data:`MIGRATIONS`; version N of the schema is the
first N scripts applied, recorded in ``PRAGMA user_version``. To change the schema, append one
script to the list; never edit a script that has shipped.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import aiosqlite

from approvals.store import CounterRow, StoreError
from approvals.store import sqlite_approvals as q
from approvals.store.records import (
    Approval,
    AuditEvent,
    Status,
    check_transition,
    check_transition_fields,
    check_update_fields,
)

__all__ = ["MIGRATIONS", "SqliteStore"]

BUSY_TIMEOUT_MS = 5000
# STRICT tables (3.37) and UPDATE … RETURNING (3.35), which the compare-and-set relies on.
MIN_SQLITE = (3, 37, 0)
RESULT_DROPPED_NOTE = "result dropped after keep window"

_V1_COUNTERS = """
CREATE TABLE counters (
    counter      TEXT    NOT NULL,
    scope_key    TEXT    NOT NULL,
    window_start INTEGER NOT NULL,
    value        REAL    NOT NULL,
    PRIMARY KEY (counter, scope_key, window_start)
) WITHOUT ROWID;
-- prune_counters deletes by age; without this index it would scan every counter.
CREATE INDEX counters_window_start ON counters (window_start);
"""

MIGRATIONS: list[str] = [_V1_COUNTERS, q.APPROVALS_SCHEMA, q.MESSAGE_REFS_SCHEMA]


class SqliteStore:
    """The aiosqlite implementation of :class:`approvals.store.Store`. Create with :meth:`open`."""

    def __init__(self, conn: aiosqlite.Connection, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self._clock = clock  # only to stamp audit events; every decision is told `now`

    @classmethod
    async def open(cls, path: pathlib.Path, *, clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; approvals needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer"
            )
        with _errors(f"cannot open {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        store = cls(conn, clock)
        try:
            await store._configure()
            await store._migrate()
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection; the WAL is checkpointed by SQLite on the last close."""
        async with self._lock:
            await self._conn.close()

    async def load_counters(self, since: float) -> list[CounterRow]:
        """Return every counter row whose ``window_start >= since``."""
        async with self._read("load counters"):
            cursor = await self._conn.execute(
                "SELECT counter, scope_key, window_start, value FROM counters WHERE window_start >= ?",
                (since,),
            )
            rows = await cursor.fetchall()
        return [(str(c), str(s), int(w), float(v)) for c, s, w, v in rows]

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        """Upsert the absolute value of every row, all in one transaction."""
        if not rows:
            return
        async with self._transaction("save counters"):
            await self._conn.executemany(
                "INSERT INTO counters (counter, scope_key, window_start, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (counter, scope_key, window_start) DO UPDATE SET value = excluded.value",
                rows,
            )

    async def prune_counters(self, before: int) -> None:
        """Delete every counter row whose ``window_start < before``."""
        async with self._transaction("prune counters"):
            await self._conn.execute("DELETE FROM counters WHERE window_start < ?", (before,))

    async def create_approval(self, approval: Approval, *, actor: str, channel: str) -> None:
        """Insert a new pending record and its "created" audit event in one durable transaction."""
        if approval.status != "pending" or approval.version != 0:
            raise ValueError(f"a new approval must be pending at version 0, not {approval.status!r}")
        async with self._transaction("create an approval", durable=True):
            await q.insert_approval(self._conn, approval)
            await self._audit(approval.id, "created", actor, channel, approval.args_sha256, None)

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The record with this id, or None."""
        async with self._read("read an approval"):
            return await q.get_approval(self._conn, approval_id)

    async def list_approvals(
        self,
        *,
        status: Status | None = None,
        upstream: str | None = None,
        tool: str | None = None,
        grant: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Approval]:
        """Records matching every given filter, newest first."""
        async with self._read("list approvals"):
            return await q.list_approvals(
                self._conn,
                status=status,
                upstream=upstream,
                tool=tool,
                grant=grant,
                limit=limit,
                offset=offset,
            )

    async def find_reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        """The newest record of the same request that a repeat call attaches to, or None."""
        async with self._read("look up a repeat call"):
            return await q.find_reusable(
                self._conn, grant=grant, upstream=upstream, tool=tool, args_sha256=args_sha256, now=now
            )

    async def count_pending(self, grant: str) -> int:
        """How many records of this grant await a decision."""
        async with self._read("count pending approvals"):
            return await q.count_pending(self._conn, grant)

    async def transition(
        self,
        approval_id: str,
        *,
        from_: Collection[Status],
        to: Status,
        actor: str,
        channel: str,
        event: str | None = None,
        **fields: object,
    ) -> Approval | None:
        """Compare-and-set the status plus its audit event, durably; the new record or None."""
        check_transition(from_, to)
        check_transition_fields(fields)
        async with self._transaction(f"move approval {approval_id} to {to}", durable=True):
            updated = await q.update_status(self._conn, approval_id, from_=from_, to=to, fields=fields)
            if updated is not None:
                # The reason given to this move, not one left on the record by an earlier move.
                reason = fields.get("reason")
                detail = reason if isinstance(reason, str) else None
                await self._audit(approval_id, event or to, actor, channel, updated.args_sha256, detail)
        return updated

    async def update_fields(self, approval_id: str, **fields: object) -> None:
        """Set delivery fields without a transition or audit event."""
        check_update_fields(fields)
        # Durable too: result_delivered is what keeps a result from being handed out twice.
        async with self._transaction("update an approval", durable=True):
            await q.update_fields(self._conn, approval_id, fields)

    async def due_for_expiry(self, now: float) -> list[Approval]:
        """Pending records whose ``expires_at <= now``, soonest first."""
        async with self._read("find expired approvals"):
            return await q.due_for_expiry(self._conn, now)

    async def interrupted_releases(self) -> list[Approval]:
        """Records left ``released`` by a process that stopped before answering."""
        async with self._read("find interrupted releases"):
            return await q.interrupted_releases(self._conn)

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among pending records."""
        async with self._read("find the next expiry"):
            return await q.next_expiry(self._conn)

    async def drop_expired_results(self, now: float) -> int:
        """Clear kept results past their window; how many were cleared."""
        # Not durable: if a power cut undoes it, the next sweep drops the same results again.
        async with self._transaction("drop expired results"):
            return await q.drop_expired_results(self._conn, now, RESULT_DROPPED_NOTE)

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        """Audit events with ``seq > after_seq``, oldest first."""
        async with self._read("read the audit log"):
            return await q.audit_events(self._conn, approval_id=approval_id, after_seq=after_seq, limit=limit)

    async def append_audit(
        self,
        approval_id: str,
        event: str,
        *,
        actor: str,
        channel: str,
        args_sha256: str,
        detail: str | None = None,
    ) -> None:
        """Append an event that is not a transition, durably."""
        async with self._transaction("append to the audit log", durable=True):
            await self._audit(approval_id, event, actor, channel, args_sha256, detail)

    async def save_message_ref(self, approval_id: str, channel: str, ref_json: str) -> None:
        """Remember where ``channel`` posted its message about the approval (replacing any earlier ref)."""
        # Durable like the record it points at: after a crash or power cut the message can still be
        # edited to show the outcome, rather than being left with live buttons.
        async with self._transaction("save a message ref", durable=True):
            await q.save_message_ref(self._conn, approval_id, channel, ref_json)

    async def message_ref(self, approval_id: str, channel: str) -> str | None:
        """The ref ``channel`` saved for the approval, or None."""
        async with self._read("read a message ref"):
            return await q.message_ref(self._conn, approval_id, channel)

    async def _audit(
        self, approval_id: str, event: str, actor: str, channel: str, args_sha256: str, detail: str | None
    ) -> None:
        await q.insert_audit(
            self._conn,
            at=self._clock(),
            approval_id=approval_id,
            event=event,
            actor=actor,
            channel=channel,
            args_sha256=args_sha256,
            detail=detail,
        )

    async def schema_version(self) -> int:
        """The schema version recorded in the file."""
        async with self._read("read schema version"):
            return await self._user_version()

    @asynccontextmanager
    async def _read(self, what: str) -> AsyncIterator[None]:
        # Reads take the lock too: on the shared connection a read in the middle of another
        # coroutine's transaction would see its uncommitted writes.
        async with self._lock:
            with _errors(f"cannot {what}"):
                yield

    @asynccontextmanager
    async def _transaction(self, what: str, *, durable: bool = False) -> AsyncIterator[None]:
        """Run the body in one ``BEGIN IMMEDIATE`` transaction; roll back on any exception.

        ``durable`` commits at ``synchronous=FULL`` (see the module docstring).
        """
        async with self._lock:
            with _errors(f"cannot {what}"):
                if durable:
                    await self._conn.execute("PRAGMA synchronous=FULL")
                try:
                    try:
                        # BEGIN is inside the try: if the caller is cancelled while it runs, the
                        # transaction it opened must still be rolled back, or the next BEGIN fails.
                        await self._conn.execute("BEGIN IMMEDIATE")
                        yield
                    except BaseException:
                        await self._conn.rollback()  # a no-op when no transaction is open
                        raise
                    await self._conn.commit()
                finally:
                    if durable:
                        # Still under the lock: no other transaction ever ran at FULL by accident.
                        await self._conn.execute("PRAGMA synchronous=NORMAL")

    async def _configure(self) -> None:
        with _errors("cannot configure the database"):
            cursor = await self._conn.execute("PRAGMA journal_mode=WAL")
            row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"the database refused WAL journal mode (got {row!r})")
            # NORMAL is durable across crashes of this process under WAL; a power cut may lose
            # the last transactions, which is acceptable for counters. Decisions ask FULL.
            await self._conn.execute("PRAGMA synchronous=NORMAL")
            await self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await self._conn.execute("PRAGMA foreign_keys=ON")

    async def _migrate(self) -> None:
        """Apply the scripts the file has not seen yet, all in one transaction."""
        known = len(MIGRATIONS)
        # The version is read inside the write transaction so two processes opening a fresh
        # file at once do not both run the same script.
        async with self._transaction("migrate the schema"):
            current = await self._user_version()
            if current > known:
                raise StoreError(
                    f"database schema version {current} is newer than this gateway supports "
                    f"({known}); upgrade approvals"
                )
            for script in MIGRATIONS[current:]:
                for statement in split_statements(script):
                    await self._conn.execute(statement)
            if current < known:
                # PRAGMA takes no bound parameters; `known` is an int we computed.
                await self._conn.execute(f"PRAGMA user_version={known:d}")

    async def _user_version(self) -> int:
        cursor = await self._conn.execute("PRAGMA user_version")
        row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements.

    ``executescript`` would commit the open transaction first, so migrations run statement by
    statement; ``sqlite3.complete_statement`` keeps ``;`` inside strings and triggers intact.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if _has_sql(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _has_sql(buffer.removesuffix(";")):
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()!r}")
    return statements


def _has_sql(text: str) -> bool:
    lines = (line.split("--", 1)[0].strip() for line in text.splitlines())
    return any(line and line != ";" for line in lines)


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn database and file-system failures into :class:`StoreError`."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"{what}: {exc}") from exc
