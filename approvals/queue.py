"""The approval life cycle: create, hold, decide, release exactly once, expire, cancel, recover.

    pending ──▶ approved ──▶ released ──▶ completed | failed
       ├──────▶ denied
       ├──────▶ expired       (timeout passed: never released)
       └──────▶ cancelled     (the client cancelled the held call, or its session ended)

Every move is one compare-and-set in the store, so the first decision wins and `approved →
released` happens at most once whatever runs concurrently. The record is written before anyone is
told; a notification that fails changes nothing. Outcomes go to every call held on the record and
are kept on it for the agent's repeat call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from approvals.channels import Channels
from approvals.config import Principal, Settings
from approvals.jsonrpc import JsonObject
from approvals.limits import LimitRefusal, RateLimiter, Reservation, scope_key, window_start
from approvals.outcomes import (
    encode_outcome,
    final_outcome,
    limit_refusal,
    pending_result,
    too_many_pending,
    upstream_timeout,
    waiting_status,
)
from approvals.policy import Decision, Limit
from approvals.proxy.gate import Admission, ToolCall, UpstreamCaller
from approvals.store import ApprovalStore
from approvals.store.records import FINAL, Approval, Status, new_approval_id, sha256_of
from approvals.tool_catalog import ToolCatalog, fingerprint

log = logging.getLogger(__name__)

KEEP_RESULT_SECONDS = 3600.0
KEEP_RESULT_BYTES = 1024 * 1024
EXPIRY_RETRY_SECONDS = 1.0
_PENDING: tuple[Status, ...] = ("pending",)
_APPROVED: tuple[Status, ...] = ("approved",)
LimitsFor = Callable[[str, str, Mapping[str, object]], Sequence[Limit]]


class DecisionError(Exception):
    """A decision that cannot be taken; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.approval = approval


@dataclass
class _Waiters:
    """Calls held on one approval: they all get the outcome when it comes, and meanwhile are told
    its latest state (so a hold that runs out says the truth: pending, approved or sent)."""

    latest: Approval
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: JsonObject | None = None


class ApprovalHold:
    """One held call on an approval (the proxy's `Hold`)."""

    def __init__(self, queue: ApprovalQueue, waiters: _Waiters) -> None:
        self.approval_id = waiters.latest.id
        self._queue = queue
        self._waiters = waiters

    async def wait(self, timeout: float) -> JsonObject | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._waiters.done.wait(), timeout)
        return self._waiters.outcome

    def status(self, now: float) -> str:
        return waiting_status(self._waiters.latest, now)

    def pending_result(self, now: float) -> JsonObject:
        return pending_result(self._waiters.latest, now, self._queue.url_of(self.approval_id))

    def delivered(self) -> None:
        self._queue.delivered(self.approval_id)

    async def cancel(self, reason: str) -> None:
        await self._queue.cancel(self.approval_id, reason)


class ApprovalQueue:
    """Creates approvals for held calls, takes decisions, and releases approved calls upstream."""

    def __init__(
        self,
        settings: Settings,
        store: ApprovalStore,
        limiter: RateLimiter,
        upstreams: UpstreamCaller,
        catalog: ToolCatalog,
        channels: Channels,
        limits_for: LimitsFor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.upstreams = upstreams
        self.catalog = catalog
        self.channels = channels
        self.limits_for = limits_for
        self.clock = clock
        self._waiters: dict[str, _Waiters] = {}
        self._arrivals: dict[str, Reservation] = {}  # what each approval counted when it arrived
        self._release_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        # When the expiry task looks next (-inf while it is finding out): an admission wakes it
        # only when its own expiry comes sooner — not once per call of a burst of ten thousand.
        self._expiry_due = -math.inf
        self._expiry: asyncio.Task[None] | None = None

    def url_of(self, approval_id: str) -> str:
        return f"{self.settings.server.public_url}/inbox/approvals/{approval_id}"

    # ---- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from a stop, then run the expiry task."""
        for approval in await self.store.interrupted_releases():
            # Released but never answered: it may have run. Never send it again.
            await self._finish(approval, "released", "failed", reason="interrupted", response=None)
        for approval in await self.store.list_approvals(status="approved", limit=10_000):
            self._spawn(self._release(approval, self.catalog.mark()))
        self._expiry = asyncio.create_task(self._expire_forever(), name="approval-expiry")

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._expiry] if self._expiry else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # ---- arrival ---------------------------------------------------------------------------

    async def admit(self, call: ToolCall, decision: Decision) -> Admission:
        """A call whose rule requires approval: attach to its open request, or open a new one."""
        args_sha = sha256_of(call.arguments)
        now = self.clock()
        existing = await self.store.find_reusable(
            grant=call.grant, upstream=call.upstream, tool=call.tool, args_sha256=args_sha, now=now
        )
        if existing is not None:
            # A repeat call never opens a second request (and is not counted again).
            return Admission(hold=self._hold(existing))
        reserved = self.limiter.reserve(
            decision.limits, grant=call.grant, session=call.session, arguments=call.arguments, now=now
        )
        if isinstance(reserved, LimitRefusal):
            return Admission(answer=limit_refusal(reserved, decision))
        try:
            asked = await self._new_approval(call, decision, args_sha, now)
            opened = await self.store.open_approval(
                asked,
                actor=call.grant,
                channel="mcp",
                max_pending=self.settings.approvals.max_pending_per_grant,
            )
        except BaseException:
            self.limiter.rollback(reserved)  # no request was opened: the call must not stay counted
            raise
        if opened is None or opened.id != asked.id:
            # Refused, or an identical call opened the request first: this one attaches to it
            # and is not counted again.
            self.limiter.rollback(reserved)
        if opened is None:
            return Admission(answer=too_many_pending(self.settings.approvals.max_pending_per_grant))
        if opened.id == asked.id:
            self._arrivals[opened.id] = reserved
            if opened.expires_at < self._expiry_due or self._expiry_due == -math.inf:
                self._wakeup.set()
            self.channels.announce(opened, "created")
        return Admission(hold=self._hold(opened))

    async def _new_approval(self, call: ToolCall, decision: Decision, args_sha: str, now: float) -> Approval:
        tool_json, tool_sha = fingerprint(
            await self.catalog.definition(call.upstream, call.tool, call.session)
        )
        owner = next((g.owner for g in self.settings.grants if g.name == call.grant), None)
        return Approval(
            id=new_approval_id(),
            upstream=call.upstream,
            tool=call.tool,
            arguments_json=json.dumps(call.arguments),  # ASCII: any JSON value can be stored
            args_sha256=args_sha,
            tool_json=tool_json,
            tool_sha256=tool_sha,
            grant=call.grant,
            owner=owner,
            session_id=call.session,
            rule=decision.rule,
            explanation=decision.explanation,
            status="pending",
            created_at=now,
            expires_at=now + (decision.approval_timeout or self.settings.approvals.timeout),
        )

    def _hold(self, approval: Approval) -> ApprovalHold:
        waiters = self._waiters.get(approval.id)
        if waiters is None:
            waiters = self._waiters[approval.id] = _Waiters(approval)
        if approval.status in FINAL and waiters.outcome is None:
            waiters.outcome = final_outcome(approval)
            waiters.done.set()
            del self._waiters[approval.id]  # nothing is left to wait for: the map must not grow
        return ApprovalHold(self, waiters)

    def _seen(self, approval: Approval) -> None:
        """Tell the calls held on this approval its new state (for their progress and pending text)."""
        if (waiters := self._waiters.get(approval.id)) is not None:
            waiters.latest = approval

    def delivered(self, approval_id: str) -> None:
        self._spawn(self.store.update_fields(approval_id, result_delivered=True))

    # ---- decisions -------------------------------------------------------------------------

    async def decide(
        self, approval_id: str, reviewer: Principal, *, approve: bool, reason: str | None, channel: str
    ) -> Approval:
        """A reviewer's decision; the first one wins. Raises DecisionError (404, 403, 409)."""
        approval = await self.store.get_approval(approval_id)
        if approval is None:
            raise DecisionError(404, f"no approval {approval_id!r}")
        if approval.owner == reviewer.name:
            raise DecisionError(
                403,
                f"{reviewer.name} runs agent {approval.grant}: a reviewer may not approve "
                "their own agent's calls",
                approval,
            )
        now = self.clock()
        if approval.status == "pending" and now >= approval.expires_at:
            await self._finish(approval, "pending", "expired", reason="no decision before the timeout")
        to: Status = "approved" if approve else "denied"
        fields: dict[str, Any] = {"decided_at": now, "decided_by": reviewer.name, "decided_via": channel}
        if reason:
            fields["reason"] = reason
        decided = await self.store.transition(
            approval_id, from_=_PENDING, to=to, actor=reviewer.name, channel=channel, **fields
        )
        if decided is None:
            current = await self.store.get_approval(approval_id)
            assert current is not None
            by = f" by {current.decided_by}" if current.decided_by else ""
            raise DecisionError(409, f"already {current.status}{by}", current)
        self._seen(decided)
        if approve:
            self.channels.announce(decided, "updated")
            self._spawn(self._release(decided, self.catalog.mark()))
        else:
            await self._settle(decided)
        return decided

    async def cancel(self, approval_id: str, reason: str) -> None:
        """The client cancelled its held call: a pending request is withdrawn (approved ones go on)."""
        approval = await self.store.get_approval(approval_id)
        if approval is not None and approval.status == "pending":
            await self._finish(approval, "pending", "cancelled", reason=reason)

    # ---- release ---------------------------------------------------------------------------

    async def _release(self, approval: Approval, decided_mark: int) -> None:
        """Forward an approved call exactly once, with exactly the stored arguments.

        `decided_mark` is the catalog's mark taken once the approval was decided.
        """
        arguments = json.loads(approval.arguments_json)
        reservation = await self._room_to_release(approval, arguments)
        if reservation is None:
            return
        # Any listing begun after the decision shows the definition as it is now: a burst of
        # releases shares one instead of asking the upstream once per call.
        listed = await self.catalog.fetch(approval.upstream, approval.session_id, after=decided_mark)
        definition_json, definition_sha = fingerprint(listed.get(approval.tool))
        # Fail closed: an unknown definition (now or at the request) cannot be shown to match.
        if not definition_sha or definition_sha != approval.tool_sha256:
            # Reviewed under another definition (or the tool is gone): the approval does not carry over.
            self.limiter.rollback(reservation)
            await self._back_to_review(approval, definition_json, definition_sha, bool(listed))
            return
        released = await self.store.transition(
            approval.id,
            from_=_APPROVED,
            to="released",
            actor="gateway",
            channel="gateway",
            released_at=self.clock(),
        )
        if released is None:
            self.limiter.rollback(reservation)
            return  # expired while waiting, or another replica released it: never twice
        self._seen(released)
        params = {"name": approval.tool, "arguments": arguments}
        timeout = self.settings.upstreams[approval.upstream].call_timeout
        try:
            async with asyncio.timeout(timeout):
                response = await self.upstreams.call(
                    approval.upstream, "tools/call", params, prefer_session=approval.session_id
                )
        except TimeoutError:
            # Sent, and maybe run: never sent again, and its counts stand.
            await self._finish(
                released, "released", "failed", reason="timeout", response=upstream_timeout(approval, timeout)
            )
            return
        failed = "error" in response
        if failed:
            self.limiter.rollback(reservation)
            if (arrival := self._arrivals.get(approval.id)) is not None:
                self.limiter.rollback(arrival)
        await self._finish(released, "released", "failed" if failed else "completed", response=response)

    async def _room_to_release(
        self, approval: Approval, arguments: Mapping[str, object]
    ) -> Reservation | None:
        """Count the release against the limits; wait, in order, for a window with room.

        Limits whose window is the one the call was counted in on arrival are not counted twice.
        None when the approval expired while waiting (it is then never released).
        """
        limits = self.limits_for(approval.upstream, approval.tool, arguments)
        while True:
            now = self.clock()
            needed = [lim for lim in limits if not self._counted_on_arrival(approval, lim, now)]
            reserved = self.limiter.reserve(
                needed, grant=approval.grant, session=approval.session_id, arguments=arguments, now=now
            )
            if isinstance(reserved, Reservation):
                return reserved
            if math.isinf(reserved.retry_after) or now + reserved.retry_after >= approval.expires_at:
                why = f"approved, but expired waiting for room under rate limit {reserved.limit.counter}"
                await self._finish(approval, "approved", "expired", reason=why)
                return None
            lock = self._release_locks.setdefault(reserved.limit.counter, asyncio.Lock())
            async with lock:  # FIFO: releases held up by the same limit go in the order they queued
                await asyncio.sleep(reserved.retry_after)

    def _counted_on_arrival(self, approval: Approval, limit: Limit, now: float) -> bool:
        arrival = self._arrivals.get(approval.id)
        if arrival is None:
            return False
        key = scope_key(limit.scope, grant=approval.grant, session=approval.session_id)
        start = window_start(now, limit.window)
        return any(e[0] == limit.counter and e[1] == key and e[2] == start for e in arrival.entries)

    async def _back_to_review(self, approval: Approval, definition_json: str, sha: str, listed: bool) -> None:
        if not listed:
            note = "the upstream did not list its tools at release, so the definition could not be checked"
        elif not sha:
            note = f"the upstream no longer lists {approval.tool}"
        else:
            note = "the tool's definition changed upstream after the request; it needs a new look"
        back = await self.store.transition(
            approval.id,
            from_=_APPROVED,
            to="pending",
            actor="gateway",
            channel="gateway",
            event="tool_changed",
            tool_json=definition_json,
            tool_sha256=sha,
            note=note,
            decided_at=None,
            decided_by=None,
            decided_via=None,
        )
        if back is not None:
            self._seen(back)
            log.warning("approval %s back to pending: %s", approval.id, note)
            self.channels.announce(back, "created")

    # ---- final states ----------------------------------------------------------------------

    async def _finish(
        self,
        approval: Approval,
        from_: Status,
        to: Status,
        *,
        reason: str | None = None,
        response: JsonObject | None = None,
    ) -> None:
        now = self.clock()
        fields: dict[str, Any] = {"finished_at": now}
        if reason:
            fields["reason"] = reason
        if response is not None:
            kept = encode_outcome({k: v for k, v in response.items() if k != "id"})
            if len(kept.encode()) <= KEEP_RESULT_BYTES:
                fields.update(result_json=kept, result_expires_at=now + KEEP_RESULT_SECONDS)
            else:
                fields["note"] = f"result of {len(kept.encode())} bytes not kept (over {KEEP_RESULT_BYTES})"
        done = await self.store.transition(
            approval.id, from_=(from_,), to=to, actor="gateway", channel="gateway", **fields
        )
        if done is not None:
            await self._settle(done, response)

    async def _settle(self, approval: Approval, response: JsonObject | None = None) -> None:
        """Give the outcome to every held call, keep it for repeat calls, tell the channels."""
        outcome = {k: v for k, v in response.items() if k not in ("id", "jsonrpc")} if response else None
        if outcome is None:
            outcome = final_outcome(approval)
            # Kept so the repeat call gets this answer instead of opening a new request; for an
            # interrupted release that matters most: a new request, approved, would run it twice.
            if approval.result_json is None and approval.status in ("denied", "expired", "failed"):
                await self.store.update_fields(
                    approval.id,
                    result_json=encode_outcome(outcome),
                    result_expires_at=self.clock() + KEEP_RESULT_SECONDS,
                )
        # Holds keep their own reference: the entry goes, so that the map does not grow.
        if (waiters := self._waiters.pop(approval.id, None)) is not None:
            waiters.latest = approval
            waiters.outcome = outcome
            waiters.done.set()
        self._arrivals.pop(approval.id, None)
        self.channels.announce(approval, "updated")

    # ---- expiry ----------------------------------------------------------------------------

    async def _expire_forever(self) -> None:
        while True:
            try:
                await self._expire_due()
            except Exception:  # the task must outlive a store hiccup, or nothing would ever expire
                log.exception("expiring approvals failed; trying again shortly")
                await asyncio.sleep(EXPIRY_RETRY_SECONDS)

    async def _expire_due(self) -> None:
        self._expiry_due = -math.inf  # until the next time is known, every admission wakes us
        next_at = await self.store.next_expiry()
        self._expiry_due = math.inf if next_at is None else next_at
        timeout = None if next_at is None else max(next_at - self.clock(), 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        self._wakeup.clear()
        now = self.clock()
        for approval in await self.store.due_for_expiry(now):
            await self._finish(approval, approval.status, "expired", reason="no decision before the timeout")
        await self.store.drop_expired_results(now)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("approval task failed", exc_info=task.exception())
