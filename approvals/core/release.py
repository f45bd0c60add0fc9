"""Releasing an approved call: exactly once, with exactly the approved arguments (a reviewer's edit
when there is one), within the limits.

Part of :class:`approvals.core.service.ApprovalService` (a base class of it, so the life cycle
stays one object); kept apart because it is the one path that talks to the upstream: counting the
release against the rate limits, checking the tool's definition is the one reviewed, leasing the
release to this process, calling the upstream (as a task when the tool asks for one), and ending
releases whose owner stopped mid-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from approvals.config import Settings
from approvals.core import upstream_tasks
from approvals.core.leases import owner_gone
from approvals.core.model import Approval, Status
from approvals.core.ports import Counters, ServiceStore, UpstreamCaller
from approvals.jsonrpc import JsonObject
from approvals.limits import Reservation, scope_key, window_start
from approvals.outcomes import upstream_timeout, with_edit_note
from approvals.policy import Limit
from approvals.tool_catalog import ToolCatalog, fingerprint

__all__ = ["APPROVED_LEASE_SECONDS", "LEASE_GRACE_SECONDS", "Releasing"]

log = logging.getLogger(__name__)

# A lease outlives the call timeout by this much, so a live owner always finishes first.
LEASE_GRACE_SECONDS = 60.0
# How long an approval is left to the process that took the decision before another releases it
# (sooner when that process is known gone: same host). A decider still waiting for rate-limit room
# after this much is joined by another releaser; the compare-and-set lets one of them send it.
APPROVED_LEASE_SECONDS = 60.0
# How long a best-effort tasks/cancel to an upstream may take, after its task was given up on.
UPSTREAM_CANCEL_SECONDS = 10.0
_APPROVED: tuple[Status, ...] = ("approved",)


class Releasing:
    """The release path of the approval service (see the module's docstring)."""

    settings: Settings
    store: ServiceStore
    clock: Callable[[], float]
    owner: str
    _counters: Counters
    _upstreams: UpstreamCaller
    _catalog: ToolCatalog
    _arrivals: dict[str, Reservation]
    _release_locks: dict[str, asyncio.Lock]
    _releasing: set[str]
    _limits_for: Callable[[str, str, Mapping[str, object]], Sequence[Limit]]

    if TYPE_CHECKING:  # provided by ApprovalService

        def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None: ...

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
        ) -> Approval | None: ...

        async def _finish(
            self,
            approval: Approval,
            from_: Status,
            to: Status,
            *,
            reason: str | None = None,
            response: JsonObject | None = None,
        ) -> None: ...

    def _start_release(self, approval: Approval) -> None:
        """Release `approval` in the background, unless this process is releasing it already."""
        if approval.id in self._releasing:
            return
        self._releasing.add(approval.id)  # at once: a sweep running meanwhile must not start another
        self._spawn(self._release(approval, self._catalog.mark()))

    async def _release(self, approval: Approval, decided_mark: int) -> None:
        """Forward an approved call exactly once, with exactly the stored arguments.

        `decided_mark` is the catalog's mark taken once the approval was decided.
        """
        try:
            await self._release_now(approval, decided_mark)
        finally:
            self._releasing.discard(approval.id)

    async def _release_now(self, approval: Approval, decided_mark: int) -> None:
        arguments = approval.release_arguments  # a reviewer's edit, when there is one
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
        response = with_edit_note(approval, response)  # the agent learns what ran was changed
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
            votes_json="",  # approvals given under the old definition do not count for the new one
            # nor does an edit checked against it: reviewers see the call as asked again
            edited_json=None,
            edited_sha256=None,
            edited_by=None,
        )
        if back is not None:
            log.warning("approval %s back to pending: %s", approval.id, note)

    async def _recover(self) -> None:
        """What stopped processes left behind. Released calls whose owner stopped mid-call are
        ended as interrupted, never sent again; approvals whose decider stopped before releasing
        them are released here (the compare-and-set keeps that to once, whoever else tries).

        An owner has stopped when its lease ran out, or — known at once — when it ran on this
        host and its process is gone (or is this process, started anew).
        """
        now = self.clock()
        for approval in await self.store.interrupted_releases(math.inf):
            if approval.lease_owner == self.owner:
                continue  # this process's own call in flight: its call timeout ends it
            if self._lease_over(approval, now):
                await self._finish(approval, "released", "failed", reason="interrupted")
        # All read before any is released: a release moves its record out of the pages being read.
        approved: list[Approval] = []
        while page := await self.store.list_approvals(status="approved", limit=1000, offset=len(approved)):
            approved += page
        for approval in approved:
            # This process's own: released unless a release of it is running (one that failed,
            # on a store error, is tried again here).
            if approval.lease_owner == self.owner or self._lease_over(approval, now):
                self._start_release(approval)

    def _lease_over(self, approval: Approval, now: float) -> bool:
        """Whether the process holding `approval` (its lease) is known to have stopped."""
        expired = approval.lease_expires_at is None or approval.lease_expires_at <= now
        return expired or owner_gone(approval.lease_owner, self.owner)
