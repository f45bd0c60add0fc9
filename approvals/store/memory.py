"""The in-memory store: the whole :class:`approvals.core.ports.Store` in a few dicts.

The twin of :class:`approvals.store.sqlite.SqliteStore`, with the same semantics, so the tests of
the store and of the approval service run against both; it is also the reference for another
adapter (PostgreSQL), each method saying in plain Python what its SQL must do:

- every method is atomic: its body never awaits, so on one event loop nothing comes between the
  look-up, the count and the insert of :meth:`open_approval`, or the compare and the set of
  :meth:`transition` (a database gets this from one statement or one transaction);
- a transition is a compare-and-set along :data:`~approvals.core.model.TRANSITIONS` that bumps
  ``version`` and appends its audit event with it;
- records go in and out as copies, so no caller shares (and could corrupt) the stored one;
- programming errors (an illegal move, a field that may not be set) raise ``ValueError`` before
  anything changes; what a database would refuse (a duplicate id, a row for an unknown approval)
  raises :class:`~approvals.errors.StoreError`.

Nothing is durable: the data lives as long as the object, and :meth:`close` keeps it, so a test can
stop a service and start another over the same store, as a restart over the same file would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Sequence

from approvals.audit_chain import GENESIS, seal
from approvals.core.model import (
    RESULT_DROPPED_NOTE,
    Approval,
    AuditEvent,
    Status,
    check_transition,
    check_transition_fields,
    check_update_fields,
)
from approvals.core.ports import CounterRow
from approvals.core.standing import StandingGrant
from approvals.errors import StoreError
from approvals.request_context import REQUEST_ID
from approvals.store.memory_review import MemoryReviewMethods
from approvals.store.memory_review import round_trip as _round_trip
from approvals.store.review_rows import check_step

__all__ = ["MemoryStore"]

_OPEN: frozenset[Status] = frozenset({"pending", "approved", "released"})


class MemoryStore(MemoryReviewMethods):
    """The in-memory implementation of :class:`approvals.core.ports.Store` (escalation queries and
    standing grants in :class:`~approvals.store.memory_review.MemoryReviewMethods`)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # only to stamp audit events; every decision is told `now`
        self._counters: dict[tuple[str, str, int], float] = {}
        self._approvals: dict[str, Approval] = {}
        self._standing: dict[str, StandingGrant] = {}
        self._audit: list[AuditEvent] = []
        self._head: tuple[int, str] = (0, GENESIS)  # the newest audit event's (seq, hash)
        self._sinks: dict[str, _SinkRow] = {}  # audit sink name → its cursor and lease
        self._refs: dict[tuple[str, str], str] = {}
        self._used_links: dict[str, float] = {}  # login link nonce → the link's expiry
        self._ended_sessions: dict[str, float] = {}  # inbox session id → its latest possible expiry

    async def close(self) -> None:
        """Nothing to flush; the data stays, for a store opened again over the same object."""

    # ---- counters -----------------------------------------------------------------------------

    async def load_counters(self, since: float) -> list[CounterRow]:
        """Every counter row whose ``window_start >= since``."""
        await _round_trip()
        return [(*key, value) for key, value in self._counters.items() if key[2] >= since]

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        """Upsert the absolute value of every row."""
        await _round_trip()
        for counter, scope_key, window_start, value in rows:
            self._counters[(counter, scope_key, window_start)] = float(value)

    async def prune_counters(self, before: int) -> None:
        """Delete every counter row whose ``window_start < before``."""
        await _round_trip()
        for key in [key for key in self._counters if key[2] < before]:
            del self._counters[key]

    # ---- approvals ----------------------------------------------------------------------------

    async def create_approval(self, approval: Approval, *, actor: str, channel: str) -> None:
        """Insert a new pending record and its "created" audit event."""
        _check_new(approval)
        await _round_trip()
        self._insert(approval, actor=actor, channel=channel)

    async def open_approval(
        self, approval: Approval, *, actor: str, channel: str, max_pending: int
    ) -> Approval | None:
        """The open request for this call, a new one, or None past ``max_pending`` — atomically."""
        _check_new(approval)
        await _round_trip()
        existing = self._reusable(
            grant=approval.grant,
            upstream=approval.upstream,
            tool=approval.tool,
            args_sha256=approval.args_sha256,
            now=approval.created_at,
        )
        if existing is not None:
            return _copy(existing)
        if self._count_pending(approval.grant) >= max_pending:
            return None
        self._insert(approval, actor=actor, channel=channel)
        return approval

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The record with this id, or None."""
        await _round_trip()
        found = self._approvals.get(approval_id)
        return None if found is None else _copy(found)

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
        """Records matching every given filter, newest first (``created_at`` then ``id``, descending)."""
        await _round_trip()
        wanted = {"status": status, "upstream": upstream, "tool": tool, "grant": grant}
        given = {name: value for name, value in wanted.items() if value is not None}
        found = [a for a in self._approvals.values() if all(getattr(a, k) == v for k, v in given.items())]
        return [_copy(a) for a in _newest_first(found)[offset : offset + limit]]

    async def find_reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        """The newest record of the same request that a repeat call attaches to, or None."""
        await _round_trip()
        found = self._reusable(grant=grant, upstream=upstream, tool=tool, args_sha256=args_sha256, now=now)
        return None if found is None else _copy(found)

    async def count_pending(self, grant: str) -> int:
        """How many records of this grant await a decision."""
        await _round_trip()
        return self._count_pending(grant)

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
        """Compare-and-set the status (and ``version``, if given) plus its audit event; the new
        record, or None."""
        check_transition(from_, to)
        check_step(from_, to, version)
        check_transition_fields(fields)
        at = self._clock()
        await _round_trip()
        current = self._approvals.get(approval_id)
        if current is None or current.status not in from_:
            return None  # a lost race (or an unknown id), not an error
        if version is not None and current.version != version:
            return None  # another step moved the record since the caller read it
        moved = dataclasses.replace(current, status=to, version=current.version + 1, **fields)  # type: ignore[arg-type]
        self._approvals[approval_id] = moved
        # The reason given to this move, not one left on the record by an earlier move.
        reason = fields.get("reason")
        self._append(
            at=at,
            approval_id=approval_id,
            event=event or to,
            actor=actor,
            channel=channel,
            args_sha256=moved.args_sha256,
            detail=reason if isinstance(reason, str) else None,
        )
        return _copy(moved)

    async def update_fields(self, approval_id: str, **fields: object) -> None:
        """Set delivery fields without a transition, version change or audit event."""
        check_update_fields(fields)
        await _round_trip()
        current = self._approvals.get(approval_id)
        if current is not None:
            self._approvals[approval_id] = dataclasses.replace(current, **fields)  # type: ignore[arg-type]

    async def due_for_expiry(self, now: float) -> list[Approval]:
        """Pending records whose ``expires_at <= now``, soonest first (``expires_at`` then ``id``)."""
        await _round_trip()
        due = [a for a in self._approvals.values() if a.status == "pending" and a.expires_at <= now]
        return [_copy(a) for a in sorted(due, key=lambda a: (a.expires_at, a.id))]

    async def interrupted_releases(self, now: float) -> list[Approval]:
        """Records left ``released`` whose lease ran out by ``now`` (or that never had one), oldest first."""
        await _round_trip()
        left = [
            a
            for a in self._approvals.values()
            if a.status == "released" and (a.lease_expires_at is None or a.lease_expires_at <= now)
        ]
        return [_copy(a) for a in sorted(left, key=lambda a: (a.created_at, a.id))]

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among pending records, or None."""
        await _round_trip()
        return min((a.expires_at for a in self._approvals.values() if a.status == "pending"), default=None)

    async def drop_expired_results(self, now: float) -> int:
        """Clear kept results whose window has ended, noting it on the record; how many were cleared."""
        await _round_trip()
        ended = [
            a
            for a in self._approvals.values()
            if a.result_json is not None and a.result_expires_at is not None and a.result_expires_at <= now
        ]
        for approval in ended:
            self._approvals[approval.id] = dataclasses.replace(
                approval, result_json=None, note=RESULT_DROPPED_NOTE
            )
        return len(ended)

    # ---- audit and message refs ---------------------------------------------------------------

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        """Audit events with ``seq > after_seq`` (of one approval, or all), oldest first."""
        await _round_trip()
        found: Iterable[AuditEvent] = (
            e for e in self._audit if e.seq > after_seq and approval_id in (None, e.approval_id)
        )
        return [e for _, e in zip(range(limit), found, strict=False)]

    async def append_audit(
        self,
        approval_id: str,
        event: str,
        *,
        actor: str,
        channel: str,
        args_sha256: str,
        detail: str | None = None,
    ) -> None:
        """Append an event that is not a transition; the approval (or standing grant) must exist."""
        at = self._clock()
        await _round_trip()
        if approval_id not in self._standing:
            self._known(approval_id)
        self._append(
            at=at,
            approval_id=approval_id,
            event=event,
            actor=actor,
            channel=channel,
            args_sha256=args_sha256,
            detail=detail,
        )

    async def audit_head(self) -> tuple[int, str]:
        """The newest audit event's (seq, hash); (0, GENESIS) while the log is empty."""
        await _round_trip()
        return self._head

    async def claim_audit_sink(self, name: str, owner: str, now: float, lease_seconds: float) -> int | None:
        """Take or keep the lease on a sink; the seq it delivered up to, or None if another holds it."""
        await _round_trip()
        row = self._sinks.setdefault(name, _SinkRow())
        if row.owner not in (None, owner) and row.expires_at is not None and row.expires_at > now:
            return None
        row.owner, row.expires_at = owner, now + lease_seconds
        return row.delivered_seq

    async def advance_audit_sink(
        self, name: str, owner: str, seq: int, now: float, lease_seconds: float
    ) -> bool:
        """Record a sink's delivery up to ``seq`` and extend its lease; False if the lease was lost."""
        await _round_trip()
        row = self._sinks.get(name)
        if row is None or row.owner != owner or row.expires_at is None or row.expires_at <= now:
            return False
        row.delivered_seq, row.expires_at = max(row.delivered_seq, seq), now + lease_seconds
        return True

    async def release_audit_sink(self, name: str, owner: str) -> None:
        """Give up a sink's lease, so another process takes it over at once."""
        await _round_trip()
        row = self._sinks.get(name)
        if row is not None and row.owner == owner:
            row.owner = row.expires_at = None

    async def save_message_ref(self, approval_id: str, channel: str, ref_json: str) -> None:
        """Remember where ``channel`` posted its message about the approval (replacing any earlier ref)."""
        await _round_trip()
        self._known(approval_id)
        self._refs[(approval_id, channel)] = ref_json

    async def message_ref(self, approval_id: str, channel: str) -> str | None:
        """The ref ``channel`` saved for the approval, or None."""
        await _round_trip()
        return self._refs.get((approval_id, channel))

    # ---- the inbox's shared state (approvals.web.inbox_state.InboxStateStore) -----------------

    async def use_login_link(self, nonce: str, expires_at: float) -> bool:
        """Record the login link as used; False when it was already (insert if absent)."""
        await _round_trip()
        if nonce in self._used_links:
            return False
        self._used_links[nonce] = expires_at
        return True

    async def login_link_used(self, nonce: str) -> bool:
        """Whether the login link was used."""
        await _round_trip()
        return nonce in self._used_links

    async def end_inbox_session(self, session_id: str, expires_at: float) -> None:
        """Record the session as ended until ``expires_at`` (the later expiry wins)."""
        await _round_trip()
        self._ended_sessions[session_id] = max(expires_at, self._ended_sessions.get(session_id, expires_at))

    async def ended_inbox_sessions(self, now: float) -> dict[str, float]:
        """Ended sessions whose record expires after ``now``."""
        await _round_trip()
        return {sid: exp for sid, exp in self._ended_sessions.items() if exp > now}

    async def prune_inbox_state(self, before: float) -> int:
        """Delete used links and ended sessions that expired before ``before``; how many."""
        await _round_trip()
        pruned = 0
        for rows in (self._used_links, self._ended_sessions):
            for key in [key for key, exp in rows.items() if exp < before]:
                del rows[key]
                pruned += 1
        return pruned

    # ---- the bodies shared by several methods (never awaiting) --------------------------------

    def _insert(self, approval: Approval, *, actor: str, channel: str) -> None:
        if approval.id in self._approvals:
            raise StoreError(f"cannot create an approval: id {approval.id!r} exists")
        self._approvals[approval.id] = _copy(approval)
        self._append(
            at=self._clock(),
            approval_id=approval.id,
            event="created",
            actor=actor,
            channel=channel,
            args_sha256=approval.args_sha256,
            detail=None,
        )

    def _append(
        self,
        *,
        at: float,
        approval_id: str,
        event: str,
        actor: str,
        channel: str,
        args_sha256: str,
        detail: str | None,
    ) -> None:
        seq, prev_hash = self._head
        new = AuditEvent(seq + 1, at, approval_id, event, actor, channel, args_sha256, detail)
        row = seal(dataclasses.replace(new, request_id=REQUEST_ID.get()), prev_hash)
        self._audit.append(row)
        self._head = (row.seq, row.hash)

    def _known(self, approval_id: str) -> None:
        # A database refuses the row by its foreign key; the same answer here.
        if approval_id not in self._approvals:
            raise StoreError(f"no approval {approval_id!r}")

    def _reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        same = [
            a
            for a in self._approvals.values()
            if (a.grant, a.upstream, a.tool, a.args_sha256) == (grant, upstream, tool, args_sha256)
            and _still_answers(a, now)
        ]
        return next(iter(_newest_first(same)), None)

    def _count_pending(self, grant: str) -> int:
        return sum(1 for a in self._approvals.values() if a.status == "pending" and a.grant == grant)


@dataclasses.dataclass(slots=True)
class _SinkRow:
    delivered_seq: int = 0
    owner: str | None = None
    expires_at: float | None = None


def _still_answers(approval: Approval, now: float) -> bool:
    """Whether a repeat call attaches to this record: it is open, or its outcome is still to be told.

    A finished record counts only while a kept, undelivered result or a denial/expiry is within its
    keep window; no window (None) never matches, so a repeat call is then a new request — never an
    unreviewed call.
    """
    if approval.status in _OPEN:
        return True
    in_window = approval.result_expires_at is not None and approval.result_expires_at > now
    if approval.status in ("completed", "failed"):
        return in_window and approval.result_json is not None and not approval.result_delivered
    return in_window and approval.status in ("denied", "expired")


def _check_new(approval: Approval) -> None:
    if approval.status != "pending" or approval.version != 0:
        raise ValueError(f"a new approval must be pending at version 0, not {approval.status!r}")


def _newest_first(approvals: list[Approval]) -> list[Approval]:
    return sorted(approvals, key=lambda a: (a.created_at, a.id), reverse=True)


def _copy(approval: Approval) -> Approval:
    # A fresh record with its own parsing cache: a caller who mutates `.arguments` changes only theirs.
    return dataclasses.replace(approval)
