"""The audit log's hash chain: canonical encoding, hashing, verification, the exported record.

Every audit row carries the hash of the row before it, so editing, deleting or moving a row breaks
the chain where it happened::

    hash(n)      = sha256_hex( hash(n-1) + "\\n" + canonical(n) )        hash(0) = GENESIS ("0" * 64)
    canonical(n) = the JSON array [seq, at, approval_id, event, actor, channel, args_sha256, detail]
                   written compactly (separators "," and ":"), ASCII only, `at` as a float

One chain per database. A store computes the hash inside the transaction that inserts the row and
keeps the newest ``(seq, hash)`` in a one-row head, updated with it; seqs are handed out from the
head, so they are dense (1, 2, 3, …) and in chain order. The head is also what shows a cut-off
tail: the last row must be the head.

Anyone can check an export (:func:`event_record` lines) with sha256 and a JSON encoder alone. What
the chain cannot show by itself is someone with write access recomputing every hash from the edit
onwards, the head included; copies kept elsewhere (the webhook sink, exports) carry the hashes, and
comparing one with the database shows such a rewrite.

The pure part (:func:`link_hash`, :func:`seal`, :class:`ChainVerifier`, :func:`verify`) takes values
and returns values; :func:`verify_log` and :func:`read_log` page through a store's log, a bounded
page at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

from approvals.core.model import AuditEvent

__all__ = [
    "GENESIS",
    "PAGE",
    "AuditLog",
    "BreakKind",
    "BrokenLink",
    "ChainVerifier",
    "canonical",
    "event_record",
    "link_hash",
    "read_log",
    "seal",
    "verify",
    "verify_log",
]

GENESIS = "0" * 64  # the "hash" before the first row
PAGE = 1000  # rows read per store call while verifying or exporting: the bound on memory
# On a row whose hash does not match, seqs this far either side are tried to tell a row moved to
# another seq from one whose fields were edited (a handful of hashes, once, at the first break).
_REORDER_WINDOW = 64

BreakKind: TypeAlias = Literal["edited", "deleted", "reordered"]


class AuditLog(Protocol):
    """What verifying and exporting read: the rows in seq order, with their hashes, and the head."""

    async def audit_events(
        self, *, approval_id: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> list[AuditEvent]: ...

    async def audit_head(self) -> tuple[int, str]: ...


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first place the chain does not hold: the seq, what happened there, and how it shows."""

    seq: int
    kind: BreakKind
    detail: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.detail}"


def canonical(event: AuditEvent, seq: int | None = None) -> bytes:
    """The bytes of ``event`` that its hash covers (with ``seq`` in place of its own, if given)."""
    fields = [
        event.seq if seq is None else seq,
        float(event.at),  # a REAL read back may come as an int; the hash must not care
        event.approval_id,
        event.event,
        event.actor,
        event.channel,
        event.args_sha256,
        event.detail,
    ]
    if event.request_id is not None:  # appended only when there is one: older rows hash as they did
        fields.append(event.request_id)
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def link_hash(prev_hash: str, event: AuditEvent, seq: int | None = None) -> str:
    """The hash of ``event`` chained after ``prev_hash``."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical(event, seq)).hexdigest()


def seal(event: AuditEvent, prev_hash: str) -> AuditEvent:
    """``event`` chained after ``prev_hash``: its ``prev_hash`` and ``hash`` filled in."""
    return dataclasses.replace(event, prev_hash=prev_hash, hash=link_hash(prev_hash, event))


class ChainVerifier:
    """Checks rows fed in seq order, one at a time, in bounded memory; then the head.

    ``check`` answers the first :class:`BrokenLink` (and should not be fed after one); ``count`` is
    how many rows held.
    """

    REMEMBERED = 4096  # recent hashes → their seq, to recognise a row that links to one further back

    def __init__(self) -> None:
        self.count = 0
        self._last_seq = 0
        self._last_hash = GENESIS
        self._recent: OrderedDict[str, int] = OrderedDict()

    def check(self, event: AuditEvent) -> BrokenLink | None:
        """The broken link that ``event`` shows, or None when it continues the chain."""
        if event.seq <= self._last_seq:
            return BrokenLink(event.seq, "reordered", f"it comes after seq {self._last_seq}")
        if event.hash != link_hash(event.prev_hash, event):
            return self._unsealed(event)
        if event.prev_hash != self._last_hash:
            return self._unlinked(event)
        # A gap with the link intact is not a deletion: the chain was written that way (rows
        # chained by the migration from a log whose seqs already had gaps).
        self._last_seq, self._last_hash = event.seq, event.hash
        self._recent[event.hash] = event.seq
        if len(self._recent) > self.REMEMBERED:
            self._recent.popitem(last=False)
        self.count += 1
        return None

    def check_head(self, head: tuple[int, str]) -> BrokenLink | None:
        """Whether the last row checked is the chain's head ``(seq, hash)``: a cut-off tail shows here."""
        head_seq, head_hash = head
        if head_seq > self._last_seq:
            first = self._last_seq + 1
            missing = f"seq {first}" if first == head_seq else f"seq {first} to {head_seq}"
            return BrokenLink(
                first, "deleted", f"{missing} missing at the end (the chain's head is seq {head_seq})"
            )
        if head_hash != self._last_hash:
            return BrokenLink(self._last_seq, "edited", "its hash is not the one the chain's head recorded")
        return None

    def _unlinked(self, event: AuditEvent) -> BrokenLink:
        """An intact row (its own hash holds, prev_hash included) that does not follow the last one."""
        if event.seq > self._last_seq + 1:
            first, last = self._last_seq + 1, event.seq - 1
            missing = f"seq {first}" if first == last else f"seq {first} to {last}"
            return BrokenLink(
                first, "deleted", f"{missing} missing: seq {event.seq} was chained to another row"
            )
        origin = self._recent.get(event.prev_hash)
        if origin is not None:
            return BrokenLink(
                event.seq, "reordered", f"it was written after seq {origin}, not after seq {self._last_seq}"
            )
        # Its stored prev_hash is the one it was written with, so the row before it was rewritten
        # with a hash of the editor's making.
        return BrokenLink(
            self._last_seq,
            "edited",
            f"its hash is not the one seq {event.seq} was chained to: the row was rewritten",
        )

    def _unsealed(self, event: AuditEvent) -> BrokenLink:
        """A row whose hash does not match its fields: moved from another seq, or edited."""
        origin = self._recent.get(event.prev_hash)
        candidates = [] if origin is None else [origin + 1]
        for step in range(1, _REORDER_WINDOW + 1):
            candidates += [event.seq - step, event.seq + step]
        for seq in candidates:
            if seq > 0 and seq != event.seq and link_hash(event.prev_hash, event, seq) == event.hash:
                return BrokenLink(event.seq, "reordered", f"this row was written as seq {seq}")
        if not event.hash:
            return BrokenLink(event.seq, "edited", "it has no hash")
        return BrokenLink(event.seq, "edited", "its fields do not match its hash")


def verify(events: Iterable[AuditEvent], head: tuple[int, str] | None = None) -> BrokenLink | None:
    """The first broken link of a whole log given in seq order (and its head, if known), or None."""
    verifier = ChainVerifier()
    for event in events:
        if (broken := verifier.check(event)) is not None:
            return broken
    return None if head is None else verifier.check_head(head)


async def read_log(
    log: AuditLog, *, after_seq: int = 0, until_seq: int | None = None
) -> AsyncIterator[AuditEvent]:
    """Every event after ``after_seq`` (up to ``until_seq``), oldest first, read a page at a time."""
    while until_seq is None or after_seq < until_seq:
        page = await log.audit_events(after_seq=after_seq, limit=PAGE)
        for event in page:
            if until_seq is not None and event.seq > until_seq:
                return
            yield event
        if len(page) < PAGE:
            return
        after_seq = page[-1].seq


async def verify_log(log: AuditLog) -> tuple[int, BrokenLink | None]:
    """How many events hold, and the first broken link of ``log`` (None: the chain is intact).

    The head is read first and the rows up to it after: rows the gateway appends meanwhile are
    beyond it and left for the next run, so a live gateway never looks like a cut-off tail.
    """
    head = await log.audit_head()
    verifier = ChainVerifier()
    async for event in read_log(log, until_seq=head[0]):
        if (broken := verifier.check(event)) is not None:
            return verifier.count, broken
    return verifier.count, verifier.check_head(head)


def event_record(event: AuditEvent) -> dict[str, Any]:
    """An event as the API, the export and the webhook sink show it (the same fields everywhere)."""
    return {
        "seq": event.seq,
        "at": event.at,
        "approval_id": event.approval_id,
        "event": event.event,
        "actor": event.actor,
        "channel": event.channel,
        "args_sha256": event.args_sha256,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
        "request_id": event.request_id,
    }
