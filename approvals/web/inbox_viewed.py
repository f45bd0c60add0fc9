"""The `viewed` audit event: a reviewer's first opening of a request's page, written once.

Read by the detail page ("who else has looked") and by the dashboard (open-to-approve times and
the rubber-stamping flag, inbox_stats). Once per reviewer per request, on the inbox's channel
("web", as its decisions): later openings add nothing the figures use.
"""

from __future__ import annotations

from approvals.core.model import Approval
from approvals.core.ports import ApprovalStore
from approvals.keyed_lock import KeyedLock


class ViewLog:
    """Writes each reviewer's first `viewed` event of each request."""

    def __init__(self, store: ApprovalStore) -> None:
        self._store = store
        # Two tabs opening the page at once make one event in this process. Across replicas two
        # may land; the dashboard takes the first.
        self._locks: KeyedLock[tuple[str, str]] = KeyedLock()

    async def note(self, approval: Approval, reviewer: str) -> None:
        async with self._locks.hold((approval.id, reviewer)):
            seen = await self._store.audit_events(approval_id=approval.id, limit=1000)
            if any(e.event == "viewed" and e.actor == reviewer for e in seen):
                return
            await self._store.append_audit(
                approval.id, "viewed", actor=reviewer, channel="web", args_sha256=approval.args_sha256
            )
