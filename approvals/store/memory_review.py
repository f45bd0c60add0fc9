"""The in-memory store's part for review workflows: escalation queries and standing grants.

A base class of :class:`approvals.store.memory.MemoryStore`, and like it the reference the SQL
stores follow: each method is atomic (its body never awaits after the one simulated round trip),
and says in plain Python what its SQL must do. ``use_standing`` is the compare-and-set of a use:
of twenty callers racing for the last five uses, exactly five get one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from approvals.core.model import Approval
from approvals.core.standing import StandingGrant
from approvals.errors import StoreError
from approvals.store.review_rows import (
    check_new_standing,
    granted_detail,
    revoked_detail,
    used_detail,
)

__all__ = ["MemoryReviewMethods", "round_trip"]


class MemoryReviewMethods:
    """Escalation queries and :class:`approvals.core.ports.StandingGrantStore`, in memory."""

    _clock: Callable[[], float]
    _approvals: dict[str, Approval]
    _standing: dict[str, StandingGrant]

    def _append(
        self,
        *,
        at: float,
        approval_id: str,
        event: str,
        actor: str,
        channel: str,
        args_sha256: str,
        detail: str | None,
    ) -> None:
        raise NotImplementedError  # MemoryStore's: one chained audit event

    # ---- escalation ---------------------------------------------------------------------------

    async def due_for_escalation(self, now: float) -> list[Approval]:
        """Pending records whose ``escalate_at <= now``, soonest first (``escalate_at`` then ``id``)."""
        await round_trip()
        due = [
            a
            for a in self._approvals.values()
            if a.status == "pending" and a.escalate_at is not None and a.escalate_at <= now
        ]
        return [dataclasses.replace(a) for a in sorted(due, key=lambda a: (a.escalate_at, a.id))]

    async def next_escalation(self) -> float | None:
        """The earliest ``escalate_at`` among pending records, or None."""
        await round_trip()
        due = (a.escalate_at for a in self._approvals.values() if a.status == "pending")
        return min((at for at in due if at is not None), default=None)

    # ---- standing grants ----------------------------------------------------------------------

    async def create_standing(self, grant: StandingGrant, *, actor: str, channel: str) -> None:
        """Insert a new grant and its "granted" audit event."""
        check_new_standing(grant)
        at = self._clock()
        await round_trip()
        if grant.id in self._standing:
            raise StoreError(f"cannot create a standing grant: id {grant.id!r} exists")
        self._standing[grant.id] = dataclasses.replace(grant)
        self._audit_grant(at, grant, "granted", actor, channel, "", granted_detail(grant))

    async def get_standing(self, grant_id: str) -> StandingGrant | None:
        """The grant with this id, or None."""
        await round_trip()
        found = self._standing.get(grant_id)
        return None if found is None else dataclasses.replace(found)

    async def list_standing(
        self, *, active_at: float | None = None, grant: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[StandingGrant]:
        """Newest first (``created_at`` then ``id``, descending); with ``active_at`` only those
        active then; with ``grant`` only that agent's."""
        await round_trip()
        found = [
            g
            for g in self._standing.values()
            if (grant is None or g.grant == grant) and (active_at is None or g.state(active_at) == "active")
        ]
        found.sort(key=lambda g: (g.created_at, g.id), reverse=True)
        return [dataclasses.replace(g) for g in found[offset : offset + limit]]

    async def standing_for(self, upstream: str, tool: str, grant: str, now: float) -> list[StandingGrant]:
        """This agent's grants for this tool active at ``now``: deny first, then oldest first."""
        await round_trip()
        found = [
            g
            for g in self._standing.values()
            if (g.upstream, g.tool, g.grant) == (upstream, tool, grant) and g.state(now) == "active"
        ]
        found.sort(key=lambda g: (g.effect != "deny", g.created_at, g.id))
        return [dataclasses.replace(g) for g in found]

    async def use_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str, args_sha256: str
    ) -> StandingGrant | None:
        """One use if the grant is active at ``now`` (compare-and-set), with its "used" event."""
        at = self._clock()
        await round_trip()
        current = self._standing.get(grant_id)
        if current is None or current.state(now) != "active":
            return None
        used = dataclasses.replace(current, uses=current.uses + 1)
        self._standing[grant_id] = used
        self._audit_grant(at, used, "used", actor, channel, args_sha256, used_detail(used))
        return dataclasses.replace(used)

    async def revoke_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str
    ) -> StandingGrant | None:
        """Revoke it if it is not revoked yet (expired or used up ones too), with its "revoked" event."""
        at = self._clock()
        await round_trip()
        current = self._standing.get(grant_id)
        if current is None or current.revoked_at is not None:
            return None
        revoked = dataclasses.replace(current, revoked_at=now, revoked_by=actor)
        self._standing[grant_id] = revoked
        self._audit_grant(at, revoked, "revoked", actor, channel, "", revoked_detail(revoked))
        return dataclasses.replace(revoked)

    def _audit_grant(
        self, at: float, grant: StandingGrant, event: str, actor: str, channel: str, sha: str, detail: str
    ) -> None:
        self._append(
            at=at,
            approval_id=grant.id,
            event=event,
            actor=actor,
            channel=channel,
            args_sha256=sha,
            detail=detail,
        )


async def round_trip() -> None:
    """Suspend the caller once, as a call to a database would, so that tests see the same
    interleavings of concurrent callers; the work itself comes after, in one step."""
    await asyncio.sleep(0)
