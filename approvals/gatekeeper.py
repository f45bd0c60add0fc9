"""The gateway's `Gate`: each call is judged by its upstream's policy, then counted against its limits.

admit(call) → policy.evaluate → deny / hidden      → a tool error the agent can act on
                              → require_approval   → (the approvals queue)
                              → allow → limits.reserve → refused → a tool error with retry_after
                                                       → reserved → forward; rolled back if the
                                                         upstream fails the call
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from approvals.config import Settings
from approvals.jsonrpc import JsonObject, tool_error
from approvals.limits import LimitRefusal, RateLimiter, Reservation
from approvals.policy import Decision
from approvals.policy_files import WATCH_INTERVAL_SECONDS, PolicyBook, check_policies
from approvals.proxy.gate import FORWARD, Admission, ToolCall
from approvals.store import Store

__all__ = ["Gatekeeper", "build_gate", "check_policies", "denial", "limit_refusal"]

log = logging.getLogger(__name__)
META_KEY = "approvals"  # our namespace in a result's `_meta`


def denial(decision: Decision) -> JsonObject:
    """The answer to a call the policy refuses."""
    return tool_error(
        f"Denied by policy: {decision.reason or 'not allowed'}",
        {META_KEY: {"code": decision.code, "rule": decision.rule}},
    )


def limit_refusal(refusal: LimitRefusal, decision: Decision) -> JsonObject:
    """The answer to a call over a rate limit; `retry_after` is null when waiting cannot help."""
    retry = None if math.isinf(refusal.retry_after) else math.ceil(refusal.retry_after)
    meta = {
        "code": "rate_limited",
        "rule": decision.rule,
        "counter": refusal.limit.counter,
        "retry_after": retry,
    }
    return tool_error(refusal.message, {META_KEY: meta})


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

    async def start(self, store: Store) -> None:
        self.limiter = RateLimiter(store, clock=self.clock)
        await self.limiter.start()
        self.policies.start(self.watch_interval)

    async def close(self) -> None:
        await self.policies.close()
        if self.limiter is not None:
            await self.limiter.close()

    async def admit(self, call: ToolCall) -> Admission:
        decision = self.policies[call.upstream].evaluate(call.tool, call.arguments)
        if decision.action == "deny":
            return Admission(answer=denial(decision))
        if decision.action == "require_approval":
            return Admission(
                answer=tool_error(
                    "This call needs a reviewer's approval, and approvals are not enabled on this gateway.",
                    {META_KEY: {"code": "approval_unavailable", "rule": decision.rule}},
                )
            )
        assert self.limiter is not None, "Gatekeeper.start() was not awaited"
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
        policy = self.policies[upstream]
        return [t for t in tools if not (isinstance(t.get("name"), str) and policy.is_hidden(t["name"]))]

    def health(self) -> dict[str, Any]:
        return {"policy_errors": self.policies.errors} if self.policies.errors else {}


def build_gate(settings: Settings) -> Gatekeeper:
    """The gate for a configured gateway (raises ConfigError when a policy file is invalid)."""
    return Gatekeeper(settings)
