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
ends it as interrupted — never sends it again. The release path lives in `release.py` (a base
class of the service), held calls in `holds.py`, lease liveness in `leases.py`.
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
from approvals.core import render
from approvals.core.deciding import Deciding, RememberRequest, review_of
from approvals.core.editing import Judge
from approvals.core.holds import ApprovalHold
from approvals.core.leases import LIVE_OWNERS
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
from approvals.core.ports import Change, ChangeFeed, Counters, ServiceStore, UpstreamCaller
from approvals.core.release import APPROVED_LEASE_SECONDS, Releasing
from approvals.core.remembering import Remembering
from approvals.core.why import Why, explain
from approvals.jsonrpc import JsonObject
from approvals.limits import LimitRefusal, Reservation
from approvals.outcomes import (
    encode_outcome,
    final_outcome,
    limit_refusal,
    too_many_pending,
)
from approvals.policy import Decision, Limit
from approvals.tool_catalog import ToolCatalog, fingerprint

__all__ = ["ApprovalHold", "ApprovalService", "LimitsFor"]

log = logging.getLogger(__name__)

KEEP_RESULT_SECONDS = 3600.0
KEEP_RESULT_BYTES = 1024 * 1024
EXPIRY_RETRY_SECONDS = 1.0
# How often leases of other processes are looked at (a dead owner's calls end within this).
LEASE_SWEEP_SECONDS = 30.0
_FOREVER = frozenset({"approval-expiry", "approval-housekeeping"})  # tasks that run until close
_PENDING: tuple[Status, ...] = ("pending",)
_APPROVED: tuple[Status, ...] = ("approved",)
LimitsFor = Callable[[str, str, Mapping[str, object]], Sequence[Limit]]


class ApprovalService(Deciding, Remembering, Releasing):
    """Creates approvals for held calls, takes decisions, and releases approved calls upstream.

    Made fully started by :meth:`open`, ended by :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: ServiceStore,
        counters: Counters,
        upstreams: UpstreamCaller,
        catalog: ToolCatalog,
        feed: ChangeFeed,
        limits_for: LimitsFor,
        clock: Callable[[], float],
        judge: Judge | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.feed = feed
        self._counters = counters
        self._upstreams = upstreams
        self._catalog = catalog
        self._limits_for = limits_for
        self._judge = judge  # the policy's verdict on an edited call (None: edits are refused)
        self.clock = clock
        # Who holds the leases this process takes: unique per process and per start.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._arrivals: dict[str, Reservation] = {}  # what each approval counted when it arrived
        self._release_locks: dict[str, asyncio.Lock] = {}
        self._releasing: set[str] = set()  # approvals this process is releasing now
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
        store: ServiceStore,
        counters: Counters,
        upstreams: UpstreamCaller,
        catalog: ToolCatalog,
        feed: ChangeFeed,
        limits_for: LimitsFor,
        clock: Callable[[], float] = time.time,
        expire_on_clock: bool = True,
        judge: Judge | None = None,
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
            judge=judge,
        )
        LIVE_OWNERS.add(service.owner)
        # Releases interrupted by a stop are ended; approvals whose decider stopped before
        # releasing them (this process's earlier start, or a replica that died) are released now.
        await service._recover()
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
        LIVE_OWNERS.discard(self.owner)
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
            # A repeat call never opens a second request (and is not counted again) — nor is it let
            # through by a standing grant saved with the approval it is collecting: that call ran.
            return Admission(hold=self.follow(existing))
        remembered = await self._by_standing_grant(call, decision, args_sha, now)
        if remembered is not None:
            return remembered
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
            due = min(opened.expires_at, opened.escalate_at or math.inf)
            if due < self._expiry_due or self._expiry_due == -math.inf:
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
            review_json=decision.review.to_json(),
            escalate_at=now + decision.review.escalate[0].after if decision.review.escalate else None,
        )

    def delivered(self, approval_id: str) -> None:
        self._spawn(self.store.update_fields(approval_id, result_delivered=True))

    # ---- decisions -------------------------------------------------------------------------

    async def decide(
        self,
        approval_id: str,
        reviewer: Principal,
        *,
        approve: bool,
        reason: str | None,
        channel: str,
        arguments: Mapping[str, object] | None = None,
        remember: RememberRequest | None = None,
        seen_sha256: str | None = None,
    ) -> Approval:
        """A reviewer's decision; the record after it. Raises DecisionRefused with its kind.

        ``status == "pending"`` after an approval means it was counted and the quorum needs more.
        ``arguments``: approve the call with these arguments instead (edit before approve).
        ``remember``: also save a standing grant for later calls like this one.
        ``seen_sha256``: the arguments' hash the reviewer was shown; refused ("changed") if an edit
        has changed them since.
        """
        decided, _ = await self.decide_and_remember(
            approval_id, reviewer, approve=approve, reason=reason, channel=channel,
            arguments=arguments, remember=remember, seen_sha256=seen_sha256,
        )  # fmt: skip
        return decided

    async def why(self, approval: Approval) -> Why:
        """What makes the call risky (core.why)."""
        return await explain(self.store, approval, self.clock())

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

    async def expire_due(self) -> None:
        """One pass of what the expiry task does: escalate and expire what is due, end releases
        whose owner stopped, drop kept results past their time."""
        now = self.clock()
        await self.escalate_due()
        for approval in await self.store.due_for_expiry(now):
            await self._time_out(approval)
        await self._recover()
        await self.store.drop_expired_results(now)

    async def _time_out(self, approval: Approval) -> None:
        """No decision in time: expired, or denied where the rule says ``on_timeout: deny``. An
        approved call that lapsed waiting for room under a rate limit always expires."""
        if approval.status == "pending" and review_of(approval).on_timeout == "deny":
            waited = render.duration(approval.expires_at - approval.created_at)
            reason = f"no decision within {waited}; this call's rule denies it then (on_timeout: deny)"
            await self._finish(approval, "pending", "denied", reason=reason)
        else:
            await self._finish(approval, approval.status, "expired", reason="no decision before the timeout")

    async def escalate_due(self) -> None:
        """Announce each request undecided past its next escalation step to that step's groups
        (who may decide it from then on): one ``pending → pending`` step, published as "escalated"."""
        for approval in await self.store.due_for_escalation(self.clock()):
            steps = review_of(approval).escalate
            step = approval.escalated
            if step >= len(steps):  # nothing left to announce: stop asking
                await self._move(
                    approval.id, _PENDING, "pending", actor="gateway", channel="gateway",
                    event="escalation_done", version=approval.version, escalate_at=None,
                )  # fmt: skip
                continue
            later = steps[step + 1].after if step + 1 < len(steps) else None
            await self._move(
                approval.id, _PENDING, "pending", actor="gateway", channel="gateway",
                event="escalated", version=approval.version, escalated=step + 1,
                escalate_at=None if later is None else approval.created_at + later,
            )  # fmt: skip

    def _approved_lease(self, now: float) -> dict[str, Any]:
        """The lease an approval gives this process: it releases the call; if it stops first,
        another process will (release.py)."""
        return {"lease_owner": self.owner, "lease_expires_at": now + APPROVED_LEASE_SECONDS}

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
        due = [
            at
            for at in (await self.store.next_expiry(), await self.store.next_escalation())
            if at is not None
        ]
        next_at = min(due) if due else None
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
        await self.escalate_due()
        for approval in await self.store.due_for_expiry(now):
            await self._time_out(approval)
        await self.store.drop_expired_results(now)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("approval task failed", exc_info=task.exception())
