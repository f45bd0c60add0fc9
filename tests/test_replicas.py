"""Several replicas on one PostgreSQL database: `approvals serve` processes behind HAProxy, and
`approvals serve --workers N` on one port, with an upstream that counts every call it receives.

Every test has a database of its own; the gateways are real processes, so one can be killed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from approvals.proxy.sse import read_events
from approvals.store.postgres_replicas import session_hash
from approvals.web.keys import SERVICE
from tests.conftest import TOKEN_A, WAIT, settings_for
from tests.rawmcp import RawSession, Reply
from tests.replica_kit import (
    HAPROXY,
    HELD_TOOL,
    POLICY,
    REPLICA_HEADER,
    CountingUpstream,
    Events,
    InProcess,
    Replica,
    audit_counts,
    decide,
    fresh_database,
    haproxy,
    serve_in_process,
    start_replica,
    statuses,
    write_config,
)

needs_haproxy = pytest.mark.skipif(shutil.which(HAPROXY) is None, reason="needs Debian's haproxy")

HELD_SESSIONS = 30
HELD_PER_SESSION = 10  # 300 held calls in all


@pytest.fixture
async def upstream() -> AsyncIterator[CountingUpstream]:
    counting = CountingUpstream()
    await counting.start()
    yield counting
    await counting.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


async def _replicas(tmp_path: Path, database: str, upstream: CountingUpstream, count: int) -> list[Replica]:
    config = write_config(tmp_path, database, upstream.url)
    names = [f"replica{i}" for i in range(1, count + 1)]
    return list(await asyncio.gather(*(start_replica(name, config) for name in names)))


async def _stop_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.kill()
    await asyncio.gather(*(r.process.wait() for r in replicas))


def _client(*, connection_per_request: bool = False) -> aiohttp.ClientSession:
    """An HTTP client with no bound on its connections (each held call keeps one open)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=connection_per_request)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))


def _call(session: RawSession, n: int) -> dict[str, Any]:
    session._next += 1
    params = {"name": HELD_TOOL, "arguments": {"n": n}}
    return {"jsonrpc": "2.0", "id": session._next, "method": "tools/call", "params": params}


def _text(reply: Reply) -> str:
    result = reply.last["result"]
    assert not result.get("isError"), result
    return str(result["content"][0]["text"])


@needs_haproxy
async def test_three_replicas_behind_haproxy_release_each_held_call_once(
    tmp_path: Path, database: str, upstream: CountingUpstream
) -> None:
    """300 calls held over 3 replicas behind HAProxy, each approved through another replica than
    the one holding it: 300 results at the agents, each call upstream once, each decision audited once."""
    replicas = await _replicas(tmp_path, database, upstream, 3)
    by_name = {r.name: r for r in replicas}
    try:
        async with (
            haproxy(tmp_path, {r.name: r.port for r in replicas}) as balancer,
            Events.following(database) as events,
            _client() as http,
        ):
            sessions: list[RawSession] = []
            holder: dict[int, str] = {}  # n -> the replica holding its call
            for _ in range(HELD_SESSIONS):
                session = RawSession(http, f"{balancer}/mcp/demo", token=TOKEN_A)
                reply = await session.request(
                    "initialize",
                    {
                        "protocolVersion": session.version,
                        "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"},
                    },
                )
                assert reply.status == 200, reply
                session.session_id = reply.headers["Mcp-Session-Id"]
                session.extra_headers["X-Holder"] = reply.headers[REPLICA_HEADER]
                sessions.append(session)
            spread = collections.Counter(s.extra_headers["X-Holder"] for s in sessions)
            assert spread == {name: HELD_SESSIONS // 3 for name in by_name}  # round-robin

            async def held(session: RawSession, n: int) -> tuple[int, str, Reply]:
                reply = await session.post(_call(session, n))
                return n, reply.headers.get(REPLICA_HEADER, ""), reply

            calls = []
            for i, session in enumerate(sessions):
                for j in range(HELD_PER_SESSION):
                    n = i * HELD_PER_SESSION + j
                    holder[n] = session.extra_headers["X-Holder"]
                    calls.append(asyncio.create_task(held(session, n)))
            total = len(calls)
            await events.until(lambda e: e.count["created"] >= total, f"{total} held calls")

            pending = {approval_id: n for approval_id, (status, _, n) in (await statuses(database)).items()}
            assert len(pending) == total
            names = sorted(by_name)
            gate = asyncio.Semaphore(16)

            async def approve_elsewhere(approval_id: str, n: int) -> int:
                other = names[(names.index(holder[n]) + 1) % len(names)]  # never the holder
                async with gate:
                    return await decide(http, by_name[other].base, approval_id)

            decided = await asyncio.gather(*(approve_elsewhere(a, n) for a, n in pending.items()))
            assert collections.Counter(decided) == {200: total}
            results = await asyncio.wait_for(asyncio.gather(*calls), WAIT * 2)
        for n, served_by, reply in results:
            assert reply.status == 200
            assert served_by == holder[n]  # the session stuck to its replica
            assert _text(reply) == f"sent {n}"
        assert upstream.received == {n: 1 for n in range(total)}  # no call twice, none lost
        assert await audit_counts(database, "approved") == {a: 1 for a in pending}
        final = await statuses(database)
        assert {status for status, _, _ in final.values()} == {"completed"}
    finally:
        await _stop_all(replicas)


@needs_haproxy
async def test_a_replica_killed_during_a_bulk_approval_never_releases_a_call_twice(
    tmp_path: Path, database: str
) -> None:
    """kill -9 of one replica while calls are approved through all three: every approved call
    reaches the upstream once or ends interrupted, none twice; the pending ones stay decidable."""
    upstream = CountingUpstream(delay=1.0)  # a release is in flight for a second: long enough to die in
    await upstream.start()
    replicas = await _replicas(tmp_path, database, upstream, 3)
    victim, *survivors = replicas
    calls_n = 90
    try:
        async with (
            haproxy(tmp_path, {r.name: r.port for r in replicas}) as balancer,
            Events.following(database) as events,
            _client() as http,
        ):
            sessions = []
            for _ in range(9):
                session = RawSession(http, f"{balancer}/mcp/demo", token=TOKEN_A)
                await session.initialize()
                sessions.append(session)
            calls = [
                asyncio.create_task(session.post(_call(session, n)))
                for n, session in zip(range(calls_n), itertools.cycle(sessions), strict=False)
            ]
            await events.until(lambda e: e.count["created"] >= calls_n, f"{calls_n} held calls")
            plan = list(zip(sorted(await statuses(database)), itertools.cycle(replicas), strict=False))
            by_victim = {approval_id for approval_id, replica in plan if replica is victim}
            gate = asyncio.Semaphore(8)  # a reviewer's bulk approval: a few at a time, over a while

            async def approve(approval_id: str, replica: Replica) -> int:
                async with gate:
                    try:
                        return await decide(http, replica.base, approval_id)
                    except aiohttp.ClientError:
                        return 0  # sent to the replica that was killed

            approving = [asyncio.create_task(approve(a, r)) for a, r in plan]
            # The victim dies while a call it released is at the upstream.
            await events.until(
                lambda e: any(e.latest.get(a) == "released" for a in by_victim), "a release by the victim"
            )
            victim.kill()
            await victim.process.wait()
            decided = collections.Counter(await asyncio.gather(*approving))
            assert decided[200] >= calls_n // 3
            assert decided[0] > 0  # some decisions never reached the dead replica
            # The pending ones stay decidable, through a survivor.
            for approval_id, (status, _, _) in (await statuses(database)).items():
                if status == "pending":
                    assert await decide(http, survivors[0].base, approval_id) == 200
            # A replica started in the victim's place (as its supervisor would) picks up what the
            # victim left: approved calls it never released, and releases it never finished.
            replicas.append(await start_replica("replacement", tmp_path / "gateway.toml"))
            final = {"completed", "failed", "denied", "expired", "cancelled"}
            await events.until(
                lambda e: len(e.latest) >= calls_n and all(v in final for v in e.latest.values()),
                "every approval to end",
            )
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        outcome = await statuses(database)
        ended = collections.Counter(status for status, _, _ in outcome.values())
        assert ended["failed"] >= 1  # the release in flight when the victim died
        assert ended["completed"] + ended["failed"] == calls_n
        assert max(upstream.received.values()) == 1  # never twice
        for status, reason, n in outcome.values():
            if status == "failed":
                assert reason == "interrupted"  # sent at most once, by the replica that died
            else:
                assert status == "completed"
                assert upstream.received[n] == 1
        assert await audit_counts(database, "approved") == {a: 1 for a in outcome}
    finally:
        await _stop_all(replicas)
        await upstream.close()


async def _kill(pid: int) -> None:
    """SIGKILL a process that is not our child, and wait until it is gone (its pidfd readable):
    connections the kernel queued for it meanwhile would be reset, a hazard of any process's death."""
    pidfd = os.pidfd_open(pid)
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, gone.set)
    try:
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(gone.wait(), WAIT)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _worker_of(database: str, session_id: str) -> str:
    conn = await asyncpg.connect(database)
    try:
        replica = await conn.fetchval(
            "SELECT replica_id FROM replica_sessions WHERE session_sha256 = $1", session_hash(session_id)
        )
    finally:
        await conn.close()
    return str(replica)


async def test_workers_on_one_port_serve_a_session_whatever_process_a_request_lands_on(
    tmp_path: Path, database: str, upstream: CountingUpstream
) -> None:
    """--workers 3: every request on a connection of its own (the kernel picks a process for
    each), and every session works — calls, held calls, its GET stream and its DELETE."""
    config = write_config(tmp_path, database, upstream.url)
    gateway = await start_replica("workers", config, "--workers", "3")
    try:
        await gateway.output.wait_for("3 worker processes share this port (one PostgreSQL store)")
        # A connection per request: nothing keeps a session on one process but the routing.
        async with (
            _client(connection_per_request=True) as http,
            Events.following(database) as events,
        ):
            sessions = [RawSession(http, gateway.mcp_url(), token=TOKEN_A) for _ in range(12)]
            for session in sessions:
                await session.initialize()
            owners = {await _worker_of(database, s.session_id or "") for s in sessions}
            assert len(owners) > 1  # the sessions live in different processes
            for session in sessions:
                for _ in range(3):
                    listed = await session.request("tools/list")
                    assert [t["name"] for t in listed.last["result"]["tools"]] == ["echo", HELD_TOOL]
                    echoed = await session.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
                    assert _text(echoed) == "echo"
            held = [asyncio.create_task(s.post(_call(s, n))) for n, s in enumerate(sessions)]
            await events.until(lambda e: e.count["created"] >= len(held), "the held calls")
            for approval_id in await statuses(database):
                assert await decide(http, gateway.base, approval_id) == 200
            for n, reply in enumerate(await asyncio.wait_for(asyncio.gather(*held), WAIT)):
                assert _text(reply) == f"sent {n}"
            # The GET stream and the end of a session go to the session's process too.
            session = sessions[0]
            async with http.get(
                session.url, headers={**session.headers(), "Accept": "text/event-stream"}
            ) as stream:
                assert stream.status == 200
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                async with http.delete(session.url, headers=session.headers()) as ended:
                    assert ended.status == 200
                assert await asyncio.wait_for(stream.content.read(), WAIT) is not None  # it ends
            gone = await session.request("tools/list")
            assert gone.status == 404
        assert upstream.received == {n: 1 for n in range(len(sessions))}
        assert await gateway.stop() == 0
    finally:
        gateway.kill()
        await gateway.process.wait()


async def test_a_session_of_a_killed_worker_is_404_and_the_worker_is_replaced(
    tmp_path: Path, database: str, upstream: CountingUpstream
) -> None:
    """kill -9 of a worker: its sessions answer 404 (their clients initialize again) from any other
    process, and the supervisor starts a new worker; other sessions go on."""
    config = write_config(tmp_path, database, upstream.url)
    gateway = await start_replica("workers", config, "--workers", "2")
    try:
        async with _client(connection_per_request=True) as http:
            sessions = [RawSession(http, gateway.mcp_url(), token=TOKEN_A) for _ in range(8)]
            for session in sessions:
                await session.initialize()
            workers = {s.session_id: await _worker_of(database, s.session_id or "") for s in sessions}
            victim = next(iter(workers.values()))
            await _kill(int(victim.split(":")[1]))  # replica ids are host:pid:token
            for session in sessions:
                reply = await session.request("tools/list")
                expected = 404 if workers[session.session_id] == victim else 200
                assert reply.status == expected, (reply, workers[session.session_id], victim)
            # The supervisor starts a worker in its place (a third worker's start, in all).
            await gateway.output.wait_for("starting it again")
            await gateway.output.wait_for("routes sessions; peers reach it at", times=3)
            fresh = RawSession(http, gateway.mcp_url(), token=TOKEN_A)
            await fresh.initialize()
            assert (await fresh.request("tools/list")).status == 200
        assert gateway.process.returncode is None  # the supervisor runs on
    finally:
        gateway.kill()
        await gateway.process.wait()


# ---- session routing in this process: two replicas, each with its internal address -----------


@pytest.fixture
async def pair(
    tmp_path: Path, database: str, upstream: CountingUpstream
) -> AsyncIterator[tuple[InProcess, InProcess]]:
    """Replicas A and B on one database, forwarding each other's sessions."""
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    settings = settings_for(
        tmp_path,
        {"demo": {"url": upstream.url, "policy": "policy.json"}},
        store={"url": database},
        server={"internal_url": "http://127.0.0.1:0"},
    )
    first = await serve_in_process(settings)
    second = await serve_in_process(settings)
    yield first, second
    for replica in (first, second):
        await replica.runner.cleanup()


async def _rows(database: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT session_sha256, replica_id FROM replica_sessions")
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows]


async def test_a_request_of_a_session_held_by_another_replica_is_answered_from_there(
    pair: tuple[InProcess, InProcess], database: str
) -> None:
    """A session opened on A works through B — calls, a held call's SSE stream, the GET stream and
    DELETE — each forwarded to A; the database knows the session only by its hash."""
    a, b = pair
    async with _client() as http, Events.following(database) as events:
        session = RawSession(http, a.mcp_url(), token=TOKEN_A)
        await session.initialize()
        assert session.session_id is not None
        assert await _rows(database) == [(session_hash(session.session_id), a.router.replica_id)]
        session.url = b.mcp_url()
        listed = await session.request("tools/list")
        assert [t["name"] for t in listed.last["result"]["tools"]] == ["echo", HELD_TOOL]
        async with http.post(session.url, json=_call(session, 7), headers=session.headers()) as held:
            assert held.headers["Content-Type"].startswith("text/event-stream")
            # Streamed as it comes: the priming event of 2025-11-25 arrives before any decision.
            first = await asyncio.wait_for(held.content.readuntil(b"\n\n"), WAIT)
            assert first.startswith(b"id:")
            stream = read_events(held.content)
            await events.until(lambda e: e.count["created"] == 1, "the held call")
            (approval,) = await a.app[SERVICE].store.list_approvals(status="pending")
            assert await decide(http, b.base, approval.id) == 200
            answers = [json.loads(event.data) async for event in stream if event.data]
        assert answers[-1]["result"]["content"][0]["text"] == "sent 7"
        headers = {**session.headers(), "Accept": "text/event-stream"}
        async with http.get(session.url, headers=headers) as stream:
            assert stream.status == 200
            async with http.delete(session.url, headers=session.headers()) as ended:
                assert ended.status == 200
            await asyncio.wait_for(stream.content.read(), WAIT)  # ends with its session
        assert (await session.request("tools/list")).status == 404
        assert b.router.forwarded == 5
        assert a.router.forwarded == 0
        await a.router.beat()  # the ended session's row goes with the next heartbeat
        assert await _rows(database) == []


async def test_only_authenticated_initialize_era_requests_from_outside_are_forwarded(
    pair: tuple[InProcess, InProcess],
) -> None:
    """Not forwarded: a request without a valid grant token (401 here), a 2026-07-28 request with a
    stray Mcp-Session-Id (it has no session), and anything arriving on the internal address (no
    request travels twice)."""
    a, b = pair
    async with _client() as http:
        session = RawSession(http, a.mcp_url(), token=TOKEN_A)
        await session.initialize()
        stranger = RawSession(
            http, b.mcp_url(), token="not-a-grant-token-at-all", session_id=session.session_id
        )
        assert (await stranger.request("tools/list")).status == 401
        modern = RawSession(http, b.mcp_url(), token=TOKEN_A, session_id=session.session_id)
        modern.version = "2026-07-28"
        assert (await modern.request("tools/list")).status < 500  # answered by B itself, whatever it says
        inside = RawSession(http, b.mcp_url(b.internal), token=TOKEN_A, session_id=session.session_id)
        assert (await inside.request("tools/list")).status == 404
        assert b.router.forwarded == 0


async def test_a_session_whose_replica_stopped_is_404_everywhere(
    pair: tuple[InProcess, InProcess], database: str
) -> None:
    """A replica that stops takes its sessions' rows with it: their requests elsewhere are 404,
    on which a client initializes again."""
    a, b = pair
    async with _client() as http:
        session = RawSession(http, a.mcp_url(), token=TOKEN_A)
        await session.initialize()
        await a.runner.cleanup()
        assert await _rows(database) == []
        session.url = b.mcp_url()
        assert (await session.request("tools/list")).status == 404
        assert b.router.forwarded == 0
