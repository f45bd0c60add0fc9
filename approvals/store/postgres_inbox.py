"""The inbox's shared state on PostgreSQL: used one-time login links, ended sessions, the signing key.

Kept in the database so that every replica refuses a login link used on another one, a logout on
one replica ends the session on all of them (:mod:`approvals.web.inbox_state` reads the ended
sessions once a second), and a cookie signed by one replica is good on the others when no
``APPROVALS_SESSION_SECRET`` is set: the first replica to start stores a random key, and every
replica uses the one stored. Whoever can read this database can then sign inbox logins, as whoever
can write it can approve calls; a deployment that keeps the two apart sets the variable, and then
nothing is stored.

The SQL is in functions taking a connection; :class:`PostgresInboxMethods` is the part of
:class:`approvals.store.postgres.PostgresStore` that calls them.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager

import asyncpg

__all__ = [
    "MIGRATION",
    "PostgresInboxMethods",
    "end_session",
    "ended_sessions",
    "link_used",
    "prune",
    "shared_secret",
    "use_link",
]

# Migration 2 of approvals.store.postgres.MIGRATIONS.
MIGRATION = """
    CREATE TABLE used_login_links (
        nonce      TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE ended_inbox_sessions (
        session_id TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE inbox_session_secret (
        singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        secret     TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
"""


async def use_link(conn: asyncpg.Connection, nonce: str, expires_at: float) -> bool:
    """Record the link as used; False when it was already. One statement: the first replica wins."""
    inserted = await conn.fetchval(
        "INSERT INTO used_login_links (nonce, expires_at) VALUES ($1, $2)"
        " ON CONFLICT (nonce) DO NOTHING RETURNING TRUE",
        nonce,
        expires_at,
    )
    return inserted is True


async def link_used(conn: asyncpg.Connection, nonce: str) -> bool:
    return await conn.fetchval("SELECT 1 FROM used_login_links WHERE nonce = $1", nonce) is not None


async def end_session(conn: asyncpg.Connection, session_id: str, expires_at: float) -> None:
    await conn.execute(
        "INSERT INTO ended_inbox_sessions (session_id, expires_at) VALUES ($1, $2)"
        " ON CONFLICT (session_id) DO UPDATE"
        " SET expires_at = greatest(ended_inbox_sessions.expires_at, excluded.expires_at)",
        session_id,
        expires_at,
    )


async def ended_sessions(conn: asyncpg.Connection, now: float) -> dict[str, float]:
    rows = await conn.fetch(
        "SELECT session_id, expires_at FROM ended_inbox_sessions WHERE expires_at > $1", now
    )
    return {str(row[0]): float(row[1]) for row in rows}


async def prune(conn: asyncpg.Connection, before: float) -> int:
    """Delete what expired before ``before`` from both tables; how many rows."""
    deleted = 0
    for table in ("used_login_links", "ended_inbox_sessions"):
        done = await conn.execute(f"DELETE FROM {table} WHERE expires_at < $1", before)  # noqa: S608
        deleted += int(done.rsplit(" ", 1)[-1])  # "DELETE n"
    return deleted


async def shared_secret(conn: asyncpg.Connection, proposed: str, now: float) -> str:
    """The stored key, storing ``proposed`` first when there is none.

    Two statements, not one: when replicas start together, the insert of the second waits for the
    first's commit and does nothing, and only a new statement's snapshot sees the row it kept.
    """
    await conn.execute(
        "INSERT INTO inbox_session_secret (singleton, secret, created_at) VALUES (TRUE, $1, $2)"
        " ON CONFLICT (singleton) DO NOTHING",
        proposed,
        now,
    )
    return str(await conn.fetchval("SELECT secret FROM inbox_session_secret"))


class PostgresInboxMethods:
    """`approvals.web.inbox_state.InboxStateStore` and `SharedSecretStore`, for PostgresStore."""

    def _connection(self, what: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        raise NotImplementedError  # PostgresStore's: a pooled connection, failures as StoreError

    async def use_login_link(self, nonce: str, expires_at: float) -> bool:
        async with self._connection("record a used login link") as conn:
            return await use_link(conn, nonce, expires_at)

    async def login_link_used(self, nonce: str) -> bool:
        async with self._connection("look up a login link") as conn:
            return await link_used(conn, nonce)

    async def end_inbox_session(self, session_id: str, expires_at: float) -> None:
        async with self._connection("end an inbox session") as conn:
            await end_session(conn, session_id, expires_at)

    async def ended_inbox_sessions(self, now: float) -> dict[str, float]:
        async with self._connection("read ended inbox sessions") as conn:
            return await ended_sessions(conn, now)

    async def prune_inbox_state(self, before: float) -> int:
        async with self._connection("prune the inbox's state") as conn:
            return await prune(conn, before)

    async def shared_session_secret(self, proposed: str) -> str:
        async with self._connection("read the inbox's session key") as conn:
            return await shared_secret(conn, proposed, time.time())
