"""The embedded store: one SQLite file through aiosqlite.

The connection runs in autocommit mode (``isolation_level=None``) and every write is an explicit
``BEGIN IMMEDIATE … COMMIT`` taken under one asyncio lock: the connection is shared by every
coroutine, and SQLite has one transaction per connection, so two coroutines must never interleave
statements of their transactions. ``BEGIN IMMEDIATE`` takes the write lock up front, so a second
process on the same file waits ``busy_timeout`` instead of failing half-way through.

Schema changes are the ordered scripts in :data:`MIGRATIONS`; version N of the schema is the
first N scripts applied, recorded in ``PRAGMA user_version``. To change the schema, append one
script to the list; never edit a script that has shipped.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import aiosqlite

from approvals.store import CounterRow, StoreError

__all__ = ["MIGRATIONS", "SqliteStore"]

BUSY_TIMEOUT_MS = 5000

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

MIGRATIONS: list[str] = [_V1_COUNTERS]


class SqliteStore:
    """The aiosqlite implementation of :class:`approvals.store.Store`. Create with :meth:`open`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: pathlib.Path) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
        with _errors(f"cannot open {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        store = cls(conn)
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
    async def _transaction(self, what: str) -> AsyncIterator[None]:
        """Run the body in one ``BEGIN IMMEDIATE`` transaction; roll back on any exception."""
        async with self._lock:
            with _errors(f"cannot {what}"):
                try:
                    # BEGIN is inside the try: if the caller is cancelled while it runs, the
                    # transaction it opened must still be rolled back, or the next BEGIN fails.
                    await self._conn.execute("BEGIN IMMEDIATE")
                    yield
                except BaseException:
                    await self._conn.rollback()  # a no-op when no transaction is open
                    raise
                await self._conn.commit()

    async def _configure(self) -> None:
        with _errors("cannot configure the database"):
            cursor = await self._conn.execute("PRAGMA journal_mode=WAL")
            row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"the database refused WAL journal mode (got {row!r})")
            # NORMAL is durable across crashes of this process under WAL; a power cut may lose
            # the last transactions, which is acceptable for counters. Decisions will ask FULL.
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
