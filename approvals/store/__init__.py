"""Durable state of the gateway behind one Protocol.

Everything the gateway must not lose — rate-limit counters now; approvals, the audit log and kept
results as they are added — goes through the ``Store`` protocols below. There is one
implementation today, :class:`approvals.store.sqlite.SqliteStore` (aiosqlite, one embedded file,
the default), and the protocols are shaped so a PostgreSQL implementation can follow for
scale-out: every method is one round trip or one transaction, values are plain tuples, and
nothing relies on SQLite-only behaviour (writes are upserts and conditional updates).

Errors::

    StoreError              any failure of the backing database (I/O, lock timeout, bad schema);
                            callers fail closed: a store error never releases a call
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

__all__ = ["CounterRow", "CounterStore", "Store", "StoreError"]

# (counter, scope_key, window_start, value): one window of one counter for one scope.
CounterRow: TypeAlias = tuple[str, str, int, float]


class StoreError(Exception):
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


class Store(CounterStore, Protocol):
    """The whole store the app opens once and closes on shutdown.

    Each concern is its own small protocol (``CounterStore`` now; approvals and audit next) so a
    component depends only on what it uses; ``Store`` is their union, which a backend implements.
    """

    async def close(self) -> None:
        """Finish pending work and release the database."""
        ...
