"""The approval service: admit, decide, follow, cancel, expire and release — the life cycle in one place.

    pending ──▶ approved ──▶ released ──▶ completed | failed
       ├──────▶ denied
       ├──────▶ expired       (timeout passed: never released)
       └──────▶ cancelled     (the client cancelled the held call, or its session ended)

Every move is one compare-and-set in the store, so the first decision wins and `approved →
released` happens at most once whatever runs concurrently, in this process or another. Every move
that succeeds is published on the change feed; nothing is told by name. A held call, a task poll,
the inbox's live list and Slack's message all follow the feed, so a decision taken in any process
reaches every one of them.

A release is leased to this process (``owner``) for the upstream's call timeout plus a grace: a
process that finds a released record whose lease ran out knows its owner stopped mid-call, and
ends it as interrupted — never sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from approvals.config import Principal, Settings
from approvals.core import render, upstream_tasks
from approvals.core.model import (
    FINAL,
    Admission,
    Approval,
    AuditEvent,
    Status,
    ToolCall,
    new_approval_id,
    sha256_of,
)
from approvals.core.ports import ApprovalStore, Change, ChangeFeed, Counters, UpstreamCaller, Watch
from approvals.errors import DecisionRefused, RefusalKind
from approvals.jsonrpc import JsonObject
from approvals.limits import LimitRefusal, Reservation, scope_key, window_start
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
from approvals.tool_catalog import ToolCatalog, fingerprint

__all__ = ["ApprovalHold", "ApprovalService", "LimitsFor"]

log = logging.getLogger(__name__)

KEEP_RESULT_SECONDS = 3600.0
KEEP_RESULT_BYTES = 1024 * 1024
EXPIRY_RETRY_SECONDS = 1.0
# A lease outlives the call timeout by this much, so a live owner always finishes first.
LEASE_GRACE_SECONDS = 60.0
# How often leases of other processes are looked at (a dead owner's calls end within this).
LEASE_SWEEP_SECONDS = 30.0
# How long a best-effort tasks/cancel to an upstream may take, after its task was given up on.
UPSTREAM_CANCEL_SECONDS = 10.0
_FOREVER = frozenset({"approval-expiry", "approval-housekeeping"})  # tasks that run until close
_PENDING: tuple[Status, ...] = ("pending",)
_APPROVED: tuple[Status, ...] = ("approved",)
LimitsFor = Callable[[str, str, Mapping[str, object]], Sequence[Limit]]


def outcome_of(change: Change) -> JsonObject:
    """What a held call answers with once its approval is final (a JSON-RPC response without id)."""
    if change.response is not None:
        return {k: v for k, v in change.response.items() if k not in ("id", "jsonrpc")}
    return final_outcome(change.approval)


class ApprovalHold:
    """One held call on an approval (the proxy's `Hold`), following it on the change feed."""

    def __init__(self, service: ApprovalService, watch: Watch) -> None:
        self.approval_id = watch.latest.id
        self._service = service
        self._watch = watch

    async def wait(self, timeout: float) -> JsonObject | None:
        change = await self._watch.final(timeout)
        return None if change is None else outcome_of(change)

    def status(self, now: float) -> str:
        return waiting_status(self._watch.latest, now)

    def pending_result(self, now: float) -> JsonObject:
        return pending_result(self._watch.latest, now, self._service.url_of(self.approval_id))

    def delivered(self) -> None:
        self._service.delivered(self.approval_id)

    async def cancel(self, reason: str) -> None:
        await self._service.cancel(self.approval_id, reason)

    def close(self) -> None:
        self._watch.close()


class ApprovalService:
    """Creates approvals for held calls, takes decisions, and releases approved calls upstream.

    Made fully started by :meth:`open`, ended by :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: ApprovalStore,
        counters: Counters,
        upstreams: UpstreamCaller,
        catalog: ToolCatalog,
        feed: ChangeFeed,
        limits_for: LimitsFor,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.feed = feed
        self._counters = counters
        self._upstreams = upstreams
        self._catalog = catalog
        self._limits_for = limits_for
        self.clock = clock
        # Who holds the leases this process takes: unique per process and per start.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._arrivals: dict[str, Reservation] = {}  # what each approval counted when it arrived
        self._release_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        # When the expiry task looks next (-inf while it is finding out): an admission wakes it
        # only when its own expiry comes sooner — not once per call of a burst of ten thousand.
        self._expiry_due = -math.inf

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        store: ApprovalStore,
        counters: Counters,
        upstreams: UpstreamCaller,
        catalog: ToolCatalog,
        feed: ChangeFeed,
        limits_for: LimitsFor,
        clock: Callable[[], float] = time.time,
        expire_on_clock: bool = True,
    ) -> ApprovalService:
        """The service, recovered from a stop and running its expiry and housekeeping tasks.

        ``expire_on_clock=False`` runs no expiry task: the caller runs :meth:`expire_due` itself
        (a test driving an injected clock).
        """
        service = cls(
            settings,
            store=store,
            counters=counters,
            upstreams=upstreams,
            catalog=catalog,
            feed=feed,
            limits_for=limits_for,
            clock=clock,
        )
        _LIVE_OWNERS.add(service.owner)
        await service._recover()
        # Approved but never released (the process stopped right after the decision): release now.
        # All read before any is released: a release moves its record out of the pages being read.
        approved: list[Approval] = []
        while page := await store.list_approvals(status="approved", limit=1000, offset=len(approved)):
            approved += page
        for approval in approved:
            service._spawn(service._release(approval, catalog.mark()))
        if expire_on_clock:
            service._spawn(service._expire_forever(), name="approval-expiry")
        service._spawn(service._forget_finished(), name="approval-housekeeping")
        return service

    def footprint(self) -> dict[str, int]:
        """What this service keeps in memory per approval, counted: it returns to zero once every
        approval is final (a bound the tests and health checks hold it to)."""
        background = sum(t.get_name() not in _FOREVER for t in self._tasks)
        return {"arrivals": len(self._arrivals), "background": background}

    async def settled(self) -> None:
        """Wait until the work this service started in the background — releases, delivery marks
        — is done (the expiry and housekeeping tasks aside, which run for the service's life)."""
        while work := [t for t in self._tasks if t.get_name() not in _FOREVER]:
            await asyncio.gather(*work, return_exceptions=True)

    async def close(self) -> None:
        _LIVE_OWNERS.discard(self.owner)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def url_of(self, approval_id: str) -> str:
        return f"{self.settings.server.public_url}/inbox/approvals/{approval_id}"

    # ---- reading ---------------------------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        return await self.store.get_approval(approval_id)

    async def list_approvals(
        self,
        *,
        status: Status | None = None,
        upstream: str | None = None,
        tool: str | None = None,
        grant: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Approval]:
        return await self.store.list_approvals(
            status=status, upstream=upstream, tool=tool, grant=grant, limit=limit, offset=offset
        )

    async def audit(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        return await self.store.audit_events(approval_id=approval_id, after_seq=after_seq, limit=limit)

    def follow(self, approval: Approval) -> ApprovalHold:
        """A hold on ``approval`` (as just read): its outcome, whichever process decides it."""
        return ApprovalHold(self, self.feed.watch(approval))

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
            return Admission(hold=self.follow(existing))
        reserved = await self._counters.reserve(
            decision.limits, grant=call.grant, session=call.session, arguments=call.arguments, now=now
        )
        if isinstance(reserved, LimitRefusal):
            return Admission(answer=limit_refusal(reserved, decision))
        limit = self.settings.approvals.max_pending_per_grant
        try:
            asked = await self._new_approval(call, decision, args_sha, now)
            opened = await self.store.open_approval(asked, actor=call.grant, channel="mcp", max_pending=limit)
        except BaseException:
            await self._counters.rollback(reserved)  # no request was opened: the call must not stay counted
            raise
        if opened is None or opened.id != asked.id:
            # Refused, or an identical call opened the request first: this one attaches to it
            # and is not counted again.
            await self._counters.rollback(reserved)
        if opened is None:
            return Admission(answer=too_many_pending(limit))
        if opened.id == asked.id:
            self._arrivals[opened.id] = reserved
            if opened.expires_at < self._expiry_due or self._expiry_due == -math.inf:
                self._wakeup.set()
            self.feed.publish(Change(opened, "created"))
        return Admission(hold=self.follow(opened))

    async def _new_approval(self, call: ToolCall, decision: Decision, args_sha: str, now: float) -> Approval:
        tool_json, tool_sha = fingerprint(
            await self._catalog.definition(call.upstream, call.tool, call.session)
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

    def delivered(self, approval_id: str) -> None:
        self._spawn(self.store.update_fields(approval_id, result_delivered=True))

    # ---- decisions -------------------------------------------------------------------------

    async def decide(
        self, approval_id: str, reviewer: Principal, *, approve: bool, reason: str | None, channel: str
    ) -> Approval:
        """A reviewer's decision; the first one wins. Raises DecisionRefused with its kind."""
        approval = await self.store.get_approval(approval_id)
        if approval is None:
            raise DecisionRefused("unknown", f"no approval {approval_id!r}")
        if approval.owner == reviewer.name:
            raise DecisionRefused(
                "own_agent",
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
        decided = await self._move(approval_id, _PENDING, to, actor=reviewer.name, channel=channel, **fields)
        if decided is None:
            current = await self.store.get_approval(approval_id)
            assert current is not None
            kind: RefusalKind = "expired" if current.status == "expired" else "already_decided"
            raise DecisionRefused(kind, render.already_decided(current), current)
        if approve:
            self._spawn(self._release(decided, self._catalog.mark()))
        else:
            await self._settle(decided)
        return decided

    async def cancel(self, approval_id: str, reason: str) -> None:
        """The client cancelled its held call: a pending request is withdrawn (approved ones go on)."""
        approval = await self.store.get_approval(approval_id)
        if approval is not None and approval.status == "pending":
            await self._finish(approval, "pending", "cancelled", reason=reason)

    async def _move(
        self,
        approval_id: str,
        from_: tuple[Status, ...],
        to: Status,
        *,
        actor: str,
        channel: str,
        event: str | None = None,
        **fields: Any,
    ) -> Approval | None:
        """One compare-and-set; when it wins, the change is published."""
        moved = await self.store.transition(
            approval_id, from_=from_, to=to, actor=actor, channel=channel, event=event, **fields
        )
        if moved is not None and to not in FINAL:
            self.feed.publish(Change(moved, event or to))
        return moved  # final moves are published by _settle, with the outcome kept

    # ---- release ---------------------------------------------------------------------------

    async def _release(self, approval: Approval, decided_mark: int) -> None:
        """Forward an approved call exactly once, with exactly the stored arguments.

        `decided_mark` is the catalog's mark taken once the approval was decided.
        """
        arguments = approval.arguments
        reservation = await self._room_to_release(approval, arguments)
        if reservation is None:
            return
        # Any listing begun after the decision shows the definition as it is now: a burst of
        # releases shares one instead of asking the upstream once per call.
        listed = await self._catalog.fetch(approval.upstream, approval.session_id, after=decided_mark)
        definition_json, definition_sha = fingerprint(listed.get(approval.tool))
        # Fail closed: an unknown definition (now or at the request) cannot be shown to match.
        if not definition_sha or definition_sha != approval.tool_sha256:
            # Reviewed under another definition (or the tool is gone): the approval does not carry over.
            await self._counters.rollback(reservation)
            await self._back_to_review(approval, definition_json, definition_sha, bool(listed))
            return
        timeout = self.settings.upstreams[approval.upstream].call_timeout
        now = self.clock()
        released = await self._move(
            approval.id,
            _APPROVED,
            "released",
            actor="gateway",
            channel="gateway",
            released_at=now,
            lease_owner=self.owner,
            lease_expires_at=now + timeout + LEASE_GRACE_SECONDS,
        )
        if released is None:
            await self._counters.rollback(reservation)
            return  # expired while waiting, or another process released it: never twice
        params = {"name": approval.tool, "arguments": arguments}
        as_task = upstream_tasks.needs_task(listed.get(approval.tool))
        upstream_task: list[str] = []  # the upstream's task id, once it made one
        try:
            async with asyncio.timeout(timeout):
                if as_task:
                    response = await self._call_as_task(approval, params, timeout, upstream_task)
                else:
                    response = await self._upstreams.call(
                        approval.upstream, "tools/call", params, prefer_session=approval.session_id
                    )
        except TimeoutError:
            # Sent, and maybe run: never sent again, and its counts stand.
            outcome = upstream_timeout(approval, timeout)
            await self._finish(released, "released", "failed", reason="timeout", response=outcome)
            if upstream_task:
                self._spawn(self._cancel_upstream_task(approval, upstream_task[0]))
            return
        failed = "error" in response
        if failed:
            await self._counters.rollback(reservation)
            if (arrival := self._arrivals.get(approval.id)) is not None:
                await self._counters.rollback(arrival)
        await self._finish(released, "released", "failed" if failed else "completed", response=response)

    async def _call_as_task(
        self, approval: Approval, params: JsonObject, timeout: float, made: list[str]
    ) -> JsonObject:
        """A task-augmented tools/call, followed to its end: what a plain call would have returned.

        The task's id goes into `made` as soon as it is known, so that a timeout can cancel it.
        """
        session = approval.session_id
        created = await self._upstreams.call(
            approval.upstream,
            "tools/call",
            upstream_tasks.task_params(params, timeout),
            prefer_session=session,
        )
        task_id = upstream_tasks.read_created(approval.upstream, created)
        if not isinstance(task_id, str):
            return task_id  # refused, answered at once, or malformed: nothing to follow
        made.append(task_id)
        # tasks/result blocks at the upstream until the task is final; the caller bounds the wait.
        answer = await self._upstreams.call(
            approval.upstream, "tasks/result", upstream_tasks.follow_params(task_id), prefer_session=session
        )
        return upstream_tasks.as_plain_response(answer, task_id)

    async def _cancel_upstream_task(self, approval: Approval, task_id: str) -> None:
        """Best effort: a task the release stopped following need not run on at the upstream."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(UPSTREAM_CANCEL_SECONDS):
                await self._upstreams.call(
                    approval.upstream,
                    "tasks/cancel",
                    upstream_tasks.follow_params(task_id),
                    prefer_session=approval.session_id,
                )

    async def _room_to_release(
        self, approval: Approval, arguments: Mapping[str, object]
    ) -> Reservation | None:
        """Count the release against the limits; wait, in order, for a window with room.

        Limits whose window is the one the call was counted in on arrival are not counted twice.
        None when the approval expired while waiting (it is then never released).
        """
        limits = self._limits_for(approval.upstream, approval.tool, arguments)
        while True:
            now = self.clock()
            needed = [lim for lim in limits if not self._counted_on_arrival(approval, lim, now)]
            reserved = await self._counters.reserve(
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
        back = await self._move(
            approval.id,
            _APPROVED,
            "pending",
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
            log.warning("approval %s back to pending: %s", approval.id, note)

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
        done = await self._move(approval.id, (from_,), to, actor="gateway", channel="gateway", **fields)
        if done is not None:
            await self._settle(done, response)

    async def _settle(self, approval: Approval, response: JsonObject | None = None) -> None:
        """Keep the outcome for repeat calls and publish the final change."""
        if (
            response is None
            and approval.result_json is None
            and approval.status in ("denied", "expired", "failed")
        ):
            # Kept so the repeat call gets this answer instead of opening a new request; for an
            # interrupted release that matters most: a new request, approved, would run it twice.
            kept = encode_outcome(final_outcome(approval))
            expires = self.clock() + KEEP_RESULT_SECONDS
            await self.store.update_fields(approval.id, result_json=kept, result_expires_at=expires)
            approval = dataclasses.replace(approval, result_json=kept, result_expires_at=expires)
        self._arrivals.pop(approval.id, None)
        self.feed.publish(Change(approval, approval.status, response))

    async def _forget_finished(self) -> None:
        """Drop what this process kept for approvals another process finished."""
        while True:  # a listener that fell behind is ended: follow on with a new one
            listener = self.feed.listen()
            try:
                async for change in listener:
                    if change.approval.status in FINAL:
                        self._arrivals.pop(change.approval.id, None)
            finally:
                listener.close()

    # ---- expiry and recovery ---------------------------------------------------------------

    async def _recover(self) -> None:
        """Released calls whose owner stopped mid-call: ended as interrupted, never sent again.

        An owner has stopped when its lease ran out, or — known at once — when it ran on this
        host and its process is gone (or is this process, started anew).
        """
        now = self.clock()
        for approval in await self.store.interrupted_releases(math.inf):
            if approval.lease_owner == self.owner:
                continue  # this process's own call in flight: its call timeout ends it
            expired = approval.lease_expires_at is None or approval.lease_expires_at <= now
            if expired or _owner_gone(approval.lease_owner, self.owner):
                await self._finish(approval, "released", "failed", reason="interrupted")

    async def expire_due(self) -> None:
        """One pass of what the expiry task does: expire what is due, end releases whose owner
        stopped, drop kept results past their time."""
        now = self.clock()
        for approval in await self.store.due_for_expiry(now):
            await self._finish(approval, approval.status, "expired", reason="no decision before the timeout")
        await self._recover()
        await self.store.drop_expired_results(now)

    async def _expire_forever(self) -> None:
        swept = self.clock()
        while True:
            try:
                await self._expire_next()
                if self.clock() - swept >= LEASE_SWEEP_SECONDS:
                    swept = self.clock()
                    await self._recover()
            except Exception:  # the task must outlive a store hiccup, or nothing would ever expire
                log.exception("expiring approvals failed; trying again shortly")
                await asyncio.sleep(EXPIRY_RETRY_SECONDS)

    async def _expire_next(self) -> None:
        self._expiry_due = -math.inf  # until the next time is known, every admission wakes us
        next_at = await self.store.next_expiry()
        self._expiry_due = math.inf if next_at is None else next_at
        wait = (
            LEASE_SWEEP_SECONDS
            if next_at is None
            else min(max(next_at - self.clock(), 0), LEASE_SWEEP_SECONDS)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait)
        self._wakeup.clear()
        now = self.clock()
        for approval in await self.store.due_for_expiry(now):
            await self._finish(approval, approval.status, "expired", reason="no decision before the timeout")
        await self.store.drop_expired_results(now)


# The owners of the services running in this process: a lease of this pid whose owner is not
# among them is an earlier start's (a container's pid 1 restarted), so that owner is gone.
_LIVE_OWNERS: set[str] = set()


def _owner_gone(owner: str | None, me: str) -> bool:
    """Whether a lease's owner is a process of this host that no longer runs (or an earlier
    start of this one). An owner on another host is never judged gone: only its lease says so."""
    host, _, rest = (owner or "").partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit() or owner == me:
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE_OWNERS  # this pid: gone unless a service of this process runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("approval task failed", exc_info=task.exception())
