"""Standing grants at work: a held call that a remembered decision covers is answered without a
reviewer — the remembering half of the approval service (a base class of it).

Checked when a call's rule requires approval, before a request is opened: a matching "deny" grant
refuses the call, a matching "allow" grant lets it through — counted against the normal rate
limits first, then against the grant's uses (one conditional update, so the last use goes to one
call). A grant only ever applies while the rule the call falls under still allows remembering
(``remember`` not false, no quorum): a policy made stricter takes effect at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from approvals.config import Principal
from approvals.core.model import Admission, ToolCall
from approvals.core.ports import Counters, ServiceStore
from approvals.core.standing import StandingGrant
from approvals.errors import DecisionRefused
from approvals.jsonrpc import JsonObject
from approvals.limits import LimitRefusal, Reservation
from approvals.outcomes import META_KEY, limit_refusal, standing_denial

if TYPE_CHECKING:
    from approvals.policy import Decision

__all__ = ["Remembering"]


class Remembering:
    store: ServiceStore
    clock: Callable[[], float]
    _counters: Counters

    async def _by_standing_grant(
        self, call: ToolCall, decision: Decision, args_sha: str, now: float
    ) -> Admission | None:
        """The answer a standing grant gives this call, or None when none covers it."""
        if not decision.review.may_remember:
            return None
        for grant in await self.store.standing_for(call.upstream, call.tool, call.grant, now):
            if not grant.matches(call.arguments):
                continue
            if grant.effect == "deny":
                used = await self._use(grant, call, args_sha, now)
                if used is not None:
                    return Admission(answer=standing_denial(used))
                continue
            reserved = await self._counters.reserve(
                decision.limits, grant=call.grant, session=call.session, arguments=call.arguments, now=now
            )
            if isinstance(reserved, LimitRefusal):
                return Admission(answer=limit_refusal(reserved, decision))
            used = await self._use(grant, call, args_sha, now)
            if used is None:  # its last use went to another call meanwhile
                await self._counters.rollback(reserved)
                continue
            return Admission(on_result=self._rollback_on_error(reserved), meta={META_KEY: _meta(used)})
        return None

    async def _use(
        self, grant: StandingGrant, call: ToolCall, args_sha: str, now: float
    ) -> StandingGrant | None:
        return await self.store.use_standing(
            grant.id, now, actor=call.grant, channel="mcp", args_sha256=args_sha
        )

    def _rollback_on_error(self, reservation: Reservation) -> Callable[[JsonObject], Awaitable[None]]:
        counters = self._counters

        async def settle(response: JsonObject) -> None:
            if "error" in response:  # the call did not happen: its counts are given back (not its use)
                await counters.rollback(reservation)

        return settle

    # ---- reading and revoking -------------------------------------------------------------

    async def list_standing(
        self, *, active: bool = False, grant: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[StandingGrant]:
        """Newest first; ``active`` keeps only those that apply now."""
        active_at = self.clock() if active else None
        return await self.store.list_standing(active_at=active_at, grant=grant, limit=limit, offset=offset)

    async def get_standing(self, grant_id: str) -> StandingGrant | None:
        return await self.store.get_standing(grant_id)

    async def revoke_standing(self, grant_id: str, reviewer: Principal, channel: str) -> StandingGrant:
        """Revoke at once; raises DecisionRefused ("unknown", or "already_decided" when it was
        revoked already). Any reviewer may revoke: taking a permission back is always safe."""
        revoked = await self.store.revoke_standing(
            grant_id, self.clock(), actor=reviewer.name, channel=channel
        )
        if revoked is not None:
            return revoked
        current = await self.store.get_standing(grant_id)
        if current is None:
            raise DecisionRefused("unknown", f"no standing grant {grant_id!r}")
        raise DecisionRefused(
            "already_decided", f"standing grant {grant_id} was already revoked by {current.revoked_by}"
        )


def _meta(grant: StandingGrant) -> JsonObject:
    return {
        "code": "allowed_by_standing_grant",
        "standing_grant": grant.id,
        "granted_by": grant.created_by,
        "uses": grant.uses,
        "max_uses": grant.max_uses,
        "expires_at": grant.expires_at,
    }
