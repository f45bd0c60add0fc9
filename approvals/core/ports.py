"""The core's ports: what it needs from the outside, as Protocols. Adapters live elsewhere —
``approvals.store`` (SQLite, and an in-memory twin), ``approvals.proxy`` (the upstream caller) — and
the core imports none of them.

    ApprovalStore   approvals and their append-only audit log (a hash chain); every transition a
                    compare-and-set
    StandingGrantStore  remembered decisions ("approve and remember") and their uses
    AuditSinkStore  where each audit sink has delivered up to, and which process delivers it
    CounterStore    the durable home of rate-limit counters (written behind, absolute values)
    Counters        the rate limits themselves: an async, atomic reserve and its rollback
    UpstreamCaller  one request to an upstream, its JSON-RPC response
    ChangeFeed      "approval X is now in state S", to every listener in every process
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from approvals.core.model import Approval, AuditEvent, Status
from approvals.core.standing import StandingGrant
from approvals.jsonrpc import JsonObject

if TYPE_CHECKING:  # limits.py implements Counters and imports CounterStore from here
    from approvals.limits import LimitRefusal, Reservation
    from approvals.policy import Limit

__all__ = [
    "ApprovalStore",
    "AuditSinkStore",
    "Change",
    "ChangeFeed",
    "CounterRow",
    "CounterStore",
    "Counters",
    "Listener",
    "ServiceStore",
    "StandingGrantStore",
    "Store",
    "UpstreamCaller",
    "Watch",
]

# (counter, scope_key, window_start, value): one window of one counter for one scope.
CounterRow: TypeAlias = tuple[str, str, int, float]


class CounterStore(Protocol):
    """Durable home of rate-limit counters, written behind by :class:`approvals.limits.RateLimiter`.

    Values are absolute counts, never deltas, so a write can be retried or repeated safely.
    """

    async def load_counters(self, since: float) -> list[CounterRow]:
        """Return every counter row whose ``window_start >= since``.

        The store does not know window sizes; the caller asks from ``now`` minus the longest
        window and ignores rows it no longer needs.
        """
        ...

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        """Upsert the absolute value of every row, all in one transaction."""
        ...

    async def prune_counters(self, before: int) -> None:
        """Delete every counter row whose ``window_start < before``."""
        ...


class ApprovalStore(Protocol):
    """Durable home of approvals and of their append-only audit log.

    The life cycle is enforced here, not by callers: :meth:`transition` is the only way a status
    changes; it is a compare-and-set on the current status along the edges of
    :data:`approvals.core.model.TRANSITIONS`, and it appends its audit event in the same
    transaction, so the log and the records never disagree. Records and audit writes are durable
    when the call returns (``synchronous=FULL`` on SQLite): a released call stays released across a
    crash or power cut, so it is never forwarded twice.
    """

    async def create_approval(self, approval: Approval, *, actor: str, channel: str) -> None:
        """Insert a new ``pending`` record (version 0) and its "created" audit event, atomically.

        Raises ``ValueError`` for a record in any other state: nothing enters the store decided.
        """
        ...

    async def open_approval(
        self, approval: Approval, *, actor: str, channel: str, max_pending: int
    ) -> Approval | None:
        """Open a request for a held call, atomically with respect to every other caller.

        If a record that :meth:`find_reusable` would return (at ``approval.created_at``) exists for
        the same request, return it and insert nothing. Else, if the grant already has
        ``max_pending`` pending records, return None. Else insert as :meth:`create_approval` does
        and return ``approval``.
        """
        ...

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The record with this id, or None."""
        ...

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
        ...

    async def find_reusable(
        self, *, grant: str, upstream: str, tool: str, args_sha256: str, now: float
    ) -> Approval | None:
        """The newest record of the same request that a repeat call attaches to, or None.

        Same grant, upstream, tool and argument hash, and one of: pending, approved or released;
        completed or failed with a kept result not yet delivered and ``result_expires_at > now``;
        denied or expired with ``result_expires_at > now`` (the caller sets that window when it
        records the outcome). None means the repeat call is a new request.
        """
        ...

    async def count_pending(self, grant: str) -> int:
        """How many records of this grant await a decision."""
        ...

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
        """Move the record to ``to`` if its current status is in ``from_``; the new record, or None.

        With ``version``, only if the record's version is still that one too: ``pending → pending``
        steps (a vote short of the quorum, an edit, an escalation) are always made this way, so
        two reviewers voting at once never overwrite each other's vote.

        One conditional update that also increments ``version`` and sets ``fields`` (Approval
        fields other than the request and the store-managed ``id``/``status``/``version``), plus
        one audit event (``event``, default ``to``; detail: ``reason`` if given), in one durable
        transaction. ``channel`` is the channel of the move, for the audit log; the record's own
        ``decided_via`` is a field like the others.

        None means the status was not in ``from_`` (or the id is unknown): another caller won,
        and reading the record says who. Raises ``ValueError`` for an illegal ``from_ → to`` pair,
        a ``pending → pending`` step without ``version``, or a field that may not be set: those are
        programming errors.
        """
        ...

    async def update_fields(self, approval_id: str, **fields: object) -> None:
        """Set delivery fields (``note``, ``result_delivered``, ``result_json``, ``result_expires_at``,
        ``session_id``) without a transition, version change or audit event.

        Raises ``ValueError`` for any other name. An unknown id is a no-op.
        """
        ...

    async def due_for_expiry(self, now: float) -> list[Approval]:
        """Pending records whose ``expires_at <= now``, soonest first (an approval given in time stands)."""
        ...

    async def interrupted_releases(self, now: float) -> list[Approval]:
        """Records left ``released`` whose lease ran out (or that never had one) at ``now``.

        The process that released such a call stopped between release and answer (or is past its
        own call timeout): it may have run, so recovery ends it as interrupted, never sends it again.
        """
        ...

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among pending records, so expiry can wait exactly."""
        ...

    async def due_for_escalation(self, now: float) -> list[Approval]:
        """Pending records whose ``escalate_at <= now``, soonest first (``escalate_at`` then ``id``).

        A record with ``escalate_at`` None has no escalation step left. The caller takes each step
        as a ``pending → pending`` transition on the version it read (event "escalated"), setting
        ``escalated`` and the next ``escalate_at``, so two processes never take the same step twice.
        """
        ...

    async def next_escalation(self) -> float | None:
        """The earliest ``escalate_at`` among pending records (None: none is due ever), so the
        escalation task can wait exactly."""
        ...

    async def drop_expired_results(self, now: float) -> int:
        """Clear ``result_json`` wherever ``result_expires_at <= now``, noting it on the record.

        Returns how many results were dropped.
        """
        ...

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]:
        """Audit events with ``seq > after_seq`` (of one approval, or all), oldest first."""
        ...

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
        """Append an event that is not a transition (e.g. "viewed", "notify_failed"), durably."""
        ...

    async def audit_head(self) -> tuple[int, str]:
        """The newest audit event's ``(seq, hash)``, ``(0, GENESIS)`` while the log is empty.

        Every appended event is chained (:mod:`approvals.audit_chain`) in the transaction that
        writes it: its seq is the head's plus one, its ``prev_hash`` the head's hash, and it
        becomes the head. Appends from every process sharing the store are chained one at a time.
        """
        ...

    async def save_message_ref(self, approval_id: str, channel: str, ref_json: str) -> None:
        """Remember, durably, where ``channel`` posted its message about an existing approval.

        ``ref_json`` is the channel's own JSON (Slack: ``{"channel": "C…", "ts": "…"}``), kept as
        is; a later save for the same approval and channel replaces it. Lets a channel edit its
        message to show the outcome, even after a restart. Raises ``StoreError`` for an unknown id.
        """
        ...

    async def message_ref(self, approval_id: str, channel: str) -> str | None:
        """The ``ref_json`` last saved for this approval and channel, or None."""
        ...


class StandingGrantStore(Protocol):
    """Standing grants (:mod:`approvals.core.standing`): remembered decisions for later calls.

    Each write appends one audit event in the same transaction, with the grant's id (``sg_…``) in
    the event's ``approval_id``: "granted", "used", "revoked".
    """

    async def create_standing(self, grant: StandingGrant, *, actor: str, channel: str) -> None:
        """Insert a new grant and its "granted" audit event (detail: the constraints, effect, until)."""
        ...

    async def get_standing(self, grant_id: str) -> StandingGrant | None: ...

    async def list_standing(
        self, *, active_at: float | None = None, grant: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[StandingGrant]:
        """Newest first; with ``active_at``, only those active then (not revoked, not expired, not
        used up)."""
        ...

    async def standing_for(self, upstream: str, tool: str, grant: str, now: float) -> list[StandingGrant]:
        """The grants active at ``now`` for this agent's calls of this tool, deny ones first, then
        oldest first."""
        ...

    async def use_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str, args_sha256: str
    ) -> StandingGrant | None:
        """Count one use, if the grant is still active at ``now`` (one conditional update: of two
        calls racing for the last use, one gets it); the grant as it now is, or None. Appends a
        "used" audit event (actor: the agent's grant name)."""
        ...

    async def revoke_standing(
        self, grant_id: str, now: float, *, actor: str, channel: str
    ) -> StandingGrant | None:
        """Revoke it if it is not revoked yet; the revoked grant, or None (unknown or already revoked)."""
        ...


class ServiceStore(ApprovalStore, StandingGrantStore, Protocol):
    """What the approval service needs of a store: approvals and standing grants."""


class AuditSinkStore(Protocol):
    """Where an audit sink (:mod:`approvals.audit_sink`) has delivered up to, and the lease of the
    one process delivering it, so processes sharing a store never send the same events together."""

    async def claim_audit_sink(self, name: str, owner: str, now: float, lease_seconds: float) -> int | None:
        """Take, renew or (when it ran out) take over the lease on sink ``name`` for ``owner``, until
        ``now + lease_seconds``; the seq delivered up to (0 for a new sink), or None while another
        owner's lease runs. Atomic: of two claims at once, one wins."""
        ...

    async def advance_audit_sink(
        self, name: str, owner: str, seq: int, now: float, lease_seconds: float
    ) -> bool:
        """Record delivery up to ``seq`` (never moving back) and renew the lease, if ``owner`` still
        holds it at ``now``; False (and nothing changed) when it does not."""
        ...

    async def release_audit_sink(self, name: str, owner: str) -> None:
        """End ``owner``'s lease, if it holds it, so another process takes the sink over at once."""
        ...


class Store(CounterStore, ApprovalStore, StandingGrantStore, AuditSinkStore, Protocol):
    """The whole store the app opens once and closes on shutdown.

    Each concern is its own small protocol (``CounterStore``, ``ApprovalStore``, ``AuditSinkStore``)
    so a component depends only on what it uses; ``Store`` is their union, which a backend implements.
    """

    async def close(self) -> None:
        """Finish pending work and release the database."""
        ...


class Counters(Protocol):
    """Rate limits: count a call against every limit or none, atomically; take a count back."""

    async def reserve(
        self,
        limits: Sequence[Limit],
        *,
        grant: str,
        session: str,
        arguments: Mapping[str, object],
        now: float,
    ) -> Reservation | LimitRefusal: ...

    async def rollback(self, reservation: Reservation) -> None: ...


class UpstreamCaller(Protocol):
    """How the core reaches an upstream itself: one request, its JSON-RPC response."""

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject: ...


@dataclass(frozen=True, slots=True)
class Change:
    """An approval reached a new state (``approval.version``), by way of ``event`` (the audit event:
    "created", "approved", "tool_changed", …).

    ``response`` is the upstream's full answer when the change was made in this process and is
    final; listeners elsewhere read the kept result from the record (it may be too large to keep).
    ``here`` says the change was made in this process: what acts once for all processes (a Slack
    post) acts on those alone, while views of the state (a page's live list) take every change.
    """

    approval: Approval
    event: str
    response: JsonObject | None = None
    here: bool = True


class Watch(Protocol):
    """The changes of one approval, from the moment the watch began, until ``close``."""

    latest: Approval  # the newest state seen: for a held call's progress and pending messages

    async def final(self, timeout: float) -> Change | None:
        """The change that made the approval final, or None if none came within ``timeout``."""
        ...

    def close(self) -> None: ...


class Listener(Protocol):
    """Every change from the moment it began, in order, until ``close`` (an async iterator).

    A listener that falls too far behind is ended rather than buffering without bound; its owner
    starts a new one and catches up from the store."""

    def __aiter__(self) -> AsyncIterator[Change]: ...

    def close(self) -> None: ...


class ChangeFeed(Protocol):
    """Publish / subscribe for approval changes. A change published in any process reaches every
    subscriber in every process sharing the store: in this process at once, in others as the
    adapter can (SQLite by polling its data_version, PostgreSQL by LISTEN/NOTIFY)."""

    def publish(self, change: Change) -> None:
        """Tell every subscriber in this process, at once (never blocks, never raises)."""
        ...

    def watch(self, approval: Approval) -> Watch:
        """Follow one approval, whose state as read is ``approval``."""
        ...

    def listen(self) -> Listener:
        """Follow every approval."""
        ...
