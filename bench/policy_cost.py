"""Per-call cost of the policy engine and the rate limiter, in process: `python bench/policy_cost.py`.

Both run on every tool call, so their cost is reported alone here, apart from the end-to-end figures
of `bench/run.py`.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Mapping, Sequence

from approvals.limits import RateLimiter
from approvals.policy import Limit, Policy, load_policy

CALLS = 200_000
DESIGN_POLICY = {  # the example of DESIGN.md and the README
    "version": "1",
    "default": "deny",
    "hide": ["delete_account"],
    "all_tools": {"limits": [{"counter": "all_calls", "window": "minute", "max": 120, "scope": "grant"}]},
    "tools": {
        "generate_image": {
            "action": "require_approval",
            "approval": {"timeout": "10m"},
            "limits": [{"counter": "generate_image_rate", "window": "minute", "max": 10, "scope": "grant"}],
        },
        "list_*": {},
        "create_refund": {
            "require": [{"path": "args.reason", "op": "exists"}],
            "deny_if": [{"path": "args.amount", "op": "gt", "value": 10000}],
            "approval_if": [{"path": "args.amount", "op": "gt", "value": 500}],
        },
        "drop_table": {"action": "deny", "reason": "Schema changes go through a migration."},
    },
}


class NullStore:
    """No persistence: the arithmetic alone is measured."""

    async def load_counters(self, since: float) -> list[tuple[str, str, int, float]]:
        return []

    async def save_counters(self, rows: Sequence[tuple[str, str, int, float]]) -> None:
        pass

    async def prune_counters(self, before: int) -> None:
        pass


def microseconds(call: object) -> float:
    """Best of five runs, per call."""
    return min(timeit.repeat(call, number=CALLS, repeat=5)) / CALLS * 1e6  # type: ignore[arg-type]


def measure_policy(policy: Policy, tool: str, arguments: Mapping[str, object]) -> float:
    return microseconds(lambda: policy.evaluate(tool, arguments))


def main() -> None:
    policy = load_policy(json.dumps(DESIGN_POLICY))
    cases = [
        ("list_users (glob, no conditions)", "list_users", {}),
        ("generate_image (exact, limits)", "generate_image", {"prompt": "a cat"}),
        ("create_refund (three conditions)", "create_refund", {"reason": "damaged", "amount": 700}),
    ]
    for label, tool, arguments in cases:
        print(f"policy.evaluate {label:36} {measure_policy(policy, tool, arguments):6.2f} µs")
    limiter = RateLimiter(NullStore())
    limits = policy.evaluate("generate_image", {"prompt": "x"}).limits
    roomy = [Limit(limit.counter, limit.window, 1e12, limit.scope) for limit in limits]

    def reserve_and_roll_back() -> None:
        reserved = limiter.reserve_now(roomy, grant="g", session="s", arguments={}, now=1e9)
        limiter.rollback_now(reserved)  # type: ignore[arg-type]

    print(f"limits.reserve + rollback, two limits        {microseconds(reserve_and_roll_back):6.2f} µs")
    no_limits = microseconds(lambda: limiter.reserve_now((), grant="g", session="s", arguments={}, now=1e9))
    print(f"limits.reserve, no limits                    {no_limits:6.2f} µs")


if __name__ == "__main__":
    main()
