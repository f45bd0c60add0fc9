"""The port of shared rate limits: a count per (counter, scope, window) that every replica takes
from atomically, with room leased beside a call when a counter is busy.

:class:`approvals.shared_limits.SharedRateLimiter` uses it; on PostgreSQL
:class:`approvals.store.postgres_quota.PostgresQuota` implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["DEFAULT_TERMS", "LeaseTerms", "Quota", "QuotaKey", "Take", "Taken"]

QuotaKey = tuple[str, str, int]  # (counter, scope_key, window_start)


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """When a replica leases a block of a window's quota, how big, and for how long."""

    seconds: float = 1.0  # a block is used for at most this long after it was asked for
    idle_seconds: float = 0.1  # and given back after this long without a call
    share: float = 0.125  # of what the window has left, at most, in one block
    smallest_block: int = 4  # calls: a smaller block is not leased (it saves too few round trips)
    max_block: int = 256  # calls


DEFAULT_TERMS = LeaseTerms()


@dataclass(frozen=True, slots=True)
class Take:
    """One key's part of a call: its amount, and what this replica gives back and asks for."""

    key: QuotaKey
    amount: float  # the call's own amount on this key (> 0)
    max: float
    give_back: float = 0.0  # this replica's unused leased quota on the key, returned in the same step
    ended_blocks: int = 0  # this replica's blocks on the key that end in this step
    block_calls: int = 0  # how many more calls of `amount` to lease beside it (0: this call only)


@dataclass(frozen=True, slots=True)
class Taken:
    """What the database did with one :class:`Take`."""

    admitted: bool
    leased: float  # quota leased beside the call (0: none)
    leases_out: int  # blocks still out with replicas (other ones, when this take was refused)
    lease_seconds_left: float  # until every block out is used or given back (database clock)


class Quota(Protocol):
    """The shared count (on PostgreSQL: :class:`approvals.store.postgres_quota.PostgresQuota`)."""

    async def take(self, takes: Sequence[Take], terms: LeaseTerms) -> list[Taken]:
        """Take every key's amount or none, atomically with respect to every replica, each with the
        block ``terms`` allow beside it; give-backs in the takes apply either way."""
        ...

    async def give_back(self, key: QuotaKey, amount: float, *, ended_blocks: int = 0) -> None:
        """Return ``amount`` to the key's count, and end ``ended_blocks`` of this replica's blocks."""
        ...

    async def prune(self, before: int) -> None:
        """Forget every window that started before ``before``."""
        ...
