"""Inbox logins on several replicas: one-time links, session cookies and logouts shared by the store.

Two gateways on one PostgreSQL database play two replicas behind a load balancer (a reviewer's
browser reaches either); one gateway on SQLite is the single process, restarted over its file.
The store's part runs against every adapter: in memory, SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from approvals.config import sha256_hex
from approvals.errors import StoreError
from approvals.gateway_secret import gateway_secret as session_secret
from approvals.store.memory import MemoryStore
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore
from approvals.web.inbox_state import (
    PRUNE_EVERY_SECONDS,
    PRUNE_GRACE_SECONDS,
    STALE_SECONDS,
    InboxState,
    InboxStateStore,
)
from approvals.web.inbox_views import INBOX
from tests.conftest import BOB_TOKEN, DEMO_COMMAND, WAIT, Running, StartGateway, settings_for
from tests.inbox_kit import Reviewer, csrf_of
from tests.test_cli import run_cli

NOW = 1_700_000_000.0
SECRET = "session-secret-0123456789abcdef0123456789"
UPSTREAMS = {"demo": {"command": DEMO_COMMAND, "policy": "policy.json"}}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[InboxStateStore]:
    """A fresh store of each kind, holding the inbox's state."""
    if request.param == "postgres":
        postgres = await PostgresStore.open(request.getfixturevalue("postgres_url"))
        await postgres.empty()
        yield postgres
        await postgres.close()
    elif request.param == "sqlite":
        sqlite = await SqliteStore.open(tmp_path / "approvals.db")
        yield sqlite
        await sqlite.close()
    else:
        yield MemoryStore()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One browser: a cookie jar that sends the 127.0.0.1 cookies to every replica (ports aside)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def replicas(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, env: dict[str, str] | None = None
) -> tuple[Running, Running]:
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    first = await start_gateway(UPSTREAMS, env=env, store={"url": postgres_url})
    second = await start_gateway(UPSTREAMS, env=env, store={"url": postgres_url})
    return first, second


def mint_link(running: Running) -> str:
    """A login link for bob, as `approvals login-link bob` makes it with the gateway's key."""
    inbox = running.app[INBOX]
    return inbox.auth.mint_link(inbox.auth.reviewers["bob"], inbox.now())


# ---- the store's part, on every adapter ----------------------------------------------------------


async def test_a_login_link_is_used_once(store: InboxStateStore) -> None:
    """The first use records the link; every later one is refused, and the link reads as used."""
    assert not await store.login_link_used("nonce-1")
    assert await store.use_login_link("nonce-1", NOW + 600)
    assert not await store.use_login_link("nonce-1", NOW + 600)
    assert await store.login_link_used("nonce-1")
    assert not await store.login_link_used("nonce-2")


async def test_concurrent_uses_of_one_link_let_exactly_one_through(store: InboxStateStore) -> None:
    """Twenty uses of one link at once: one succeeds, whatever the adapter."""
    used = await asyncio.gather(*(store.use_login_link("nonce-1", NOW + 600) for _ in range(20)))
    assert sorted(used) == [False] * 19 + [True]


async def test_ended_sessions_are_read_until_they_expire_then_pruned(store: InboxStateStore) -> None:
    """An ended session is listed while its record lasts (the later expiry wins); prune deletes
    what expired before the given time, links and sessions alike."""
    await store.end_inbox_session("session-1", NOW + 200)
    await store.end_inbox_session("session-1", NOW + 50)  # an older cookie's logout: keeps NOW + 200
    await store.end_inbox_session("session-2", NOW + 100)
    await store.use_login_link("old-link", NOW + 10)
    await store.use_login_link("new-link", NOW + 300)
    assert await store.ended_inbox_sessions(NOW) == {"session-1": NOW + 200, "session-2": NOW + 100}
    assert await store.ended_inbox_sessions(NOW + 100) == {"session-1": NOW + 200}
    assert await store.prune_inbox_state(NOW + 150) == 2  # session-2 and old-link
    assert not await store.login_link_used("old-link")
    assert await store.login_link_used("new-link")
    assert await store.ended_inbox_sessions(NOW) == {"session-1": NOW + 200}
    assert await store.prune_inbox_state(NOW + 1000) == 2
    assert await store.ended_inbox_sessions(0.0) == {}


# ---- the replica's copy of ended sessions --------------------------------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose reads of ended sessions fail while `down` (a database outage)."""

    down = False

    async def ended_inbox_sessions(self, now: float) -> dict[str, float]:
        if self.down:
            raise StoreError("cannot read ended inbox sessions: the database is down")
        return await super().ended_inbox_sessions(now)


async def test_a_replica_that_cannot_refresh_refuses_every_session_until_it_can() -> None:
    """Failing closed: after STALE_SECONDS without a good refresh, a logout elsewhere might be unseen,
    so every session counts as ended; the next good refresh lets them in again."""
    store, ticks = FlakyStore(), [0.0]
    state = await InboxState.open(store, lambda: NOW, refresh_seconds=0.01, monotonic=lambda: ticks[0])
    try:
        store.down = True
        ticks[0] = STALE_SECONDS - 0.5
        assert state.fresh
        assert not state.session_ended("session-1")
        ticks[0] = STALE_SECONDS
        assert not state.fresh
        assert state.session_ended("session-1")
        store.down = False
        await asyncio.wait_for(state.next_refresh(), WAIT)
        assert state.fresh
        assert not state.session_ended("session-1")
    finally:
        await state.close()


async def test_the_replica_prunes_expired_rows_now_and_then() -> None:
    """Every PRUNE_EVERY_SECONDS the refresher deletes rows that expired PRUNE_GRACE_SECONDS ago."""
    store, ticks = MemoryStore(), [0.0]
    expired, live = NOW - PRUNE_GRACE_SECONDS - 1, NOW + 100
    await store.end_inbox_session("old-session", expired)
    await store.use_login_link("old-link", expired)
    await store.end_inbox_session("live-session", live)
    await store.use_login_link("live-link", live)
    state = await InboxState.open(store, lambda: NOW, refresh_seconds=0.01, monotonic=lambda: ticks[0])
    try:
        ticks[0] = PRUNE_EVERY_SECONDS
        await asyncio.wait_for(state.next_refresh(), WAIT)  # the loop that prunes after it…
        await asyncio.wait_for(state.next_refresh(), WAIT)  # …has pruned before this one began
        assert not await store.login_link_used("old-link")
        assert await store.login_link_used("live-link")
        assert await store.ended_inbox_sessions(0.0) == {"live-session": live}
        assert state.session_ended("live-session")
    finally:
        await state.close()


async def test_the_signing_key_comes_from_the_environment_or_a_shared_store(tmp_path: Path) -> None:
    """APPROVALS_SESSION_SECRET wins; one SQLite process keeps a random key; a database URL with a
    store that cannot keep the key refuses to start rather than use a key no other replica has."""
    env = {"APPROVALS_SESSION_SECRET": SECRET}
    url = {"url": "postgresql://127.0.0.1/approvals"}
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    assert await session_secret(settings_for(tmp_path, UPSTREAMS, env, store=url), MemoryStore()) == SECRET
    assert await session_secret(settings_for(tmp_path, UPSTREAMS), MemoryStore()) is None
    with pytest.raises(StoreError, match="APPROVALS_SESSION_SECRET"):
        await session_secret(settings_for(tmp_path, UPSTREAMS, store=url), MemoryStore())


# ---- two replicas on PostgreSQL ------------------------------------------------------------------


async def test_a_login_link_used_on_one_replica_is_refused_on_the_other(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, http: aiohttp.ClientSession
) -> None:
    """Without a configured secret the replicas share the key kept in the database: a link lands on
    either; used on A, it is refused on B, and the session it opened on A is good on B."""
    a, b = await replicas(start_gateway, tmp_path, postgres_url)
    on_a, on_b = Reviewer(a.base, http), Reviewer(b.base, http)
    link = mint_link(a)
    landing = await on_b.get(f"/inbox/login/link?t={link}")
    assert landing.status == 200
    assert (await on_a.post("/inbox/login/link", {"csrf": csrf_of(landing.text), "link": link})).status == 303
    assert (await on_b.get("/inbox")).status == 200
    assert (await on_b.get(f"/inbox/login/link?t={link}")).status == 403
    form = await on_b.get("/inbox/login")
    assert (await on_b.post("/inbox/login/link", {"csrf": csrf_of(form.text), "link": link})).status == 403


async def test_one_link_posted_to_both_replicas_at_once_logs_in_once(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, http: aiohttp.ClientSession
) -> None:
    """Twelve submissions of one link, spread over two replicas at the same moment: one login."""
    a, b = await replicas(start_gateway, tmp_path, postgres_url)
    on_a, on_b = Reviewer(a.base, http), Reviewer(b.base, http)
    link = mint_link(b)
    data = {"csrf": csrf_of((await on_a.get(f"/inbox/login/link?t={link}")).text), "link": link}
    answers = await asyncio.gather(*(r.post("/inbox/login/link", data) for r in [on_a, on_b] * 6))
    assert sorted(page.status for page in answers) == [303] + [403] * 11


async def test_a_logout_on_one_replica_ends_the_session_on_the_other(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, http: aiohttp.ClientSession
) -> None:
    """A cookie made on A works on B; after a logout on A, A refuses a copy of it at once and B from
    its next refresh (within a second) on."""
    a, b = await replicas(start_gateway, tmp_path, postgres_url, env={"APPROVALS_SESSION_SECRET": SECRET})
    on_a, on_b = Reviewer(a.base, http), Reviewer(b.base, http)
    assert (await on_a.login(BOB_TOKEN)).status == 303
    copy = {"approvals_session": on_a.session_cookie()}
    assert (await on_b.get("/inbox")).status == 200
    assert (await on_a.post("/inbox/logout", {"csrf": await on_a.csrf()})).status == 303
    assert (await on_a.get("/inbox", cookies=copy)).status == 303
    await asyncio.wait_for(b.app[INBOX].auth.state.next_refresh(), WAIT)
    assert (await on_b.get("/inbox", cookies=copy)).status == 303
    assert (await on_b.get("/inbox/history.json", cookies=copy)).status == 401


async def test_a_replica_started_later_knows_earlier_logouts(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, http: aiohttp.ClientSession
) -> None:
    """A replica reads the ended sessions when it starts: a logged-out cookie is refused from its
    first request."""
    env = {"APPROVALS_SESSION_SECRET": SECRET}
    a, _ = await replicas(start_gateway, tmp_path, postgres_url, env=env)
    on_a = Reviewer(a.base, http)
    assert (await on_a.login(BOB_TOKEN)).status == 303
    copy = {"approvals_session": on_a.session_cookie()}
    assert (await on_a.post("/inbox/logout", {"csrf": await on_a.csrf()})).status == 303
    late = await start_gateway(UPSTREAMS, env=env, store={"url": postgres_url})
    assert (await Reviewer(late.base, http).get("/inbox", cookies=copy)).status == 303


# ---- one process on SQLite -----------------------------------------------------------------------


async def test_on_sqlite_a_used_link_and_a_logout_outlive_a_restart(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Restarted over the same file (and key), the gateway still refuses the used link and the
    logged-out cookie."""
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    env = {"APPROVALS_SESSION_SECRET": SECRET}
    first = await start_gateway(UPSTREAMS, env=env)
    link = mint_link(first)
    reviewer = Reviewer(first.base, http)
    landing = await reviewer.get(f"/inbox/login/link?t={link}")
    assert (
        await reviewer.post("/inbox/login/link", {"csrf": csrf_of(landing.text), "link": link})
    ).status == 303
    copy = {"approvals_session": reviewer.session_cookie()}
    assert (await reviewer.post("/inbox/logout", {"csrf": await reviewer.csrf()})).status == 303
    await first.server.close()

    second = Reviewer((await start_gateway(UPSTREAMS, env=env)).base, http)
    assert (await second.get(f"/inbox/login/link?t={link}")).status == 403
    form = await second.get("/inbox/login")
    assert (await second.post("/inbox/login/link", {"csrf": csrf_of(form.text), "link": link})).status == 403
    assert (await second.get("/inbox", cookies=copy)).status == 303


async def test_while_sessions_cannot_be_checked_logins_answer_503_and_keep_the_link(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With the copy of ended sessions stale, a session is refused and a login says the inbox is
    unavailable, without using the link up; once fresh again, the same link logs in."""
    (tmp_path / "policy.json").write_text('{"version": "1", "default": "allow"}')
    running = await start_gateway(UPSTREAMS, env={"APPROVALS_SESSION_SECRET": SECRET})
    state = running.app[INBOX].auth.state
    reviewer = Reviewer(running.base, http)
    assert (await reviewer.login(BOB_TOKEN)).status == 303
    link = mint_link(running)
    landing = await reviewer.get(f"/inbox/login/link?t={link}")
    state.stale_seconds = 0.0  # as if the database had been unreachable for too long
    assert (await reviewer.get("/inbox")).status == 303
    assert (await reviewer.login(BOB_TOKEN)).status == 503
    data = {"csrf": csrf_of(landing.text), "link": link}
    assert (await reviewer.post("/inbox/login/link", data)).status == 503
    state.stale_seconds = STALE_SECONDS
    await asyncio.wait_for(state.next_refresh(), WAIT)
    assert (await reviewer.post("/inbox/login/link", data)).status == 303
    assert (await reviewer.get("/inbox")).status == 200


async def test_login_link_command_signs_with_the_key_the_replicas_keep(
    start_gateway: StartGateway, tmp_path: Path, postgres_url: str, http: aiohttp.ClientSession
) -> None:
    """`approvals login-link` with a database URL and no APPROVALS_SESSION_SECRET reads the key the
    replicas keep in the database: the link it prints logs bob in on a running replica."""
    a, _ = await replicas(start_gateway, tmp_path, postgres_url)
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[store]\nurl = "{postgres_url}"\n\n[upstreams.demo]\ncommand = ["true"]\n\n'
        f'[[reviewers]]\nname = "bob"\ntoken_sha256 = "{sha256_hex(BOB_TOKEN)}"\n'
    )
    status, out, err = await run_cli(tmp_path, "login-link", "bob", "--config", str(config), "--url", a.base)
    assert status == 0, err
    link = out.strip().split("?t=", 1)[1]
    on_a = Reviewer(a.base, http)
    landing = await on_a.get(f"/inbox/login/link?t={link}")
    assert landing.status == 200
    assert (await on_a.post("/inbox/login/link", {"csrf": csrf_of(landing.text), "link": link})).status == 303
