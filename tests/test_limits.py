"""Rate limits: windows, scopes, shared counters, all-or-nothing reservations and write-behind."""

from __future__ import annotations

import asyncio
import math
import pathlib
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from approvals.core.ports import CounterRow, CounterStore
from approvals.errors import StoreError
from approvals.limits import LimitRefusal, RateLimiter, Reservation, scope_key, window_start
from approvals.policy import WINDOW_SECONDS, Limit, Scope, Window
from approvals.store.sqlite import SqliteStore

_Key = tuple[str, str, int]

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z: a whole minute, hour and second, but not a whole day


class MemoryCounterStore:
    """An in-memory CounterStore that records what was written."""

    def __init__(self) -> None:
        self.rows: dict[_Key, float] = {}
        self.saves: list[list[CounterRow]] = []

    async def load_counters(self, since: float) -> list[CounterRow]:
        return [(c, s, w, v) for (c, s, w), v in self.rows.items() if w >= since]

    async def save_counters(self, rows: Sequence[CounterRow]) -> None:
        self.saves.append(list(rows))
        for c, s, w, v in rows:
            self.rows[c, s, w] = v

    async def prune_counters(self, before: int) -> None:
        self.rows = {k: v for k, v in self.rows.items() if k[2] >= before}


def _limiter(store: CounterStore | None = None, now: float = NOW) -> RateLimiter:
    return RateLimiter(store or MemoryCounterStore(), clock=lambda: now)


def _reserve(
    limiter: RateLimiter,
    limits: Sequence[Limit],
    *,
    now: float = NOW,
    grant: str = "agent",
    session: str = "s1",
    arguments: Mapping[str, object] | None = None,
) -> Reservation | LimitRefusal:
    return limiter.reserve_now(limits, grant=grant, session=session, arguments=arguments or {}, now=now)


def _passes(
    limiter: RateLimiter,
    limits: Sequence[Limit],
    *,
    now: float = NOW,
    grant: str = "agent",
    session: str = "s1",
) -> int:
    """How many calls in a row get through before the first refusal (at most 100)."""
    for n in range(100):
        if isinstance(_reserve(limiter, limits, now=now, grant=grant, session=session), LimitRefusal):
            return n
    return 100


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("second", 1_700_000_042),
        ("minute", 1_700_000_040),
        ("hour", 1_699_999_200),
        ("day", 1_699_920_000),
    ],
)
def test_windows_align_to_the_epoch(window: Window, expected: int) -> None:
    """Every window starts at a multiple of its size since 1970-01-01T00:00:00Z."""
    now = 1_700_000_042.75
    assert window_start(now, window) == expected
    limiter = _limiter()
    reservation = _reserve(limiter, [Limit("c", window, 5, "global")], now=now)
    assert isinstance(reservation, Reservation)
    assert reservation.entries == (("c", "*", expected, 1.0),)


@pytest.mark.parametrize("window", ["second", "minute", "hour", "day"])
def test_a_new_window_starts_from_zero(window: Window) -> None:
    """A full window refuses up to its last instant; the next window has room again."""
    size = WINDOW_SECONDS[window]
    start = window_start(NOW, window)
    limiter = _limiter()
    limits = [Limit("c", window, 2, "global")]
    assert _passes(limiter, limits, now=start) == 2
    assert isinstance(_reserve(limiter, limits, now=start + size - 0.001), LimitRefusal)
    assert _passes(limiter, limits, now=start + size) == 2


@pytest.mark.parametrize("seconds", [7, 90, 86400])
def test_a_window_of_any_seconds_aligns_to_the_epoch_and_rolls_over(seconds: int) -> None:
    """A window given in seconds starts at a multiple of it and admits `max` again in the next one."""
    start = window_start(NOW, seconds)
    assert start % seconds == 0
    assert start <= NOW < start + seconds
    limiter = _limiter()
    limits = [Limit("c", seconds, 2, "session")]
    assert _passes(limiter, limits, now=start) == 2
    refusal = _reserve(limiter, limits, now=start + seconds - 0.5)
    assert isinstance(refusal, LimitRefusal)
    assert refusal.message == f"Rate limit c reached: 2 per {seconds} s per session. Retry in 1 s."
    assert _passes(limiter, limits, now=start + seconds) == 2


async def test_seconds_windows_are_written_behind_and_reloaded(tmp_path: pathlib.Path) -> None:
    """Counts of a 90-second window reach SQLite and a restarted limiter in the same window sees them."""
    path = tmp_path / "approvals.db"
    limits = [Limit("c", 90, 3, "grant")]
    start = window_start(NOW, 90)
    store = await SqliteStore.open(path)
    first = RateLimiter(store, clock=lambda: start + 1.0)
    await first.start()
    assert _passes(first, limits, now=start + 1.0) == 3
    await first.close()
    await store.close()
    store = await SqliteStore.open(path)
    second = RateLimiter(store, clock=lambda: start + 2.0)
    await second.start()
    try:
        assert second.count("c", "grant:agent", start) == 3
        assert _passes(second, limits, now=start + 2.0) == 0
        assert _passes(second, limits, now=start + 90.0) == 3
    finally:
        await second.close()
        await store.close()


def test_scopes_isolate_counts() -> None:
    """grant counts per client, session per session, global across everyone."""
    limiter = _limiter()
    per_grant = [Limit("c", "minute", 1, "grant")]
    assert _passes(limiter, per_grant, grant="a", session="x") == 1
    assert _passes(limiter, per_grant, grant="b", session="x") == 1
    assert _passes(limiter, per_grant, grant="a", session="y") == 0

    per_session = [Limit("d", "minute", 1, "session")]
    assert _passes(limiter, per_session, grant="a", session="x") == 1
    assert _passes(limiter, per_session, grant="b", session="y") == 1
    assert _passes(limiter, per_session, grant="b", session="x") == 0

    everyone = [Limit("e", "minute", 1, "global")]
    assert _passes(limiter, everyone, grant="a", session="x") == 1
    assert _passes(limiter, everyone, grant="b", session="y") == 0


def test_grant_and_session_with_the_same_name_do_not_share() -> None:
    """A grant named like a session id never shares that session's counts."""
    assert scope_key("grant", grant="x", session="x") != scope_key("session", grant="x", session="x")
    limiter = _limiter()
    assert _passes(limiter, [Limit("c", "minute", 1, "grant")], grant="x", session="x") == 1
    assert _passes(limiter, [Limit("c", "minute", 1, "session")], grant="x", session="x") == 1


def test_tools_naming_the_same_counter_share_it() -> None:
    """Two tools' limits with one counter name draw on one count."""
    limiter = _limiter()
    image = [Limit("media", "minute", 3, "grant")]
    video = [Limit("media", "minute", 3, "grant")]
    assert _passes(limiter, image) == 3
    assert _passes(limiter, video) == 0


def test_increment_from_adds_the_amount() -> None:
    """A limit with increment_from counts the argument's value, not the number of calls."""
    limiter = _limiter()
    spend = [Limit("refunds", "day", 1000, "grant", increment_from="args.amount")]
    first = _reserve(limiter, spend, arguments={"amount": 600})
    assert isinstance(first, Reservation)
    assert first.entries[0][3] == 600.0
    assert isinstance(_reserve(limiter, spend, arguments={"amount": 400.5}), LimitRefusal)
    assert isinstance(_reserve(limiter, spend, arguments={"amount": 400}), Reservation)
    assert isinstance(_reserve(limiter, spend, arguments={"amount": 0}), Reservation)
    assert isinstance(_reserve(limiter, spend, arguments={"amount": 1}), LimitRefusal)


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"amount": -1},
        {"amount": True},
        {"amount": "5"},
        {"amount": math.nan},
        {"amount": math.inf},
        {"amount": 10**400},
        {"amount": 2**53 + 1},
    ],
)
def test_increment_from_refuses_unusable_amounts(arguments: Mapping[str, object]) -> None:
    """A missing, non-numeric, boolean, negative, non-finite or huge amount is refused for good
    with a tool-error message (never an exception) and counts nothing."""
    limiter = _limiter()
    spend = Limit("refunds", "day", 1000, "grant", increment_from="args.amount")
    calls = Limit("calls", "minute", 10, "grant")
    refusal = _reserve(limiter, [calls, spend], arguments=arguments)
    assert isinstance(refusal, LimitRefusal)
    assert refusal.limit == spend
    assert refusal.retry_after == math.inf
    assert refusal.message == "args.amount must be a number from 0 to 9007199254740992 for rate limit refunds"
    assert limiter.snapshot() == {}


def test_an_amount_over_max_can_never_pass() -> None:
    """An amount larger than the whole limit is refused with an infinite retry_after."""
    limiter = _limiter()
    spend = [Limit("refunds", "day", 1000, "grant", increment_from="args.amount")]
    refusal = _reserve(limiter, spend, arguments={"amount": 5000})
    assert isinstance(refusal, LimitRefusal)
    assert refusal.retry_after == math.inf


def test_a_refusal_consumes_no_other_limit() -> None:
    """All or nothing: when the second limit is full, the first is not counted either."""
    limiter = _limiter()
    wide = Limit("all_calls", "minute", 100, "grant")
    narrow = Limit("images", "minute", 1, "grant")
    assert isinstance(_reserve(limiter, [wide, narrow]), Reservation)
    refusal = _reserve(limiter, [wide, narrow])
    assert isinstance(refusal, LimitRefusal)
    assert refusal.limit == narrow
    assert limiter.count("all_calls", "grant:agent", window_start(NOW, "minute")) == 1


def test_one_call_on_one_counter_twice_counts_both() -> None:
    """Two limits of one call on the same counter key are checked against their sum."""
    limiter = _limiter()
    twice = [Limit("c", "minute", 3, "grant"), Limit("c", "minute", 3, "grant")]
    assert isinstance(_reserve(limiter, twice), Reservation)
    assert isinstance(_reserve(limiter, twice), LimitRefusal)
    assert limiter.count("c", "grant:agent", window_start(NOW, "minute")) == 2


def test_the_refusal_names_the_limit_with_the_longest_wait() -> None:
    """Several full limits: the refusal reports the one that frees up last."""
    limiter = _limiter()
    per_minute = Limit("m", "minute", 1, "grant")
    per_hour = Limit("h", "hour", 1, "grant")
    assert isinstance(_reserve(limiter, [per_minute, per_hour]), Reservation)
    refusal = _reserve(limiter, [per_minute, per_hour])
    assert isinstance(refusal, LimitRefusal)
    assert refusal.limit == per_hour


def test_rollback_restores_the_count() -> None:
    """Rolling back a reservation gives its slot to the next call."""
    limiter = _limiter()
    limits = [Limit("c", "minute", 1, "grant"), Limit("spend", "day", 10, "grant", increment_from="args.n")]
    reservation = _reserve(limiter, limits, arguments={"n": 10})
    assert isinstance(reservation, Reservation)
    assert isinstance(_reserve(limiter, limits, arguments={"n": 0}), LimitRefusal)
    limiter.rollback_now(reservation)
    assert set(limiter.snapshot().values()) == {0.0}
    assert isinstance(_reserve(limiter, limits, arguments={"n": 10}), Reservation)


def test_empty_limits_reserve_nothing() -> None:
    """A call with no limits gets an empty reservation and touches no counter."""
    limiter = _limiter()
    reservation = _reserve(limiter, [])
    assert reservation == Reservation(())
    limiter.rollback_now(reservation)
    assert limiter.snapshot() == {}


def test_retry_after_and_message() -> None:
    """The refusal says which limit, how many per which window and scope, and when to retry."""
    limiter = _limiter()
    now = 1_700_000_040.0 + 36.2  # 23.8 s before the minute ends
    limit = Limit("generate_image_rate", "minute", 10, "grant")
    assert _passes(limiter, [limit], now=now) == 10
    refusal = _reserve(limiter, [limit], now=now)
    assert isinstance(refusal, LimitRefusal)
    assert refusal.retry_after == pytest.approx(23.8)
    expected = "Rate limit generate_image_rate reached: 10 per minute per client. Retry in 24 s."
    assert refusal.message == expected


@pytest.mark.parametrize(("scope", "words"), [("session", "per session"), ("global", "for everyone")])
def test_message_names_the_scope(scope: Scope, words: str) -> None:
    """Session and global limits say so, and a wait under a second still says 1 s."""
    limiter = _limiter()
    limit = Limit("c", "second", 2.5, scope)
    assert _passes(limiter, [limit], now=NOW + 0.9) == 2
    refusal = _reserve(limiter, [limit], now=NOW + 0.9)
    assert isinstance(refusal, LimitRefusal)
    assert refusal.message == f"Rate limit c reached: 2.5 per second {words}. Retry in 1 s."


async def test_concurrent_calls_get_exactly_max() -> None:
    """200 interleaved tasks against max 37: exactly 37 get through."""
    limiter = _limiter()
    limits = [Limit("c", "minute", 37, "global")]

    async def call() -> Reservation | LimitRefusal:
        await asyncio.sleep(0)
        result = _reserve(limiter, limits)
        await asyncio.sleep(0)
        return result

    results = await asyncio.gather(*(call() for _ in range(200)))
    assert sum(isinstance(r, Reservation) for r in results) == 37
    assert limiter.count("c", "*", window_start(NOW, "minute")) == 37


async def test_flush_writes_absolute_values_of_changed_counters() -> None:
    """flush writes changed keys only, as absolute counts, and a rollback is written again."""
    store = MemoryCounterStore()
    limiter = _limiter(store)
    limits = [Limit("c", "minute", 5, "grant")]
    first = _reserve(limiter, limits)
    _reserve(limiter, limits)
    await limiter.flush()
    key = ("c", "grant:agent", window_start(NOW, "minute"))
    assert store.rows == {key: 2.0}
    await limiter.flush()
    assert store.saves[-1] == []  # nothing changed, nothing written
    assert isinstance(first, Reservation)
    limiter.rollback_now(first)
    await limiter.flush()
    assert store.saves[-1] == [(*key, 1.0)]


async def test_flush_drops_ended_windows_from_memory_and_store() -> None:
    """Windows that have ended leave memory at the next flush; day-old rows leave the store."""
    store = MemoryCounterStore()
    clock = [NOW]
    limiter = RateLimiter(store, clock=lambda: clock[0])
    _reserve(limiter, [Limit("s", "second", 5, "global"), Limit("d", "day", 5, "global")])
    store.rows["old", "*", 0] = 1.0
    await limiter.flush()
    assert ("old", "*", 0) not in store.rows
    clock[0] = NOW + 1
    await limiter.flush()
    assert [key[0] for key in limiter.snapshot()] == ["d"]


async def test_a_failed_flush_is_retried_by_the_next() -> None:
    """Counts a failed write did not store stay dirty and go out with the next flush."""
    store = MemoryCounterStore()
    limiter = _limiter(store)
    _reserve(limiter, [Limit("c", "minute", 5, "global")])
    failing = store.save_counters

    async def broken(rows: Sequence[CounterRow]) -> None:
        raise StoreError("disk full")

    store.save_counters = broken  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await limiter.flush()
    store.save_counters = failing  # type: ignore[method-assign]
    await limiter.flush()
    assert store.rows == {("c", "*", window_start(NOW, "minute")): 1.0}


async def test_counts_survive_a_restart(tmp_path: pathlib.Path) -> None:
    """Counts written by one limiter are loaded by the next one on the same file."""
    path = tmp_path / "approvals.db"
    limits = [Limit("c", "hour", 4, "grant")]
    store = await SqliteStore.open(path)
    first = _limiter(store)
    await first.start()
    assert _passes(first, limits) == 4
    await first.close()
    await store.close()

    store = await SqliteStore.open(path)
    try:
        second = RateLimiter(store, clock=lambda: NOW + 60)
        await second.start()
        assert _passes(second, limits, now=NOW + 60) == 0
        assert _passes(second, limits, now=NOW + 3600) == 4  # the next hour is fresh
        await second.close()
    finally:
        await store.close()


# -- property: the count per key is exactly what un-rolled-back reservations added ------------

_limits = st.builds(
    Limit,
    counter=st.sampled_from(["a", "b"]),
    window=st.sampled_from(["second", "minute"]),
    max=st.integers(0, 4).map(float),
    scope=st.sampled_from(["grant", "session", "global"]),
    increment_from=st.sampled_from([None, None, "args.n"]),
)
_reserve_op = st.tuples(
    st.just("reserve"),
    st.lists(_limits, max_size=3),
    st.sampled_from(["g1", "g2"]),
    st.sampled_from([NOW, NOW + 0.5, NOW + 1, NOW + 60]),
    st.integers(-1, 3),
)
_rollback_op = st.tuples(st.just("rollback"), st.integers(0, 50))


def _fits(counts: dict[_Key, float], limits: list[Limit], grant: str, now: float, n: int) -> bool:
    """The model: does this call fit under every limit, counting its own repeats of a key?"""
    added: dict[_Key, float] = {}
    keyed = []
    for limit in limits:
        amount = 1 if limit.increment_from is None else n
        if amount < 0:
            return False
        key_scope = scope_key(limit.scope, grant=grant, session="s1")
        key = (limit.counter, key_scope, window_start(now, limit.window))
        added[key] = added.get(key, 0.0) + amount
        keyed.append((key, limit))
    return all(counts.get(key, 0.0) + added[key] <= limit.max for key, limit in keyed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_reserve_op, _rollback_op), max_size=40))
def test_counts_equal_live_reservations_and_never_exceed_max(ops: list[tuple[object, ...]]) -> None:
    """For any reserve/rollback sequence, each count is the sum of live reservations, <= max."""
    limiter = _limiter()
    live: list[Reservation] = []
    for op in ops:
        if op[0] == "rollback":
            index = op[1]
            assert isinstance(index, int)
            if live:
                limiter.rollback_now(live.pop(index % len(live)))
        else:
            _, limits, grant, now, n = op
            assert isinstance(limits, list)
            assert isinstance(grant, str)
            assert isinstance(now, float)
            assert isinstance(n, int)
            before = limiter.snapshot()
            result = _reserve(limiter, limits, grant=grant, now=now, arguments={"n": n})
            assert isinstance(result, Reservation) == _fits(before, limits, grant, now, n)
            if isinstance(result, Reservation):
                live.append(result)
                for limit, (counter, key, start, _) in zip(limits, result.entries, strict=True):
                    assert limiter.count(counter, key, start) <= limit.max
            else:
                assert limiter.snapshot() == before  # a refusal changes nothing
        expected: dict[_Key, float] = {}
        for reservation in live:
            for counter, key, start, amount in reservation.entries:
                expected[counter, key, start] = expected.get((counter, key, start), 0.0) + amount
        actual = {k: v for k, v in limiter.snapshot().items() if v}
        assert actual == {k: v for k, v in expected.items() if v}
