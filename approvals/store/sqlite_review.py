"""The SQLite store's part for review workflows: schema v8, escalation queries, standing grants.

:class:`SqliteReviewMethods` is a base class of :class:`approvals.store.sqlite.SqliteStore` and runs
its jobs through the store's ``_read`` / ``_write`` (one job each, on the store's thread, so a use
of a grant and its audit event commit together or not at all). The SQL follows the in-memory twin,
:class:`approvals.store.memory_review.MemoryReviewMethods`.

Every value is bound as a parameter — the text of a standing grant (its reason, its constraints)
comes from reviewers; only fixed column names and fixed SQL words are ever spelled into a statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from approvals.core.model import Approval
from approvals.core.standing import StandingGrant
from approvals.request_context import REQUEST_ID
from approvals.store import sqlite_approvals as q
from approvals.store.review_rows import (
    STANDING_FIELDS,
    STANDING_SELECT,
    check_new_standing,
    granted_detail,
    revoked_detail,
    standing_from_values,
    used_detail,
)

__all__ = ["REVIEW_SCHEMA", "SqliteReviewMethods"]

T = TypeVar("T")

# Schema v8 (issue 15: review workflows).
# - approvals gains what a review keeps: the rule at request time, the votes, an edit, the
#   escalation steps announced and when the next is due. Old rows read as "" / NULL / 0: one
#   reviewer, anyone, no edit, no escalation — what they were held under.
# - pending → pending becomes a legal move (a vote, an edit, an escalation), and review_json
#   joins the request that never changes.
# - standing_grants, whose "granted" / "used" / "revoked" events go in the audit log under the
#   grant's id (sg_…). The audit table loses its foreign key to approvals for that (SQLite cannot
#   drop a constraint: the table is rebuilt, rows, seqs and hashes copied as they are) and gains a
#   trigger that asks the same of either table. DROP TABLE's implicit delete fires no trigger, so
#   the append-only triggers do not stand in the way; they are made again on the new table.
REVIEW_SCHEMA = """
ALTER TABLE approvals ADD COLUMN review_json TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN votes_json TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN edited_json TEXT;
ALTER TABLE approvals ADD COLUMN edited_sha256 TEXT;
ALTER TABLE approvals ADD COLUMN edited_by TEXT;
ALTER TABLE approvals ADD COLUMN escalated INTEGER NOT NULL DEFAULT 0 CHECK (escalated >= 0);
ALTER TABLE approvals ADD COLUMN escalate_at REAL;
-- Partial, like approvals_pending_expiry: the escalation task asks only about pending records that
-- still have a step to take.
CREATE INDEX approvals_pending_escalation ON approvals (escalate_at, id)
    WHERE status = 'pending' AND escalate_at IS NOT NULL;

DROP TRIGGER approvals_legal_moves;
CREATE TRIGGER approvals_legal_moves BEFORE UPDATE OF status ON approvals
WHEN NOT ((OLD.status = 'pending' AND NEW.status IN ('pending', 'approved', 'denied', 'expired', 'cancelled'))
       OR (OLD.status = 'approved' AND NEW.status IN ('released', 'expired', 'pending'))
       OR (OLD.status = 'released' AND NEW.status IN ('completed', 'failed')))
BEGIN
    SELECT RAISE(ABORT, 'illegal approval status change');
END;
DROP TRIGGER approvals_request_is_fixed;
CREATE TRIGGER approvals_request_is_fixed
BEFORE UPDATE OF id, upstream, tool, arguments_json, args_sha256, grant_name, owner, created_at, review_json
ON approvals
BEGIN
    SELECT RAISE(ABORT, 'the request of an approval never changes');
END;

CREATE TABLE standing_grants (
    id               TEXT    NOT NULL PRIMARY KEY CHECK (substr(id, 1, 3) = 'sg_'),
    effect           TEXT    NOT NULL CHECK (effect IN ('allow', 'deny')),
    upstream         TEXT    NOT NULL,
    tool             TEXT    NOT NULL,
    grant_name       TEXT    NOT NULL, -- StandingGrant.grant, the agent's [[grants]] name
    constraints_json TEXT    NOT NULL,
    rule             TEXT    NOT NULL,
    reason           TEXT,
    created_by       TEXT    NOT NULL,
    created_via      TEXT    NOT NULL,
    created_at       REAL    NOT NULL,
    expires_at       REAL    NOT NULL,
    max_uses         INTEGER CHECK (max_uses IS NULL OR max_uses >= 1),
    uses             INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND (max_uses IS NULL OR uses <= max_uses)),
    source_approval  TEXT    NOT NULL DEFAULT '',
    revoked_at       REAL,
    revoked_by       TEXT
) STRICT;
-- standing_for, on every call of a tool by an agent: its grants not revoked.
CREATE INDEX standing_grants_for ON standing_grants (grant_name, upstream, tool) WHERE revoked_at IS NULL;
-- list_standing, newest first: everyone's, or one agent's.
CREATE INDEX standing_grants_created ON standing_grants (created_at, id);
CREATE INDEX standing_grants_agent ON standing_grants (grant_name, created_at, id);
-- What a reviewer granted stays as granted: only uses and the revocation change.
CREATE TRIGGER standing_grants_terms_are_fixed
BEFORE UPDATE OF id, effect, upstream, tool, grant_name, constraints_json, rule, reason, created_by,
                 created_via, created_at, expires_at, max_uses, source_approval
ON standing_grants
BEGIN
    SELECT RAISE(ABORT, 'the terms of a standing grant never change');
END;

CREATE TABLE audit_v8 (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL    NOT NULL,
    approval_id TEXT    NOT NULL, -- an approval's id, or a standing grant's (sg_…)
    event       TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    channel     TEXT    NOT NULL,
    args_sha256 TEXT    NOT NULL,
    detail      TEXT,
    prev_hash   TEXT    NOT NULL DEFAULT '',
    hash        TEXT    NOT NULL DEFAULT '',
    request_id  TEXT
) STRICT;
INSERT INTO audit_v8 (seq, at, approval_id, event, actor, channel, args_sha256, detail, prev_hash, hash,
                      request_id)
SELECT seq, at, approval_id, event, actor, channel, args_sha256, detail, prev_hash, hash, request_id
FROM audit ORDER BY seq;
DROP TABLE audit;
ALTER TABLE audit_v8 RENAME TO audit;
CREATE INDEX audit_approval ON audit (approval_id, seq);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit WHEN OLD.hash <> ''
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER audit_known_subject BEFORE INSERT ON audit
WHEN NOT EXISTS (SELECT 1 FROM approvals WHERE id = NEW.approval_id)
 AND NOT EXISTS (SELECT 1 FROM standing_grants WHERE id = NEW.approval_id)
BEGIN
    SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: no approval or standing grant has this id');
END;
"""

_ESCALATING = "status = 'pending' AND escalate_at IS NOT NULL"  # spelled as the partial index's WHERE
_BY_ESCALATION = "approvals INDEXED BY approvals_pending_escalation"
_ACTIVE = "revoked_at IS NULL AND expires_at > ? AND (max_uses IS NULL OR uses < max_uses)"


class SqliteReviewMethods:
    """Escalation queries and :class:`approvals.core.ports.StandingGrantStore` for SqliteStore."""

    _clock: Callable[[], float]

    async def _read(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError  # SqliteStore's: one read job, errors as StoreError

    async def _write(
        self,
        what: str,
        job: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = False,
        operation: str | None = None,
    ) -> T:
        raise NotImplementedError  # SqliteStore's: one write job in a group commit, errors as StoreError

    # ---- escalation ---------------------------------------------------------------------------

    async def due_for_escalation(self, now: float) -> list[Approval]:
        """Pending records whose ``escalate_at <= now``, soonest first."""

        def due(conn: sqlite3.Connection) -> list[Approval]:
            rows = conn.execute(
                f"SELECT {q.SELECT_COLUMNS} FROM {_BY_ESCALATION}"  # noqa: S608
                f" WHERE {_ESCALATING} AND escalate_at <= ? ORDER BY escalate_at, id",
                (now,),
            ).fetchall()
            return [q.approval_of_row(row) for row in rows]

        return await self._read("find approvals due for escalation", due)

    async def next_escalation(self) -> float | None:
        """The earliest ``escalate_at`` among pending records."""

        def soonest(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                f"SELECT escalate_at FROM {_BY_ESCALATION} WHERE {_ESCALATING}"  # noqa: S608
                " ORDER BY escalate_at, id LIMIT 1"
            ).fetchone()
            return None if row is None else float(row[0])

        return await self._read("find the next escalation", soonest)

    # ---- standing grants ----------------------------------------------------------------------

    async def create_standing(self, grant: StandingGrant, *, actor: str, channel: str) -> None:
        """Insert a new grant and its "granted" audit event in one durable transaction."""
        check_new_standing(grant)
        audit = self._auditor(grant.id, "granted", actor, channel)

        def create(conn: sqlite3.Connection) -> None:
            values = tuple(getattr(grant, name) for name in STANDING_FIELDS)
            conn.execute(
                f"INSERT INTO standing_grants ({STANDING_SELECT}) VALUES ({', '.join('?' * len(values))})",  # noqa: S608
                values,
            )
            audit(conn, "", granted_detail(grant))

        await self._write("create a standing grant", create, durable=True)

    async def get_standing(self, grant_id: str) -> StandingGrant | None:
        """The grant with this id, or None."""

        def get(conn: sqlite3.Connection) -> StandingGrant | None:
            rows = _grants(conn, "WHERE id = ?", (grant_id,))
            return rows[0] if rows else None

        return await self._read("read a standing grant", get)

    async def list_standing(
        self, *, active_at: float | None = None, grant: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[StandingGrant]:
        """Newest first; with ``active_at`` only those active then; with ``grant`` only that agent's."""
        conditions: list[str] = []
        params: list[object] = []
        if grant is not None:
            conditions.append("grant_name = ?")
            params.append(grant)
        if active_at is not None:
            conditions.append(_ACTIVE)
            params.append(active_at)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        tail = f"{where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        return await self._read(
            "list standing grants", lambda conn: _grants(conn, tail, (*params, limit, offset))
        )

    async def standing_for(self, upstream: str, tool: str, grant: str, now: float) -> list[StandingGrant]:
        """This agent's grants for this tool active at ``now``: deny first, then oldest first."""
        tail = (
            f"WHERE grant_name = ? AND upstream = ? AND tool = ? AND {_ACTIVE}"
            " ORDER BY CASE effect WHEN 'deny' THEN 0 ELSE 1 END, created_at, id"
        )
        return await self._read(
            "find standing grants", lambda conn: _grants(conn, tail, (grant, upstream, tool, now))
        )

    async def use_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str, args_sha256: str
    ) -> StandingGrant | None:
        """Count one use if the grant is active at ``now``: one conditional UPDATE, with its event."""
        audit = self._auditor(grant_id, "used", actor, channel)

        def use(conn: sqlite3.Connection) -> StandingGrant | None:
            rows = _grants(conn, f"WHERE id = ? AND {_ACTIVE}", (grant_id, now), update="SET uses = uses + 1")
            if rows:
                audit(conn, args_sha256, used_detail(rows[0]))
            return rows[0] if rows else None

        # Durable: a power cut must not hand a used-up grant's last use out again.
        return await self._write("use a standing grant", use, durable=True)

    async def revoke_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str
    ) -> StandingGrant | None:
        """Revoke it if it is not revoked yet: one conditional UPDATE, with its event."""
        audit = self._auditor(grant_id, "revoked", actor, channel)

        def revoke(conn: sqlite3.Connection) -> StandingGrant | None:
            rows = _grants(
                conn,
                "WHERE id = ? AND revoked_at IS NULL",
                (now, actor, grant_id),
                update="SET revoked_at = ?, revoked_by = ?",
            )
            if rows:
                audit(conn, "", revoked_detail(rows[0]))
            return rows[0] if rows else None

        return await self._write("revoke a standing grant", revoke, durable=True)

    def _auditor(
        self, grant_id: str, event: str, actor: str, channel: str
    ) -> Callable[[sqlite3.Connection, str, str], None]:
        """Appends the event of a grant's write, inside its job. The time and the request id are
        read here, on the caller's task: the job runs on the store's thread."""
        at, request_id = self._clock(), REQUEST_ID.get()

        def append(conn: sqlite3.Connection, args_sha256: str, detail: str) -> None:
            q.insert_audit(
                conn,
                at=at,
                approval_id=grant_id,
                event=event,
                actor=actor,
                channel=channel,
                args_sha256=args_sha256,
                detail=detail,
                request_id=request_id,
            )

        return append


def _grants(
    conn: sqlite3.Connection, tail: str, params: tuple[object, ...], *, update: str | None = None
) -> list[StandingGrant]:
    """SELECT (or, with ``update``, UPDATE … RETURNING) the grants that ``tail`` picks.

    ``tail`` and ``update`` are fixed SQL of this module; every value is in ``params``.
    """
    if update is None:
        sql = f"SELECT {STANDING_SELECT} FROM standing_grants {tail}"  # noqa: S608
    else:
        sql = f"UPDATE standing_grants {update} {tail} RETURNING {STANDING_SELECT}"
    cursor = conn.execute(sql, params)
    try:
        rows = cursor.fetchall()  # also steps an UPDATE … RETURNING to its end before the commit
    finally:
        cursor.close()
    return [_grant(row) for row in rows]


def _grant(row: Any) -> StandingGrant:
    return standing_from_values(dict(zip(STANDING_FIELDS, row, strict=True)))
