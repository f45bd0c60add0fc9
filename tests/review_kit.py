"""Shared parts for the review-workflow tests: reviewers in groups, a gateway whose policy holds
send_email under an ``approval`` object, a recorder of the change feed's events, and an approval
service over a store of each kind in front of a recording upstream, on an injected clock."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from approvals.config import Principal, Settings, sha256_hex
from approvals.core.feed import LocalFeed
from approvals.core.model import Approval, AuditEvent, Hold, ToolCall, sha256_of
from approvals.core.ports import Change, ChangeFeed, Store
from approvals.core.review import (
    CHANNEL_OF_VIA,
    Escalation,
    ReviewRule,
    eligible_groups,
    quorum_met,
    valid_votes,
    votes_from_json,
)
from approvals.core.service import ApprovalService
from approvals.core.standing import StandingGrant
from approvals.jsonrpc import JsonObject
from approvals.limits import RateLimiter
from approvals.policy import Decision, Policy, parse_policy
from approvals.store.memory import MemoryStore
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore
from approvals.tool_catalog import ToolCatalog
from tests.approvals_kit import Held, start_held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, WAIT, StartGateway, settings_for

CAROL_TOKEN = "carol-reviewer-token-0123456789a"
DAVE_TOKEN = "dave-reviewer-token-0123456789ab"
ERIN_TOKEN = "erin-reviewer-token-0123456789ab"
TOKENS = {
    "alice": ALICE_TOKEN,
    "bob": BOB_TOKEN,
    "carol": CAROL_TOKEN,
    "dave": DAVE_TOKEN,
    "erin": ERIN_TOKEN,
}
# alice owns agent-a (settings_for's grants) and bob owns agent-b; everyone else owns nothing.
GROUPS: dict[str, tuple[str, ...]] = {
    "alice": ("payments",),
    "bob": ("payments",),
    "carol": ("payments",),
    "dave": ("security",),
    "erin": ("oncall",),
}
REVIEWERS = [
    {"name": name, "token_sha256": sha256_hex(TOKENS[name]), "groups": list(groups)}
    for name, groups in GROUPS.items()
]
NOW = 1_800_000_010.0  # 10 s into a UTC minute (and hour): windows do not roll over under a test
EMAIL: JsonObject = {"to": "ops-1@example.com", "subject": "Quarterly numbers", "body": "Attached."}


def held_policy(approval: Mapping[str, Any] | None = None, **rule: Any) -> dict[str, Any]:
    """A policy holding send_email under ``approval`` (and any other fields of its rule)."""
    send: dict[str, Any] = {"action": "require_approval", **rule}
    if approval is not None:
        send["approval"] = dict(approval)
    return {"version": "1", "default": "deny", "tools": {"send_email": send, "get_time": {}}}


async def start_review(
    start_gateway: StartGateway,
    tmp_path: Path,
    approval: Mapping[str, Any] | None = None,
    *,
    clock: Callable[[], float] | None = None,
    approvals: dict[str, Any] | None = None,
    **rule: Any,
) -> Held:
    """The demo upstream behind a gateway whose send_email rule has this ``approval`` object, with
    the five reviewers of REVIEWERS (and ``clock`` injected when given)."""
    extra: dict[str, Any] = {"reviewers": REVIEWERS}
    if clock is not None:
        extra["clock"] = clock
    return await start_held(
        start_gateway, tmp_path, held_policy(approval, **rule), approvals=approvals, **extra
    )


async def audit_of(held: Held, subject: str) -> list[dict[str, Any]]:
    """The audit events of one approval (or standing grant), oldest first."""
    status, body = await held.api("GET", f"/api/audit?approval_id={subject}&limit=1000")
    assert status == 200, body
    return body["events"]  # type: ignore[no-any-return]


class Changes:
    """Every Change published on a feed from now on (with its event name, which the kit's Recorder
    drops), and a way to wait for one without polling."""

    def __init__(self) -> None:
        self.seen: list[Change] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def following(cls, feed: ChangeFeed) -> Changes:
        changes = cls()
        listener = feed.listen()

        async def follow() -> None:
            async for change in listener:
                async with changes._changed:
                    changes.seen.append(change)
                    changes._changed.notify_all()

        changes._task = asyncio.create_task(follow())
        return changes

    async def wait_for(self, predicate: Callable[[Change], bool], timeout: float = WAIT) -> Change:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for change in self.seen:
                    if predicate(change):
                        return change
                await self._changed.wait()

    def events(self, approval_id: str) -> list[str]:
        return [c.event for c in self.seen if c.approval.id == approval_id]


# ---- the service over each store, on an injected clock --------------------------------------

StoreKind = Literal["memory", "sqlite", "postgres"]
UPSTREAM = "up"
TOOL = "send"
SEND_TOOL: JsonObject = {
    "name": TOOL,
    "description": "Send a message.",
    "inputSchema": {
        "type": "object",
        "properties": {
            "to": {"type": "string", "minLength": 3},
            "subject": {"type": "string"},
            "body": {"type": "string"},
            "n": {"type": "integer"},
        },
        "required": ["to"],
    },
}


@dataclass(frozen=True)
class Sent:
    """The upstream received a tools/call of ``tool`` with these arguments."""

    tool: str
    arguments: JsonObject


class RecordingUpstream:
    """Lists ``send`` and answers each call at once with the arguments it received; records them."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        await asyncio.sleep(0)  # answered later, as over a pipe
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": 1, "result": {"tools": [copy.deepcopy(SEND_TOOL)]}}
        self.sent.append(Sent(params["name"], copy.deepcopy(params["arguments"])))
        text = f"sent {json.dumps(params['arguments'], sort_keys=True)}"
        return {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}}


def send_policy(approval: Mapping[str, Any] | None = None, **rule: Any) -> Policy:
    """A policy whose ``send`` rule holds calls under ``approval`` (deny_if etc. in ``rule``)."""
    send: dict[str, Any] = {"action": "require_approval", **rule}
    if approval is not None:
        send["approval"] = dict(approval)
    return parse_policy({"version": "1", "default": "deny", "tools": {TOOL: send}})


@dataclass
class Rig:
    """An approval service over one store, its clock cell, its upstream and what its feed said."""

    service: ApprovalService
    store: Store
    upstream: RecordingUpstream
    now: list[float]
    changes: Changes
    settings: Settings
    policy: Policy
    holds: list[Hold] = field(default_factory=list)
    _sessions: int = 0

    def reviewer(self, name: str) -> Principal:
        return next(r for r in self.settings.reviewers if r.name == name)

    def decision(self, arguments: Mapping[str, object]) -> Decision:
        return self.policy.evaluate(TOOL, arguments)

    async def admit(self, arguments: Mapping[str, object], grant: str = "agent-a") -> Any:
        """The Admission of one call by ``grant`` (its hold kept, and closed at the end)."""
        self._sessions += 1
        call = ToolCall(UPSTREAM, grant, f"session-{self._sessions}", TOOL, dict(arguments))
        admission = await self.service.admit(call, self.decision(arguments))
        if admission.hold is not None:
            self.holds.append(admission.hold)
        return admission

    async def held(self, arguments: Mapping[str, object], grant: str = "agent-a") -> Hold:
        admission = await self.admit(arguments, grant)
        assert admission.hold is not None, admission
        return admission.hold  # type: ignore[no-any-return]

    async def audit(self, subject: str) -> list[AuditEvent]:
        return await self.service.audit(approval_id=subject, limit=10_000)

    def sent_arguments(self) -> list[JsonObject]:
        return [s.arguments for s in self.upstream.sent]


async def open_store(kind: StoreKind, tmp_path: Path, clock: Callable[[], float], url: str | None) -> Store:
    if kind == "memory":
        return MemoryStore(clock=clock)
    if kind == "sqlite":
        return await SqliteStore.open(tmp_path / "review.db", clock=clock)
    assert url is not None
    store = await PostgresStore.open(url, clock=clock)
    await store.empty()
    return store


@asynccontextmanager
async def review_rig(
    kind: StoreKind,
    tmp_path: Path,
    policy: Policy,
    *,
    url: str | None = None,
    judge: bool = True,
) -> AsyncIterator[Rig]:
    """The service as the runtime builds it (limiter, catalog, feed), over a store of ``kind``, on a
    clock cell starting at NOW; no expiry task: tests call expire_due / escalate_due themselves.
    ``judge`` False opens it without a policy to judge edits with."""
    now = [NOW]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    settings = settings_for(
        tmp_path,
        {UPSTREAM: {"command": ["x"]}},
        approvals={"timeout": "10m", "max_pending_per_grant": 1000},
        reviewers=REVIEWERS,
    )
    store = await open_store(kind, tmp_path, clock, url)
    feed = LocalFeed()
    changes = Changes.following(feed)
    limiter = RateLimiter(store, clock=clock)
    await limiter.start()
    upstream = RecordingUpstream()
    service = await ApprovalService.open(
        settings,
        store=store,
        counters=limiter,
        upstreams=upstream,
        catalog=ToolCatalog(upstream),
        feed=feed,
        limits_for=lambda _up, tool, arguments: policy.evaluate(tool, arguments).limits,
        clock=clock,
        expire_on_clock=False,
        judge=(lambda _up, tool, arguments: policy.evaluate(tool, arguments)) if judge else None,
    )
    rig = Rig(service, store, upstream, now, changes, settings, policy)
    try:
        yield rig
    finally:
        for hold in rig.holds:
            hold.close()
        await service.settled()
        await service.close()
        feed.close()
        await limiter.close()
        await store.close()


def store_kinds(*kinds: StoreKind) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("kind", kinds or ("memory", "sqlite"))


# ---- the state machine's model of review workflows (tests/test_service_machine.py) -----------

# The rules a machine's calls are held under: one reviewer; a quorum; one from each of two groups;
# a group of one reviewer, escalated to another and denied at the timeout; step-up, no edits, no
# standing grants.
MACHINE_REVIEWS: tuple[ReviewRule, ...] = (
    ReviewRule(),
    ReviewRule(quorum=2),
    ReviewRule(quorum=2, from_groups=("payments", "security")),
    ReviewRule(reviewers=("security",), escalate=(Escalation(120.0, ("payments",)),), on_timeout="deny"),
    ReviewRule(via=("inbox",), edit=False, remember=False),
)
FORBIDDEN = "forbidden"  # a "to" the machine's policy denies: an edit to it is refused
CHANNELS = ("web", "api", "slack")


def in_groups(rule: ReviewRule, escalated: int, groups: Sequence[str]) -> bool:
    """Whether a reviewer of these groups may decide under ``rule`` after ``escalated`` steps."""
    allowed = eligible_groups(rule, escalated)
    return allowed is None or bool(set(groups) & allowed)


def through_allowed_channel(rule: ReviewRule, channel: str) -> bool:
    return not rule.via or any(CHANNEL_OF_VIA[via] == channel for via in rule.via)


def schema_refuses(approval: Approval, arguments: Mapping[str, object]) -> bool:
    """Whether the definition the call was held under requires an argument ``arguments`` lacks (the
    only way the machine's tool versions refuse an object)."""
    schema = (approval.tool_definition or {}).get("inputSchema") or {}
    return any(name not in arguments for name in schema.get("required", ()))


def refusal_alone(
    approval: Approval,
    reviewer: Principal,
    *,
    approve: bool,
    channel: str,
    arguments: Mapping[str, object] | None,
    seen_sha256: str | None,
    judged: ReviewRule | None,
) -> set[str]:
    """The refusal kinds one decision, taken alone on this pending record before its timeout, may
    get ("" standing for none: it is taken). ``judged`` is the review the policy gives the edited
    arguments now (None: it denies them).

    The order is the service's: the owner; what the reviewer was shown (an approval of someone
    else's edit must name its hash); the channel and the groups; the edit (schema, policy, the rule
    it falls under now); a second vote. Under ``from`` a vote that fills no missing group may also
    be refused."""
    rule = ReviewRule.from_json(approval.review_json)
    if reviewer.name == approval.owner:
        return {"own_agent"}
    if approve and seen_sha256 is not None and seen_sha256 != approval.release_sha256:
        return {"changed"}  # a denial is safe whatever its page showed
    if (
        seen_sha256 is None
        and approve
        and arguments is None
        and approval.edited_json is not None
        and approval.edited_by != reviewer.name
    ):
        return {"changed"}
    if not through_allowed_channel(rule, channel):
        return {"step_up"}
    if not in_groups(rule, approval.escalated, reviewer.groups):
        return {"not_eligible"}
    released = approval.release_sha256
    if arguments is not None and sha256_of(arguments) != released:  # the same arguments: no edit
        if not approve or not rule.edit:
            return {"edit_refused"}
        if schema_refuses(approval, arguments) or judged != rule:
            return {"edit_refused"}
        released = sha256_of(arguments)
    if not approve:
        return {""}
    votes = valid_votes(votes_from_json(approval.votes_json), released)
    if any(v.by == reviewer.name for v in votes):
        return {"already_voted"}
    return {"", "not_eligible"} if rule.from_groups else {""}


def check_release_votes(
    approval: Approval, events: Sequence[AuditEvent], groups: Mapping[str, Sequence[str]]
) -> None:
    """A released call has the approvals its rule requires, by distinct eligible reviewers who are not
    its owner, given before its timeout and its release, for the arguments released — the last
    approval being for exactly those arguments."""
    rule = ReviewRule.from_json(approval.review_json)
    votes = votes_from_json(approval.votes_json)
    assert votes, "released without a recorded approval"
    assert votes[-1].by == approval.decided_by, "the approval that released it is not the last one"
    assert votes[-1].args_sha256 == approval.release_sha256, "released other arguments than approved last"
    counted = valid_votes(votes, approval.release_sha256)
    assert quorum_met(rule, counted), f"released without its quorum: {counted}"
    assert len({v.by for v in counted}) == len(counted), "one reviewer counted twice"
    escalations = [e.at for e in events if e.event == "escalated"]
    for vote in counted:
        assert vote.by != approval.owner, "the owner's approval counted"
        assert tuple(vote.groups) == tuple(groups[vote.by]), "a vote with other groups than its reviewer's"
        steps = sum(at <= vote.at for at in escalations)
        assert in_groups(rule, steps, vote.groups), "an approval by a reviewer outside the rule's groups"
        assert vote.at < approval.expires_at, "an approval counted from after the timeout"
        assert approval.released_at is not None
        assert vote.at <= approval.released_at, "an approval counted from after the release"
    if approval.edited_json is not None:
        assert approval.edited_sha256 == sha256_of(approval.release_arguments)
        edits = [e for e in events if e.event == "edited"]
        assert edits, "edited arguments without an edited event"
        assert json.loads(edits[-1].detail or "{}")["to_sha256"] == approval.release_sha256


def grant_stands(
    grant: StandingGrant, decision: Decision, reviewers: Sequence[Principal], owner: str | None
) -> bool:
    """Whether the grant's maker could still take this call's decision (remembering._still_stands,
    as the model sees it): the same rule, still allowing grants, a channel its via accepts, a group
    it names, and not the agent's owner."""
    review = decision.review
    if not review.may_remember or grant.rule != decision.rule or grant.created_by == owner:
        return False
    if review.via and {v for v, c in CHANNEL_OF_VIA.items() if c == grant.created_via}.isdisjoint(review.via):
        return False
    maker = next((r for r in reviewers if r.name == grant.created_by), None)
    allowed = eligible_groups(review, 0)
    return maker is not None and (allowed is None or bool(allowed & set(maker.groups)))


@dataclass
class GrantModel:
    """What the machine knows of one standing grant: as created, each use, and its revocation."""

    grant: StandingGrant
    uses: list[tuple[int, float, int]] = field(default_factory=list)  # (use number, clock, step)
    revoked_step: int | None = None

    def active(self, now: float) -> bool:
        limit = self.grant.max_uses
        return (
            self.revoked_step is None
            and now < self.grant.expires_at
            and (limit is None or len(self.uses) < limit)
        )

    def covers(self, grant: str, arguments: Mapping[str, object], now: float) -> bool:
        return self.grant.grant == grant and self.grant.matches(arguments) and self.active(now)

    def check_use(
        self, number: int, grant: str, arguments: Mapping[str, object], now: float, step: int
    ) -> None:
        assert self.grant.grant == grant, "a standing grant used for another agent"
        assert self.grant.matches(arguments), "a standing grant used for a call it does not match"
        assert now < self.grant.expires_at, "a standing grant used after it expired"
        assert self.revoked_step is None, "a standing grant used after it was revoked"
        limit = self.grant.max_uses
        assert limit is None or number <= limit, "a standing grant used more than max_uses times"
        self.uses.append((number, now, step))

    def check_stored(self, stored: StandingGrant, used_events: int) -> None:
        assert stored.uses == len(self.uses) == used_events, (stored.uses, len(self.uses), used_events)
        assert sorted(n for n, _, _ in self.uses) == list(range(1, stored.uses + 1)), "uses numbered twice"
        assert (stored.revoked_at is None) == (self.revoked_step is None)
        assert (stored.expires_at, stored.max_uses, stored.grant) == (
            self.grant.expires_at,
            self.grant.max_uses,
            self.grant.grant,
        )
