"""The gateway's `Gate`: each call is judged by its upstream's policy, then counted against its limits.

admit(call) → policy.evaluate → deny / hidden      → a tool error the agent can act on
                              → otherwise, arguments that break the tool's known inputSchema
                                                   → a tool error naming the path (never coerced)
                              → require_approval   → (the approvals queue)
                              → allow → limits.reserve → refused → a tool error with retry_after
                                                       → reserved → forward; rolled back if the
                                                         upstream fails the call
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from approvals.arg_schema import ArgumentProblem
from approvals.channels import Channel, Channels
from approvals.config import Settings
from approvals.jsonrpc import JsonObject, tool_error
from approvals.limits import LimitRefusal, RateLimiter, Reservation
from approvals.outcomes import META_KEY, denial, limit_refusal
from approvals.policy import Limit
from approvals.policy_files import WATCH_INTERVAL_SECONDS, PolicyBook, check_policies
from approvals.proxy.gate import FORWARD, Admission, ToolCall, UpstreamCaller
from approvals.queue import ApprovalQueue
from approvals.store import Store
from approvals.tool_catalog import ToolCatalog

__all__ = ["Gatekeeper", "build_gate", "check_policies"]

log = logging.getLogger(__name__)


class Gatekeeper:
    """Policy and rate limits for every upstream of a gateway."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        watch_interval: float = WATCH_INTERVAL_SECONDS,
    ) -> None:
        self.settings = settings
        self.policies = PolicyBook.load(settings)
        self.clock = clock
        self.watch_interval = watch_interval
        self.limiter: RateLimiter | None = None
        self.queue: ApprovalQueue | None = None
        self.catalog: ToolCatalog | None = None
        self.channels: Channels | None = None
        self.channel_list: list[Channel] = []  # Slack, the inbox…: registered before start

    async def start(self, store: Store, upstreams: UpstreamCaller) -> None:
        self.limiter = RateLimiter(store, clock=self.clock)
        await self.limiter.start()
        self.channels = Channels(store, self.channel_list)
        self.catalog = ToolCatalog(upstreams)
        self.queue = ApprovalQueue(
            self.settings,
            store,
            self.limiter,
            upstreams,
            self.catalog,
            self.channels,
            self._limits_for,
            self.clock,
        )
        await self.queue.start()
        self.policies.start(self.watch_interval)

    def _limits_for(self, upstream: str, tool: str, arguments: Mapping[str, object]) -> Sequence[Limit]:
        # Limits at release come from the policy in force then: an edit applies to what is still waiting.
        return self.policies[upstream].evaluate(tool, arguments).limits

    async def close(self) -> None:
        await self.policies.close()
        if self.queue is not None:
            await self.queue.close()
        if self.channels is not None:
            await self.channels.close()
        if self.limiter is not None:
            await self.limiter.close()

    async def admit(self, call: ToolCall) -> Admission:
        decision = self.policies[call.upstream].evaluate(call.tool, call.arguments)
        if decision.action == "deny":
            return Admission(answer=denial(decision))
        assert self.limiter is not None, "Gatekeeper.start() was not awaited"
        assert self.queue is not None
        assert self.catalog is not None
        # Checked after a denial (a hidden tool's schema stays unspoken) and before anything acts
        # on the verdict: what the upstream would coerce is refused, not judged one way and run another.
        problem = self.catalog.argument_problem(call.upstream, call.tool, call.arguments)
        if problem is not None:
            return Admission(answer=_invalid_arguments(call.tool, problem))
        if decision.action == "require_approval":
            return await self.queue.admit(call, decision)
        reserved = self.limiter.reserve(
            decision.limits,
            grant=call.grant,
            session=call.session,
            arguments=call.arguments,
            now=self.clock(),
        )
        if isinstance(reserved, LimitRefusal):
            return Admission(answer=limit_refusal(reserved, decision))
        if not reserved.entries:
            return FORWARD
        return Admission(on_result=self._rollback_on_failure(reserved))

    def _rollback_on_failure(self, reservation: Reservation) -> Callable[[JsonObject], None]:
        limiter = self.limiter
        assert limiter is not None

        def settle(response: JsonObject) -> None:
            # A JSON-RPC error (the upstream's, or ours for a transport failure) means the call did
            # not happen: it must not use up the limit. A tool result with isError did run.
            if "error" in response:
                limiter.rollback(reservation)

        return settle

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        if self.catalog is not None:
            self.catalog.remember(upstream, tools)
        policy = self.policies[upstream]
        return [t for t in tools if not (isinstance(t.get("name"), str) and policy.is_hidden(t["name"]))]

    def health(self) -> dict[str, Any]:
        return {"policy_errors": self.policies.errors} if self.policies.errors else {}


def _invalid_arguments(tool: str, problem: ArgumentProblem) -> JsonObject:
    text = (
        f"Invalid arguments for {tool}: {problem.path}: {problem.message}. The call was not made; "
        "send arguments that match the tool's inputSchema (numbers as numbers, lists as lists)."
    )
    return tool_error(text, {META_KEY: {"code": "invalid_arguments", "path": problem.path}})


def build_gate(settings: Settings) -> Gatekeeper:
    """The gate for a configured gateway (raises ConfigError when a policy file is invalid)."""
    return Gatekeeper(settings)
