"""Exact rate limits shared by every replica on one database, without a round trip per call.

The database holds the truth: per (counter, scope, window) a count ``used`` that a conditional
statement raises only while it stays within ``max`` (:class:`Quota`; on PostgreSQL
:class:`approvals.store.postgres_quota.PostgresQuota`). A replica admits a call in one of two ways:

- **Through the database**, one atomic take per call. This is how every call goes while a counter is
  quiet, for small limits and when a window is nearly used up, so no replica sits on quota another
  one needs when it matters.
- **From a lease**, in memory. When a replica takes quota for a counter again within
  ``seconds`` of its last take, the take also leases a block beside the call: room for up to
  ``max_block`` more calls like it (doubling from ``smallest_block`` while the counter stays busy),
  never more than ``share`` of what the window has left, and none when that comes to fewer than
  ``smallest_block`` calls (the names are :class:`approvals.shared_quota.LeaseTerms`'s fields;
  defaults 1 s, 0.1 s idle, 1/8, 4 and 256). Calls count against the block in memory until it runs
  out.

The bound on quota held away from the shared count: per (counter, scope, window) a replica holds at
most one block — at most ``max_block`` calls, and at most ``share`` of what was left when it took it —
and stops using it ``seconds`` after asking for it. What it has not used goes back to the shared
count after ``idle_seconds`` without a call, or when the lease ends, within one ``tick`` (0.05 s)
more: with the defaults, at most 256 calls' worth per counter and window, for at most about 1.05 s.
A replica that dies holding a block leaves it counted until its window ends: the limit may then
admit fewer calls than ``max`` in that window, never more.

Exactness: every admitted call was counted in the database (from the take itself, or from a block
that was), and ``used`` never exceeds ``max``, so the replicas together never admit more than
``max`` per window. A call the database refuses while other replicas hold blocks of the same window
waits for those blocks to be used or given back (at most their remaining lease time, polling every
``tick``) and tries again, so N calls spread over the replicas admit exactly min(N, max) — unless a
replica dies holding a block, as above.

Failing closed: a limited call that cannot be counted (the database is down or slow past
``timeout``) is refused with code ``limit_uncounted``; the outage is logged once, and once more
when counting works again. A call covered by a block already leased is still admitted: its quota
was counted. Calls without limits never touch the database. A give-back whose outcome is unknown
is not repeated (repeating could hand out quota twice): at worst that quota stays counted until the
window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from approvals.errors import StoreError
from approvals.limits import (
    LimitRefusal,
    Planned,
    Reservation,
    full_refusal,
    never_refusal,
    plan,
    uncounted_refusal,
)
from approvals.policy import MAX_WINDOW_SECONDS, Limit
from approvals.shared_quota import DEFAULT_TERMS, LeaseTerms, Quota, QuotaKey, Take

__all__ = ["SharedRateLimiter"]

logger = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0

_EMPTY = Reservation(())


@dataclass(slots=True)
class _Lease:
    held: float  # taken from the shared count, not yet used by a call here
    blocks: int  # blocks the database counts as out with this replica on the key
    until: float  # monotonic: no call is admitted from it after this
    last_used: float  # monotonic
    window_end: int  # epoch: the key means nothing after this


@dataclass(slots=True)
class _Need:
    amount: float  # the call's total on the key
    limit: Limit  # the tightest of its limits on the key
    end: int  # the window's end (epoch)


@dataclass(slots=True)
class _KeyLock:
    lock: asyncio.Lock
    users: int = 0


class SharedRateLimiter:
    """The `Counters` port over a shared :class:`Quota` (see the module docstring)."""

    def __init__(
        self,
        quota: Quota,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        terms: LeaseTerms = DEFAULT_TERMS,
        tick: float = 0.05,
        timeout: float = 2.0,
    ) -> None:
        self._quota = quota
        self._clock = clock
        self._mono = monotonic
        self._terms = terms
        self._lease_seconds = terms.seconds
        self._idle = terms.idle_seconds
        self._tick = tick
        self._smallest = terms.smallest_block
        self._max_block = terms.max_block
        self._timeout = timeout
        self._leases: dict[QuotaKey, _Lease] = {}
        self._wants: dict[tuple[str, str], tuple[float, int]] = {}  # (counter, scope) → (last take, calls)
        self._locks: dict[QuotaKey, _KeyLock] = {}
        self._tickets = itertools.count()
        # key → (ticket, amount) of the latest take refused there with no block out
        self._refused: dict[QuotaKey, tuple[int, float]] = {}
        self._failing = False
        self._settling = asyncio.Lock()  # close() waits for the tick's give-backs in flight
        self._task: asyncio.Task[None] | None = None
        self._last_prune = -math.inf

    async def start(self) -> None:
        """Start giving back idle and ended leases."""
        if self._task is None:
            self._task = asyncio.create_task(self._tick_forever(), name="approvals.shared_limits.tick")

    async def close(self) -> None:
        """Stop, and give every lease's unused quota back to the shared count."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.give_back_due(everything=True)

    async def reserve(
        self,
        limits: Sequence[Limit],
        *,
        grant: str,
        session: str,
        arguments: Mapping[str, object],
        now: float,
    ) -> Reservation | LimitRefusal:
        """Count one call against every limit, or against none if any of them is full."""
        if not limits:
            return _EMPTY
        planned = [plan(limit, grant, session, arguments, now) for limit in limits]
        needs = _needs(planned, now)
        if isinstance(needs, LimitRefusal):
            return needs
        reservation = Reservation(tuple((*key, amount or 0.0) for key, amount, _, _ in planned))
        if not needs or self._take_from_leases(needs, self._mono()):
            return reservation
        return await self._reserve_shared(needs, reservation, now)

    async def rollback(self, reservation: Reservation) -> None:
        """Take back exactly what ``reservation`` added: into this replica's lease if one is live,
        else into the shared count."""
        amounts: dict[QuotaKey, float] = {}
        for counter, key_scope, start, amount in reservation.entries:
            if amount > 0:
                key = (counter, key_scope, start)
                amounts[key] = amounts.get(key, 0.0) + amount
        for key, amount in amounts.items():
            await self._put_back(key, amount, self._leases.get(key))

    def held(self) -> dict[QuotaKey, float]:
        """The unused quota of every lease this replica holds, for metrics and tests."""
        return {key: lease.held for key, lease in self._leases.items()}

    async def give_back_due(self, *, everything: bool = False) -> None:
        """Give back leases idle for ``idle_seconds`` or past their end (every lease: ``everything``);
        forget those of ended windows. The tick runs this; tests call it to settle at once."""
        async with self._settling:
            mono, now = self._mono(), self._clock()
            due: list[tuple[QuotaKey, _Lease]] = []
            for key, lease in list(self._leases.items()):
                if lease.window_end <= now:
                    del self._leases[key]  # the window is over: its quota is of no use to anyone
                elif everything or mono >= lease.until or mono - lease.last_used >= self._idle:
                    del self._leases[key]
                    due.append((key, lease))
            for key, lease in due:
                if lease.held > 0:
                    self._halve_appetite(key)
                await self._give_back(key, lease.held, lease.blocks)
            self._refused.clear()  # only calls queued behind a refusal use it; they have had their turn
            stale = mono - self._lease_seconds
            self._wants = {k: v for k, v in self._wants.items() if v[0] >= stale}
            if now - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = now
                with contextlib.suppress(StoreError, TimeoutError):
                    async with asyncio.timeout(self._timeout):
                        await self._quota.prune(int(now) - MAX_WINDOW_SECONDS)

    # ---- taking -------------------------------------------------------------------------------

    def _take_from_leases(self, needs: Mapping[QuotaKey, _Need], mono: float) -> bool:
        """Count the call in memory if live leases cover every key; else change nothing."""
        leases = self._leases
        for key, need in needs.items():
            lease = leases.get(key)
            if lease is None or lease.until <= mono or lease.held < need.amount:
                return False
        for key, need in needs.items():
            lease = leases[key]
            lease.held -= need.amount
            lease.last_used = mono
        return True

    async def _reserve_shared(
        self, needs: dict[QuotaKey, _Need], reservation: Reservation, now: float
    ) -> Reservation | LimitRefusal:
        ticket = next(self._tickets)
        deadline: float | None = None
        while True:
            async with self._locked(needs):
                outcome = await self._take_shared(needs, now, ticket)
            if outcome is None:
                return reservation
            refusal, wait = outcome
            mono = self._mono()
            if wait <= 0:
                return refusal
            # Blocks leased to other replicas may come back: wait for them, bounded by their lease.
            grace = 2 * self._tick + 0.05
            if deadline is None:
                deadline = mono + min(wait, self._lease_seconds) + grace
            if mono >= deadline:
                return refusal
            await asyncio.sleep(min(self._tick, deadline - mono))
            ticket = next(self._tickets)

    async def _take_shared(
        self, needs: dict[QuotaKey, _Need], now: float, ticket: int
    ) -> tuple[LimitRefusal, float] | None:
        """One attempt under the keys' locks: None when admitted, else the refusal and how long
        blocks out with other replicas may keep quota that could still come back."""
        mono = self._mono()
        if self._take_from_leases(needs, mono):
            return None  # another call refilled the lease while this one waited for the lock
        local: list[tuple[QuotaKey, float, _Lease]] = []
        remote: list[tuple[QuotaKey, _Need, _Lease | None]] = []
        for key, need in needs.items():
            lease = self._leases.get(key)
            if lease is not None and lease.until > mono and lease.held >= need.amount:
                local.append((key, need.amount, lease))
                continue
            # A take sent after this call began, for no more than it, was refused with no block
            # out: since then only a rollback could have made room, which may as well have come
            # after this call. Refused too, without queueing one more statement behind a flood.
            refused = self._refused.get(key)
            if refused is not None and refused[0] > ticket and need.amount >= refused[1]:
                return full_refusal(need.limit, need.end - now), 0.0
            remote.append((key, need, lease))
        for _, amount, lease in local:
            lease.held -= amount  # tentatively: put back if another key refuses
        takes: list[Take] = []
        for key, need, lease in remote:
            if lease is not None:
                del self._leases[key]  # its rest goes back with this take
            takes.append(
                Take(
                    key,
                    need.amount,
                    need.limit.max,
                    give_back=lease.held if lease else 0.0,
                    ended_blocks=lease.blocks if lease else 0,
                    block_calls=self._appetite(key, mono),
                )
            )
        sent = next(self._tickets)
        try:
            async with asyncio.timeout(self._timeout):
                taken = await self._quota.take(takes, self._terms)
        except (StoreError, TimeoutError) as exc:
            self._note_failure(exc)
            await self._put_back_all(local)
            return uncounted_refusal(needs[takes[0].key].limit), 0.0
        except BaseException:
            # Cancelled (the agent went away): what this call took from its leases goes back to
            # them; what the database may have counted stays counted (fail closed).
            for key, amount, lease in local:
                if self._leases.get(key) is lease:
                    lease.held += amount
            raise
        self._note_success()
        if all(t.admitted for t in taken):
            for take, t in zip(takes, taken, strict=True):
                if t.leased > 0:
                    self._install(take.key, t.leased, mono, needs[take.key].end)
            for _key, _, lease in local:
                lease.last_used = mono
            return None
        await self._put_back_all(local)
        take, no = next((k, t) for k, t in zip(takes, taken, strict=True) if not t.admitted)
        need = needs[take.key]
        wait = no.lease_seconds_left if no.leases_out > 0 else 0.0
        if wait <= 0:
            self._refused[take.key] = (sent, take.amount)
        return full_refusal(need.limit, need.end - now), wait

    def _install(self, key: QuotaKey, leased: float, sent: float, window_end: int) -> None:
        # Timed from before the take was sent, so this replica stops using the block before the
        # database's lease_until (timed from when the statement ran) passes.
        until = sent + self._lease_seconds
        lease = self._leases.get(key)
        if lease is None:
            self._leases[key] = _Lease(leased, 1, until, sent, window_end)
        else:  # a second take for the key raced this one: one lease, both blocks
            lease.held += leased
            lease.blocks += 1
            lease.until = min(lease.until, until)

    def _appetite(self, key: QuotaKey, mono: float) -> int:
        """Calls to lease beside this one: none for a quiet counter; doubling while it stays busy."""
        scope = (key[0], key[1])
        last = self._wants.get(scope)
        calls = 0
        if last is not None and mono - last[0] <= self._lease_seconds:
            calls = min(self._max_block, max(self._smallest, 2 * last[1]))
        self._wants[scope] = (mono, calls)
        return calls

    def _halve_appetite(self, key: QuotaKey) -> None:
        scope = (key[0], key[1])
        last = self._wants.get(scope)
        if last is not None:
            self._wants[scope] = (last[0], last[1] // 2)

    # ---- giving back --------------------------------------------------------------------------

    async def _put_back_all(self, local: Iterable[tuple[QuotaKey, float, _Lease]]) -> None:
        for key, amount, lease in local:
            await self._put_back(key, amount, lease)

    async def _put_back(self, key: QuotaKey, amount: float, lease: _Lease | None) -> None:
        """Return ``amount`` counted on ``key``: to ``lease`` while it is this key's live lease (it
        goes back to the shared count with the lease), else to the shared count now."""
        if lease is not None and self._leases.get(key) is lease and lease.until > self._mono():
            lease.held += amount
            return
        await self._give_back(key, amount, 0)

    async def _give_back(self, key: QuotaKey, amount: float, blocks: int) -> None:
        if amount <= 0 and blocks == 0:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._quota.give_back(key, amount, ended_blocks=blocks)
        except (StoreError, TimeoutError) as exc:
            self._note_failure(exc)  # the quota stays counted until its window ends: fail closed
        else:
            self._note_success()

    def _note_failure(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            logger.error(
                "rate limits cannot be counted (%s): limited calls are refused until the database answers",
                exc or type(exc).__name__,
            )

    def _note_success(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("rate limits are counted again: the database answers")

    @contextlib.asynccontextmanager
    async def _locked(self, keys: Iterable[QuotaKey]) -> AsyncIterator[None]:
        """One call at a time per key in this replica, locked in key order (no deadlock)."""
        ordered = sorted(keys)
        entries = [self._locks.setdefault(key, _KeyLock(asyncio.Lock())) for key in ordered]
        for entry in entries:
            entry.users += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                for entry in entries:
                    await stack.enter_async_context(entry.lock)
                yield
        finally:
            for key, entry in zip(ordered, entries, strict=True):
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                await asyncio.shield(self.give_back_due())
            except Exception:
                logger.exception("giving back rate-limit leases failed")


def _needs(planned: Sequence[Planned], now: float) -> dict[QuotaKey, _Need] | LimitRefusal:
    """What the call adds to each key, with the tightest limit there; or the refusal no count can
    change (an unusable amount, or more than a limit allows in any window)."""
    needs: dict[QuotaKey, _Need] = {}
    for key, amount, end, limit in planned:
        if amount is None or amount > limit.max:
            return never_refusal(limit, amount)
        need = needs.get(key)
        if need is None:
            needs[key] = _Need(amount, limit, end)
        else:
            need.amount += amount
            if limit.max < need.limit.max:
                need.limit = limit
    for need in needs.values():
        if need.amount > need.limit.max:
            return full_refusal(need.limit, need.end - now)
    return {key: need for key, need in needs.items() if need.amount > 0}
