"""Replicas and the sessions they own, on PostgreSQL: where a request of an initialize-era session
is sent when it lands on a replica that does not hold the session (approvals.proxy.affinity).

    replicas          id, internal_url, seen_at       one row per running process, kept fresh by
                                                      its heartbeat, deleted when it stops
    replica_sessions  session_sha256 → replica_id     one row per live session; ON DELETE CASCADE,
                                                      so a replica's rows go with its own row

A session id is a bearer credential of sorts (with the grant token it names a live session), so
only its sha256 is stored. Times are the database's own clock (``now()``), never a replica's: the
liveness of a replica on one machine is judged by replicas on others, whose clocks may differ
(``extract(epoch from now())`` in every statement).

A replica that is killed leaves its rows behind until a live replica notices its heartbeat is
stale (``STALE_AFTER_SECONDS``) and deletes them; until then a request for one of its sessions is
tried at its address, fails to connect, and gets the 404 a client re-initializes on.

Migration 3 of approvals.store.postgres.MIGRATIONS.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from approvals.errors import StoreError

__all__ = ["MIGRATION", "Owner", "ReplicaRegistry", "session_hash"]

MIGRATION = """
    CREATE TABLE replicas (
        id           TEXT PRIMARY KEY,
        internal_url TEXT NOT NULL,
        started_at   DOUBLE PRECISION NOT NULL,
        seen_at      DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE replica_sessions (
        session_sha256 TEXT PRIMARY KEY,
        replica_id     TEXT NOT NULL REFERENCES replicas (id) ON DELETE CASCADE
    );
    CREATE INDEX replica_sessions_replica ON replica_sessions (replica_id);
"""

HEARTBEAT_SECONDS = 5.0
# Three missed heartbeats: a replica this quiet is taken for dead and its sessions forgotten.
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS


def session_hash(session_id: str) -> str:
    """The form in which a session id is stored."""
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Owner:
    """The live replica that holds a session."""

    replica_id: str
    internal_url: str


class ReplicaRegistry:
    """This replica's row, its sessions' rows, and the look-up of another session's owner.

    Every method is one statement (or one transaction) on a small pool of its own, so a slow
    approval query never delays a routed request. Failures raise StoreError.
    """

    def __init__(self, pool: asyncpg.Pool, replica_id: str, internal_url: str) -> None:
        self._pool = pool
        self.replica_id = replica_id
        self.internal_url = internal_url

    @classmethod
    async def open(cls, database_url: str, replica_id: str, internal_url: str) -> ReplicaRegistry:
        """Connect (the schema is migrated by the store, opened before) and register this replica."""
        try:
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        registry = cls(pool, replica_id, internal_url)
        try:
            await registry.register()
        except BaseException:
            await pool.close()
            raise
        return registry

    async def close(self) -> None:
        """Drop this replica and (by cascade) its sessions' rows, then disconnect."""
        try:
            async with self._connection("unregister this replica") as conn:
                await conn.execute("DELETE FROM replicas WHERE id = $1", self.replica_id)
        finally:
            await self._pool.close()

    async def register(self) -> None:
        async with self._connection("register this replica") as conn:
            await conn.execute(
                "INSERT INTO replicas (id, internal_url, started_at, seen_at)"
                " VALUES ($1, $2, extract(epoch from now()), extract(epoch from now()))"
                " ON CONFLICT (id) DO UPDATE"
                " SET internal_url = excluded.internal_url, seen_at = extract(epoch from now())",
                self.replica_id,
                self.internal_url,
            )

    async def heartbeat(self) -> bool:
        """Mark this replica alive and forget replicas that stopped beating; False when this
        replica's own row was gone (taken for dead during a long pause): the caller registers again
        and records its sessions anew."""
        async with self._connection("refresh this replica") as conn, conn.transaction():
            done = await conn.execute(
                "UPDATE replicas SET seen_at = extract(epoch from now()) WHERE id = $1", self.replica_id
            )
            await conn.execute(
                "DELETE FROM replicas WHERE seen_at < extract(epoch from now()) - $1 AND id <> $2",
                STALE_AFTER_SECONDS,
                self.replica_id,
            )
        return str(done) != "UPDATE 0"

    async def record(self, session_hashes: Collection[str]) -> None:
        """These sessions are held here (a session id is never reused, so an existing row is ours)."""
        if not session_hashes:
            return
        async with self._connection("record sessions") as conn:
            await conn.execute(
                "INSERT INTO replica_sessions (session_sha256, replica_id) SELECT unnest($1::text[]), $2"
                " ON CONFLICT (session_sha256) DO UPDATE SET replica_id = excluded.replica_id",
                list(session_hashes),
                self.replica_id,
            )

    async def forget(self, session_hashes: Collection[str]) -> None:
        """These sessions ended here."""
        if not session_hashes:
            return
        async with self._connection("forget sessions") as conn:
            await conn.execute(
                "DELETE FROM replica_sessions WHERE replica_id = $1 AND session_sha256 = ANY($2::text[])",
                self.replica_id,
                list(session_hashes),
            )

    async def owner(self, session_sha256: str) -> Owner | None:
        """The live replica holding a session, or None (never heard of, or its replica is gone)."""
        async with self._connection("look up a session's replica") as conn:
            row = await conn.fetchrow(
                "SELECT r.id, r.internal_url FROM replica_sessions s JOIN replicas r ON r.id = s.replica_id"
                " WHERE s.session_sha256 = $1 AND r.seen_at >= extract(epoch from now()) - $2",
                session_sha256,
                STALE_AFTER_SECONDS,
            )
        return None if row is None else Owner(str(row[0]), str(row[1]))

    async def replicas(self) -> list[Owner]:
        """Every live replica (for operators and tests)."""
        async with self._connection("list replicas") as conn:
            rows = await conn.fetch(
                "SELECT id, internal_url FROM replicas WHERE seen_at >= extract(epoch from now()) - $1"
                " ORDER BY started_at, id",
                STALE_AFTER_SECONDS,
            )
        return [Owner(str(r[0]), str(r[1])) for r in rows]

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot {what}: {exc}") from exc
