"""The PostgreSQL adapter of the durable ports, for several replicas sharing one database.

The same semantics as :class:`approvals.store.sqlite.SqliteStore` (the store test module runs
against both): every transition is one ``UPDATE … WHERE status = ANY(…) RETURNING`` plus its audit
row in one transaction, so the first decision wins and ``approved → released`` happens once
whichever replica tries; opening a request takes a transaction-scoped advisory lock on its grant,
so the look-up of an open request, the count of pending ones and the insert are one step across
replicas. Every committed transition also sends ``NOTIFY approvals`` (delivered at commit), which
:class:`approvals.store.postgres_feed.PostgresFeed` turns into changes on every replica.

Migrations are versioned and applied at start under a session advisory lock, so replicas that start
together migrate once. Failures raise :class:`approvals.errors.StoreError`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager

import asyncpg

from approvals.audit_chain import GENESIS, seal
from approvals.core.model import (
    RESULT_DROPPED_NOTE,
    STORED_FIELDS,
    Approval,
    AuditEvent,
    Status,
    check_transition,
    check_transition_fields,
    check_update_fields,
)
from approvals.core.ports import CounterRow
from approvals.errors import StoreError
from approvals.request_context import REQUEST_ID
from approvals.store import postgres_inbox, postgres_quota, postgres_replicas, postgres_review
from approvals.store.postgres_rows import AUDIT_COLUMNS as _AUDIT_COLUMNS
from approvals.store.postgres_rows import COLUMN as _COLUMN
from approvals.store.postgres_rows import SELECT as _SELECT
from approvals.store.postgres_rows import approval_of_row as _approval
from approvals.store.postgres_rows import audit_event_of_row as _audit_event
from approvals.store.review_rows import check_step

__all__ = ["CHANNEL", "MIGRATIONS", "PostgresStore"]

CHANNEL = "approvals"  # the NOTIFY channel; payload "id:version:event"
# A connection the server ended (pg_terminate_backend) can also surface as InternalClientError.
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
_MIGRATION_LOCK = 0x61707072  # "appr": the advisory lock replicas migrate under

MIGRATIONS: list[str] = [
    """
    CREATE TABLE approvals (
        id                TEXT PRIMARY KEY,
        upstream          TEXT NOT NULL,
        tool              TEXT NOT NULL,
        arguments_json    TEXT NOT NULL,
        args_sha256       TEXT NOT NULL,
        tool_json         TEXT NOT NULL,
        tool_sha256       TEXT NOT NULL,
        grant_name        TEXT NOT NULL,
        owner             TEXT,
        session_id        TEXT NOT NULL,
        rule              TEXT NOT NULL,
        explanation       TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired',
                                                          'cancelled', 'released', 'completed', 'failed')),
        created_at        DOUBLE PRECISION NOT NULL,
        expires_at        DOUBLE PRECISION NOT NULL,
        decided_at        DOUBLE PRECISION,
        decided_by        TEXT,
        decided_via       TEXT,
        reason            TEXT,
        released_at       DOUBLE PRECISION,
        finished_at       DOUBLE PRECISION,
        result_json       TEXT,
        result_expires_at DOUBLE PRECISION,
        result_delivered  BOOLEAN NOT NULL DEFAULT FALSE,
        note              TEXT,
        version           INTEGER NOT NULL DEFAULT 0,
        lease_owner       TEXT,
        lease_expires_at  DOUBLE PRECISION
    );
    CREATE INDEX approvals_status_created ON approvals (status, created_at, id);
    CREATE INDEX approvals_created ON approvals (created_at, id);
    CREATE INDEX approvals_request ON approvals (grant_name, upstream, tool, args_sha256, created_at);
    CREATE INDEX approvals_pending_grant ON approvals (grant_name) WHERE status = 'pending';
    CREATE INDEX approvals_pending_expiry ON approvals (expires_at, id) WHERE status = 'pending';
    CREATE INDEX approvals_kept_results ON approvals (result_expires_at) WHERE result_json IS NOT NULL;
    CREATE INDEX approvals_released_lease ON approvals (lease_expires_at) WHERE status = 'released';
    CREATE TABLE audit (
        seq         BIGSERIAL PRIMARY KEY,
        at          DOUBLE PRECISION NOT NULL,
        approval_id TEXT NOT NULL REFERENCES approvals (id),
        event       TEXT NOT NULL,
        actor       TEXT NOT NULL,
        channel     TEXT NOT NULL,
        args_sha256 TEXT NOT NULL,
        detail      TEXT
    );
    CREATE INDEX audit_approval ON audit (approval_id, seq);
    CREATE TABLE message_refs (
        approval_id TEXT NOT NULL REFERENCES approvals (id),
        channel     TEXT NOT NULL,
        ref_json    TEXT NOT NULL,
        PRIMARY KEY (approval_id, channel)
    );
    CREATE TABLE counters (
        counter      TEXT NOT NULL,
        scope_key    TEXT NOT NULL,
        window_start BIGINT NOT NULL,
        value        DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (counter, scope_key, window_start)
    );
    """,
    postgres_inbox.MIGRATION,
    postgres_replicas.MIGRATION,
    postgres_quota.MIGRATION,
    # 5: the audit log becomes a hash chain (approvals.audit_chain). Every row keeps the hash of the
    # one before and its own; the one-row head keeps the newest (seq, hash), and a writer locks it
    # (FOR UPDATE) until commit, so inserts from every replica are chained one at a time and seqs
    # are handed out, dense, in chain order. Rows already there are chained, in seq order, by
    # _chain_unchained_audit in the same transaction. audit_sinks: each webhook sink's position and
    # the lease of the replica delivering it. (empty() TRUNCATEs, which row triggers do not see.)
    # The genesis hash (64 zeros) is spelled in SQL: a shipped migration never changes with the code.
    """
    ALTER TABLE audit ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '', ADD COLUMN hash TEXT NOT NULL DEFAULT '',
        ADD COLUMN request_id TEXT;
    CREATE TABLE audit_head (
        singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        seq       BIGINT NOT NULL,
        hash      TEXT NOT NULL
    );
    INSERT INTO audit_head (seq, hash) VALUES (0, repeat('0', 64));
    CREATE TABLE audit_sinks (
        name             TEXT PRIMARY KEY,
        delivered_seq    BIGINT NOT NULL DEFAULT 0,
        lease_owner      TEXT,
        lease_expires_at DOUBLE PRECISION
    );
    -- As on SQLite: rows are never changed or deleted, but for the chaining of rows that have no
    -- hash yet (the rows of before this migration, chained right after it).
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.hash = '' THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'the audit log is append-only';
    END
    $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    """,
    postgres_review.MIGRATION,
]
AUDIT_CHAIN_MIGRATION = 5  # its number: the migration that also chains the rows already there

_REUSABLE = (
    " WHERE grant_name = $1 AND upstream = $2 AND tool = $3 AND args_sha256 = $4"
    " AND (status IN ('pending', 'approved', 'released')"
    "      OR (status IN ('completed', 'failed') AND result_json IS NOT NULL"
    "          AND NOT result_delivered AND result_expires_at > $5)"
    "      OR (status IN ('denied', 'expired') AND result_expires_at > $5))"
    " ORDER BY created_at DESC, id DESC LIMIT 1"
)


class PostgresStore(postgres_inbox.PostgresInboxMethods, postgres_review.PostgresReviewMethods):
    """The whole store (`approvals.core.ports.Store`) on a PostgreSQL pool (escalation queries and
    standing grants in :class:`~approvals.store.postgres_review.PostgresReviewMethods`)."""

    def __init__(self, pool: asyncpg.Pool, url: str, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self.url = url
        self._clock = clock
        # Told (operation, seconds) after each write, commit included (the gateway's metrics).
        self.on_write: Callable[[str, float], None] | None = None

    @classmethod
    async def open(
        cls, url: str, *, clock: Callable[[], float] = time.time, max_connections: int = 10
    ) -> PostgresStore:
        """Connect, and bring the schema to the latest version (once, whichever replica is first)."""
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=max_connections)
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"cannot connect to the database: {exc}") from exc
        store = cls(pool, url, clock)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool, for adapters that share it (the rate limits' shared quota)."""
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    async def empty(self) -> None:
        """Delete every row (tests sharing one database start each from nothing)."""
        async with self._connection("empty the database") as conn:
            tables = (
                "approvals, audit, message_refs, counters, used_login_links, ended_inbox_sessions,"
                " rate_quota, audit_sinks, standing_grants"
            )
            await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
            await conn.execute("UPDATE audit_head SET seq = 0, hash = $1", GENESIS)

    async def schema_version(self) -> int:
        async with self._connection("read the schema version") as conn:
            return int(await conn.fetchval("SELECT max(version) FROM schema_version") or 0)

    async def _migrate(self) -> None:
        async with self._connection("migrate the schema") as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
                if current > len(MIGRATIONS):
                    raise StoreError(f"the database schema is v{current}, newer than this gateway's")
                for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                    async with conn.transaction():
                        await conn.execute(script)
                        if number == AUDIT_CHAIN_MIGRATION:
                            await _chain_unchained_audit(conn)
                        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    # ---- counters ------------------------------------------------------------------------------

    async def load_counters(self, since: float) -> list[CounterRow]:
        async with self._connection("load counters") as conn:
            rows = await conn.fetch(
                "SELECT counter, scope_key, window_start, value FROM counters WHERE window_start >= $1", since
            )
        return [(str(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        if not rows:
            return
        async with self._connection("save counters", write=True) as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO counters (counter, scope_key, window_start, value) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (counter, scope_key, window_start) DO UPDATE SET value = excluded.value",
                [(c, k, int(w), float(v)) for c, k, w, v in rows],
            )

    async def prune_counters(self, before: int) -> None:
        async with self._connection("prune counters") as conn:
            await conn.execute("DELETE FROM counters WHERE window_start < $1", before)

    # ---- approvals ------------------------------------------------------------------------------

    async def create_approval(self, approval: Approval, *, actor: str, channel: str) -> None:
        _check_new(approval)
        async with self._connection("create an approval", write=True) as conn, conn.transaction():
            await self._insert(conn, approval, actor, channel)

    async def open_approval(
        self, approval: Approval, *, actor: str, channel: str, max_pending: int
    ) -> Approval | None:
        _check_new(approval)
        async with self._connection("open an approval", write=True) as conn, conn.transaction():
            # Every replica opening a request for this grant waits here: look-up, count and insert
            # are one step.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", approval.grant)
            row = await conn.fetchrow(
                f"SELECT {_SELECT} FROM approvals{_REUSABLE}",  # noqa: S608
                approval.grant,
                approval.upstream,
                approval.tool,
                approval.args_sha256,
                approval.created_at,
            )
            if row is not None:
                return _approval(row)
            pending = await conn.fetchval(
                "SELECT count(*) FROM approvals WHERE status = 'pending' AND grant_name = $1", approval.grant
            )
            if int(pending) >= max_pending:
                return None
            await self._insert(conn, approval, actor, channel)
            return approval

    async def _insert(self, conn: asyncpg.Connection, approval: Approval, actor: str, channel: str) -> None:
        marks = ", ".join(f"${n}" for n in range(1, len(STORED_FIELDS) + 1))
        values = [getattr(approval, name) for name in STORED_FIELDS]
        await conn.execute(f"INSERT INTO approvals ({_SELECT}) VALUES ({marks})", *values)  # noqa: S608
        # NOTIFY first: it is delivered at commit all the same, and the audit append, which locks
        # the chain's head until then, comes last.
        await _notify(conn, approval.id, approval.version, "created")
        await self._audit(conn, approval.id, "created", actor, channel, approval.args_sha256, None)

    async def get_approval(self, approval_id: str) -> Approval | None:
        async with self._connection("read an approval") as conn:
            row = await conn.fetchrow(f"SELECT {_SELECT} FROM approvals WHERE id = $1", approval_id)  # noqa: S608
        return None if row is None else _approval(row)

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
        # Column names come from the fixed mapping, never from the caller; values are bound.
        given = {"status": status, "upstream": upstream, "tool": tool, "grant": grant}
        filters = {_COLUMN[name]: value for name, value in given.items() if value is not None}
        where = " AND ".join(f"{column} = ${n}" for n, column in enumerate(filters, start=1)) or "TRUE"
        n = len(filters)
        sql = (
            f"SELECT {_SELECT} FROM approvals WHERE {where}"  # noqa: S608
            f" ORDER BY created_at DESC, id DESC LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        async with self._connection("list approvals") as conn:
            rows = await conn.fetch(sql, *filters.values(), limit, offset)
        return [_approval(row) for row in rows]

    async def find_reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        async with self._connection("look up a repeat call") as conn:
            row = await conn.fetchrow(
                f"SELECT {_SELECT} FROM approvals{_REUSABLE}",  # noqa: S608
                grant,
                upstream,
                tool,
                args_sha256,
                now,
            )
        return None if row is None else _approval(row)

    async def count_pending(self, grant: str) -> int:
        async with self._connection("count pending approvals") as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM approvals WHERE status = 'pending' AND grant_name = $1", grant
            )
        return int(count)

    async def transition(
        self,
        approval_id: str,
        *,
        from_: Collection[Status],
        to: Status,
        actor: str,
        channel: str,
        event: str | None = None,
        version: int | None = None,
        **fields: object,
    ) -> Approval | None:
        check_transition(from_, to)
        check_step(from_, to, version)
        check_transition_fields(fields)
        sets = ["status = $1", "version = version + 1"]
        sets += [f"{_COLUMN[name]} = ${n}" for n, name in enumerate(fields, start=2)]
        n = len(fields) + 2
        params: list[object] = [to, *fields.values(), approval_id, sorted(set(from_))]
        where = f"id = ${n} AND status = ANY(${n + 1}::text[])"
        if version is not None:  # a step on the way to a decision: only on the record as read
            where += f" AND version = ${n + 2}"
            params.append(version)
        sql = f"UPDATE approvals SET {', '.join(sets)} WHERE {where} RETURNING {_SELECT}"  # noqa: S608
        async with (
            self._connection(f"move approval {approval_id} to {to}", write="transition") as conn,
            conn.transaction(),
        ):
            row = await conn.fetchrow(sql, *params)
            if row is None:
                return None
            moved = _approval(row)
            detail = fields.get("reason")
            await _notify(conn, approval_id, moved.version, event or to)  # delivered at commit
            await self._audit(  # last: it holds the chain's head until commit
                conn,
                approval_id,
                event or to,
                actor,
                channel,
                moved.args_sha256,
                None if detail is None else str(detail),
            )
        return moved

    async def update_fields(self, approval_id: str, **fields: object) -> None:
        check_update_fields(fields)
        if not fields:
            return
        sets = ", ".join(f"{_COLUMN[name]} = ${n}" for n, name in enumerate(fields, start=1))
        async with self._connection("update an approval", write=True) as conn:
            await conn.execute(
                f"UPDATE approvals SET {sets} WHERE id = ${len(fields) + 1}",  # noqa: S608
                *fields.values(),
                approval_id,
            )

    async def due_for_expiry(self, now: float) -> list[Approval]:
        async with self._connection("find expired approvals") as conn:
            rows = await conn.fetch(
                f"SELECT {_SELECT} FROM approvals WHERE status = 'pending' AND expires_at <= $1"  # noqa: S608
                " ORDER BY expires_at, id",
                now,
            )
        return [_approval(row) for row in rows]

    async def interrupted_releases(self, now: float) -> list[Approval]:
        async with self._connection("find interrupted releases") as conn:
            rows = await conn.fetch(
                f"SELECT {_SELECT} FROM approvals WHERE status = 'released'"  # noqa: S608
                " AND (lease_expires_at IS NULL OR lease_expires_at <= $1) ORDER BY created_at, id",
                now,
            )
        return [_approval(row) for row in rows]

    async def next_expiry(self) -> float | None:
        async with self._connection("find the next expiry") as conn:
            value = await conn.fetchval("SELECT min(expires_at) FROM approvals WHERE status = 'pending'")
        return None if value is None else float(value)

    async def drop_expired_results(self, now: float) -> int:
        async with self._connection("drop expired results") as conn:
            done = await conn.execute(
                "UPDATE approvals SET result_json = NULL, note = $1"
                " WHERE result_json IS NOT NULL AND result_expires_at <= $2",
                RESULT_DROPPED_NOTE,
                now,
            )
        return int(done.rsplit(" ", 1)[-1])  # "UPDATE n"

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        async with self._connection("read the audit log") as conn:
            if approval_id is None:
                rows = await conn.fetch(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",  # noqa: S608
                    after_seq,
                    limit,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE approval_id = $1 AND seq > $2"  # noqa: S608
                    " ORDER BY seq LIMIT $3",
                    approval_id,
                    after_seq,
                    limit,
                )
        return [_audit_event(r) for r in rows]

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
        async with self._connection("append to the audit log", write=True) as conn, conn.transaction():
            await self._audit(conn, approval_id, event, actor, channel, args_sha256, detail)

    async def audit_head(self) -> tuple[int, str]:
        """The newest audit event's (seq, hash); (0, GENESIS) while the log is empty."""
        async with self._connection("read the audit chain's head") as conn:
            row = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        if row is None:
            raise StoreError("the audit chain's head row is missing")
        return int(row[0]), str(row[1])

    async def claim_audit_sink(self, name: str, owner: str, now: float, lease_seconds: float) -> int | None:
        """Take or keep the lease on a sink; the seq it delivered up to, or None if another holds it."""
        async with self._connection("claim an audit sink") as conn:
            # One statement: of two replicas claiming at once, one inserts or updates, the other
            # finds the lease held and gets no row.
            delivered = await conn.fetchval(
                "INSERT INTO audit_sinks (name, delivered_seq, lease_owner, lease_expires_at)"
                " VALUES ($1, 0, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET lease_owner = excluded.lease_owner,"
                " lease_expires_at = excluded.lease_expires_at"
                " WHERE audit_sinks.lease_owner IS NULL OR audit_sinks.lease_owner = excluded.lease_owner"
                " OR audit_sinks.lease_expires_at <= $4"
                " RETURNING delivered_seq",
                name,
                owner,
                now + lease_seconds,
                now,
            )
        return None if delivered is None else int(delivered)

    async def advance_audit_sink(
        self, name: str, owner: str, seq: int, now: float, lease_seconds: float
    ) -> bool:
        """Record a sink's delivery up to ``seq`` and extend its lease; False if the lease was lost."""
        async with self._connection("advance an audit sink") as conn:
            done = await conn.execute(
                "UPDATE audit_sinks SET delivered_seq = greatest(delivered_seq, $1), lease_expires_at = $2"
                " WHERE name = $3 AND lease_owner = $4 AND lease_expires_at > $5",
                seq,
                now + lease_seconds,
                name,
                owner,
                now,
            )
        return bool(done == "UPDATE 1")

    async def release_audit_sink(self, name: str, owner: str) -> None:
        """Give up a sink's lease, so another replica takes it over at once."""
        async with self._connection("release an audit sink") as conn:
            await conn.execute(
                "UPDATE audit_sinks SET lease_owner = NULL, lease_expires_at = NULL"
                " WHERE name = $1 AND lease_owner = $2",
                name,
                owner,
            )

    async def save_message_ref(self, approval_id: str, channel: str, ref_json: str) -> None:
        async with self._connection("save a message ref", write=True) as conn:
            await conn.execute(
                "INSERT INTO message_refs (approval_id, channel, ref_json) VALUES ($1, $2, $3)"
                " ON CONFLICT (approval_id, channel) DO UPDATE SET ref_json = excluded.ref_json",
                approval_id,
                channel,
                ref_json,
            )

    async def message_ref(self, approval_id: str, channel: str) -> str | None:
        async with self._connection("read a message ref") as conn:
            value = await conn.fetchval(
                "SELECT ref_json FROM message_refs WHERE approval_id = $1 AND channel = $2",
                approval_id,
                channel,
            )
        return None if value is None else str(value)

    # ---- plumbing -----------------------------------------------------------------------------

    async def _audit(
        self,
        conn: asyncpg.Connection,
        approval_id: str,
        event: str,
        actor: str,
        channel: str,
        args_sha256: str,
        detail: str | None,
    ) -> None:
        """Append one event, chained after the head, inside the caller's transaction.

        The head stays locked until that transaction ends: callers append last, just before
        commit, so other replicas wait for it as briefly as possible.
        """
        head = await conn.fetchrow("SELECT seq, hash FROM audit_head FOR UPDATE")
        if head is None:
            raise StoreError("the audit chain's head row is missing")
        seq = int(head[0]) + 1
        new = AuditEvent(seq, self._clock(), approval_id, event, actor, channel, args_sha256, detail)
        row = seal(dataclasses.replace(new, request_id=REQUEST_ID.get()), str(head[1]))
        await conn.execute(
            f"WITH appended AS (INSERT INTO audit ({_AUDIT_COLUMNS})"  # noqa: S608
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11))"
            " UPDATE audit_head SET seq = $1, hash = $10",
            *dataclasses.astuple(row),
        )

    @asynccontextmanager
    async def _connection(self, what: str, *, write: bool | str = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; any database failure becomes a StoreError saying what failed. A
        `write` is timed, waiting for a connection and the commit included, for ``on_write``, named
        `what` (a fixed phrase) or the operation name `write` gives."""
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except StoreError:
            raise
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"cannot {what}: {exc}") from exc
        if write and self.on_write is not None:
            self.on_write(write if isinstance(write, str) else what, time.perf_counter() - started)


async def _notify(conn: asyncpg.Connection, approval_id: str, version: int, event: str) -> None:
    # Delivered when the transaction commits, never for one that rolls back.
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{approval_id}:{version}:{event}")


async def _chain_unchained_audit(conn: asyncpg.Connection, page: int = 1000) -> None:
    """Chain the rows written before migration 5, in seq order, a page at a time (bounded memory)."""
    head_seq, head_hash = 0, GENESIS
    while rows := await conn.fetch(
        f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",  # noqa: S608
        head_seq,
        page,
    ):
        sealed = []
        for row in rows:
            event = seal(_audit_event(row), head_hash)
            sealed.append((event.prev_hash, event.hash, event.seq))
            head_seq, head_hash = event.seq, event.hash
        await conn.executemany("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3", sealed)
    await conn.execute("UPDATE audit_head SET seq = $1, hash = $2", head_seq, head_hash)


def _check_new(approval: Approval) -> None:
    if approval.status != "pending" or approval.version != 0:
        raise ValueError(f"a new approval must be pending at version 0, not {approval.status!r}")
