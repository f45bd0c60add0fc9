"""The gateway's `Gate`: each call is judged by its upstream's policy, then counted against its limits.

admit(call) → policy.evaluate → deny / hidden      → a tool error the agent can act on
                              → otherwise, arguments that break the tool's known inputSchema
                                                   → a tool error naming the path (never coerced)
                              → require_approval   → the approval service (held, or answered)
                              → allow → limits.reserve → refused → a tool error with retry_after
                                                       → reserved → forward; rolled back if the
                                                         upstream fails the call

With metrics on, each call is counted by its outcome (allowed, denied, rate_limited, held,
invalid) and a forwarded call's round trip to the upstream is timed (approvals.metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from approvals.arg_schema import ArgumentProblem
from approvals.core.model import FORWARD, Admission, ToolCall
from approvals.core.ports import Counters
from approvals.core.service import ApprovalService
from approvals.jsonrpc import JsonObject, tool_error
from approvals.limits import LimitRefusal, Reservation
from approvals.outcomes import META_KEY, denial, limit_refusal
from approvals.policy import Decision
from approvals.policy_files import PolicyBook, check_policies
from approvals.tool_catalog import ToolCatalog

if TYPE_CHECKING:
    from approvals.metrics import Metrics, Outcome

__all__ = ["Gatekeeper", "check_policies"]

log = logging.getLogger(__name__)

RATE_LIMIT_CODES = frozenset({"rate_limited", "limit_uncounted"})  # approvals.limits.LimitRefusal.code


class Gatekeeper:
    """Policy, argument schemas and rate limits for every upstream; held calls go to the service."""

    def __init__(
        self,
        policies: PolicyBook,
        counters: Counters,
        catalog: ToolCatalog,
        service: ApprovalService,
        clock: Callable[[], float],
    ) -> None:
        self.policies = policies
        self.counters = counters
        self.catalog = catalog
        self.service = service
        self.clock = clock
        self.metrics: Metrics | None = None  # set when metrics are on (approvals.web.app)

    async def admit(self, call: ToolCall) -> Admission:
        decision = self.policies[call.upstream].evaluate(call.tool, call.arguments)
        outcome, admission = await self._judge(call, decision)
        # The tool and the verdict, never the arguments (they may hold what the agent was given).
        if admission.hold is not None:
            log.info(
                "call of %s on %s held for approval %s", call.tool, call.upstream, admission.hold.approval_id
            )
        else:
            log.debug("call of %s on %s: %s (rule %s)", call.tool, call.upstream, outcome, decision.rule)
        metrics = self.metrics
        if metrics is not None:
            metrics.count_call(call.upstream, call.tool, outcome, decision.rule)
            if outcome == "allowed":
                return _timed(metrics, call.upstream, admission)
        return admission

    async def _judge(self, call: ToolCall, decision: Decision) -> tuple[Outcome, Admission]:
        if decision.action == "deny":
            return "denied", Admission(answer=denial(decision))
        # Checked after a denial (a hidden tool's schema stays unspoken) and before anything acts
        # on the verdict: what the upstream would coerce is refused, not judged one way and run another.
        problem = self.catalog.argument_problem(call.upstream, call.tool, call.arguments)
        if problem is not None:
            return "invalid", Admission(answer=_invalid_arguments(call.tool, problem))
        if decision.action == "require_approval":
            admission = await self.service.admit(call, decision)
            outcome = _approval_outcome(admission)
            if outcome == "allowed":
                log.info(
                    "call of %s on %s allowed by standing grant %s",
                    call.tool, call.upstream, (admission.meta or {}).get(META_KEY, {}).get("standing_grant"),
                )  # fmt: skip
            return outcome, admission
        reserved = await self.counters.reserve(
            decision.limits,
            grant=call.grant,
            session=call.session,
            arguments=call.arguments,
            now=self.clock(),
        )
        if isinstance(reserved, LimitRefusal):
            return "rate_limited", Admission(answer=limit_refusal(reserved, decision))
        if not reserved.entries:
            return "allowed", FORWARD
        return "allowed", Admission(on_result=self._rollback_on_failure(reserved))

    def _rollback_on_failure(self, reservation: Reservation) -> Callable[[JsonObject], Awaitable[None]]:
        counters = self.counters

        async def settle(response: JsonObject) -> None:
            # A JSON-RPC error (the upstream's, or ours for a transport failure) means the call did
            # not happen: it must not use up the limit. A tool result with isError did run.
            if "error" in response:
                await counters.rollback(reservation)

        return settle

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        self.catalog.remember(upstream, tools)
        if self.metrics is not None:
            self.metrics.listed(upstream, (t["name"] for t in tools if isinstance(t.get("name"), str)))
        policy = self.policies[upstream]
        return [t for t in tools if not (isinstance(t.get("name"), str) and policy.is_hidden(t["name"]))]

    def health(self) -> dict[str, Any]:
        return {"policy_errors": self.policies.errors} if self.policies.errors else {}


def _approval_outcome(admission: Admission) -> Outcome:
    """Held, unless the approval service answered at once: over a rate limit, refused (too many
    pending, a remembered denial), or let through by a standing grant."""
    if admission.hold is not None:
        return "held"
    if admission.answer is None:
        return "allowed"  # a standing grant covers it: forwarded like any allowed call
    meta = admission.answer.get("_meta", {}).get(META_KEY, {})
    return "rate_limited" if meta.get("code") in RATE_LIMIT_CODES else "denied"


def _timed(metrics: Metrics, upstream: str, admission: Admission) -> Admission:
    """`admission`, with the forwarded call's round trip to the upstream timed when it answers."""
    started = time.perf_counter()
    settle = admission.on_result

    async def timed(response: JsonObject) -> None:
        metrics.upstream_call(upstream, time.perf_counter() - started, "error" in response)
        if settle is not None:
            await settle(response)

    return Admission(on_result=timed, meta=admission.meta)


def _invalid_arguments(tool: str, problem: ArgumentProblem) -> JsonObject:
    text = (
        f"Invalid arguments for {tool}: {problem.path}: {problem.message}. The call was not made; "
        "send arguments that match the tool's inputSchema (numbers as numbers, lists as lists)."
    )
    return tool_error(text, {META_KEY: {"code": "invalid_arguments", "path": problem.path}})
