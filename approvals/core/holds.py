"""A held call following its approval on the change feed (the proxy's `Hold`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from approvals.core.ports import Change, Watch
from approvals.jsonrpc import JsonObject
from approvals.outcomes import final_outcome, pending_result, waiting_status

if TYPE_CHECKING:
    from approvals.core.service import ApprovalService

__all__ = ["ApprovalHold", "outcome_of"]


def outcome_of(change: Change) -> JsonObject:
    """What a held call answers with once its approval is final (a JSON-RPC response without id)."""
    if change.response is not None:
        return {k: v for k, v in change.response.items() if k not in ("id", "jsonrpc")}
    return final_outcome(change.approval)


class ApprovalHold:
    """One held call on an approval (the proxy's `Hold`), following it on the change feed."""

    def __init__(self, service: ApprovalService, watch: Watch) -> None:
        self.approval_id = watch.latest.id
        self._service = service
        self._watch = watch

    async def wait(self, timeout: float) -> JsonObject | None:
        change = await self._watch.final(timeout)
        return None if change is None else outcome_of(change)

    def status(self, now: float) -> str:
        return waiting_status(self._watch.latest, now)

    def pending_result(self, now: float) -> JsonObject:
        return pending_result(self._watch.latest, now, self._service.url_of(self.approval_id))

    def delivered(self) -> None:
        self._service.delivered(self.approval_id)

    async def cancel(self, reason: str) -> None:
        await self._service.cancel(self.approval_id, reason)

    def close(self) -> None:
        self._watch.close()
