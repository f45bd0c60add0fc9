"""The embedded store: one SQLite file, on a thread of the store's own with group commit.

Every store call is one job on :class:`~approvals.store.sqlite_thread.SqliteThread`: the thread
owns the connection, so no two calls ever interleave statements, and each write job runs in a
``BEGIN IMMEDIATE … COMMIT`` it shares with the other writes queued meanwhile (one fsync for the
group). ``BEGIN IMMEDIATE`` takes the write lock up front, so a second process on the same file
waits ``busy_timeout`` instead of failing half-way through.

Durability is chosen per write. The connection runs at ``synchronous=NORMAL``, which under WAL
survives a crash of the process but may lose the last commits on a power cut — fine for counters,
written behind every second. Approval and audit writes are *durable*: their group commits at
``synchronous=FULL``, so the WAL is fsynced before the call returns. That is what makes
``approved → released`` single use across a power cut.

The approvals and audit SQL is in :mod:`approvals.store.sqlite_approvals`, the review workflows'
(escalation queries, standing grants, schema v8) in :mod:`approvals.store.sqlite_review`; this
module keeps the jobs' boundaries, their durability and the schema history.

Schema changes are the ordered scripts in :data:`MIGRATIONS`; version N of the schema is the
first N scripts applied, recorded in ``PRAGMA user_version``. To change the schema, append one
script to the list; never edit a script that has shipped.
"""

from __future__ import annotations

import pathlib
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from approvals.core.model import (
    RESULT_DROPPED_NOTE,
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
from approvals.store import sqlite_approvals as q
from approvals.store.review_rows import check_step
from approvals.store.sqlite_review import REVIEW_SCHEMA, SqliteReviewMethods
from approvals.store.sqlite_thread import SqliteThread

__all__ = ["AUDIT_CHAIN_VERSION", "CHANGES_PAGE", "MIGRATIONS", "SqliteStore"]

# Audit events read per look by the change feed's poller (a burst is read over several looks).
CHANGES_PAGE = 1000

BUSY_TIMEOUT_MS = 5000
# STRICT tables (3.37) and UPDATE … RETURNING (3.35), which the compare-and-set relies on.
MIN_SQLITE = (3, 37, 0)

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

# The inbox's used one-time login links and sessions logged out early (approvals.web.inbox_state):
# kept in the file, so a restart neither makes a used link good again nor a logged-out cookie.
_V6_INBOX = """
CREATE TABLE used_login_links (
    nonce      TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
CREATE TABLE ended_inbox_sessions (
    session_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) STRICT, WITHOUT ROWID;
"""

MIGRATIONS: list[str] = [
    _V1_COUNTERS,
    q.APPROVALS_SCHEMA,
    q.MESSAGE_REFS_SCHEMA,
    q.PENDING_INDEXES_SCHEMA,
    q.LEASES_SCHEMA,
    _V6_INBOX,
    q.AUDIT_CHAIN_SCHEMA,
    REVIEW_SCHEMA,
]
# The version whose migration also chains the audit rows written before it (in Python: the hash).
AUDIT_CHAIN_VERSION = 7
T = TypeVar("T")


class SqliteStore(SqliteReviewMethods):
    """The SQLite implementation of :class:`approvals.store.Store`. Create with :meth:`open`.

    Escalation queries and standing grants are in :class:`~approvals.store.sqlite_review.SqliteReviewMethods`.
    """

    def __init__(self, db: SqliteThread, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock  # only to stamp audit events; every decision is told `now`
        # Told (operation, seconds) after each write, commit included (the gateway's metrics).
        self.on_write: Callable[[str, float], None] | None = None

    @classmethod
    async def open(cls, path: pathlib.Path, *, clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; approvals needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer"
            )
        db = SqliteThread(path, _configure)
        with _errors(f"cannot open {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            await db.start()
        store = cls(db, clock)
        try:
            # The version is read inside the write transaction so two processes opening a fresh
            # file at once do not both run the same script.
            await store._write("migrate the schema", _migrate)
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """Finish queued work and close the connection; SQLite checkpoints the WAL on the last close."""
        await self._db.close()

    async def load_counters(self, since: float) -> list[CounterRow]:
        """Return every counter row whose ``window_start >= since``."""

        def load(conn: sqlite3.Connection) -> list[CounterRow]:
            rows = conn.execute(
                "SELECT counter, scope_key, window_start, value FROM counters WHERE window_start >= ?",
                (since,),
            ).fetchall()
            return [(str(c), str(s), int(w), float(v)) for c, s, w, v in rows]

        return await self._read("load counters", load)

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        """Upsert the absolute value of every row, all in one transaction."""
        if not rows:
            return
        rows = list(rows)  # the job runs later, on the store's thread: not the caller's live list

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO counters (counter, scope_key, window_start, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (counter, scope_key, window_start) DO UPDATE SET value = excluded.value",
                rows,
            )

        await self._write("save counters", save)

    async def prune_counters(self, before: int) -> None:
        """Delete every counter row whose ``window_start < before``."""

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM counters WHERE window_start < ?", (before,))

        await self._write("prune counters", prune)

    async def create_approval(self, approval: Approval, *, actor: str, channel: str) -> None:
        """Insert a new pending record and its "created" audit event in one durable transaction."""
        insert = self._inserter(approval, actor=actor, channel=channel)
        await self._write("create an approval", insert, durable=True)

    async def open_approval(
        self, approval: Approval, *, actor: str, channel: str, max_pending: int
    ) -> Approval | None:
        """The open request for this call, a new one, or None past ``max_pending`` — as one job.

        One job on the store's thread, so no other write comes between the look-up, the count and
        the insert: identical calls arriving together make one request, and a grant never holds
        more than ``max_pending`` pending ones.
        """
        insert = self._inserter(approval, actor=actor, channel=channel)

        def open_(conn: sqlite3.Connection) -> Approval | None:
            existing = q.find_reusable(
                conn,
                grant=approval.grant,
                upstream=approval.upstream,
                tool=approval.tool,
                args_sha256=approval.args_sha256,
                now=approval.created_at,
            )
            if existing is not None:
                return existing
            if q.count_pending(conn, approval.grant) >= max_pending:
                return None
            insert(conn)
            return approval

        return await self._write("open an approval", open_, durable=True)

    def _inserter(
        self, approval: Approval, *, actor: str, channel: str
    ) -> Callable[[sqlite3.Connection], None]:
        if approval.status != "pending" or approval.version != 0:
            raise ValueError(f"a new approval must be pending at version 0, not {approval.status!r}")
        at = self._clock()
        request_id = REQUEST_ID.get()  # read here: the job runs on the store's thread

        def insert(conn: sqlite3.Connection) -> None:
            q.insert_approval(conn, approval)
            q.insert_audit(
                conn,
                at=at,
                approval_id=approval.id,
                event="created",
                actor=actor,
                channel=channel,
                args_sha256=approval.args_sha256,
                detail=None,
                request_id=request_id,
            )

        return insert

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The record with this id, or None."""
        return await self._read("read an approval", lambda conn: q.get_approval(conn, approval_id))

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
        return await self._read(
            "list approvals",
            lambda conn: q.list_approvals(
                conn, status=status, upstream=upstream, tool=tool, grant=grant, limit=limit, offset=offset
            ),
        )

    async def find_reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        """The newest record of the same request that a repeat call attaches to, or None."""
        return await self._read(
            "look up a repeat call",
            lambda conn: q.find_reusable(
                conn, grant=grant, upstream=upstream, tool=tool, args_sha256=args_sha256, now=now
            ),
        )

    async def count_pending(self, grant: str) -> int:
        """How many records of this grant await a decision."""
        return await self._read("count pending approvals", lambda conn: q.count_pending(conn, grant))

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
        """Compare-and-set the status (and ``version``, if given) plus its audit event, durably; the
        new record or None."""
        check_transition(from_, to)
        check_step(from_, to, version)
        check_transition_fields(fields)
        at = self._clock()
        request_id = REQUEST_ID.get()  # read here: the job runs on the store's thread
        # The reason given to this move, not one left on the record by an earlier move.
        reason = fields.get("reason")
        detail = reason if isinstance(reason, str) else None

        def move(conn: sqlite3.Connection) -> Approval | None:
            updated = q.update_status(conn, approval_id, from_=from_, to=to, fields=fields, version=version)
            if updated is not None:
                q.insert_audit(
                    conn,
                    at=at,
                    approval_id=approval_id,
                    event=event or to,
                    actor=actor,
                    channel=channel,
                    args_sha256=updated.args_sha256,
                    detail=detail,
                    request_id=request_id,
                )
            return updated

        what = f"move approval {approval_id} to {to}"
        return await self._write(what, move, durable=True, operation="transition")

    async def update_fields(self, approval_id: str, **fields: object) -> None:
        """Set delivery fields without a transition or audit event."""
        check_update_fields(fields)
        # Durable too: result_delivered is what keeps a result from being handed out twice.
        await self._write(
            "update an approval", lambda conn: q.update_fields(conn, approval_id, fields), durable=True
        )

    async def due_for_expiry(self, now: float) -> list[Approval]:
        """Pending records whose ``expires_at <= now``, soonest first."""
        return await self._read("find expired approvals", lambda conn: q.due_for_expiry(conn, now))

    async def interrupted_releases(self, now: float) -> list[Approval]:
        """Records left ``released`` whose lease ran out by ``now`` (or that never had one)."""
        return await self._read("find interrupted releases", lambda conn: q.interrupted_releases(conn, now))

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among pending records."""
        return await self._read("find the next expiry", q.next_expiry)

    async def drop_expired_results(self, now: float) -> int:
        """Clear kept results past their window; how many were cleared."""
        # Not durable: if a power cut undoes it, the next sweep drops the same results again.
        return await self._write(
            "drop expired results", lambda conn: q.drop_expired_results(conn, now, RESULT_DROPPED_NOTE)
        )

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        """Audit events with ``seq > after_seq``, oldest first."""
        return await self._read(
            "read the audit log",
            lambda conn: q.audit_events(conn, approval_id=approval_id, after_seq=after_seq, limit=limit),
        )

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
        at = self._clock()
        request_id = REQUEST_ID.get()  # read here: the job runs on the store's thread
        await self._write(
            "append to the audit log",
            lambda conn: q.insert_audit(
                conn,
                at=at,
                approval_id=approval_id,
                event=event,
                actor=actor,
                channel=channel,
                args_sha256=args_sha256,
                detail=detail,
                request_id=request_id,
            ),
            durable=True,
        )

    async def audit_head(self) -> tuple[int, str]:
        """The newest audit event's (seq, hash); (0, GENESIS) while the log is empty."""
        return await self._read("read the audit chain's head", q.audit_head)

    async def claim_audit_sink(self, name: str, owner: str, now: float, lease_seconds: float) -> int | None:
        """Take or keep the lease on a sink; the seq it delivered up to, or None if another holds it."""
        return await self._write(
            "claim an audit sink", lambda conn: q.claim_audit_sink(conn, name, owner, now, lease_seconds)
        )

    async def advance_audit_sink(
        self, name: str, owner: str, seq: int, now: float, lease_seconds: float
    ) -> bool:
        """Record a sink's delivery up to ``seq`` and extend its lease; False if the lease was lost."""
        # Not durable: a power cut that undoes it makes the sink deliver those events again.
        return await self._write(
            "advance an audit sink",
            lambda conn: q.advance_audit_sink(conn, name, owner, seq, now, lease_seconds),
        )

    async def release_audit_sink(self, name: str, owner: str) -> None:
        """Give up a sink's lease, so another process takes it over at once."""
        await self._write("release an audit sink", lambda conn: q.release_audit_sink(conn, name, owner))

    async def save_message_ref(self, approval_id: str, channel: str, ref_json: str) -> None:
        """Remember where ``channel`` posted its message about the approval (replacing any earlier ref)."""
        # Durable like the record it points at: after a crash or power cut the message can still be
        # edited to show the outcome, rather than being left with live buttons.
        await self._write(
            "save a message ref",
            lambda conn: q.save_message_ref(conn, approval_id, channel, ref_json),
            durable=True,
        )

    async def message_ref(self, approval_id: str, channel: str) -> str | None:
        """The ref ``channel`` saved for the approval, or None."""
        return await self._read("read a message ref", lambda conn: q.message_ref(conn, approval_id, channel))

    async def use_login_link(self, nonce: str, expires_at: float) -> bool:
        """Record the login link as used, durably; False when it was already."""

        def use(conn: sqlite3.Connection) -> bool:
            inserted = conn.execute(
                "INSERT INTO used_login_links (nonce, expires_at) VALUES (?, ?)"
                " ON CONFLICT (nonce) DO NOTHING",
                (nonce, expires_at),
            )
            return inserted.rowcount == 1

        # Durable: a power cut must not make a used link good again.
        return await self._write("use a login link", use, durable=True)

    async def login_link_used(self, nonce: str) -> bool:
        """Whether the login link was used."""
        return await self._read(
            "look up a login link",
            lambda conn: (
                conn.execute("SELECT 1 FROM used_login_links WHERE nonce = ?", (nonce,)).fetchone()
                is not None
            ),
        )

    async def end_inbox_session(self, session_id: str, expires_at: float) -> None:
        """Record the session as ended until ``expires_at`` (the later expiry wins), durably."""

        def end(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO ended_inbox_sessions (session_id, expires_at) VALUES (?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)",
                (session_id, expires_at),
            )

        await self._write("end an inbox session", end, durable=True)

    async def ended_inbox_sessions(self, now: float) -> dict[str, float]:
        """Ended sessions whose record expires after ``now``."""

        def read(conn: sqlite3.Connection) -> dict[str, float]:
            rows = conn.execute(
                "SELECT session_id, expires_at FROM ended_inbox_sessions WHERE expires_at > ?", (now,)
            )
            return {str(sid): float(exp) for sid, exp in rows}

        return await self._read("read ended inbox sessions", read)

    async def prune_inbox_state(self, before: float) -> int:
        """Delete used links and ended sessions that expired before ``before``; how many."""

        def prune(conn: sqlite3.Connection) -> int:
            links = conn.execute("DELETE FROM used_login_links WHERE expires_at < ?", (before,)).rowcount
            ended = conn.execute("DELETE FROM ended_inbox_sessions WHERE expires_at < ?", (before,)).rowcount
            return int(links) + int(ended)

        return await self._write("prune the inbox's state", prune)

    async def changes_after(
        self, seq: int, data_version: int | None
    ) -> tuple[int, int, list[tuple[str, Approval]]]:
        """What other connections committed since the last look, for the change feed's poller.

        ``PRAGMA data_version`` changes only when another connection commits, so an unchanged
        value answers at once with nothing. Otherwise: the audit events after ``seq`` (at most
        ``CHANGES_PAGE``), each with its approval as it is now. Returns the data version, the last
        seq read, and the (event, approval) pairs.
        """

        def look(conn: sqlite3.Connection) -> tuple[int, int, list[tuple[str, Approval]]]:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
            if version == data_version:
                return version, seq, []
            return (version, *q.changes_after(conn, seq, CHANGES_PAGE))

        return await self._read("read changes", look)

    async def last_audit_seq(self) -> int:
        """The newest audit event's seq (0 when there is none): where a new poller starts."""
        return await self._read("read the audit position", q.last_audit_seq)

    async def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return await self._read("read schema version", _user_version)

    async def _read(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T:
        with _errors(f"cannot {what}"):
            return await self._db.read(job)

    async def _write(
        self,
        what: str,
        job: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = False,
        operation: str | None = None,
    ) -> T:
        """Run ``job`` as one transaction of its own (sharing the commit of its group).

        ``durable`` commits at ``synchronous=FULL`` (see the module docstring). Its time, commit
        included, goes to ``on_write`` as ``operation`` (default ``what``: a fixed phrase).
        """
        started = time.perf_counter()
        with _errors(f"cannot {what}"):
            result = await self._db.write(job, durable=durable)
        if self.on_write is not None:
            self.on_write(operation or what, time.perf_counter() - started)
        return result


def _configure(conn: sqlite3.Connection) -> None:
    row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if row is None or str(row[0]).lower() != "wal":
        raise StoreError(f"the database refused WAL journal mode (got {row!r})")
    # NORMAL is durable across crashes of this process under WAL; a power cut may lose the last
    # transactions, which is acceptable for counters. Durable writes commit at FULL.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the scripts the file has not seen yet, all in the one transaction of the job."""
    known = len(MIGRATIONS)
    current = _user_version(conn)
    if current > known:
        raise StoreError(
            f"database schema version {current} is newer than this gateway supports ({known}); "
            "upgrade approvals"
        )
    for script in MIGRATIONS[current:]:
        for statement in split_statements(script):
            conn.execute(statement)
    if current < AUDIT_CHAIN_VERSION <= known:
        q.chain_unchained_audit(conn)
    if current < known:
        # PRAGMA takes no bound parameters; `known` is an int we computed.
        conn.execute(f"PRAGMA user_version={known:d}")


def _user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
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
