"""Rate-limit quota shared by every replica on PostgreSQL: one row per (counter, scope, window).

The row's ``used`` is everything taken out of the window's ``max``: the calls admitted, plus the
blocks leased to replicas that count them in memory (:mod:`approvals.shared_limits` decides when to
lease and how much). Every change is one statement on the row, so its row lock makes it atomic
across replicas: a take adds only when ``used + amount <= max`` still holds on the row as it is
when the statement runs, so no interleaving of replicas can take more than ``max``.

    used         calls admitted + quota leased and not yet given back; never above max
    leases       blocks out with replicas (+1 per block leased, -1 when its holder gives it back)
    lease_until  database clock (epoch) by which every block leased so far is used or given back
    last_take    what the row's latest take added: 0 means refused. RETURNING sees only the new
                 row, so this is how one statement both decides and says what it decided.

Failures raise :class:`approvals.errors.StoreError`; the caller refuses the call (fail closed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from approvals.errors import StoreError
from approvals.shared_quota import LeaseTerms, QuotaKey, Take, Taken

__all__ = ["MIGRATION", "PostgresQuota"]

# A connection the server ended (pg_terminate_backend) can also surface as InternalClientError.
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

# Migration 4 of approvals.store.postgres.MIGRATIONS.
MIGRATION = """
    CREATE TABLE rate_quota (
        counter      TEXT NOT NULL,
        scope_key    TEXT NOT NULL,
        window_start BIGINT NOT NULL,
        used         DOUBLE PRECISION NOT NULL CHECK (used >= 0),
        leases       INTEGER NOT NULL DEFAULT 0,
        lease_until  DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_take    DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (counter, scope_key, window_start)
    );
"""

_NOW = "extract(epoch FROM clock_timestamp())"

# The take's parameters, typed once here: PostgreSQL cannot infer them inside CASE and arithmetic.
# $1-$3 the key; the give-back applies whether or not the call fits: it is quota the replica stops using.
_AMOUNT = "$4::float8"  # the call's amount (> 0)
_MAX = "$5::float8"
_GIVEN = "$6::float8"  # this replica's unused leased quota, given back
_ENDED = "$7::int"  # blocks of this replica that end here
_WANTED = "$8::float8"  # calls wanted in a block beside this one
_SECONDS = "$9::float8"  # how long a block lives
_SHARE = "$10::float8"  # of what would be left, at most, in one block
_SMALLEST = "$11::float8"  # calls: no smaller block is leased


def _block(used: str) -> str:
    """SQL for the block leased beside the call when the row's count is ``used``: up to the
    calls wanted (of the call's amount each), no more than a share of what would be left, and
    nothing when that comes to fewer than the smallest block."""
    calls = f"least({_WANTED}, floor(({_MAX} - ({used}) - {_AMOUNT}) * {_SHARE} / {_AMOUNT}))"
    return f"(CASE WHEN {calls} >= {_SMALLEST} THEN {calls} * {_AMOUNT} ELSE 0 END)"


_AFTER_GIVE_BACK = f"greatest(q.used - {_GIVEN}, 0)"
_FITS = f"({_AFTER_GIVE_BACK} + {_AMOUNT} <= {_MAX})"
_BLOCK = _block(_AFTER_GIVE_BACK)
_FIRST_FITS = f"({_AMOUNT} <= {_MAX})"
_FIRST_BLOCK = _block("0")

_TAKE = f"""
INSERT INTO rate_quota AS q (counter, scope_key, window_start, used, leases, lease_until, last_take)
VALUES ($1, $2, $3,
        CASE WHEN {_FIRST_FITS} THEN {_AMOUNT} + {_FIRST_BLOCK} ELSE 0 END,
        CASE WHEN {_FIRST_FITS} AND {_FIRST_BLOCK} > 0 THEN 1 ELSE 0 END,
        CASE WHEN {_FIRST_FITS} AND {_FIRST_BLOCK} > 0 THEN {_NOW} + {_SECONDS} ELSE 0 END,
        CASE WHEN {_FIRST_FITS} THEN {_AMOUNT} + {_FIRST_BLOCK} ELSE 0 END)
ON CONFLICT (counter, scope_key, window_start) DO UPDATE SET
    used = CASE WHEN {_FITS} THEN {_AFTER_GIVE_BACK} + {_AMOUNT} + {_BLOCK} ELSE {_AFTER_GIVE_BACK} END,
    leases = greatest(q.leases - {_ENDED}, 0) + CASE WHEN {_FITS} AND {_BLOCK} > 0 THEN 1 ELSE 0 END,
    lease_until = CASE WHEN {_FITS} AND {_BLOCK} > 0
                       THEN greatest(q.lease_until, {_NOW} + {_SECONDS}) ELSE q.lease_until END,
    last_take = CASE WHEN {_FITS} THEN {_AMOUNT} + {_BLOCK} ELSE 0 END
RETURNING last_take, leases, lease_until - {_NOW}
"""  # noqa: S608 - every value is bound; only fixed SQL fragments are formatted in

_GIVE_BACK = """
UPDATE rate_quota SET used = greatest(used - $4, 0), leases = greatest(leases - $5, 0)
WHERE counter = $1 AND scope_key = $2 AND window_start = $3
"""


class PostgresQuota:
    """The shared counts on a PostgreSQL pool (a replica's own, or the store's)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def take(self, takes: Sequence[Take], terms: LeaseTerms) -> list[Taken]:
        """Take every key's amount, or none: one statement for one key; for several, one
        transaction in key order (two calls locking the same rows in the same order cannot
        deadlock) that takes back what it took when any key refuses. Give-backs stand either way."""
        ordered = sorted(takes, key=lambda t: t.key)
        async with self._connection("count a rate limit") as conn:
            if len(ordered) == 1:
                return [await self._take_one(conn, ordered[0], terms)]
            async with conn.transaction():
                done = [await self._take_one(conn, take, terms) for take in ordered]
                if not all(taken.admitted for taken in done):
                    for take, taken in zip(ordered, done, strict=True):
                        if taken.admitted:
                            await self._give_back(
                                conn, take.key, take.amount + taken.leased, int(taken.leased > 0)
                            )
        by_key = {take.key: taken for take, taken in zip(ordered, done, strict=True)}
        return [by_key[take.key] for take in takes]

    async def give_back(self, key: QuotaKey, amount: float, *, ended_blocks: int = 0) -> None:
        """Return ``amount`` to the shared count (a rollback, or a lease's unused rest)."""
        async with self._connection("give back rate-limit quota") as conn:
            await self._give_back(conn, key, amount, ended_blocks)

    async def count(self, key: QuotaKey) -> tuple[float, int]:
        """``(used, leases)`` of one window, ``(0, 0)`` if nothing was taken: for tests and metrics."""
        async with self._connection("read a rate limit") as conn:
            row = await conn.fetchrow(
                "SELECT used, leases FROM rate_quota"
                " WHERE counter = $1 AND scope_key = $2 AND window_start = $3",
                *key,
            )
        return (0.0, 0) if row is None else (float(row[0]), int(row[1]))

    async def prune(self, before: int) -> None:
        """Delete every window that started before ``before`` (no window is that long)."""
        async with self._connection("prune rate-limit quota") as conn:
            await conn.execute("DELETE FROM rate_quota WHERE window_start < $1", before)

    async def _take_one(self, conn: asyncpg.Connection, take: Take, terms: LeaseTerms) -> Taken:
        row = await conn.fetchrow(
            _TAKE,
            *take.key,
            float(take.amount),
            float(take.max),
            float(take.give_back),
            take.ended_blocks,
            float(take.block_calls),
            float(terms.seconds),
            float(terms.share),
            float(terms.smallest_block),
        )
        assert row is not None  # an upsert always returns its row
        added = float(row[0])
        return Taken(added > 0, max(0.0, added - take.amount), int(row[1]), max(0.0, float(row[2])))

    async def _give_back(self, conn: asyncpg.Connection, key: QuotaKey, amount: float, blocks: int) -> None:
        await conn.execute(_GIVE_BACK, *key, float(amount), blocks)

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"cannot {what}: {exc}") from exc
