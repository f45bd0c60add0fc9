"""Rate limits shared by replicas on PostgreSQL: exact over all of them, leased in blocks when busy,
refused (never let through) when the database cannot count."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from approvals.limits import LimitRefusal, Reservation, window_start
from approvals.policy import Limit
from approvals.shared_limits import SharedRateLimiter
from approvals.shared_quota import LeaseTerms, QuotaKey, Take, Taken
from approvals.store.postgres import PostgresStore
from approvals.store.postgres_quota import PostgresQuota
from tests.conftest import TOKEN_A, WAIT, StartGateway, mcp_client

NOW = 1_700_000_000.0  # a whole minute
MINUTE = window_start(NOW, "minute")


class CountingQuota:
    """A PostgresQuota that counts the statements a limiter sends: to see round trips saved."""

    def __init__(self, inner: PostgresQuota) -> None:
        self.inner = inner
        self.takes = 0
        self.give_backs = 0

    async def take(self, takes: Sequence[Take], terms: LeaseTerms) -> list[Taken]:
        self.takes += 1
        return await self.inner.take(takes, terms)

    async def give_back(self, key: QuotaKey, amount: float, *, ended_blocks: int = 0) -> None:
        self.give_backs += 1
        await self.inner.give_back(key, amount, ended_blocks=ended_blocks)

    async def prune(self, before: int) -> None:
        await self.inner.prune(before)


class Replicas:
    """Several limiters on one database, each on a pool of its own, as separate replicas have."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pools: list[asyncpg.Pool] = []
        self.limiters: list[SharedRateLimiter] = []
        self.quotas: list[CountingQuota] = []

    async def add(self, url: str | None = None, **options: Any) -> SharedRateLimiter:
        pool = await asyncpg.create_pool(url or self.url, min_size=0, max_size=4)
        self.pools.append(pool)
        quota = CountingQuota(PostgresQuota(pool))
        options.setdefault("clock", lambda: NOW)
        limiter = SharedRateLimiter(quota, **options)
        await limiter.start()
        self.quotas.append(quota)
        self.limiters.append(limiter)
        return limiter

    async def count(self, key: QuotaKey) -> tuple[float, int]:
        return await PostgresQuota(self.pools[0]).count(key)

    async def close(self) -> None:
        for limiter in self.limiters:
            await limiter.close()
        for pool in self.pools:
            await pool.close()


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Replicas]:
    store = await PostgresStore.open(postgres_url)  # brings the schema up to date
    await store.close()
    group = Replicas(postgres_url)
    try:
        yield group
    finally:
        await group.close()


def _counter() -> str:
    """A counter no other test uses: the database is shared by the whole run."""
    return f"c_{uuid.uuid4().hex[:10]}"


async def _reserve(
    limiter: SharedRateLimiter,
    limits: Sequence[Limit],
    arguments: dict[str, object] | None = None,
    now: float = NOW,
) -> Reservation | LimitRefusal:
    return await limiter.reserve(limits, grant="agent", session="s1", arguments=arguments or {}, now=now)


async def _spread(limiters: Sequence[SharedRateLimiter], limits: Sequence[Limit], calls: int) -> list[object]:
    """`calls` concurrent reservations, dealt round robin over the limiters."""
    turn = itertools.cycle(limiters)
    return await asyncio.wait_for(asyncio.gather(*(_reserve(next(turn), limits) for _ in range(calls))), WAIT)


async def test_64_concurrent_calls_over_three_replicas_admit_exactly_the_limit(replicas: Replicas) -> None:
    """64 calls at once against a limit of 10, spread over 3 replicas: exactly 10 pass."""
    limiters = [await replicas.add() for _ in range(3)]
    limit = Limit(_counter(), "minute", 10, "global")
    results = await _spread(limiters, [limit], 64)
    assert sum(isinstance(r, Reservation) for r in results) == 10
    refused = [r for r in results if isinstance(r, LimitRefusal)]
    assert {r.code for r in refused} == {"rate_limited"}
    assert await replicas.count((limit.counter, "*", MINUTE)) == (10.0, 0)


async def test_busy_counter_is_leased_in_blocks_and_the_rest_goes_back(replicas: Replicas) -> None:
    """A busy counter costs far fewer statements than calls; the unused rest returns on close."""
    limiter = await replicas.add()
    limit = Limit(_counter(), "minute", 10_000, "global")
    key = (limit.counter, "*", MINUTE)
    for _ in range(200):
        assert isinstance(await _reserve(limiter, [limit]), Reservation)
    quota = replicas.quotas[0]
    assert quota.takes < 20  # blocks double from 4 to 256 calls
    used, leases = await replicas.count(key)
    assert used >= 200
    assert leases == 1
    assert limiter.held()[key] == used - 200
    await limiter.give_back_due(everything=True)
    assert await replicas.count(key) == (200.0, 0)
    assert limiter.held() == {}


async def test_quiet_counter_takes_no_block(replicas: Replicas) -> None:
    """A call on a counter not used within the lease time goes through the database alone."""
    clock = [0.0]
    limiter = await replicas.add(monotonic=lambda: clock[0])
    limit = Limit(_counter(), "minute", 10_000, "global")
    for _ in range(3):
        assert isinstance(await _reserve(limiter, [limit]), Reservation)
        clock[0] += 5.0
    assert limiter.held() == {}
    assert await replicas.count((limit.counter, "*", MINUTE)) == (3.0, 0)


async def test_calls_without_limits_never_touch_the_database(replicas: Replicas) -> None:
    """No limit (or an amount of 0) → admitted without a statement."""
    limiter = await replicas.add()
    spend = Limit(_counter(), "minute", 10, "global", increment_from="args.n")
    assert await _reserve(limiter, []) == Reservation(())
    assert isinstance(await _reserve(limiter, [spend], {"n": 0}), Reservation)
    assert replicas.quotas[0].takes == 0


async def test_large_limit_spread_over_three_busy_replicas_is_exact(replicas: Replicas) -> None:
    """600 calls at once against 300 over 3 replicas leasing blocks: exactly 300 pass."""
    limiters = [await replicas.add() for _ in range(3)]
    limit = Limit(_counter(), "minute", 300, "global")
    results = await _spread(limiters, [limit], 600)
    assert sum(isinstance(r, Reservation) for r in results) == 300
    for limiter in limiters:
        await limiter.give_back_due(everything=True)
    assert await replicas.count((limit.counter, "*", MINUTE)) == (300.0, 0)


async def test_a_block_left_idle_on_one_replica_comes_back_to_another(replicas: Replicas) -> None:
    """Replica A leases a block and goes quiet; B's calls wait for it to come back: exactly max pass."""
    terms = LeaseTerms(share=0.5)
    a = await replicas.add(terms=terms)
    b = await replicas.add(terms=terms)
    limit = Limit(_counter(), "minute", 100, "global")
    admitted_a = 0
    for _ in range(10):
        admitted_a += isinstance(await _reserve(a, [limit]), Reservation)
    key = (limit.counter, "*", MINUTE)
    assert a.held().get(key, 0) > 0  # A sits on quota it does not use
    results = await _spread([b], [limit], 150)
    assert admitted_a + sum(isinstance(r, Reservation) for r in results) == 100
    await b.give_back_due(everything=True)
    assert await replicas.count(key) == (100.0, 0)


async def test_a_block_of_a_replica_that_died_stays_counted_and_never_blocks_for_long(
    replicas: Replicas,
) -> None:
    """A replica cut off holding a block: the others admit max minus that block, never more, and
    their refused calls wait no longer than the block's lease before answering."""
    terms = LeaseTerms(seconds=0.3, share=0.5)
    a = await replicas.add(terms=terms, tick=3600.0)  # never gives back: as good as dead
    b = await replicas.add(terms=terms)
    limit = Limit(_counter(), "minute", 100, "global")
    key = (limit.counter, "*", MINUTE)
    admitted_a = sum([isinstance(await _reserve(a, [limit]), Reservation) for _ in range(10)])
    stranded = a.held()[key]
    assert stranded > 0
    results = await _spread([b], [limit], 150)
    admitted_b = sum(isinstance(r, Reservation) for r in results)
    assert admitted_a + admitted_b + stranded == 100


async def test_windows_roll_over_and_ended_leases_are_forgotten(replicas: Replicas) -> None:
    """A full window refuses until the next one; a lease of an ended window is dropped, not returned."""
    now = [NOW]
    limiter = await replicas.add(clock=lambda: now[0])
    limit = Limit(_counter(), "second", 3, "global")
    passed = [isinstance(await _reserve(limiter, [limit]), Reservation) for _ in range(4)]
    assert passed == [True, True, True, False]
    refusal = await _reserve(limiter, [limit], now=NOW + 0.5)
    assert isinstance(refusal, LimitRefusal)
    assert refusal.retry_after == pytest.approx(0.5)
    assert isinstance(await _reserve(limiter, [limit], now=NOW + 1), Reservation)

    busy = Limit(_counter(), "second", 1000, "global")
    for _ in range(20):
        await _reserve(limiter, [busy])
    assert limiter.held()
    now[0] = NOW + 1
    before = replicas.quotas[0].give_backs
    await limiter.give_back_due()
    assert limiter.held() == {}
    assert replicas.quotas[0].give_backs == before


async def test_amounts_from_arguments_are_shared_exactly(replicas: Replicas) -> None:
    """`increment_from` amounts count across replicas: 600 on one; 400.5 refused, 400 passes on another."""
    a, b = await replicas.add(), await replicas.add()
    spend = Limit(_counter(), "hour", 1000, "grant", increment_from="args.amount")
    assert isinstance(await _reserve(a, [spend], {"amount": 600}), Reservation)
    assert isinstance(await _reserve(b, [spend], {"amount": 400.5}), LimitRefusal)
    assert isinstance(await _reserve(b, [spend], {"amount": 400}), Reservation)
    refusal = await _reserve(a, [spend], {"amount": 1})
    assert isinstance(refusal, LimitRefusal)
    never = await _reserve(a, [spend], {"amount": 1001})
    assert isinstance(never, LimitRefusal)
    assert never.retry_after == float("inf")


async def test_rollback_returns_quota_to_every_replica(replicas: Replicas) -> None:
    """A call rolled back on one replica frees its place for a call on another."""
    a, b = await replicas.add(), await replicas.add()
    limit = Limit(_counter(), "minute", 3, "global")
    taken = [await _reserve(a, [limit]) for _ in range(3)]
    assert isinstance(await _reserve(b, [limit]), LimitRefusal)
    first = taken[0]
    assert isinstance(first, Reservation)
    await a.rollback(first)
    assert isinstance(await _reserve(b, [limit]), Reservation)
    assert isinstance(await _reserve(b, [limit]), LimitRefusal)


async def test_rollback_of_a_call_counted_from_a_lease_goes_back_to_the_lease(replicas: Replicas) -> None:
    """Rolled back while its block is live: back into the block, and to the shared count with it."""
    limiter = await replicas.add()
    limit = Limit(_counter(), "minute", 10_000, "global")
    key = (limit.counter, "*", MINUTE)
    reservations = [await _reserve(limiter, [limit]) for _ in range(20)]
    held = limiter.held()[key]
    last = reservations[-1]
    assert isinstance(last, Reservation)
    await limiter.rollback(last)
    assert limiter.held()[key] == held + 1
    await limiter.give_back_due(everything=True)
    assert await replicas.count(key) == (19.0, 0)


async def test_two_counters_are_all_or_nothing_across_replicas(replicas: Replicas) -> None:
    """A call on two counters where the second is full on the database counts on neither."""
    a, b = await replicas.add(), await replicas.add()
    calls = Limit(_counter(), "minute", 50, "grant")
    spend = Limit(_counter(), "minute", 100, "grant", increment_from="args.amount")
    assert isinstance(await _reserve(a, [spend], {"amount": 90}), Reservation)
    refusal = await _reserve(b, [calls, spend], {"amount": 20})
    assert isinstance(refusal, LimitRefusal)
    assert refusal.limit == spend
    assert await replicas.count((calls.counter, "grant:agent", MINUTE)) == (0.0, 0)
    assert await replicas.count((spend.counter, "grant:agent", MINUTE)) == (90.0, 0)
    both = await _reserve(b, [calls, spend], {"amount": 10})
    assert isinstance(both, Reservation)
    await b.rollback(both)
    await b.give_back_due(everything=True)  # the second take may have leased a block
    assert await replicas.count((calls.counter, "grant:agent", MINUTE)) == (0.0, 0)
    assert await replicas.count((spend.counter, "grant:agent", MINUTE)) == (90.0, 0)


async def test_a_random_mix_over_three_replicas_never_exceeds_and_settles_exactly(replicas: Replicas) -> None:
    """Concurrent one- and two-counter calls with amounts and rollbacks: the net count stays within
    every max, and once the leases are given back the database holds exactly the net count."""
    limiters = [await replicas.add() for _ in range(3)]
    calls = Limit(_counter(), "minute", 40, "global")
    spend = Limit(_counter(), "minute", 500, "global", increment_from="args.n")
    shapes = [[calls], [spend], [calls, spend]]
    rng = random.Random(14)
    net = {calls.counter: 0.0, spend.counter: 0.0}

    async def one(limiter: SharedRateLimiter, limits: list[Limit], n: int, undo: bool) -> None:
        result = await _reserve(limiter, limits, {"n": n})
        if isinstance(result, Reservation):
            for counter, _, _, amount in result.entries:
                net[counter] += amount
            if undo:
                for counter, _, _, amount in result.entries:
                    net[counter] -= amount  # before: the quota may be taken again as soon as it is back
                await limiter.rollback(result)
        assert net[calls.counter] <= 40
        assert net[spend.counter] <= 500

    await asyncio.wait_for(
        asyncio.gather(
            *(
                one(rng.choice(limiters), rng.choice(shapes), rng.randint(0, 60), rng.random() < 0.3)
                for _ in range(300)
            )
        ),
        WAIT,
    )
    for limiter in limiters:
        await limiter.give_back_due(everything=True)
    assert await replicas.count((calls.counter, "*", MINUTE)) == (net[calls.counter], 0)
    assert await replicas.count((spend.counter, "*", MINUTE)) == (net[spend.counter], 0)


class Forwarder:
    """A TCP forwarder to PostgreSQL that can be cut and restored: a database outage on demand."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_outage_refuses_limited_calls_logs_once_and_recovers(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    """Database unreachable → limited calls refused (limit_uncounted), one log line; back → counted."""
    forwarder = Forwarder()
    await forwarder.start()
    try:
        limiter = await replicas.add(replicas.url.replace(":5432/", f":{forwarder.port}/"))
        limit = Limit(_counter(), "minute", 5, "global")
        assert isinstance(await _reserve(limiter, [limit]), Reservation)
        await forwarder.stop()
        caplog.set_level(logging.WARNING, logger="approvals.shared_limits")
        for _ in range(3):
            refusal = await _reserve(limiter, [limit])
            assert isinstance(refusal, LimitRefusal)
            assert refusal.code == "limit_uncounted"
            assert 0 < refusal.retry_after < float("inf")
        assert await _reserve(limiter, []) == Reservation(())  # no limit: no database
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        await forwarder.start()
        assert isinstance(await _reserve(limiter, [limit]), Reservation)
        assert len([r for r in caplog.records if "counted again" in r.getMessage()]) == 1
        assert await replicas.count((limit.counter, "*", MINUTE)) == (2.0, 0)
    finally:
        await forwarder.stop()


async def test_terminated_backends_never_let_a_call_through_uncounted(
    replicas: Replicas, postgres_url: str
) -> None:
    """pg_terminate_backend on a replica's connections: each call is counted or refused; then counted."""
    name = f"limits_{uuid.uuid4().hex[:8]}"
    limiter = await replicas.add(f"{postgres_url}?application_name={name}")
    limit = Limit(_counter(), "minute", 100, "global")
    assert isinstance(await _reserve(limiter, [limit]), Reservation)
    admin = await asyncpg.connect(postgres_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await admin.close()
    assert killed >= 1
    results = [await _reserve(limiter, [limit]) for _ in range(3)]
    admitted = sum(isinstance(r, Reservation) for r in results)
    assert all(isinstance(r, Reservation) or r.code == "limit_uncounted" for r in results)
    assert isinstance(results[-1], Reservation)
    await limiter.give_back_due(everything=True)
    used, _ = await replicas.count((limit.counter, "*", MINUTE))
    assert used <= 1 + admitted  # a take lost with its connection stays counted: never fewer


# ---- end to end: three gateways, one database, one upstream that counts ---------------------------

upstream = MCPServer("counting")
received: list[str] = []


@upstream.tool()
async def ping(n: int) -> str:
    """Record the call."""
    received.append(str(n))
    return f"pong {n}"


@asynccontextmanager
async def counting_upstream() -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(upstream.streamable_http_app(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def test_three_gateways_on_postgres_send_exactly_the_limit_upstream(
    start_gateway: StartGateway, postgres_url: str, tmp_path: Path
) -> None:
    """64 concurrent tools/call over 3 gateways sharing PostgreSQL, limit 10: 10 reach the upstream."""
    counter = _counter()
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {"ping": {"limits": [{"counter": counter, "window": "hour", "max": 10, "scope": "global"}]}},
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    received.clear()
    async with counting_upstream() as url:
        upstreams = {"up": {"url": url, "policy": "policy.json"}}
        gateways = [await start_gateway(upstreams, store={"url": postgres_url}) for _ in range(3)]
        async with (
            mcp_client(gateways[0].url("up"), TOKEN_A) as c0,
            mcp_client(gateways[1].url("up"), TOKEN_A) as c1,
            mcp_client(gateways[2].url("up"), TOKEN_A) as c2,
        ):
            clients = itertools.cycle([c0, c1, c2])
            results = await asyncio.wait_for(
                asyncio.gather(*(next(clients).call_tool("ping", {"n": n}) for n in range(64))), WAIT
            )
    passed = [r for r in results if not r.is_error]
    assert len(passed) == 10
    assert len(received) == 10
    refused = [r for r in results if r.is_error]
    assert all("Rate limit" in r.content[0].text for r in refused)  # type: ignore[union-attr]
