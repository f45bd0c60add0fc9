"""Standing grants at work: a held call that a remembered decision covers is answered without a
reviewer — the remembering half of the approval service (a base class of it).

Checked when a call's rule requires approval, before a request is opened: a matching "deny" grant
refuses the call, a matching "allow" grant lets it through — counted against the normal rate
limits first, then against the grant's uses (one conditional update, so the last use goes to one
call). A grant only ever applies while the rule the call falls under still allows remembering
(``remember`` not false, no quorum): a policy made stricter takes effect at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from approvals.config import Principal, Settings
from approvals.core import render
from approvals.core.model import Admission, Approval, ToolCall
from approvals.core.ports import Counters, ServiceStore
from approvals.core.review import VIA_OF_CHANNEL, ReviewRule, eligible_groups
from approvals.core.standing import (
    MAX_USES_LIMIT,
    REMEMBER_MAX_SECONDS,
    REMEMBER_MIN_SECONDS,
    Constraint,
    RememberRequest,
    StandingGrant,
    constraints_to_json,
    exact_constraints,
    new_standing_id,
)
from approvals.errors import DecisionRefused
from approvals.jsonrpc import JsonObject
from approvals.limits import LimitRefusal, Reservation
from approvals.outcomes import META_KEY, limit_refusal, standing_denial

if TYPE_CHECKING:
    from approvals.policy import Decision

__all__ = ["Remembering", "remembered_constraints"]


class Remembering:
    settings: Settings
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
            if not grant.matches(call.arguments) or not self._still_stands(grant, call, decision):
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

    def _still_stands(self, grant: StandingGrant, call: ToolCall, decision: Decision) -> bool:
        """Whether the grant's maker could still take this decision under the policy and config as
        they are now: the same rule, a channel its ``via`` accepts, a group it names, and not the
        agent's owner. A policy or config made stricter takes effect on grants at once."""
        review = decision.review
        if grant.rule != decision.rule:
            return False
        if review.via and VIA_OF_CHANNEL.get(grant.created_via) not in review.via:
            return False
        maker = next((r for r in self.settings.reviewers if r.name == grant.created_by), None)
        owner = next((g.owner for g in self.settings.grants if g.name == call.grant), None)
        if owner is not None and owner == grant.created_by:
            return False
        allowed = eligible_groups(review, 0)
        if allowed is None:
            # Any reviewer may decide; the maker must still be one (or the development reviewer
            # `approvals serve` makes when the config has no [[reviewers]]).
            return maker is not None or not self.settings.reviewers
        return maker is not None and bool(allowed & set(maker.groups))

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

    async def _save_grant(
        self,
        decided: Approval,
        reviewer: Principal,
        channel: str,
        approve: bool,
        reason: str | None,
        remember: RememberRequest,
        constraints: tuple[Constraint, ...],
    ) -> StandingGrant:
        now = self.clock()
        grant = StandingGrant(
            id=new_standing_id(),
            effect="allow" if approve else "deny",
            upstream=decided.upstream,
            tool=decided.tool,
            grant=decided.grant,
            constraints_json=constraints_to_json(constraints),
            rule=decided.rule,
            reason=reason,
            created_by=reviewer.name,
            created_via=channel,
            created_at=now,
            expires_at=now + remember.seconds,
            max_uses=remember.max_uses,
            source_approval=decided.id,
        )
        await self.store.create_standing(grant, actor=reviewer.name, channel=channel)
        return grant

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


def remembered_constraints(
    approval: Approval, rule: ReviewRule, remember: RememberRequest, arguments: Mapping[str, object]
) -> tuple[Constraint, ...]:
    """The constraints of the standing grant asked for, checked before anything is decided."""
    if not rule.may_remember:
        why = "remember: false" if not rule.remember else f"a quorum of {rule.quorum}"
        raise DecisionRefused(
            "remember_refused", f"this call's rule does not allow standing grants ({why})", approval
        )
    if not (
        math.isfinite(remember.seconds) and REMEMBER_MIN_SECONDS <= remember.seconds <= REMEMBER_MAX_SECONDS
    ):
        raise DecisionRefused(
            "remember_refused",
            f"remember.for: must be from {render.duration(REMEMBER_MIN_SECONDS)} to "
            f"{render.duration(REMEMBER_MAX_SECONDS)}",
            approval,
        )
    if remember.max_uses is not None and not 1 <= remember.max_uses <= MAX_USES_LIMIT:
        raise DecisionRefused(
            "remember_refused", f"remember.max_uses: must be from 1 to {MAX_USES_LIMIT}", approval
        )
    constraints = remember.constraints if remember.constraints is not None else exact_constraints(arguments)
    named = {c.field for c in constraints}
    for name in arguments:
        if name not in named:
            raise DecisionRefused(
                "remember_refused",
                f"remember.constraints: argument {name!r} of this call is not constrained"
                ' (use {"op": "any"} to accept any value)',
                approval,
            )
    for i, constraint in enumerate(constraints):
        if not constraint.holds(arguments):
            raise DecisionRefused(
                "remember_refused",
                f"remember.constraints[{i}]: {constraint.describe()} does not hold for this call",
                approval,
            )
    return constraints
