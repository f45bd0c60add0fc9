"""The audit webhook sink: follows the audit log and POSTs it, in signed batches, to a SIEM.

    store (audit log) ──read after the cursor──▶ batch ──POST, signed──▶ receiver
          ▲                                                  │ 2xx
          └──────── advance the cursor (the store's, shared) ◀┘   else: retry, backing off

Its own task, beside the gateway: a decision never waits for it, and a slow or failing receiver
only delays the copies. One batch (at most ``batch`` events) is in memory at a time.

Where it has delivered up to is kept in the store (``audit_sinks``), with a lease: of several
processes or replicas on one store, only the lease holder sends, and it renews the lease before
every attempt. The request timeout is well under the lease, so a holder that stalls has given up
its request before another can take over. Delivery is at least once: a receiver that stored a batch
but whose answer was lost gets it again — every event carries its seq and hash to deduplicate on.

The request::

    POST <url>
    Content-Type: application/json
    X-Approvals-Timestamp: <unix seconds, also the body's "sent_at">
    X-Approvals-Signature: sha256=<hex HMAC-SHA256 of the body with the shared secret>

    {"sink": "webhook", "first_seq": 41, "last_seq": 42, "sent_at": 1767225600,
     "events": [<approvals.audit_chain.event_record>, …]}

The signature covers the body, and the body the timestamp: a receiver checks the signature, that
the header equals ``sent_at``, and that it is recent, to refuse forgeries and replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from approvals.audit_chain import AuditLog, event_record
from approvals.core.model import AuditEvent
from approvals.core.ports import AuditSinkStore, ChangeFeed
from approvals.errors import StoreError

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AuditSink",
    "DeliveryRefusedError",
    "SinkStore",
    "WebhookTarget",
    "signature",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Approvals-Signature"
TIMESTAMP_HEADER = "X-Approvals-Timestamp"
# How long close() lets a batch in flight finish: it normally takes milliseconds, and a receiver
# that hangs must not hold up the gateway's shutdown (the batch is then sent again later).
CLOSE_WAIT_SECONDS = 2.0


class SinkStore(AuditLog, AuditSinkStore, Protocol):
    """What the sink needs of the store: the log, and its cursor with the lease."""


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where the sink sends, and the secret it signs with (from the environment, never a file)."""

    url: str
    secret: str = field(repr=False)
    name: str = "webhook"  # the cursor's name in the store: one per target


def signature(secret: str, body: bytes) -> str:
    """The ``X-Approvals-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class AuditSink:
    """Delivers the audit log to one webhook. :meth:`start`, then :meth:`close` on shutdown."""

    def __init__(
        self,
        store: SinkStore,
        target: WebhookTarget,
        *,
        feed: ChangeFeed | None = None,
        clock: Callable[[], float] = time.time,
        batch: int = 100,
        poll_seconds: float = 1.0,
        lease_seconds: float = 30.0,
        timeout_seconds: float = 10.0,
        first_backoff: float = 0.5,
        max_backoff: float = 60.0,
        owner: str | None = None,
    ) -> None:
        if timeout_seconds >= lease_seconds:
            raise ValueError("the request timeout must be shorter than the lease")
        self._store = store
        self._target = target
        self._feed = feed
        self._clock = clock
        self._batch = batch
        self._poll = poll_seconds
        self._lease = lease_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self.owner = owner or uuid.uuid4().hex  # this process, as the lease names it
        self._wake = asyncio.Event()  # new events may be there: look now
        self._stop = asyncio.Event()  # close(): finish the batch in flight, then end
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start following the log (in tasks of its own)."""
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        self._tasks.append(asyncio.create_task(self._run(), name=f"audit sink {self._target.name}"))
        if self._feed is not None:
            self._tasks.append(asyncio.create_task(self._follow_feed(), name="audit sink wake-ups"))

    def nudge(self) -> None:
        """Look for new events now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop after the batch in flight (if it ends within CLOSE_WAIT_SECONDS), and give up the
        lease so another process takes over at once.

        Finishing the batch first records its delivery: cancelling between the receiver's answer
        and the cursor's advance would make the next holder send it again.
        """
        self._stop.set()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tasks[0]), CLOSE_WAIT_SECONDS)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()
        try:
            await self._store.release_audit_sink(self._target.name, self.owner)
        except Exception:  # shutting down: the lease simply runs out
            log.exception("could not release the audit sink's lease")

    async def _follow_feed(self) -> None:
        """Every approval change may have appended events: look at once instead of at the next poll."""
        assert self._feed is not None
        while True:
            listener = self._feed.listen()
            try:
                async for _ in listener:
                    self._wake.set()
            finally:
                listener.close()
            # A listener that fell behind is ended; a new one picks up (the log has the events).

    async def _run(self) -> None:
        backoff = self._first_backoff
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and await self._deliver_one_batch():
                    pass
            except (aiohttp.ClientError, TimeoutError, DeliveryRefusedError, StoreError) as exc:
                log.warning(
                    "audit sink %s: %s; retrying in %.1f s",
                    self._target.name,
                    str(exc) or type(exc).__name__,
                    backoff,
                )
            except Exception:  # the top of the task: a bug; log it whole and keep following
                log.exception("audit sink %s failed; retrying in %.1f s", self._target.name, backoff)
            else:
                backoff = self._first_backoff
                await self._wait(self._wake, self._poll)
                self._wake.clear()
                continue
            # Not cut short by new events (the receiver needs the rest), only by close().
            await self._wait(self._stop, backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        """Until ``event`` is set (or close() is called), for at most ``seconds``."""
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((stop, wake), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()

    async def _deliver_one_batch(self) -> bool:
        """Send the next batch once (raising on failure); whether one was delivered."""
        name = self._target.name
        position = await self._store.claim_audit_sink(name, self.owner, self._clock(), self._lease)
        if position is None:
            return False  # another process delivers; this one looks again later
        events = await self._store.audit_events(after_seq=position, limit=self._batch)
        if not events:
            return False
        await self._post(events)
        if not await self._store.advance_audit_sink(
            name, self.owner, events[-1].seq, self._clock(), self._lease
        ):
            log.warning("audit sink %s: lease lost after sending up to seq %d", name, events[-1].seq)
            return False
        return True

    async def _post(self, events: list[AuditEvent]) -> None:
        assert self._http is not None
        sent_at = int(self._clock())
        body = json.dumps(
            {
                "sink": self._target.name,
                "first_seq": events[0].seq,
                "last_seq": events[-1].seq,
                "sent_at": sent_at,
                "events": [event_record(e) for e in events],
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(sent_at),
            SIGNATURE_HEADER: signature(self._target.secret, body),
        }
        async with self._http.post(self._target.url, data=body, headers=headers) as response:
            if not 200 <= response.status < 300:
                raise DeliveryRefusedError(f"{self._target.url} answered {response.status}")


class DeliveryRefusedError(Exception):
    """The receiver answered with a status other than 2xx."""
