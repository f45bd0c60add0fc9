"""Policy replay: judge the calls the gateway held under a candidate policy, to see what it changes.

Pure: records in, a :class:`Replay` out; nothing is sent anywhere, and no clock is read. Each
record is judged as :class:`approvals.gatekeeper.Gatekeeper` judges a call arriving:

    candidate.evaluate(tool, arguments) → deny                      → denied
                                        → arguments break the tool's inputSchema (the definition
                                          stored with the record)   → invalid
                                        → require_approval / allow  → counted against the rule's
                                          limits at the call's arrival → rate_limited
                                                                       → held / allowed

Rate limits are counted in the order the calls arrived, on a fresh in-memory counter
(:class:`approvals.limits.RateLimiter` over a :class:`approvals.store.memory.MemoryStore`), so a
limit the candidate adds shows up. Only held calls are recorded: the calls the current policy
allowed or denied outright are not in the history, so they are neither judged nor counted here,
and a candidate limit shared with allowed traffic would refuse more in practice than it does here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from approvals.arg_schema import SchemaCache
from approvals.core import render
from approvals.core.model import Approval
from approvals.limits import LimitRefusal, RateLimiter
from approvals.policy import Policy
from approvals.store.memory import MemoryStore

__all__ = [
    "NOT_RECORDED",
    "OUTCOMES",
    "Judged",
    "Outcome",
    "Replay",
    "ToolCounts",
    "arguments_of",
    "replay",
    "reviewer_verdict",
]

Outcome = Literal["allowed", "held", "denied", "rate_limited", "invalid"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Said with every replay, in words and in JSON: what the history can and cannot show.
NOT_RECORDED = (
    "Only calls the gateway held for review are recorded; calls the current policy allowed or denied "
    "outright are not in the history, so they are not replayed and do not count against the "
    "candidate's limits."
)


@dataclass(frozen=True, slots=True)
class Judged:
    """One recorded call and what the candidate does with it."""

    approval: Approval
    outcome: Outcome
    rule: str  # the candidate's matched rule ("" when the arguments could not be read)
    why: str  # the candidate's explanation, or the limit / schema refusal

    @property
    def then(self) -> str:
        """What the reviewers did with the call when it was held (see :func:`reviewer_verdict`)."""
        return reviewer_verdict(self.approval)


@dataclass(slots=True)
class ToolCounts:
    """How many of one tool's recorded calls the candidate would allow, hold, deny, refuse."""

    upstream: str
    tool: str
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def calls(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Replay:
    """Every recorded call judged, oldest first."""

    judged: tuple[Judged, ...]

    def by_tool(self) -> list[ToolCounts]:
        """Counts per (upstream, tool), sorted by upstream then tool."""
        tools: dict[tuple[str, str], ToolCounts] = {}
        for item in self.judged:
            key = (item.approval.upstream, item.approval.tool)
            counts = tools.setdefault(key, ToolCounts(*key))
            counts.counts[item.outcome] += 1
        return [tools[key] for key in sorted(tools)]

    def totals(self) -> dict[Outcome, int]:
        totals = dict.fromkeys(OUTCOMES, 0)
        for item in self.judged:
            totals[item.outcome] += 1
        return totals

    def flips(self) -> list[Judged]:
        """The held calls the candidate would let through unasked, oldest first."""
        return [item for item in self.judged if item.outcome == "allowed"]

    def flip_verdicts(self) -> list[tuple[str, str, dict[str, int]]]:
        """Per (upstream, tool) with flips: how the reviewers decided those calls then."""
        verdicts: dict[tuple[str, str], dict[str, int]] = {}
        for item in self.flips():
            key = (item.approval.upstream, item.approval.tool)
            tally = verdicts.setdefault(key, {})
            tally[item.then] = tally.get(item.then, 0) + 1
        return [(upstream, tool, verdicts[(upstream, tool)]) for upstream, tool in sorted(verdicts)]


def reviewer_verdict(approval: Approval) -> str:
    """approved, denied, expired, cancelled or pending: what became of the request for review.

    A call approved and then lapsed while waiting for a rate-limit window still counts as approved
    (a reviewer said yes); one that expired with nobody deciding is "expired".
    """
    if approval.status == "expired" and approval.decided_by:
        return "approved"
    return render.decided(approval.status)  # "approved" for every state after an approval


def replay(records: Iterable[Approval], candidate: Policy) -> Replay:
    """Judge every record under ``candidate``, counting limits in arrival order from zero."""
    counters = RateLimiter(MemoryStore())
    schemas = SchemaCache()
    ordered = sorted(records, key=lambda a: (a.created_at, a.id))
    return Replay(tuple(_judge(a, candidate, counters, schemas) for a in ordered))


def _judge(approval: Approval, candidate: Policy, counters: RateLimiter, schemas: SchemaCache) -> Judged:
    arguments = arguments_of(approval)
    if arguments is None:
        # The gateway refuses arguments that are not an object before any policy sees them.
        return Judged(approval, "invalid", "", "the recorded arguments are not a JSON object")
    decision = candidate.evaluate(approval.tool, arguments)
    if decision.action == "deny":
        return Judged(approval, "denied", decision.rule, decision.reason or decision.explanation)
    problem = schemas.compile(_input_schema(approval)).problem(arguments)
    if problem is not None:
        return Judged(approval, "invalid", decision.rule, f"{problem.path}: {problem.message}")
    reserved = counters.reserve_now(
        decision.limits,
        grant=approval.grant,
        session=approval.session_id,
        arguments=arguments,
        now=approval.created_at,
    )
    if isinstance(reserved, LimitRefusal):
        return Judged(approval, "rate_limited", decision.rule, reserved.message)
    outcome: Outcome = "held" if decision.action == "require_approval" else "allowed"
    return Judged(approval, outcome, decision.rule, decision.explanation)


def arguments_of(approval: Approval) -> Mapping[str, object] | None:
    """The record's arguments as the object they were sent as, or None when they are not one."""
    try:
        arguments = approval.arguments
    except ValueError:  # a record whose text is not JSON: judged as nothing the gateway would run
        return None
    return arguments if isinstance(arguments, dict) else None


def _input_schema(approval: Approval) -> object:
    """The inputSchema of the definition stored with the record (None when it was not known)."""
    try:
        definition = approval.tool_definition
    except ValueError:
        return None
    return definition.get("inputSchema") if isinstance(definition, dict) else None
