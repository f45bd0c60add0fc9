"""The approvals and audit SQL of :class:`approvals.store.sqlite.SqliteStore`.

Each function runs its statements on a connection the caller already holds: ``SqliteStore`` owns
the lock, the transactions and their durability; this module owns the SQL and the mapping between
rows and :class:`~approvals.core.model.Approval`. Nothing here validates a request — the store
checks transitions and field names with the pure functions of ``records`` before calling in.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from approvals.audit_chain import seal
from approvals.core.model import STATUSES, STORED_FIELDS, Approval, AuditEvent, Status
from approvals.errors import StoreError

__all__ = [
    "APPROVALS_SCHEMA",
    "AUDIT_CHAIN_SCHEMA",
    "LEASES_SCHEMA",
    "MESSAGE_REFS_SCHEMA",
    "PENDING_INDEXES_SCHEMA",
    "SELECT_COLUMNS",
    "advance_audit_sink",
    "approval_of_row",
    "audit_events",
    "audit_head",
    "chain_unchained_audit",
    "changes_after",
    "claim_audit_sink",
    "count_pending",
    "drop_expired_results",
    "due_for_expiry",
    "find_reusable",
    "get_approval",
    "insert_approval",
    "insert_audit",
    "interrupted_releases",
    "last_audit_seq",
    "list_approvals",
    "message_ref",
    "next_expiry",
    "release_audit_sink",
    "save_message_ref",
    "update_fields",
    "update_status",
]

# Schema v2. Tables are STRICT so a value of the wrong type is refused rather than stored as text,
# and the triggers make the rules of the life cycle hold even for SQL that bypasses the store.
APPROVALS_SCHEMA = """
CREATE TABLE approvals (
    id                TEXT    NOT NULL PRIMARY KEY,
    upstream          TEXT    NOT NULL,
    tool              TEXT    NOT NULL,
    arguments_json    TEXT    NOT NULL,
    args_sha256       TEXT    NOT NULL,
    tool_json         TEXT    NOT NULL,
    tool_sha256       TEXT    NOT NULL,
    grant_name        TEXT    NOT NULL, -- Approval.grant; GRANT is reserved in PostgreSQL
    owner             TEXT,
    session_id        TEXT    NOT NULL,
    rule              TEXT    NOT NULL,
    explanation       TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired',
                                                         'cancelled', 'released', 'completed', 'failed')),
    created_at        REAL    NOT NULL,
    expires_at        REAL    NOT NULL,
    decided_at        REAL,
    decided_by        TEXT,
    decided_via       TEXT,
    reason            TEXT,
    released_at       REAL,
    finished_at       REAL,
    result_json       TEXT,
    result_expires_at REAL,
    result_delivered  INTEGER NOT NULL DEFAULT 0 CHECK (result_delivered IN (0, 1)),
    note              TEXT,
    version           INTEGER NOT NULL DEFAULT 0
) STRICT;
-- The inbox (list by status, newest first), interrupted_releases and count_pending.
CREATE INDEX approvals_status_created ON approvals (status, created_at, id);
-- The unfiltered list, newest first, without sorting the whole history for each page.
CREATE INDEX approvals_created ON approvals (created_at, id);
-- find_reusable: a repeat call looks up its request, newest first.
CREATE INDEX approvals_request ON approvals (grant_name, upstream, tool, args_sha256, created_at);
-- Partial: the expiry task asks only about live records; a full index on expires_at would make
-- next_expiry walk past every decided record older than the oldest live one.
CREATE INDEX approvals_live_expiry ON approvals (expires_at) WHERE status IN ('pending', 'approved');
-- Partial, for the same reason: drop_expired_results looks only at results still kept.
CREATE INDEX approvals_kept_results ON approvals (result_expires_at) WHERE result_json IS NOT NULL;

-- The edges of records.TRANSITIONS. The store checks them first and compares-and-sets the status;
-- this catches any other writer. A new edge needs a new migration that replaces this trigger.
CREATE TRIGGER approvals_legal_moves BEFORE UPDATE OF status ON approvals
WHEN NOT ((OLD.status = 'pending' AND NEW.status IN ('approved', 'denied', 'expired', 'cancelled'))
       OR (OLD.status = 'approved' AND NEW.status IN ('released', 'expired', 'pending'))
       OR (OLD.status = 'released' AND NEW.status IN ('completed', 'failed')))
BEGIN
    SELECT RAISE(ABORT, 'illegal approval status change');
END;
-- A reviewer approves exactly what was asked: the request itself is never rewritten.
CREATE TRIGGER approvals_request_is_fixed
BEFORE UPDATE OF id, upstream, tool, arguments_json, args_sha256, grant_name, owner, created_at
ON approvals
BEGIN
    SELECT RAISE(ABORT, 'the request of an approval never changes');
END;

CREATE TABLE audit (
    -- AUTOINCREMENT: a seq is never reused, so a reader paging with after_seq never misses a row.
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL    NOT NULL,
    approval_id TEXT    NOT NULL REFERENCES approvals (id),
    event       TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    channel     TEXT    NOT NULL,
    args_sha256 TEXT    NOT NULL,
    detail      TEXT
) STRICT;
CREATE INDEX audit_approval ON audit (approval_id, seq);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
"""

# Schema v3. Where a channel posted its message about an approval (Slack: channel id and ts), so the
# message can still be edited to show the outcome after a restart. The ref is the channel's own JSON;
# the store only keeps it. One ref per approval and channel: a repost replaces it.
MESSAGE_REFS_SCHEMA = """
CREATE TABLE message_refs (
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    channel     TEXT NOT NULL,
    ref_json    TEXT NOT NULL,
    PRIMARY KEY (approval_id, channel)
) STRICT, WITHOUT ROWID;
"""

# Schema v4. With ten thousand calls held, admission counts a grant's pending records and the
# expiry task asks for the soonest pending expiry, each time. Both are answered from partial
# indexes of pending records alone: the count without reading a row, the soonest expiry from the
# first entry. approvals_live_expiry also held approved records, which the expiry query had to
# step over; nothing else used it.
PENDING_INDEXES_SCHEMA = """
CREATE INDEX approvals_pending_grant ON approvals (grant_name) WHERE status = 'pending';
CREATE INDEX approvals_pending_expiry ON approvals (expires_at, id) WHERE status = 'pending';
DROP INDEX approvals_live_expiry;
"""

# Schema v5. A released call is leased to the process that claimed it (owner id, expiry): only a
# lease that ran out means the call was interrupted, so a process starting beside a live one never
# fails the other's calls in flight.
LEASES_SCHEMA = """
ALTER TABLE approvals ADD COLUMN lease_owner TEXT;
ALTER TABLE approvals ADD COLUMN lease_expires_at REAL;
CREATE INDEX approvals_released_lease ON approvals (lease_expires_at) WHERE status = 'released';
"""

# Schema v7. The audit log becomes a hash chain (approvals.audit_chain): each row keeps the hash of
# the one before and its own, and the one-row head keeps the newest (seq, hash), from which the
# next row takes both. Rows written before v7 are chained by the migration (chain_unchained_audit),
# the only update the trigger lets through: of a row that has no hash yet. audit_sinks is where a
# webhook sink (approvals.audit_sink) keeps how far it delivered and which process holds it.
# The genesis hash (64 zeros) is spelled in SQL: a shipped migration never changes with the code.
AUDIT_CHAIN_SCHEMA = """
ALTER TABLE audit ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN request_id TEXT;
CREATE TABLE audit_head (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    seq       INTEGER NOT NULL,
    hash      TEXT    NOT NULL
) STRICT;
INSERT INTO audit_head (singleton, seq, hash) VALUES (1, 0, hex(zeroblob(32)));
DROP TRIGGER audit_no_update;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit WHEN OLD.hash <> ''
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TABLE audit_sinks (
    name             TEXT    PRIMARY KEY,
    delivered_seq    INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at REAL
) STRICT, WITHOUT ROWID;
"""

_FIELDS: tuple[str, ...] = STORED_FIELDS
_COLUMN: Mapping[str, str] = {name: "grant_name" if name == "grant" else name for name in _FIELDS}
_SELECT = ", ".join(_COLUMN[name] for name in _FIELDS)
# UPDATE … RETURNING hands back a whole-number REAL as an int (SQLite stores such values compactly
# and RETURNING skips the conversion a SELECT does), so these are made floats again on the way out.
_REAL_FIELDS = frozenset(
    {
        "created_at",
        "expires_at",
        "decided_at",
        "released_at",
        "finished_at",
        "result_expires_at",
        "lease_expires_at",
        "escalate_at",
    }
)
# Only pending requests expire on the clock: an approval given in time stands even when its release
# is slow; a release waiting for rate-limit room expires it itself when the wait would pass expiry.
_EXPIRING = "status = 'pending'"  # spelled as in the partial indexes of v4, so they are used
# Named: without statistics the planner prefers approvals_status_created and sorts every pending row.
_BY_EXPIRY = "approvals INDEXED BY approvals_pending_expiry"
_AUDIT_COLUMNS = (
    "seq, at, approval_id, event, actor, channel, args_sha256, detail, prev_hash, hash, request_id"
)


def insert_approval(conn: sqlite3.Connection, approval: Approval) -> None:
    """Insert a new record (a duplicate id fails)."""
    values = tuple(getattr(approval, name) for name in _FIELDS)
    marks = ", ".join("?" * len(values))
    conn.execute(f"INSERT INTO approvals ({_SELECT}) VALUES ({marks})", values)  # noqa: S608


def insert_audit(
    conn: sqlite3.Connection,
    *,
    at: float,
    approval_id: str,
    event: str,
    actor: str,
    channel: str,
    args_sha256: str,
    detail: str | None,
    request_id: str | None = None,
) -> None:
    """Append one audit event, chained after the head, and make it the head."""
    head_seq, head_hash = audit_head(conn)
    new = AuditEvent(head_seq + 1, at, approval_id, event, actor, channel, args_sha256, detail)
    row = seal(dataclasses.replace(new, request_id=request_id), head_hash)
    conn.execute(
        f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        dataclasses.astuple(row),
    )
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE singleton = 1", (row.seq, row.hash))


def audit_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The newest chained row's (seq, hash): (0, GENESIS) for an empty log."""
    row = conn.execute("SELECT seq, hash FROM audit_head WHERE singleton = 1").fetchone()
    if row is None:  # the v7 migration inserts it; without it no row could be chained
        raise StoreError("the audit chain's head row is missing")
    return int(row[0]), str(row[1])


def chain_unchained_audit(conn: sqlite3.Connection, page: int = 1000) -> int:
    """Chain the rows written before the chain existed, in seq order, after the head; how many.

    Run once, by the migration to v7, in its transaction; a page at a time, so a long log is never
    held in memory whole.
    """
    chained = 0
    head_seq, head_hash = audit_head(conn)
    while rows := _rows_without_hash(conn, head_seq, page):
        for event in rows:
            sealed = seal(event, head_hash)
            conn.execute(
                "UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                (sealed.prev_hash, sealed.hash, sealed.seq),
            )
            head_seq, head_hash = sealed.seq, sealed.hash
            chained += 1
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE singleton = 1", (head_seq, head_hash))
    return chained


def _rows_without_hash(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[AuditEvent]:
    """Rows after ``after_seq`` that have no hash yet, oldest first."""
    rows = _fetch(
        conn,
        f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ? AND hash = '' ORDER BY seq LIMIT ?",  # noqa: S608
        (after_seq, limit),
    )
    return [_audit_event(row) for row in rows]


def claim_audit_sink(
    conn: sqlite3.Connection, name: str, owner: str, now: float, lease_seconds: float
) -> int | None:
    """Take (or keep) the lease on sink ``name`` for ``owner``: how far it delivered, or None when
    another owner's lease is still running."""
    rows = _fetch(
        conn,
        "INSERT INTO audit_sinks (name, delivered_seq, lease_owner, lease_expires_at) VALUES (?, 0, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET lease_owner = excluded.lease_owner,"
        " lease_expires_at = excluded.lease_expires_at"
        " WHERE lease_owner IS NULL OR lease_owner = excluded.lease_owner OR lease_expires_at <= ?"
        " RETURNING delivered_seq",
        (name, owner, now + lease_seconds, now),
    )
    return int(rows[0][0]) if rows else None


def advance_audit_sink(
    conn: sqlite3.Connection, name: str, owner: str, seq: int, now: float, lease_seconds: float
) -> bool:
    """Record delivery up to ``seq`` and extend the lease, if ``owner`` still holds it."""
    cursor = conn.execute(
        "UPDATE audit_sinks SET delivered_seq = max(delivered_seq, ?), lease_expires_at = ?"
        " WHERE name = ? AND lease_owner = ? AND lease_expires_at > ?",
        (seq, now + lease_seconds, name, owner, now),
    )
    return cursor.rowcount == 1


def release_audit_sink(conn: sqlite3.Connection, name: str, owner: str) -> None:
    """Give the lease up (shutdown), so another process takes the sink over at once."""
    conn.execute(
        "UPDATE audit_sinks SET lease_owner = NULL, lease_expires_at = NULL"
        " WHERE name = ? AND lease_owner = ?",
        (name, owner),
    )


def _audit_event(row: Any) -> AuditEvent:
    seq, at, approval, event, actor, channel, digest, detail, prev_hash, own_hash, request_id = row
    return AuditEvent(
        seq=int(seq),
        at=float(at),
        approval_id=str(approval),
        event=str(event),
        actor=str(actor),
        channel=str(channel),
        args_sha256=str(digest),
        detail=None if detail is None else str(detail),
        prev_hash=str(prev_hash),
        hash=str(own_hash),
        request_id=None if request_id is None else str(request_id),
    )


def get_approval(conn: sqlite3.Connection, approval_id: str) -> Approval | None:
    """The record with this id, or None."""
    return _one(_fetch(conn, f"SELECT {_SELECT} FROM approvals WHERE id = ?", (approval_id,)))  # noqa: S608


def list_approvals(
    conn: sqlite3.Connection,
    *,
    status: Status | None,
    upstream: str | None,
    tool: str | None,
    grant: str | None,
    limit: int,
    offset: int,
) -> list[Approval]:
    """Records matching every given filter, newest first (created_at, then id, descending)."""
    # Column names come from this fixed mapping, never from the caller; values are bound.
    given = {"status": status, "upstream": upstream, "tool": tool, "grant": grant}
    filters = {_COLUMN[name]: value for name, value in given.items() if value is not None}
    where = " AND ".join(f"{column} = ?" for column in filters) or "1"
    rows = _fetch(
        conn,
        f"SELECT {_SELECT} FROM approvals WHERE {where}"  # noqa: S608
        " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (*filters.values(), limit, offset),
    )
    return [_approval(row) for row in rows]


def find_reusable(
    conn: sqlite3.Connection, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
) -> Approval | None:
    """The newest record of this request that a repeat call should attach to, or None."""
    # A finished record counts only while its outcome is still to be told: a kept, undelivered
    # result, or a denial/expiry within its keep window. A NULL result_expires_at never matches,
    # so a record without a keep window leads to a new request — never to an unreviewed call.
    return _one(
        _fetch(
            conn,
            f"SELECT {_SELECT} FROM approvals"  # noqa: S608
            " WHERE grant_name = ? AND upstream = ? AND tool = ? AND args_sha256 = ?"
            " AND (status IN ('pending', 'approved', 'released')"
            "      OR (status IN ('completed', 'failed') AND result_json IS NOT NULL"
            "          AND result_delivered = 0 AND result_expires_at > ?)"
            "      OR (status IN ('denied', 'expired') AND result_expires_at > ?))"
            " ORDER BY created_at DESC, id DESC LIMIT 1",
            (grant, upstream, tool, args_sha256, now, now),
        )
    )


def count_pending(conn: sqlite3.Connection, grant: str) -> int:
    """How many records of this grant await a decision."""
    cursor = conn.execute(
        "SELECT count(*) FROM approvals WHERE status = 'pending' AND grant_name = ?", (grant,)
    )
    row = cursor.fetchone()
    return int(row[0]) if row is not None else 0


def update_status(
    conn: sqlite3.Connection,
    approval_id: str,
    *,
    from_: Collection[Status],
    to: Status,
    fields: Mapping[str, object],
    version: int | None = None,
) -> Approval | None:
    """Compare-and-set: move the record to ``to`` if its status is in ``from_`` (and its version is
    ``version``, if given); the new record or None."""
    sets = ["status = ?", "version = version + 1", *(f"{_COLUMN[name]} = ?" for name in fields)]
    sources = sorted(set(from_))
    where = f"id = ? AND status IN ({', '.join('?' * len(sources))})"
    params: tuple[object, ...] = (to, *fields.values(), approval_id, *sources)
    if version is not None:
        where += " AND version = ?"
        params += (version,)
    rows = _fetch(
        conn,
        f"UPDATE approvals SET {', '.join(sets)} WHERE {where} RETURNING {_SELECT}",  # noqa: S608
        params,
    )
    return _one(rows)


def update_fields(conn: sqlite3.Connection, approval_id: str, fields: Mapping[str, object]) -> None:
    """Set the given (already checked) columns; no status, version or audit change."""
    if not fields:
        return
    sets = ", ".join(f"{_COLUMN[name]} = ?" for name in fields)
    conn.execute(f"UPDATE approvals SET {sets} WHERE id = ?", (*fields.values(), approval_id))  # noqa: S608


def due_for_expiry(conn: sqlite3.Connection, now: float) -> list[Approval]:
    """Pending records whose ``expires_at <= now``, soonest first."""
    rows = _fetch(
        conn,
        f"SELECT {_SELECT} FROM {_BY_EXPIRY} WHERE {_EXPIRING} AND expires_at <= ? ORDER BY expires_at, id",  # noqa: S608
        (now,),
    )
    return [_approval(row) for row in rows]


def interrupted_releases(conn: sqlite3.Connection, now: float) -> list[Approval]:
    """Records left in ``released`` whose lease ran out (or that have none), oldest first."""
    rows = _fetch(
        conn,
        f"SELECT {_SELECT} FROM approvals WHERE status = 'released'"  # noqa: S608
        " AND (lease_expires_at IS NULL OR lease_expires_at <= ?) ORDER BY created_at, id",
        (now,),
    )
    return [_approval(row) for row in rows]


def next_expiry(conn: sqlite3.Connection) -> float | None:
    """The earliest ``expires_at`` among live records, or None."""
    sql = f"SELECT expires_at FROM {_BY_EXPIRY} WHERE {_EXPIRING} ORDER BY expires_at, id LIMIT 1"  # noqa: S608
    row = conn.execute(sql).fetchone()
    return None if row is None else float(row[0])


def drop_expired_results(conn: sqlite3.Connection, now: float, note: str) -> int:
    """Clear every kept result whose keep window has ended; how many were cleared."""
    cursor = conn.execute(
        "UPDATE approvals SET result_json = NULL, note = ?"
        " WHERE result_json IS NOT NULL AND result_expires_at <= ?",
        (note, now),
    )
    return cursor.rowcount


def audit_events(
    conn: sqlite3.Connection, *, approval_id: str | None, after_seq: int, limit: int
) -> list[AuditEvent]:
    """Audit events after ``after_seq`` (of one approval, or all), oldest first."""
    if approval_id is None:
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608
        params: tuple[object, ...] = (after_seq, limit)
    else:
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE approval_id = ? AND seq > ? ORDER BY seq LIMIT ?"  # noqa: S608
        params = (approval_id, after_seq, limit)
    return [_audit_event(row) for row in _fetch(conn, sql, params)]


def save_message_ref(conn: sqlite3.Connection, approval_id: str, channel: str, ref_json: str) -> None:
    """Insert or replace the ref of this approval's message on ``channel``."""
    conn.execute(
        "INSERT INTO message_refs (approval_id, channel, ref_json) VALUES (?, ?, ?)"
        " ON CONFLICT (approval_id, channel) DO UPDATE SET ref_json = excluded.ref_json",
        (approval_id, channel, ref_json),
    )


def message_ref(conn: sqlite3.Connection, approval_id: str, channel: str) -> str | None:
    """The ref of this approval's message on ``channel``, or None."""
    rows = _fetch(
        conn,
        "SELECT ref_json FROM message_refs WHERE approval_id = ? AND channel = ?",
        (approval_id, channel),
    )
    return str(rows[0][0]) if rows else None


# For the review workflows' queries (approvals.store.sqlite_review): the columns of a record, in
# Approval's field order, and the record of a row selected with them.
SELECT_COLUMNS = _SELECT


def approval_of_row(row: Any) -> Approval:
    """The record of a row selected with :data:`SELECT_COLUMNS` (fails closed on an unknown status)."""
    return _approval(row)


def _fetch(conn: sqlite3.Connection, sql: str, params: Iterable[object]) -> list[Any]:
    # fetchall also steps an UPDATE … RETURNING to its end, so the statement is finished before
    # the caller commits.
    cursor = conn.execute(sql, tuple(params))
    try:
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _one(rows: list[Any]) -> Approval | None:
    return _approval(rows[0]) if rows else None


def _approval(row: Any) -> Approval:
    values: dict[str, Any] = dict(zip(_FIELDS, row, strict=True))
    if values["status"] not in STATUSES:
        # Failing closed: a state this code does not know is never acted on.
        raise StoreError(f"approval {values['id']!r} has unknown status {values['status']!r}")
    values["result_delivered"] = bool(values["result_delivered"])
    for name in _REAL_FIELDS:
        if values[name] is not None:
            values[name] = float(values[name])
    return Approval(**values)


def changes_after(conn: sqlite3.Connection, seq: int, limit: int) -> tuple[int, list[tuple[str, Approval]]]:
    """The audit events after ``seq`` (oldest first, at most ``limit``), each with its approval as it
    is now; and the last seq read."""
    rows = conn.execute(
        "SELECT seq, approval_id, event FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
    ).fetchall()
    found: list[tuple[str, Approval]] = []
    for _, approval_id, event in rows:
        # None for a standing grant's event ("granted", "used", "revoked" on an sg_ id): it has no
        # approvals row and is no approval's change.
        approval = get_approval(conn, approval_id)
        if approval is not None:
            found.append((str(event), approval))
    return (int(rows[-1][0]) if rows else seq), found


def last_audit_seq(conn: sqlite3.Connection) -> int:
    """The newest audit seq, or 0."""
    row = conn.execute("SELECT max(seq) FROM audit").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0
