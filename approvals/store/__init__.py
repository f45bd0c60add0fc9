"""Durable state of the gateway behind one Protocol.

Everything the gateway must not lose — rate-limit counters, approvals, the audit log and kept
results — goes through the ``Store`` protocols below. There is one implementation today,
:class:`approvals.store.sqlite.SqliteStore` (one embedded SQLite file, the default), and the
protocols are shaped so a PostgreSQL implementation can follow for scale-out: every method is one
round trip or one transaction, values are plain tuples or frozen records
(:mod:`approvals.store.records`), and nothing relies on SQLite-only behaviour (writes are upserts
and conditional updates: ``UPDATE … WHERE status IN (…) RETURNING``).

Errors::

    StoreError              any failure of the backing database (I/O, lock timeout, bad schema);
                            callers fail closed: a store error never releases a call
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, TypeAlias

from approvals.errors import ApprovalsError
from approvals.store.records import Approval, AuditEvent, Status

__all__ = [
    "Approval",
    "ApprovalStore",
    "AuditEvent",
    "CounterRow",
    "CounterStore",
    "Status",
    "Store",
    "StoreError",
]

# (counter, scope_key, window_start, value): one window of one counter for one scope.
CounterRow: TypeAlias = tuple[str, str, int, float]


class StoreError(ApprovalsError):
    """The backing database failed or is unusable; the operation did not happen."""


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
    :data:`approvals.store.records.TRANSITIONS`, and it appends its audit event in the same
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
        **fields: object,
    ) -> Approval | None:
        """Move the record to ``to`` if its current status is in ``from_``; the new record, or None.

        One conditional update that also increments ``version`` and sets ``fields`` (Approval
        fields other than the request and the store-managed ``id``/``status``/``version``), plus
        one audit event (``event``, default ``to``; detail: ``reason`` if given), in one durable
        transaction. ``channel`` is the channel of the move, for the audit log; the record's own
        ``decided_via`` is a field like the others.

        None means the status was not in ``from_`` (or the id is unknown): another caller won,
        and reading the record says who. Raises ``ValueError`` for an illegal ``from_ → to`` pair
        or a field that may not be set: those are programming errors.
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

    async def interrupted_releases(self) -> list[Approval]:
        """Records left ``released`` — the process stopped between release and answer. For recovery."""
        ...

    async def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` among pending records, so expiry can wait exactly."""
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


class Store(CounterStore, ApprovalStore, Protocol):
    """The whole store the app opens once and closes on shutdown.

    Each concern is its own small protocol (``CounterStore``, ``ApprovalStore``) so a component
    depends only on what it uses; ``Store`` is their union, which a backend implements.
    """

    async def close(self) -> None:
        """Finish pending work and release the database."""
        ...
