"""The PostgreSQL store's part for review workflows: migration 6, escalation queries, standing grants.

:class:`PostgresReviewMethods` is a base class of :class:`approvals.store.postgres.PostgresStore`,
with the same semantics as the in-memory twin (:class:`approvals.store.memory_review.MemoryReviewMethods`)
and SQLite. A use or a revocation is one conditional ``UPDATE … RETURNING``: under READ COMMITTED a
replica that waited for another's row lock re-checks the WHERE on the row as that one left it, so
of twenty replicas racing for the last five uses exactly five get one. The audit event is appended
in the same transaction, last (it holds the chain's head until commit).

Standing grant events are not sent on the ``approvals`` NOTIFY channel: they are no approval's
change, and :class:`approvals.store.postgres_feed.PostgresFeed` reads every id it is told about as
an approval. Every value is bound as a parameter — a grant's text comes from reviewers.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from approvals.core.model import Approval
from approvals.core.standing import StandingGrant
from approvals.store.postgres_rows import SELECT, approval_of_row
from approvals.store.review_rows import (
    STANDING_COLUMN,
    STANDING_FIELDS,
    STANDING_SELECT,
    check_new_standing,
    granted_detail,
    revoked_detail,
    standing_from_values,
    used_detail,
)

__all__ = ["MIGRATION", "PostgresReviewMethods"]

# Migration 6 of approvals.store.postgres.MIGRATIONS (issue 15: review workflows), as SQLite's v8:
# the review's columns on approvals (old rows read as "" / NULL / 0), standing_grants, and an audit
# log whose approval_id may also name a standing grant (sg_…): the foreign key to approvals gives
# way to a trigger that asks the same of either table.
MIGRATION = """
    ALTER TABLE approvals
        ADD COLUMN review_json   TEXT NOT NULL DEFAULT '',
        ADD COLUMN votes_json    TEXT NOT NULL DEFAULT '',
        ADD COLUMN edited_json   TEXT,
        ADD COLUMN edited_sha256 TEXT,
        ADD COLUMN edited_by     TEXT,
        ADD COLUMN escalated     INTEGER NOT NULL DEFAULT 0 CHECK (escalated >= 0),
        ADD COLUMN escalate_at   DOUBLE PRECISION;
    CREATE INDEX approvals_pending_escalation ON approvals (escalate_at, id)
        WHERE status = 'pending' AND escalate_at IS NOT NULL;

    CREATE TABLE standing_grants (
        id               TEXT PRIMARY KEY CHECK (starts_with(id, 'sg_')),
        effect           TEXT NOT NULL CHECK (effect IN ('allow', 'deny')),
        upstream         TEXT NOT NULL,
        tool             TEXT NOT NULL,
        grant_name       TEXT NOT NULL,
        constraints_json TEXT NOT NULL,
        rule             TEXT NOT NULL,
        reason           TEXT,
        created_by       TEXT NOT NULL,
        created_via      TEXT NOT NULL,
        created_at       DOUBLE PRECISION NOT NULL,
        expires_at       DOUBLE PRECISION NOT NULL,
        max_uses         INTEGER CHECK (max_uses IS NULL OR max_uses >= 1),
        uses             INTEGER NOT NULL DEFAULT 0
                         CHECK (uses >= 0 AND (max_uses IS NULL OR uses <= max_uses)),
        source_approval  TEXT NOT NULL DEFAULT '',
        revoked_at       DOUBLE PRECISION,
        revoked_by       TEXT
    );
    CREATE INDEX standing_grants_for ON standing_grants (grant_name, upstream, tool) WHERE revoked_at IS NULL;
    CREATE INDEX standing_grants_created ON standing_grants (created_at, id);
    CREATE INDEX standing_grants_agent ON standing_grants (grant_name, created_at, id);
    -- What a reviewer granted stays as granted: only uses and the revocation change.
    CREATE FUNCTION standing_grants_terms_are_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF (NEW.id, NEW.effect, NEW.upstream, NEW.tool, NEW.grant_name, NEW.constraints_json, NEW.rule,
            NEW.reason, NEW.created_by, NEW.created_via, NEW.created_at, NEW.expires_at, NEW.max_uses,
            NEW.source_approval)
           IS DISTINCT FROM
           (OLD.id, OLD.effect, OLD.upstream, OLD.tool, OLD.grant_name, OLD.constraints_json, OLD.rule,
            OLD.reason, OLD.created_by, OLD.created_via, OLD.created_at, OLD.expires_at, OLD.max_uses,
            OLD.source_approval) THEN
            RAISE EXCEPTION 'the terms of a standing grant never change';
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER standing_grants_terms_are_fixed BEFORE UPDATE ON standing_grants
        FOR EACH ROW EXECUTE FUNCTION standing_grants_terms_are_fixed();

    -- The foreign key's name is PostgreSQL's choice (audit_approval_id_fkey): found, not assumed.
    DO $$
    DECLARE fk TEXT;
    BEGIN
        FOR fk IN SELECT conname FROM pg_constraint WHERE conrelid = 'audit'::regclass AND contype = 'f' LOOP
            EXECUTE format('ALTER TABLE audit DROP CONSTRAINT %I', fk);
        END LOOP;
    END
    $$;
    CREATE FUNCTION audit_known_subject() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM approvals WHERE id = NEW.approval_id)
           AND NOT EXISTS (SELECT 1 FROM standing_grants WHERE id = NEW.approval_id) THEN
            RAISE EXCEPTION 'no approval or standing grant has the id %', NEW.approval_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER audit_known_subject BEFORE INSERT ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_known_subject();
"""

_ACTIVE = "revoked_at IS NULL AND expires_at > {now} AND (max_uses IS NULL OR uses < max_uses)"


class PostgresReviewMethods:
    """Escalation queries and :class:`approvals.core.ports.StandingGrantStore` for PostgresStore."""

    def _connection(
        self, what: str, *, write: bool | str = False
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        raise NotImplementedError  # PostgresStore's: a pooled connection, failures as StoreError

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
        raise NotImplementedError  # PostgresStore's: one chained event in the caller's transaction

    # ---- escalation ---------------------------------------------------------------------------

    async def due_for_escalation(self, now: float) -> list[Approval]:
        """Pending records whose ``escalate_at <= now``, soonest first."""
        async with self._connection("find approvals due for escalation") as conn:
            rows = await conn.fetch(
                f"SELECT {SELECT} FROM approvals"  # noqa: S608
                " WHERE status = 'pending' AND escalate_at IS NOT NULL AND escalate_at <= $1"
                " ORDER BY escalate_at, id",
                now,
            )
        return [approval_of_row(row) for row in rows]

    async def next_escalation(self) -> float | None:
        """The earliest ``escalate_at`` among pending records."""
        async with self._connection("find the next escalation") as conn:
            value = await conn.fetchval(
                "SELECT min(escalate_at) FROM approvals WHERE status = 'pending' AND escalate_at IS NOT NULL"
            )
        return None if value is None else float(value)

    # ---- standing grants ----------------------------------------------------------------------

    async def create_standing(self, grant: StandingGrant, *, actor: str, channel: str) -> None:
        """Insert a new grant and its "granted" audit event in one transaction."""
        check_new_standing(grant)
        marks = ", ".join(f"${n}" for n in range(1, len(STANDING_FIELDS) + 1))
        values = [getattr(grant, name) for name in STANDING_FIELDS]
        async with self._connection("create a standing grant", write=True) as conn, conn.transaction():
            await conn.execute(f"INSERT INTO standing_grants ({STANDING_SELECT}) VALUES ({marks})", *values)  # noqa: S608
            await self._audit(conn, grant.id, "granted", actor, channel, "", granted_detail(grant))

    async def get_standing(self, grant_id: str) -> StandingGrant | None:
        """The grant with this id, or None."""
        async with self._connection("read a standing grant") as conn:
            row = await conn.fetchrow(
                f"SELECT {STANDING_SELECT} FROM standing_grants WHERE id = $1",  # noqa: S608
                grant_id,
            )
        return None if row is None else _grant(row)

    async def list_standing(
        self, *, active_at: float | None = None, grant: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[StandingGrant]:
        """Newest first; with ``active_at`` only those active then; with ``grant`` only that agent's."""
        conditions: list[str] = []
        params: list[object] = []
        if grant is not None:
            params.append(grant)
            conditions.append(f"grant_name = ${len(params)}")
        if active_at is not None:
            params.append(active_at)
            conditions.append(_ACTIVE.format(now=f"${len(params)}"))
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        n = len(params)
        sql = (
            f"SELECT {STANDING_SELECT} FROM standing_grants {where}"  # noqa: S608
            f" ORDER BY created_at DESC, id DESC LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        async with self._connection("list standing grants") as conn:
            rows = await conn.fetch(sql, *params, limit, offset)
        return [_grant(row) for row in rows]

    async def standing_for(self, upstream: str, tool: str, grant: str, now: float) -> list[StandingGrant]:
        """This agent's grants for this tool active at ``now``: deny first, then oldest first."""
        sql = (
            f"SELECT {STANDING_SELECT} FROM standing_grants"  # noqa: S608
            f" WHERE grant_name = $1 AND upstream = $2 AND tool = $3 AND {_ACTIVE.format(now='$4')}"
            " ORDER BY CASE effect WHEN 'deny' THEN 0 ELSE 1 END, created_at, id"
        )
        async with self._connection("find standing grants") as conn:
            rows = await conn.fetch(sql, grant, upstream, tool, now)
        return [_grant(row) for row in rows]

    async def use_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str, args_sha256: str
    ) -> StandingGrant | None:
        """Count one use if the grant is active at ``now``: one conditional UPDATE, with its event."""
        sql = (
            "UPDATE standing_grants SET uses = uses + 1"  # noqa: S608
            f" WHERE id = $1 AND {_ACTIVE.format(now='$2')} RETURNING {STANDING_SELECT}"
        )
        async with self._connection("use a standing grant", write=True) as conn, conn.transaction():
            row = await conn.fetchrow(sql, grant_id, now)
            if row is None:
                return None
            used = _grant(row)
            await self._audit(conn, grant_id, "used", actor, channel, args_sha256, used_detail(used))
        return used

    async def revoke_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str
    ) -> StandingGrant | None:
        """Revoke it if it is not revoked yet: one conditional UPDATE, with its event."""
        sql = (
            "UPDATE standing_grants SET revoked_at = $1, revoked_by = $2"  # noqa: S608
            f" WHERE id = $3 AND revoked_at IS NULL RETURNING {STANDING_SELECT}"
        )
        async with self._connection("revoke a standing grant", write=True) as conn, conn.transaction():
            row = await conn.fetchrow(sql, now, actor, grant_id)
            if row is None:
                return None
            revoked = _grant(row)
            await self._audit(conn, grant_id, "revoked", actor, channel, "", revoked_detail(revoked))
        return revoked


def _grant(row: Any) -> StandingGrant:
    return standing_from_values({name: row[STANDING_COLUMN[name]] for name in STANDING_FIELDS})
