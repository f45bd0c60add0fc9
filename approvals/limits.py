"""Exact fixed-window rate limits, counted in memory and written behind to the store.

A limit allows at most ``max`` per window per scope. Windows are aligned to the UTC epoch
(``window_start = floor(now / size) * size``), so every process and every restart agrees on
where a window begins. A counter is keyed by ``(counter, scope_key, window_start)``: tools that
name the same counter share it.

:meth:`RateLimiter.reserve` is synchronous and checks every limit before it increments any, so
within one process it is exact and all-or-nothing however many tasks call it at once. Counts live
in a dict; keys changed since the last flush are written to the store as absolute values every
``flush_interval`` seconds (and on close), so a restart loses at most that much counting.
Windows that have ended are dropped from memory at flush time, and from the store once a day old.

This is the counter of one process (SQLite, or the in-memory store). Several replicas on PostgreSQL
share one exact count instead: :class:`approvals.shared_limits.SharedRateLimiter`, which plans a
call with the same :func:`plan` and refuses with the same :func:`full_refusal` and
:func:`never_refusal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from approvals.core.ports import CounterStore
from approvals.policy import (
    MAX_COUNT,
    MAX_WINDOW_SECONDS,
    WINDOW_SECONDS,
    Limit,
    Window,
    resolve_path,
    window_seconds,
    window_text,
)

__all__ = [
    "LimitRefusal",
    "Planned",
    "RateLimiter",
    "Reservation",
    "full_refusal",
    "never_refusal",
    "plan",
    "scope_key",
    "uncounted_refusal",
    "window_start",
]

logger = logging.getLogger(__name__)

_Key = tuple[str, str, int]  # (counter, scope_key, window_start)
Planned = tuple[_Key, float | None, int, Limit]  # (key, amount or None if unusable, window end, limit)

# How long an agent is told to wait when a shared count could not be reached.
UNCOUNTED_RETRY_SECONDS = 5.0

# No window is longer than MAX_WINDOW_SECONDS (policy.py refuses longer ones); rows older than
# it are of no use to anyone.
STORE_PRUNE_INTERVAL = 3600.0

_SCOPE_WORDS = {"grant": "per client", "session": "per session", "global": "for everyone"}


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    """A call refused by ``limit``; waiting ``retry_after`` seconds may let it through.

    ``retry_after`` is ``math.inf`` when waiting cannot help: the call's own amount is invalid or
    larger than the limit's ``max``. ``code`` tells the agent which: ``rate_limited`` (the limit is
    reached), or ``limit_uncounted`` (the shared count could not be reached, so the call was refused
    rather than let through uncounted).
    """

    limit: Limit
    retry_after: float
    message: str
    code: str = "rate_limited"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one call added to the counters, so it can be rolled back exactly."""

    entries: tuple[tuple[str, str, int, float], ...]  # (counter, scope_key, window_start, amount)


_EMPTY = Reservation(())


def window_start(now: float, window: Window | int) -> int:
    """Start (epoch seconds) of the ``window`` (a name, or seconds) that contains ``now``."""
    size = window_seconds(window)
    return int(now // size) * size


def scope_key(scope: str, *, grant: str, session: str) -> str:
    """The key that separates one scope's counts from another's.

    Grant and session keys carry a prefix so a grant that happens to be named like a session id
    (or ``*``) can never share counts with it.
    """
    if scope == "grant":
        return "grant:" + grant
    if scope == "session":
        return "session:" + session
    return "*"


class RateLimiter:
    """Rate limits for the whole process over one :class:`CounterStore`."""

    def __init__(
        self,
        store: CounterStore,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._clock = clock  # only to drop ended windows; reserve() is told `now`
        self._flush_interval = flush_interval
        self._counts: dict[_Key, float] = {}
        self._dirty: set[_Key] = set()
        self._ends: list[tuple[int, _Key]] = []  # heap of (window end, key) to drop ended windows
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_store_prune = -math.inf

    async def start(self) -> None:
        """Load the counts of current windows from the store and start writing behind."""
        since = self._clock() - MAX_WINDOW_SECONDS
        for counter, key_scope, start, value in await self._store.load_counters(since):
            key = (counter, key_scope, start)
            if key not in self._counts:
                self._counts[key] = value
                # The row does not say its window size; keep it as long as the longest window.
                heapq.heappush(self._ends, (start + MAX_WINDOW_SECONDS, key))
        if self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="approvals.limits.flush")

    async def close(self) -> None:
        """Stop the write-behind task and write what is left."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def reserve(
        self,
        limits: Sequence[Limit],
        *,
        grant: str,
        session: str,
        arguments: Mapping[str, object],
        now: float,
    ) -> Reservation | LimitRefusal:
        """The `Counters` port: :meth:`reserve_now` (async, so a shared database may back it)."""
        return self.reserve_now(limits, grant=grant, session=session, arguments=arguments, now=now)

    async def rollback(self, reservation: Reservation) -> None:
        """The `Counters` port: :meth:`rollback_now`."""
        self.rollback_now(reservation)

    def reserve_now(
        self,
        limits: Sequence[Limit],
        *,
        grant: str,
        session: str,
        arguments: Mapping[str, object],
        now: float,
    ) -> Reservation | LimitRefusal:
        """Count one call against every limit, or against none if any of them is full.

        Synchronous on purpose: with no await between the checks and the increments, concurrent
        tasks cannot both see the last free slot.
        """
        if not limits:
            return _EMPTY
        planned = [plan(limit, grant, session, arguments, now) for limit in limits]
        refusal = self._check(planned, now)
        if refusal is not None:
            return refusal
        counts = self._counts
        dirty = self._dirty
        entries = []
        for key, amount, end, _ in planned:
            assert amount is not None  # _check refuses any call with an unusable amount
            value = counts.get(key)
            if value is None:
                counts[key] = amount
                heapq.heappush(self._ends, (end, key))
            else:
                counts[key] = value + amount
            dirty.add(key)
            entries.append((*key, amount))
        return Reservation(tuple(entries))

    def _check(self, planned: list[Planned], now: float) -> LimitRefusal | None:
        """The refusal for this call, or None when it fits under every limit."""
        counts = self._counts
        refusal: LimitRefusal | None = None
        for key, amount, end, limit in planned:
            if amount is None or amount > limit.max:
                found: LimitRefusal | None = never_refusal(limit, amount)
            else:
                # Every limit on a key must hold for the call's total on that key: two limits of
                # one call can name the same counter, even with different maxima.
                added = amount if len(planned) == 1 else _added(planned, key)
                over = counts.get(key, 0.0) + added > limit.max
                found = full_refusal(limit, end - now) if over else None
            if found is not None and (refusal is None or found.retry_after > refusal.retry_after):
                refusal = found
        return refusal

    def rollback_now(self, reservation: Reservation) -> None:
        """Take back exactly what ``reservation`` added (a window already ended is left alone)."""
        counts = self._counts
        for counter, key_scope, start, amount in reservation.entries:
            key = (counter, key_scope, start)
            value = counts.get(key)
            if value is not None:
                # Clamped so a double rollback cannot hand out more than `max` later.
                counts[key] = max(0.0, value - amount)
                self._dirty.add(key)

    def count(self, counter: str, scope_key: str, window_start: int) -> float:
        """The current count of one window of one counter (0 when nothing was counted)."""
        return self._counts.get((counter, scope_key, window_start), 0.0)

    def snapshot(self) -> dict[tuple[str, str, int], float]:
        """A copy of every count held in memory, for metrics and tests."""
        return dict(self._counts)

    async def flush(self) -> None:
        """Write every count changed since the last flush, then drop windows that have ended."""
        async with self._flush_lock:
            # Ended windows go first, unwritten: no one reads them again, and dropping them even
            # when the store is down keeps memory bounded.
            now = self._clock()
            self._drop_ended(now)
            keys, self._dirty = self._dirty, set()
            # Values are read now, before the await: anything counted during the write marks
            # its key dirty again and goes out with the next flush.
            rows = [(k[0], k[1], k[2], self._counts[k]) for k in keys if k in self._counts]
            try:
                await self._store.save_counters(rows)
            except BaseException:
                self._dirty |= keys
                raise
            if now - self._last_store_prune >= STORE_PRUNE_INTERVAL:
                await self._store.prune_counters(int(now) - MAX_WINDOW_SECONDS)
                self._last_store_prune = now

    def _drop_ended(self, now: float) -> None:
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, key = heapq.heappop(ends)
            self._counts.pop(key, None)
            self._dirty.discard(key)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                # Shielded so close() stops this loop between flushes, never inside a write;
                # its own flush() then waits for this one on the lock.
                await asyncio.shield(self.flush())
            except Exception:
                # Keep counting in memory; the dirty keys are retried on the next tick.
                logger.exception("writing rate-limit counters to the store failed")


def plan(limit: Limit, grant: str, session: str, arguments: Mapping[str, object], now: float) -> Planned:
    """Where and how much ``limit`` would count this call (amount None: unusable)."""
    window = limit.window
    size = window if isinstance(window, int) else WINDOW_SECONDS[window]
    start = int(now // size) * size
    scope = limit.scope
    # scope_key() inlined: this runs for every limit of every call.
    key_scope = "grant:" + grant if scope == "grant" else "session:" + session if scope == "session" else "*"
    amount = 1.0 if limit.increment_from is None else _amount(limit, arguments)
    return (limit.counter, key_scope, start), amount, start + size, limit


def _added(planned: list[Planned], key: _Key) -> float:
    """What this call adds to ``key`` over all its limits."""
    total = 0.0
    for other, amount, _, _ in planned:
        if amount is not None and other == key:
            total += amount
    return total


def _amount(limit: Limit, arguments: Mapping[str, object]) -> float | None:
    """The call's numeric amount at ``limit.increment_from``, or None when it is not usable."""
    assert limit.increment_from is not None
    found, value = resolve_path(arguments, limit.increment_from)
    # bool is an int subclass, but `true` is not an amount. The range check comes before float(),
    # which overflows on an int past 1e308; it also keeps NaN and infinity out of the counts.
    if not found or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= MAX_COUNT else None


def full_refusal(limit: Limit, retry_after: float) -> LimitRefusal:
    seconds = max(1, math.ceil(retry_after))
    message = (
        f"Rate limit {limit.counter} reached: {limit.max:g} per {window_text(limit.window)} "
        f"{_SCOPE_WORDS[limit.scope]}. Retry in {seconds} s."
    )
    return LimitRefusal(limit, retry_after, message)


def never_refusal(limit: Limit, amount: float | None) -> LimitRefusal:
    """A refusal that waiting cannot fix: the amount itself is unusable or over ``max``."""
    path = limit.increment_from
    if amount is None:
        message = f"{path} must be a number from 0 to {MAX_COUNT} for rate limit {limit.counter}"
    elif path is None:
        message = (
            f"Rate limit {limit.counter} allows no calls ({limit.max:g} per {window_text(limit.window)})"
        )
    else:
        message = (
            f"{path} is larger than rate limit {limit.counter} allows in any {window_text(limit.window)} "
            f"({limit.max:g} {_SCOPE_WORDS[limit.scope]})"
        )
    return LimitRefusal(limit, math.inf, message)


def uncounted_refusal(limit: Limit) -> LimitRefusal:
    """A refusal because the shared count of ``limit`` could not be reached: failing closed."""
    seconds = math.ceil(UNCOUNTED_RETRY_SECONDS)
    message = (
        f"Rate limit {limit.counter} could not be counted: the database the gateway's replicas share "
        f"did not answer, so the call was not made. Retry in {seconds} s."
    )
    return LimitRefusal(limit, UNCOUNTED_RETRY_SECONDS, message, code="limit_uncounted")
