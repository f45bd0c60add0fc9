"""The approval service as a state machine: random arrivals, decisions, cancels, tool changes, expiry
and restarts against the real service, limiter and catalog, over each store (SQLite and the
in-memory twin), in front of an in-memory upstream. Calls are held under review rules drawn from
tests.review_kit.MACHINE_REVIEWS (quorum, groups, escalation, step-up, no edits), and reviewers
vote, edit, approve and deny with standing grants, which later calls use and reviewers revoke.

Everything goes through the service's public API (``open(expire_on_clock=False)``, ``admit``,
``decide``, ``cancel``, ``expire_due``, ``settled``, ``follow``, ``close``) and its change feed: a
listener hears every announcement, as the inbox and Slack do. The clock is a list cell the machine
advances; every rule runs on one event loop, and background work (releases, delivery marks) goes on
between and during rules as it would in the gateway. After every step the machine reads the store's
records and audit log and the upstream's record of what it received, and checks the promises of
the life cycle against them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from approvals.config import Principal, Settings
from approvals.core.deciding import RememberRequest
from approvals.core.feed import LocalFeed
from approvals.core.model import (
    FINAL,
    Approval,
    AuditEvent,
    Hold,
    Status,
    ToolCall,
    canonical_json,
    sha256_of,
)
from approvals.core.ports import Change, Listener, Store
from approvals.core.review import ReviewRule, quorum_met, valid_votes, votes_from_json
from approvals.core.service import ApprovalService
from approvals.core.standing import Constraint, exact_constraints
from approvals.errors import DecisionRefused, RefusalKind
from approvals.jsonrpc import JsonObject
from approvals.limits import RateLimiter
from approvals.policy import Decision, Limit
from approvals.store.memory import MemoryStore
from approvals.store.sqlite import SqliteStore
from approvals.tool_catalog import ToolCatalog, fingerprint
from tests.conftest import settings_for
from tests.review_kit import (
    CHANNELS,
    FORBIDDEN,
    GROUPS,
    MACHINE_REVIEWS,
    REVIEWERS,
    GrantModel,
    check_release_votes,
    grant_stands,
    in_groups,
    refusal_alone,
    through_allowed_channel,
)

T = TypeVar("T")
StoreKind = Literal["sqlite", "memory"]
WAIT = 30.0  # the bound on every step: a release that sleeps for a rate-limit window fails the test
# The bound on hearing a change already published: the listener only has to be scheduled once.
HEAR_WAIT = 5.0
NOW = 1_800_000_000.0  # the start of a UTC hour
UPSTREAM = "demo"
TOOL = "send"
OWNERS = {"agent-a": "alice", "agent-b": "bob"}
UNKNOWN_ID = "0" * 32
MAX_PENDING = 3
DEFAULT_TIMEOUT = 600.0
# Hour windows, longer than any approval timeout: a release refused by a limit can never fit before
# its expiry, so it expires at once instead of sleeping (the loop's sleep is in real seconds).
LIMITS = (Limit("sends", "hour", 4, "grant"), Limit("all_sends", "hour", 7, "global"))
LIMIT_MAX = {limit.counter: limit.max for limit in LIMITS}
SEND_VERSIONS: tuple[JsonObject | None, ...] = (
    {"name": TOOL, "description": "Send a message.", "inputSchema": {"type": "object"}},
    {"name": TOOL, "description": "Send a message to anyone, now.", "inputSchema": {"type": "object"}},
    {"name": TOOL, "description": "Send a message.", "inputSchema": {"type": "object", "required": ["to"]}},
    None,  # the upstream no longer lists it
)
READ_TOOL: JsonObject = {"name": "read", "inputSchema": {"type": "object"}}
LIVE: frozenset[Status] = frozenset({"pending", "approved", "released"})
RELEASED: frozenset[Status] = frozenset({"released", "completed", "failed"})
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=4,
)
# Where a failed background task or a stray asyncio error is logged (never raised).
WATCHED_LOGS = ("approvals.core.service", "asyncio")


@dataclass(frozen=True)
class Listed:
    """The upstream answered a tools/list asked for `session`; `send_sha256` of what it listed."""

    session: str | None
    ok: bool
    send_sha256: str  # "" when the listing failed or did not include the tool


@dataclass(frozen=True)
class Called:
    """The upstream received a tools/call, with these arguments, preferring `session`."""

    session: str | None
    tool: str
    arguments: JsonObject


@dataclass(frozen=True)
class Moved:
    """The store committed a transition of an approval (logged beside the upstream's requests)."""

    approval_id: str
    to: Status


Seen = Listed | Called | Moved


class MemoryUpstream:
    """The in-memory `UpstreamCaller`: lists `send` as currently defined, records every request."""

    def __init__(self) -> None:
        self.send: JsonObject | None = SEND_VERSIONS[0]
        self.listing_fails = False
        self.seen: list[Seen] = []  # one timeline of requests and of transitions
        self.answering = asyncio.Event()  # cleared: calls are received, then held unanswered
        self.answering.set()
        self.listing = asyncio.Event()  # cleared: tools/list waits, then lists what is defined then
        self.listing.set()

    def tools(self) -> list[JsonObject]:
        return [copy.deepcopy(tool) for tool in (self.send, READ_TOOL) if tool is not None]

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject:
        assert upstream == UPSTREAM
        await asyncio.sleep(0)  # answered later, as over a pipe: other tasks run in the meantime
        if method == "tools/list":
            await self.listing.wait()
            if self.listing_fails:
                self.seen.append(Listed(prefer_session, ok=False, send_sha256=""))
                return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "cannot list"}}
            self.seen.append(Listed(prefer_session, ok=True, send_sha256=fingerprint(self.send)[1]))
            return {"jsonrpc": "2.0", "id": 1, "result": {"tools": self.tools()}}
        assert method == "tools/call", method
        arguments = params["arguments"]
        self.seen.append(Called(prefer_session, params["name"], copy.deepcopy(arguments)))
        await self.answering.wait()
        if arguments.get("fail") is True:
            return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "mailbox full"}}
        text = f"sent {arguments['call']}"
        return {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}}


def _note(timeline: list[Seen], moved: Approval | None, approval_id: str, to: Status) -> Approval | None:
    if moved is not None:
        timeline.append(Moved(approval_id, to))
    return moved


class LoggedSqliteStore(SqliteStore):
    """The SQLite store, which also notes each committed transition on the upstream's timeline."""

    timeline: list[Seen]

    async def transition(
        self,
        approval_id: str,
        *,
        from_: Collection[Status],
        to: Status,
        actor: str,
        channel: str,
        event: str | None = None,
        version: int | None = None,
        **fields: object,
    ) -> Approval | None:
        moved = await super().transition(
            approval_id,
            from_=from_,
            to=to,
            actor=actor,
            channel=channel,
            event=event,
            version=version,
            **fields,
        )
        return _note(self.timeline, moved, approval_id, to)


class LoggedMemoryStore(MemoryStore):
    """The in-memory store, which also notes each committed transition on the upstream's timeline."""

    timeline: list[Seen]

    async def transition(
        self,
        approval_id: str,
        *,
        from_: Collection[Status],
        to: Status,
        actor: str,
        channel: str,
        event: str | None = None,
        version: int | None = None,
        **fields: object,
    ) -> Approval | None:
        moved = await super().transition(
            approval_id,
            from_=from_,
            to=to,
            actor=actor,
            channel=channel,
            event=event,
            version=version,
            **fields,
        )
        return _note(self.timeline, moved, approval_id, to)


class Database:
    """What outlives a process: a SQLite file, or one in-memory store kept across restarts."""

    def __init__(self, kind: StoreKind, path: pathlib.Path, timeline: list[Seen]) -> None:
        self.kind = kind
        self._path = path
        self._timeline = timeline
        self._memory: LoggedMemoryStore | None = None

    async def open(self, clock: Callable[[], float]) -> Store:
        store: SqliteStore | LoggedMemoryStore
        if self.kind == "sqlite":
            store = await LoggedSqliteStore.open(self._path, clock=clock)
            assert isinstance(store, LoggedSqliteStore)
        else:
            # Closing the memory store keeps its data: the "file" the next start opens.
            self._memory = self._memory or LoggedMemoryStore(clock=clock)
            store = self._memory
        store.timeline = self._timeline
        return store


class Heard:
    """Every change a listener of the feed heard, across restarts (one listener per start)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self._grew = asyncio.Event()

    async def follow(self, listener: Listener) -> None:
        async for change in listener:
            self.changes.append(change)
            self._grew.set()

    def finals(self) -> set[tuple[str, Status]]:
        return {(c.approval.id, c.approval.status) for c in self.changes if c.approval.status in FINAL}

    async def until(self, heard: Callable[[], bool]) -> bool:
        """Whether ``heard()`` came true within HEAR_WAIT (it is checked after every change heard)."""
        try:
            async with asyncio.timeout(HEAR_WAIT):
                while not heard():
                    self._grew.clear()
                    await self._grew.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class Running:
    """One process's service and the parts it was opened with."""

    service: ApprovalService
    store: Store
    feed: LocalFeed
    limiter: RateLimiter
    catalog: ToolCatalog
    hearing: asyncio.Task[None]


class ErrorLog(logging.Handler):
    """Keeps every error a background task logs (a failed release is only logged, never raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def call_limits(upstream: str, tool: str, arguments: Mapping[str, object]) -> Sequence[Limit]:
    return LIMITS


def decision(timeout: float | None, review: ReviewRule = MACHINE_REVIEWS[0]) -> Decision:
    return Decision(
        action="require_approval",
        rule=TOOL,
        code="approval_required",
        reason=None,
        explanation="sending needs a human",
        limits=LIMITS,
        review=dataclasses.replace(review, timeout=timeout),
    )


class Policy:
    """The policy as the machine makes it up: each call is held under the review rule last drawn
    for its "call" (so a repeat asked under another rule is a policy that changed since the
    request); an edit to "to" = FORBIDDEN is denied."""

    def __init__(self) -> None:
        self.review_of: dict[object, ReviewRule] = {}

    def held(self, arguments: Mapping[str, object], timeout: float | None, review: ReviewRule) -> Decision:
        asked = decision(timeout, review)
        self.review_of[arguments.get("call")] = asked.review
        return asked

    def judged(self, arguments: Mapping[str, object]) -> ReviewRule | None:
        """The review the policy gives these arguments now, None when it denies them."""
        if arguments.get("to") == FORBIDDEN:
            return None
        return self.review_of.get(arguments.get("call"), decision(None).review)

    def judge(self, upstream: str, tool: str, arguments: Mapping[str, object]) -> Decision:
        review = self.judged(arguments)
        if review is None:
            return dataclasses.replace(decision(None), action="deny", code="deny_if", reason="not that one")
        return dataclasses.replace(decision(None), review=review)


async def open_service(
    settings: Settings,
    database: Database,
    upstream: MemoryUpstream,
    clock: Callable[[], float],
    heard: Heard,
    policy: Policy | None = None,
) -> Running:
    """A service over the database's store, a limiter and a catalog, as the runtime builds it, with
    a listener on its feed from before it opens (so recovery's changes are heard too)."""
    store = await database.open(clock)
    feed = LocalFeed()
    hearing = asyncio.create_task(heard.follow(feed.listen()), name="machine-listener")
    limiter = RateLimiter(store, clock=clock)
    await limiter.start()
    catalog = ToolCatalog(upstream)
    service = await ApprovalService.open(
        settings,
        store=store,
        counters=limiter,
        upstreams=upstream,
        catalog=catalog,
        feed=feed,
        limits_for=call_limits,
        clock=clock,
        expire_on_clock=False,
        judge=(policy or Policy()).judge,
    )
    return Running(service, store, feed, limiter, catalog, hearing)


async def close_service(running: Running) -> None:
    await running.service.close()
    running.feed.close()  # ends the listener
    await running.hearing
    await running.limiter.close()
    await running.store.close()


async def _bounded(coro: Coroutine[Any, Any, T]) -> T:
    async with asyncio.timeout(WAIT):
        return await coro


def _pick(data: st.DataObject, choices: Sequence[T], label: str) -> T:
    """One of ``choices``, drawn as a plain number taken modulo their count: which records exist or
    are pending may depend on background work (a SQLite thread's timing), and a draw whose bounds
    depend on it makes hypothesis report its replays as flaky data generation."""
    return choices[_number(data, label) % len(choices)]


def _number(data: st.DataObject, label: str) -> int:
    return data.draw(st.integers(0, 10_000), label=label)


async def _attempt(coro: Coroutine[Any, Any, T]) -> T | DecisionRefused:
    """What ``coro`` returns, or the refusal it raised."""
    try:
        return await coro
    except DecisionRefused as refused:
        return refused


@dataclass(frozen=True)
class Asked:
    """One decision a rule takes: who, which way, through which channel, with an edit or not."""

    reviewer: Principal
    approve: bool
    channel: str = "web"
    arguments: JsonObject | None = None
    seen_sha256: str | None = None  # the arguments' hash the reviewer was shown


async def _decide(service: ApprovalService, approval_id: str, asked: Asked) -> Approval | RefusalKind:
    """The decided record, or the kind of the refusal."""
    try:
        return await service.decide(
            approval_id,
            asked.reviewer,
            approve=asked.approve,
            reason=None if asked.approve else "not now",
            channel=asked.channel,
            arguments=asked.arguments,
            seen_sha256=asked.seen_sha256,
        )
    except DecisionRefused as refused:
        return refused.kind


class ServiceMachine(RuleBasedStateMachine):
    """Random arrivals, decisions, cancels, tool changes, clock moves, expiry and restarts of one service."""

    kind: StoreKind = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.now = [NOW]
        self._dir = tempfile.TemporaryDirectory()
        self._path = pathlib.Path(self._dir.name)
        self._runner = asyncio.Runner()
        self._errors = ErrorLog()
        for name in WATCHED_LOGS:
            logging.getLogger(name).addHandler(self._errors)
        self.settings = settings_for(
            self._path,
            {UPSTREAM: {"command": ["x"]}},
            approvals={"timeout": "10m", "max_pending_per_grant": MAX_PENDING},
            reviewers=REVIEWERS,
        )
        self.upstream = MemoryUpstream()
        self.database = Database(self.kind, self._path / "a.db", self.upstream.seen)
        self.heard = Heard()
        self.policy = Policy()
        self.running = self._run(self._open())
        self.calls: list[tuple[str, JsonObject]] = []  # every (grant, arguments) asked, to repeat
        self.admitted: dict[str, JsonObject] = {}  # by the session that opened the request
        self.ids: list[str] = []  # in the order they were first seen, so draws replay
        self.grant_of: dict[str, str] = {}
        self.holds: dict[str, list[Hold]] = defaultdict(list)  # calls held (and open) on this service
        self.first_tool_sha: dict[str, str] = {}
        self.finals: dict[str, tuple[Status, int, float | None, str | None]] = {}
        self.unannounced: set[str] = set()  # final when the process stopped, not heard: may be lost
        self._counter = itertools.count()
        self.voted: dict[str, list[tuple[str, str]]] = defaultdict(list)  # (reviewer, sha) taken, by approval
        self.grants: dict[str, GrantModel] = {}  # standing grants saved, by id
        self.remembered: dict[str, tuple[str, JsonObject]] = {}  # (agent, arguments) each grant was saved for
        self._steps = itertools.count()  # orders uses and revocations of standing grants

    def clock(self) -> float:
        return self.now[0]

    @property
    def service(self) -> ApprovalService:
        return self.running.service

    @property
    def store(self) -> Store:
        return self.running.store

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(_bounded(coro))

    async def _open(self) -> Running:
        return await open_service(
            self.settings, self.database, self.upstream, self.clock, self.heard, self.policy
        )

    def teardown(self) -> None:
        try:
            self._close_holds()
            self._run(close_service(self.running))
        finally:
            for name in WATCHED_LOGS:
                logging.getLogger(name).removeHandler(self._errors)
            self._runner.close()
            self._dir.cleanup()

    async def _close(self) -> None:
        self._close_holds()
        assert self.running.feed.watched() == 0, "a closed hold left its watch behind"
        await close_service(self.running)

    def _close_holds(self) -> None:
        for holds in self.holds.values():
            for hold in holds:
                hold.close()
        self.holds.clear()

    # ---- arrivals ------------------------------------------------------------------------------

    def _draw_call(self, data: st.DataObject) -> tuple[str, JsonObject]:
        repeat: bool = len(self.calls) > 0 and data.draw(st.booleans(), label="repeat")
        if repeat:
            earlier_grant, earlier = data.draw(st.sampled_from(self.calls), label="earlier call")
            return data.draw(st.sampled_from([earlier_grant, *OWNERS]), label="grant"), earlier
        arguments: JsonObject = {"call": f"c{next(self._counter)}", "to": data.draw(JSON_VALUES, label="to")}
        if data.draw(st.sampled_from([False, False, False, True]), label="upstream fails it"):
            arguments["fail"] = True
        grant = data.draw(st.sampled_from(sorted(OWNERS)), label="grant")
        self.calls.append((grant, arguments))
        return grant, arguments

    @rule(
        data=st.data(), timeout=st.sampled_from([60.0, 300.0, None]), review=st.sampled_from(MACHINE_REVIEWS)
    )
    def admit(self, data: st.DataObject, timeout: float | None, review: ReviewRule) -> None:
        grant, arguments = self._draw_call(data)
        self._run(self._admit(grant, arguments, self.policy.held(arguments, timeout, review), 1))

    @rule(
        data=st.data(),
        timeout=st.sampled_from([60.0, None]),
        copies=st.integers(2, 3),
        review=st.sampled_from(MACHINE_REVIEWS),
    )
    def admit_together(
        self, data: st.DataObject, timeout: float | None, copies: int, review: ReviewRule
    ) -> None:
        grant, arguments = self._draw_call(data)
        self._run(self._admit(grant, arguments, self.policy.held(arguments, timeout, review), copies))

    async def _admit(self, grant: str, arguments: JsonObject, asked: Decision, copies: int) -> None:
        timeout = asked.approval_timeout
        now = self.clock()
        # What the standing grants the machine saved say of this call, before it arrives.
        covering = [
            m
            for m in self.grants.values()
            if m.covers(grant, arguments, now)
            and grant_stands(m.grant, asked, self.settings.reviewers, OWNERS[grant])
        ]
        sessions = [f"s{next(self._counter)}" for _ in range(copies)]
        # Results already handed to a client: flags never go back, so no admission may attach to these.
        delivered = {
            a.id
            for a in await self.service.list_approvals(limit=10_000)
            if a.status in ("completed", "failed") and a.result_delivered
        }
        admissions = await asyncio.gather(
            *(
                self.service.admit(ToolCall(UPSTREAM, grant, session, TOOL, arguments), asked)
                for session in sessions
            )
        )
        held: set[str] = set()
        for session, admission in zip(sessions, admissions, strict=True):
            code = self._answered(admission, grant, arguments, now)
            if copies == 1 and covering:
                # Alone, a call a remembered denial covers is denied, one an allowance covers is
                # allowed (or over a rate limit) — unless it is a repeat collecting the outcome of
                # its own request, which it attaches to (whether a finished one still answers it
                # may change meanwhile, as a delivery mark or kept denial lands): never a new one.
                denied = any(m.grant.effect == "deny" for m in covering)
                expected = (
                    ("denied_by_standing_grant",) if denied else ("allowed_by_standing_grant", "rate_limited")
                )
                assert code in (*expected, "held"), code
            if admission.hold is None:
                event(f"admit answered: {code}")
                if admission.on_result is not None:  # the proxy forwards it; the upstream answers
                    await admission.on_result({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
                continue
            approval = await self.service.get(admission.hold.approval_id)
            assert approval is not None
            assert (approval.grant, approval.upstream, approval.tool) == (grant, UPSTREAM, TOOL)
            assert approval.args_sha256 == sha256_of(arguments)
            assert approval.id not in delivered, "a repeat call got a result already delivered"
            held.add(approval.id)
            if approval.id not in self.ids:
                self.ids.append(approval.id)
                self.grant_of[approval.id] = grant
            self.holds[approval.id].append(admission.hold)
            if approval.session_id == session:  # this call opened the request
                assert copies > 1 or not covering, "a call an active standing grant covers opened a request"
                event("admit: new request")
                assert approval.id not in self.first_tool_sha
                self.admitted[session] = arguments
                self.first_tool_sha[approval.id] = approval.tool_sha256
                assert canonical_json(approval.arguments) == canonical_json(arguments)
                assert approval.owner == OWNERS[grant]
                assert approval.expires_at == approval.created_at + (timeout or DEFAULT_TIMEOUT)
            else:
                event(f"admit: attached to a {approval.status} request")
        # Identical calls arriving together find one another: one request at most.
        assert len(held) <= 1, held

    def _answered(self, admission: Any, grant: str, arguments: JsonObject, now: float) -> str:
        """What an admission did ("held", or its code), each use of a standing grant checked against
        the machine's model of it."""
        if admission.hold is not None:
            return "held"
        if admission.answer is None:  # forwarded: only a standing grant lets a held call's rule through
            meta = admission.meta["approvals"]
            assert meta["code"] == "allowed_by_standing_grant", meta
        else:
            assert admission.answer["isError"] is True
            meta = admission.answer["_meta"]["approvals"]
            assert meta["code"] in ("rate_limited", "too_many_pending", "denied_by_standing_grant"), meta
        if meta["code"].endswith("_by_standing_grant"):
            model = self.grants.get(meta["standing_grant"])
            assert model is not None, "a call answered by a standing grant nobody saved"
            assert model.grant.effect == ("allow" if meta["code"].startswith("allowed") else "deny")
            number = meta.get("uses", len(model.uses) + 1)  # a denial's answer does not number its use
            model.check_use(number, grant, arguments, now, next(self._steps))
        return meta["code"]  # type: ignore[no-any-return]

    # ---- decisions -----------------------------------------------------------------------------

    def _draw_id(self, data: st.DataObject) -> str:
        return _pick(data, [*self.ids, UNKNOWN_ID], "approval")

    def _draw_reviewer(self, data: st.DataObject) -> Principal:
        return data.draw(st.sampled_from(self.settings.reviewers), label="reviewer")

    @rule(
        data=st.data(),
        approve=st.booleans(),
        channel=st.sampled_from(CHANNELS),
        seen=st.sampled_from(["nothing", "current", "as asked"]),
    )
    def decide(self, data: st.DataObject, approve: bool, channel: str, seen: str) -> None:
        approval_id = self._draw_id(data)
        record = self._run(self.service.get(approval_id))
        shown = None
        if record is not None and seen != "nothing":
            shown = record.release_sha256 if seen == "current" else record.args_sha256
        asked = Asked(self._draw_reviewer(data), approve, channel, seen_sha256=shown)
        self._run(self._decide(approval_id, [asked]))

    def _draw_able(self, data: st.DataObject, remembering: bool = False) -> tuple[Approval, Principal, str]:
        """A request (a pending one when there is one), a reviewer who may approve it, and a channel
        its rule accepts: most decisions drawn at random are refused.

        Which are pending, and who may approve, depend on releases running in the background (see
        `_pick`)."""
        listed = self._run(self.service.list_approvals(status="pending", limit=10_000))
        pending = {
            a.id for a in listed if not remembering or ReviewRule.from_json(a.review_json).may_remember
        }
        approval_id = _pick(data, [i for i in self.ids if i in pending] or self.ids, "approval")
        record = self._run(self.service.get(approval_id))
        assert record is not None
        rule = ReviewRule.from_json(record.review_json)
        voted = {v.by for v in valid_votes(votes_from_json(record.votes_json), record.release_sha256)}
        able = [
            r
            for r in self.settings.reviewers
            if r.name != record.owner and r.name not in voted and in_groups(rule, record.escalated, r.groups)
        ]
        reviewer = _pick(data, able or list(self.settings.reviewers), "approver")
        return record, reviewer, next(c for c in CHANNELS if through_allowed_channel(rule, c))

    @precondition(lambda self: bool(self.ids))
    @rule(data=st.data())
    def approve(self, data: st.DataObject) -> None:
        record, reviewer, channel = self._draw_able(data)
        self._run(
            self._decide(record.id, [Asked(reviewer, True, channel, seen_sha256=record.release_sha256)])
        )

    @precondition(lambda self: bool(self.ids))
    @rule(data=st.data(), first=st.booleans(), second=st.booleans())
    def decide_together(self, data: st.DataObject, first: bool, second: bool) -> None:
        approval_id = _pick(data, self.ids, "approval")
        reviewers = data.draw(st.lists(st.sampled_from(self.settings.reviewers), min_size=2, max_size=2))
        self._run(self._decide(approval_id, [Asked(reviewers[0], first), Asked(reviewers[1], second)]))

    @precondition(lambda self: bool(self.ids))
    @rule(
        data=st.data(),
        change=st.sampled_from(["to", "to", "forbidden", "drop to", "fail"]),
        together=st.booleans(),
    )
    def edit(self, data: st.DataObject, change: str, together: bool) -> None:
        """A reviewer approves the call with changed arguments (alone, or as another approves it)."""
        record, reviewer, channel = self._draw_able(data)
        edited: JsonObject = dict(record.release_arguments)
        if change == "to":
            edited["to"] = data.draw(JSON_VALUES, label="new to")
        elif change == "forbidden":
            edited["to"] = FORBIDDEN
        elif change == "drop to":
            edited.pop("to", None)
        elif edited.pop("fail", None) is None:
            edited["fail"] = True
        asked = [Asked(reviewer, True, channel, edited, seen_sha256=record.release_sha256)]
        if together:
            asked.append(Asked(self._draw_reviewer(data), True, channel))
        self._run(self._decide(record.id, asked))

    async def _decide(self, approval_id: str, decisions: list[Asked]) -> None:
        before = await self.service.get(approval_id)
        now = self.clock()
        outcomes = await asyncio.gather(*(_decide(self.service, approval_id, asked) for asked in decisions))
        after = await self.service.get(approval_id)
        if before is None:
            assert outcomes == ["unknown"] * len(decisions)
            return
        assert after is not None
        rule = ReviewRule.from_json(before.review_json)
        lapsed = before.status == "pending" and now >= before.expires_at
        # Only a release in flight moves a record that is not pending, and it may send an approved
        # one back to pending meanwhile; a final or released one is never decided again.
        decided = before.status in FINAL or before.status == "released"
        timed_out = "expired" if rule.on_timeout == "expire" else "already_decided"
        for asked, outcome in zip(decisions, outcomes, strict=True):
            reviewer = asked.reviewer
            if reviewer.name == before.owner:
                assert outcome == "own_agent", "a reviewer approved their own agent's call"
                continue
            if lapsed:
                assert outcome == timed_out, (outcome, rule.on_timeout)
            if decided:
                assert not isinstance(outcome, Approval)
            if len(decisions) == 1 and before.status == "pending" and not lapsed:
                expected = refusal_alone(
                    before,
                    reviewer,
                    approve=asked.approve,
                    channel=asked.channel,
                    arguments=asked.arguments,
                    seen_sha256=asked.seen_sha256,
                    judged=None if asked.arguments is None else self.policy.judged(asked.arguments),
                )
                got = "" if isinstance(outcome, Approval) else outcome
                assert got in expected, (got, expected, rule)
            if isinstance(outcome, Approval):
                self._check_taken(before, asked, outcome, now)
                event(f"decide: {outcome.status}{' (edited)' if asked.arguments is not None else ''}")
            else:
                assert outcome in (
                    "already_decided", "expired", "not_eligible", "step_up", "already_voted", "edit_refused",
                    "changed",
                ), outcome  # fmt: skip
                if outcome == "expired":
                    assert after.status == "expired"
                if outcome == "step_up":
                    assert not through_allowed_channel(rule, asked.channel)
                if outcome == "edit_refused":
                    assert asked.arguments is not None
                if outcome == "already_voted":
                    assert asked.approve
                if outcome == "changed":  # approving other arguments than shown, or an edit unseen
                    assert asked.approve
                event(f"decide: {outcome} on {before.status}")
        final = [o for o in outcomes if isinstance(o, Approval) and o.status in ("approved", "denied")]
        assert len(final) <= 1, "two decisions ended one request"
        if lapsed and any(asked.reviewer.name != before.owner for asked in decisions):
            assert after.status == ("expired" if rule.on_timeout == "expire" else "denied")
        # Any single denial by a reviewer who may decide ends a pending request at once: it won,
        # or another decision taken with it had already ended the request.
        for asked, outcome in zip(decisions, outcomes, strict=True):
            may = (
                asked.reviewer.name != before.owner
                and through_allowed_channel(rule, asked.channel)
                and in_groups(rule, before.escalated, asked.reviewer.groups)
                and asked.seen_sha256 in (None, before.release_sha256)  # a stale look is refused
            )
            if not asked.approve and may and before.status == "pending" and not lapsed:
                assert isinstance(outcome, Approval) or final, "a denial by an eligible reviewer was lost"
        if final and final[0].status == "denied":
            assert after.status == "denied"

    def _check_taken(self, before: Approval, asked: Asked, taken: Approval, now: float) -> None:
        """A decision the service took: by someone who may, recorded as taken."""
        rule = ReviewRule.from_json(before.review_json)
        assert through_allowed_channel(rule, asked.channel), "a decision through a channel the rule refuses"
        assert in_groups(rule, before.escalated, asked.reviewer.groups), (
            "a decision by an ineligible reviewer"
        )
        assert now < taken.expires_at
        if not asked.approve:
            assert (taken.status, taken.decided_by, taken.decided_at) == ("denied", asked.reviewer.name, now)
            return
        if asked.arguments is not None:
            assert taken.release_sha256 == sha256_of(asked.arguments), "an edit approved other arguments"
        votes = votes_from_json(taken.votes_json)
        assert votes, "an approval without its vote"
        mine = votes[-1]  # the record its own move made: its vote is the last
        assert (mine.by, mine.args_sha256, mine.at) == (asked.reviewer.name, taken.release_sha256, now)
        self.voted[before.id].append((mine.by, mine.args_sha256))
        counted = valid_votes(votes, taken.release_sha256)
        if taken.status == "approved":
            assert (taken.decided_by, taken.decided_at) == (asked.reviewer.name, now)
            assert quorum_met(rule, counted)
        else:
            assert taken.status == "pending"
            assert not quorum_met(rule, counted), "the quorum was met but the call not approved"

    # ---- standing grants -----------------------------------------------------------------------

    @precondition(lambda self: bool(self.ids))
    @rule(
        data=st.data(),
        approve=st.sampled_from([True, True, False]),
        seconds=st.sampled_from([60.0, 600.0, 3600.0]),
        max_uses=st.sampled_from([1, 2, None]),
        widen=st.booleans(),
    )
    def remember(
        self, data: st.DataObject, approve: bool, seconds: float, max_uses: int | None, widen: bool
    ) -> None:
        """Approve (or deny) and remember: exactly this call, or any call to the same "to"."""
        record, reviewer, channel = self._draw_able(data, remembering=True)
        remember = RememberRequest(seconds, max_uses)
        self._run(self._remember(record.id, Asked(reviewer, approve, channel), remember, widen))

    async def _remember(self, approval_id: str, asked: Asked, remember: RememberRequest, widen: bool) -> None:
        reviewer, approve = asked.reviewer, asked.approve
        before = await self.service.get(approval_id)
        assert before is not None
        arguments = before.release_arguments
        constraints = exact_constraints(arguments)
        if widen:
            constraints = tuple(c if c.field == "to" else Constraint(c.field, "any") for c in constraints)
        remember = dataclasses.replace(remember, constraints=constraints)
        now = self.clock()
        rule = ReviewRule.from_json(before.review_json)
        outcome = await _attempt(
            self.service.decide_and_remember(
                approval_id, reviewer, approve=approve, reason=None if approve else "never",
                channel=asked.channel, remember=remember, seen_sha256=before.release_sha256,
            )
        )  # fmt: skip
        if isinstance(outcome, DecisionRefused):
            assert outcome.kind != "remember_refused" or not rule.may_remember, str(outcome)
            event(f"remember refused: {outcome.kind}")
            return
        taken, saved = outcome
        assert rule.may_remember, "a standing grant saved under a rule that forbids it"
        assert saved is not None
        self._check_taken(before, asked, taken, now)
        assert (saved.effect, saved.grant, saved.upstream, saved.tool) == (
            "allow" if approve else "deny", before.grant, UPSTREAM, TOOL,
        )  # fmt: skip
        assert (saved.expires_at, saved.max_uses, saved.uses) == (
            now + remember.seconds,
            remember.max_uses,
            0,
        )
        assert (saved.source_approval, saved.created_by) == (approval_id, reviewer.name)
        assert saved.matches(arguments)
        assert saved.id not in self.grants
        self.grants[saved.id] = GrantModel(saved)
        self.remembered[saved.id] = (before.grant, arguments)
        event(f"remember: {saved.effect}{' widened' if widen else ''}")

    # No precondition on the grants saved, and as many draws whatever they are: whether a grant was
    # saved can depend on background work, and hypothesis must replay the same draws (see `_pick`).
    @rule(
        data=st.data(),
        other_agent=st.sampled_from([False, False, False, True]),
        copies=st.sampled_from([1, 1, 2, 3]),
        review=st.sampled_from(MACHINE_REVIEWS),
        fresh=st.sampled_from([True, True, False]),
    )
    def call_as_remembered(
        self, data: st.DataObject, other_agent: bool, copies: int, review: ReviewRule, fresh: bool
    ) -> None:
        """The call a grant was saved for, again, or a new one like it (another "call", which only
        a widened grant matches), by its agent or by the other one, once or several times at once."""
        number = _number(data, "standing grant")
        if not self.grants:
            return
        grant_id = list(self.grants)[number % len(self.grants)]
        agent, arguments = self.remembered[grant_id]
        if fresh:
            arguments = {**arguments, "call": f"c{next(self._counter)}"}
        model = self.grants[grant_id]
        state = "active" if model.active(self.clock()) else "inactive"
        event(f"call as remembered: {model.grant.effect}, {state}")
        if other_agent:
            agent = next(a for a in sorted(OWNERS) if a != agent)
        self._run(self._admit(agent, arguments, self.policy.held(arguments, None, review), copies))

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        number, reviewer = _number(data, "standing grant"), self._draw_reviewer(data)
        if self.grants:
            self._run(self._revoke(list(self.grants)[number % len(self.grants)], reviewer))

    async def _revoke(self, grant_id: str, reviewer: Principal) -> None:
        model = self.grants[grant_id]
        revoked = await _attempt(self.service.revoke_standing(grant_id, reviewer, "api"))
        if isinstance(revoked, DecisionRefused):
            assert revoked.kind == "already_decided"
            assert model.revoked_step is not None, "a standing grant not revoked refused revocation"
            return
        assert model.revoked_step is None, "a standing grant revoked twice"
        assert (revoked.revoked_by, revoked.revoked_at, revoked.uses) == (
            reviewer.name,
            self.clock(),
            len(model.uses),
        )
        model.revoked_step = next(self._steps)
        event("revoke")

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._run(self._cancel(self._draw_id(data)))

    async def _cancel(self, approval_id: str) -> None:
        before = await self.service.get(approval_id)
        now = self.clock()
        await self.service.cancel(approval_id, "the client went away")
        after = await self.service.get(approval_id)
        if before is None:
            assert after is None
            return
        assert after is not None
        event(f"cancel: {before.status} -> {after.status}")
        if before.status in FINAL:
            assert (after.status, after.version) == (before.status, before.version)
        elif before.status == "pending":
            assert after.status in (("cancelled", "expired") if now >= before.expires_at else ("cancelled",))
        elif before.status == "released":
            assert after.status in RELEASED, "cancel withdrew a call already sent"

    # ---- the world around the service ----------------------------------------------------------

    @rule(
        version=st.sampled_from(range(len(SEND_VERSIONS))),
        listing_fails=st.sampled_from([False, False, False, True]),
    )
    def change_tool(self, version: int, listing_fails: bool) -> None:
        self.upstream.send = SEND_VERSIONS[version]
        self.upstream.listing_fails = listing_fails

    @rule()
    def client_lists_tools(self) -> None:
        self._run(self._client_lists_tools())

    async def _client_lists_tools(self) -> None:
        # A client's tools/list passing through the proxy refreshes the catalog, as the gatekeeper does.
        answer = await self.upstream.call(UPSTREAM, "tools/list", {}, prefer_session="client")
        if "result" in answer:
            self.running.catalog.remember(UPSTREAM, answer["result"]["tools"])

    @rule(answering=st.booleans())
    def upstream_answers(self, answering: bool) -> None:
        # Held calls stay released, in flight, across decisions, expiry and restarts.
        if answering:
            self.upstream.answering.set()
        else:
            self.upstream.answering.clear()

    @rule(seconds=st.sampled_from([1.0, 59.0, 61.0, 299.0, 601.0, 3600.0]))
    def advance(self, seconds: float) -> None:
        self.now[0] += seconds

    @precondition(lambda self: bool(self.ids))
    @rule(data=st.data(), seconds=st.sampled_from([1.0, 61.0, 601.0]))
    def approve_then_advance(self, data: st.DataObject, seconds: float) -> None:
        # Time passes between a decision and its release (a slow loop, a slow upstream).
        self.approve(data)
        self.now[0] += seconds

    @rule()
    def expire(self) -> None:
        self._run(self._expire())

    async def _expire(self) -> None:
        """One pass of the expiry task: afterwards nothing pending is past its time."""
        due = await self.store.due_for_expiry(self.clock())
        event(f"expire: {min(len(due), 2)}+ due")
        await self.service.expire_due()
        assert not await self.store.due_for_expiry(self.clock())

    @rule()
    def settle(self) -> None:
        self._run(self._settle())

    async def _settle(self) -> None:
        """Wait for every release in flight, then check every outcome reached whoever follows it."""
        self.upstream.answering.set()
        await self.service.settled()
        approvals = await self.service.list_approvals(limit=10_000)
        # Every release ran to its end: nothing is left approved or released.
        assert not [a for a in approvals if a.status in ("approved", "released")]
        finals = {(a.id, a.status) for a in approvals if a.status in FINAL and a.id not in self.unannounced}
        assert await self.heard.until(lambda: finals <= self.heard.finals()), (
            "a final state was never announced on the feed",
            finals - self.heard.finals(),
        )
        for approval in approvals:
            for hold in self.holds.get(approval.id, []):
                outcome = await hold.wait(0)
                if approval.status not in FINAL:
                    assert outcome is None
                    continue
                assert outcome is not None, "a held call never got the outcome"
                if approval.status == "completed":
                    assert outcome["result"]["content"][0]["text"].startswith("sent ")
                elif approval.status == "failed" and approval.reason is None:
                    assert "error" in outcome
                else:
                    meta = outcome["result"]["_meta"]["approvals"]
                    assert (meta["approval_id"], meta["status"]) == (approval.id, approval.status)

    @precondition(lambda self: any(self.holds.values()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        held = _pick(data, [i for i, holds in self.holds.items() if holds], "held call")
        self._run(self._deliver(held))

    async def _deliver(self, approval_id: str) -> None:
        hold = self.holds[approval_id][0]
        if await hold.wait(0) is not None:
            # The client got it (a repeat call is then a new request) and the proxy lets go.
            hold.delivered()
            hold.close()
            self.holds[approval_id].remove(hold)

    # Restart only early in an hour window: whatever was admitted before has then expired before the
    # window ends, so a release that lost its arrival count expires rather than sleeps for room.
    @precondition(lambda self: self.now[0] % 3600 <= 3000)
    @rule()
    def restart(self) -> None:
        self._run(self._restart())

    @precondition(lambda self: self.now[0] % 3600 <= 3000 and bool(self.ids))
    @rule(data=st.data())
    def approve_then_restart(self, data: st.DataObject) -> None:
        # The process stops right after a decision, before its release ran.
        self.approve(data)
        self._run(self._restart())

    async def _restart(self) -> None:
        in_flight = await self.service.list_approvals(status="approved")
        event(f"restart with {min(len(in_flight), 2)}+ approved")
        await self._close()  # the clients' connections went with the process
        # A move committed as the process stopped may not have been announced: its news may be lost.
        store = await self.database.open(self.clock)
        stopped = await store.list_approvals(limit=10_000)
        await store.close()
        heard = self.heard.finals()
        self.unannounced |= {a.id for a in stopped if a.status in FINAL and (a.id, a.status) not in heard}
        self.running = await self._open()

    # ---- what must always hold -----------------------------------------------------------------

    @invariant()
    def life_cycle_holds(self) -> None:
        self._run(self._check())

    async def _check(self) -> None:
        assert not self._errors.records, [r.getMessage() for r in self._errors.records]
        assert not self.running.hearing.done(), "the feed ended its listener"
        # Watches are kept exactly for the approvals whose held calls are still open.
        assert self.running.feed.watched() == len([i for i, holds in self.holds.items() if holds])
        # Releases go on while the store is read: what the upstream saw first, so that every call
        # in this copy was preceded by the transition the records then show.
        seen: list[Seen] = list(self.upstream.seen)
        approvals = await self.service.list_approvals(limit=10_000)
        events: dict[str, list[AuditEvent]] = defaultdict(list)
        for audit in await self.service.audit(limit=1_000_000):
            events[audit.approval_id].append(audit)
        by_session = {approval.session_id: approval for approval in approvals}
        assert len(by_session) == len(approvals) == len(self.first_tool_sha)
        made: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(seen):
            if isinstance(request, Called):
                asked = by_session.get(request.session or "")
                assert asked is not None, f"the upstream received a call nobody approved: {request}"
                made[asked.id].append(index)
        live: Counter[tuple[str, str, str]] = Counter()
        for approval in approvals:
            if any(e.event == "tool_changed" for e in events[approval.id]):
                event(f"tool changed, then {approval.status}")
            if approval.status == "expired" and any(e.event == "approved" for e in events[approval.id]):
                event(f"expired after an approval: {approval.reason}")
            self._check_final(approval)
            calls = made[approval.id]
            assert len(calls) <= 1, "the upstream received one approval's call more than once"
            if approval.status in LIVE:
                live[(approval.grant, approval.tool, approval.args_sha256)] += 1
            if approval.status in RELEASED:
                self._check_released(approval, events[approval.id], seen, calls)
            else:
                assert not calls, f"the upstream received the call of a {approval.status} approval"
            if approval.status == "completed" or (approval.status == "failed" and approval.reason is None):
                assert len(calls) == 1
        assert set(self.finals) <= {approval.id for approval in approvals}
        assert max(live.values(), default=0) <= 1, "a repeat call opened a second request"
        # A request sent back for review (tool_changed) returns to pending whatever the count.
        pending = Counter(
            approval.grant
            for approval in approvals
            if approval.status == "pending"
            and not any(e.event == "tool_changed" for e in events[approval.id])
        )
        assert max(pending.values(), default=0) <= MAX_PENDING, "a grant opened more than max_pending"
        for (counter, _, _), value in self.running.limiter.snapshot().items():
            assert value <= LIMIT_MAX[counter]
        self._check_announcements()
        # Standing grants: each used as the machine saw, never past max_uses, expiry or revocation.
        stored = {g.id: g for g in await self.service.list_standing(limit=10_000)}
        assert set(stored) == set(self.grants)
        for grant_id, model in self.grants.items():
            used = [e for e in events[grant_id] if e.event == "used"]
            model.check_stored(stored[grant_id], len(used))

    def _check_final(self, approval: Approval) -> None:
        if approval.status in FINAL:
            state = (approval.status, approval.version, approval.finished_at, approval.decided_by)
            assert self.finals.setdefault(approval.id, state) == state, "a final state changed"
        else:
            assert approval.id not in self.finals, "a final state changed"

    def _check_announcements(self) -> None:
        """Each approval's changes are heard in the order they were made, and a final one last."""
        versions: dict[str, int] = {}
        for change in self.heard.changes:
            approval = change.approval
            last = versions.get(approval.id, -1)
            assert approval.version > last, "a change was announced after a newer one, or twice"
            versions[approval.id] = approval.version
            if approval.status in FINAL:
                assert self.finals.get(approval.id, (approval.status,))[0] == approval.status

    def _check_released(
        self, approval: Approval, events: list[AuditEvent], seen: list[Seen], calls: list[int]
    ) -> None:
        approved = [e for e in events if e.event == "approved"]
        assert approved, "released without an approval"
        last = approved[-1]
        assert last.actor != approval.owner, "released on its owner's approval"
        assert last.actor == approval.decided_by
        assert last.at < approval.expires_at, "released on an approval given after the expiry"
        released = [e for e in events if e.event == "released"]
        assert len(released) == 1
        assert released[0].seq > last.seq
        changed = [e.seq for e in events if e.event == "tool_changed"]
        assert all(seq < last.seq for seq in changed), "released without a look at the new definition"
        if self.first_tool_sha[approval.id] != approval.tool_sha256:
            assert changed, "the definition changed but the approval was not sent back"
        event(f"{approval.status} after {len(changed)} tool change(s)")
        # The approvals behind it (only those since the last tool change are kept): the rule's
        # quorum, by eligible non-owners, in time, for the arguments released, each one a decision
        # the machine saw taken.
        check_release_votes(approval, events, GROUPS)
        taken = set(self.voted[approval.id])
        assert {(v.by, v.args_sha256) for v in votes_from_json(approval.votes_json)} <= taken
        if approval.edited_json is not None:
            event("released edited")
        if approval.reason == "interrupted":
            event(f"interrupted by a restart after {len(calls)} call(s)")
        if not calls:
            return
        called = seen[calls[0]]
        assert isinstance(called, Called)
        stored = json.loads(approval.arguments_json)
        sent_as = approval.release_arguments  # a reviewer's edit, else the call as asked
        assert called.tool == approval.tool
        assert canonical_json(called.arguments) == canonical_json(sent_as)
        assert called.arguments == sent_as
        assert sha256_of(called.arguments) == approval.release_sha256
        assert canonical_json(self.admitted[approval.session_id]) == canonical_json(stored)
        # The definition the reviewer approved is one the upstream listed after the decision.
        decided = max(
            i for i, moved in enumerate(seen[: calls[0]]) if moved == Moved(approval.id, "approved")
        )
        listed = [request for request in seen[decided : calls[0]] if isinstance(request, Listed)]
        assert listed, "released without listing the tools after the decision"
        assert approval.tool_sha256 in {request.send_sha256 for request in listed}, (
            "released under another definition than the one approved"
        )
        if not approval.tool_sha256:
            event("released without a definition to check")


class MemoryServiceMachine(ServiceMachine):
    """The same machine over the in-memory twin of the store."""

    kind: StoreKind = "memory"


MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("SERVICE_MACHINE_EXAMPLES", "60")),
    stateful_step_count=50,
    deadline=None,  # each step fsyncs; disk latency is not what this test is about
    database=None,  # no .hypothesis/ directory in the working tree
    # No explain phase: tracing every line of the service, the store and its thread takes minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ServiceMachine.TestCase.settings = MACHINE_SETTINGS
MemoryServiceMachine.TestCase.settings = MACHINE_SETTINGS
test_service_life_cycle_sqlite = ServiceMachine.TestCase
test_service_life_cycle_sqlite.__doc__ = (
    "Approvals driven at random through the service over SQLite keep the life cycle's promises."
)
test_service_life_cycle_memory = MemoryServiceMachine.TestCase
test_service_life_cycle_memory.__doc__ = "The same machine over the in-memory store keeps the same promises."


# ---- what the machine found, pinned one by one -------------------------------------------------


@asynccontextmanager
async def running_service(
    tmp_path: pathlib.Path, kind: StoreKind
) -> AsyncIterator[tuple[ApprovalService, MemoryUpstream, list[float]]]:
    """A service over a store of this kind in front of a MemoryUpstream, and the clock cell it reads."""
    now = [NOW]
    upstream = MemoryUpstream()
    settings = settings_for(tmp_path, {UPSTREAM: {"command": ["x"]}}, approvals={"timeout": "10m"})
    database = Database(kind, tmp_path / "a.db", upstream.seen)
    running = await open_service(settings, database, upstream, lambda: now[0], Heard())
    try:
        yield running.service, upstream, now
    finally:
        await close_service(running)


def reviewer(settings: Settings, name: str) -> Principal:
    return next(r for r in settings.reviewers if r.name == name)


KINDS = pytest.mark.parametrize("kind", ["sqlite", "memory"])


@KINDS
async def test_arguments_with_a_lone_surrogate_are_held_and_released_exactly(
    tmp_path: pathlib.Path, kind: StoreKind
) -> None:
    """A "\\ud800" escape the proxy accepts is held, approved and released exactly as received."""
    arguments: JsonObject = {"call": "c0", "to": "\ud800"}
    async with running_service(tmp_path, kind) as (service, upstream, _):
        admission = await service.admit(ToolCall(UPSTREAM, "agent-a", "s0", TOOL, arguments), decision(None))
        assert admission.hold is not None
        bob = reviewer(service.settings, "bob")
        await service.decide(admission.hold.approval_id, bob, approve=True, reason=None, channel="web")
        outcome = await admission.hold.wait(WAIT)
        admission.hold.close()
        assert outcome is not None
        assert "result" in outcome
        assert [seen for seen in upstream.seen if isinstance(seen, Called)] == [Called("s0", TOOL, arguments)]


@KINDS
async def test_an_approval_given_in_time_is_not_expired_while_its_release_runs(
    tmp_path: pathlib.Path, kind: StoreKind
) -> None:
    """Approved a second before the timeout, with the release's tools/list slow: the call is made."""
    async with running_service(tmp_path, kind) as (service, upstream, now):
        arguments: JsonObject = {"call": "c0", "to": "ann"}
        admission = await service.admit(ToolCall(UPSTREAM, "agent-a", "s0", TOOL, arguments), decision(60.0))
        assert admission.hold is not None
        approval_id = admission.hold.approval_id
        now[0] += 59
        upstream.listing.clear()  # the release's check of the definition takes a while
        bob = reviewer(service.settings, "bob")
        await service.decide(approval_id, bob, approve=True, reason=None, channel="web")
        now[0] += 2  # the timeout passes while the upstream lists its tools
        await service.expire_due()
        upstream.listing.set()
        outcome = await admission.hold.wait(WAIT)
        admission.hold.close()
        record = await service.get(approval_id)
        assert record is not None
        assert (record.status, record.decided_by) == ("completed", "bob")
        assert outcome is not None
        assert "result" in outcome


@KINDS
async def test_a_release_whose_definition_cannot_be_listed_goes_back_for_review(
    tmp_path: pathlib.Path, kind: StoreKind
) -> None:
    """tools/list failing at the request and at the release: the call is not made unchecked."""
    async with running_service(tmp_path, kind) as (service, upstream, _):
        upstream.listing_fails = True
        arguments: JsonObject = {"call": "c0", "to": "ann"}
        admission = await service.admit(ToolCall(UPSTREAM, "agent-a", "s0", TOOL, arguments), decision(None))
        assert admission.hold is not None
        admission.hold.close()
        approval_id = admission.hold.approval_id
        bob = reviewer(service.settings, "bob")
        await service.decide(approval_id, bob, approve=True, reason=None, channel="web")
        await service.settled()
        record = await service.get(approval_id)
        assert record is not None
        assert record.status == "pending"
        events = [e.event for e in await service.audit(approval_id=approval_id)]
        assert events[-1] == "tool_changed"
        assert not [seen for seen in upstream.seen if isinstance(seen, Called)]
