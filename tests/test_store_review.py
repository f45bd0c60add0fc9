"""The stores' part of review workflows: the review's fields, versioned pending → pending steps,
escalation queries, standing grants and their audit events, and the SQLite v7 → v8 migration.

Every test that takes the ``store`` fixture runs against the in-memory twin, SQLite and PostgreSQL,
so the three keep one semantics; what only a database has (triggers, a second connection, NOTIFY,
an old file) is gathered at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from approvals.audit_chain import verify, verify_log
from approvals.core.model import STORED_FIELDS, new_approval_id, sha256_of
from approvals.core.ports import Store
from approvals.core.standing import (
    Constraint,
    StandingGrant,
    constraints_to_json,
    exact_constraints,
    new_standing_id,
)
from approvals.errors import StoreError
from approvals.request_context import REQUEST_ID
from approvals.store import sqlite_approvals
from approvals.store.postgres import CHANNEL, PostgresStore
from approvals.store.sqlite import MIGRATIONS, SqliteStore, split_statements
from tests.conftest import WAIT
from tests.test_store_approvals import NOW, make_approval, open_store

HOUR = 3600.0
EMAIL = {"to": "ops@example.com", "subject": "Numbers"}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    opened = await open_store(request.param, tmp_path / "approvals.db", url)
    yield opened
    await opened.close()


def make_grant(**overrides: Any) -> StandingGrant:
    """agent-a may send exactly EMAIL through mail for an hour from NOW, any number of times."""
    grant = StandingGrant(
        id=new_standing_id(),
        effect="allow",
        upstream="mail",
        tool="send_email",
        grant="agent-a",
        constraints_json=constraints_to_json(exact_constraints(EMAIL)),
        rule="mail-needs-review",
        reason=None,
        created_by="alice",
        created_via="web",
        created_at=NOW,
        expires_at=NOW + HOUR,
        max_uses=None,
    )
    return dataclasses.replace(grant, **overrides)


async def granted(store: Store, **overrides: Any) -> StandingGrant:
    grant = make_grant(**overrides)
    await store.create_standing(grant, actor=grant.created_by, channel=grant.created_via)
    return grant


async def use(store: Store, grant_id: str, now: float = NOW) -> StandingGrant | None:
    return await store.use_standing(
        grant_id, now, actor="agent-a", channel="mcp", args_sha256=sha256_of(EMAIL)
    )


# ---- the review's fields and versioned steps ----------------------------------------------------


async def test_review_fields_round_trip_on_create_and_on_a_step(store: Store) -> None:
    """review_json, votes, an edit, escalation count and time read back as written."""
    approval = make_approval(review_json='{"quorum":2}', escalate_at=NOW + 600)
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    assert await store.get_approval(approval.id) == approval
    edited = {"path": "/srv/report-final.txt"}
    fields: dict[str, Any] = {
        "votes_json": '[{"reviewer":"bob"}]',
        "edited_json": json.dumps(edited),
        "edited_sha256": sha256_of(edited),
        "edited_by": "bob",
        "escalated": 1,
        "escalate_at": NOW + 1200.0,
    }
    step = await store.transition(
        approval.id,
        from_={"pending"},
        to="pending",
        actor="bob",
        channel="web",
        event="voted",
        version=0,
        **fields,
    )
    assert step == dataclasses.replace(approval, version=1, **fields)
    assert await store.get_approval(approval.id) == step
    assert step.release_arguments == edited
    assert step.release_sha256 == sha256_of(edited)


async def test_a_record_without_review_fields_reads_as_one_reviewer_no_edit_no_escalation(
    store: Store,
) -> None:
    """The defaults: "" / None / 0 — what records from before the review workflows read as."""
    approval = make_approval()
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    record = await store.get_approval(approval.id)
    assert record is not None
    assert (record.review_json, record.votes_json, record.edited_json, record.edited_sha256) == (
        "",
        "",
        None,
        None,
    )
    assert (record.edited_by, record.escalated, record.escalate_at) == (None, 0, None)


async def test_two_steps_on_the_same_version_have_one_winner(store: Store) -> None:
    """Ten votes racing on version 0: one is recorded (with its own event), the others get None."""
    approval = make_approval()
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    results = await asyncio.gather(
        *(
            store.transition(
                approval.id,
                from_={"pending"},
                to="pending",
                actor=f"r{n}",
                channel="web",
                event="voted",
                version=0,
                votes_json=f'["r{n}"]',
            )
            for n in range(10)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].version == 1
    assert await store.get_approval(approval.id) == winners[0]
    events = await store.audit_events(approval_id=approval.id)
    assert [e.event for e in events] == ["created", "voted"]
    assert json.loads(winners[0].votes_json) == [events[1].actor]


async def test_a_step_on_a_stale_version_finds_nothing_and_a_step_without_one_is_refused(
    store: Store,
) -> None:
    """A decision on the version it read: after another step it gets None; no version is a bug."""
    approval = make_approval()
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    kwargs: dict[str, Any] = {"from_": {"pending"}, "actor": "bob", "channel": "web"}
    assert await store.transition(
        approval.id, to="pending", event="escalated", version=0, escalated=1, **kwargs
    )
    assert await store.transition(approval.id, to="approved", version=0, decided_by="bob", **kwargs) is None
    with pytest.raises(ValueError, match="version"):
        await store.transition(approval.id, to="pending", event="voted", **kwargs)
    approved = await store.transition(approval.id, to="approved", version=1, decided_by="bob", **kwargs)
    assert approved is not None
    assert (approved.status, approved.version, approved.escalated) == ("approved", 2, 1)
    events = await store.audit_events(approval_id=approval.id)
    assert [e.event for e in events] == ["created", "escalated", "approved"]


# ---- escalation queries ------------------------------------------------------------------------


async def test_escalation_queries_find_pending_records_due_soonest_first(store: Store) -> None:
    """Only pending records with escalate_at <= now, by escalate_at then id; the soonest overall."""
    assert await store.next_escalation() is None
    later = make_approval(escalate_at=NOW + 300)
    sooner = make_approval(escalate_at=NOW + 100)
    never = make_approval()
    decided = make_approval(escalate_at=NOW + 50)
    for approval in (later, sooner, never, decided):
        await store.create_approval(approval, actor="agent-a", channel="mcp")
    await store.transition(decided.id, from_={"pending"}, to="denied", actor="bob", channel="web")
    assert await store.next_escalation() == NOW + 100
    assert await store.due_for_escalation(NOW + 99) == []
    assert [a.id for a in await store.due_for_escalation(NOW + 100)] == [sooner.id]
    assert [a.id for a in await store.due_for_escalation(NOW + 1000)] == [sooner.id, later.id]
    # The step moves the next escalation on (None: no step left).
    await store.transition(
        sooner.id, from_={"pending"}, to="pending", actor="gateway", channel="gateway",
        event="escalated", version=0, escalated=1, escalate_at=None,
    )  # fmt: skip
    assert await store.next_escalation() == NOW + 300
    assert [a.id for a in await store.due_for_escalation(NOW + 1000)] == [later.id]


# ---- standing grants ---------------------------------------------------------------------------


async def test_a_grant_reads_back_with_reviewers_text_kept_as_data(store: Store) -> None:
    """Every field round-trips, quotes and SQL in the reviewer's text included; ids are sg_…"""
    nasty = "it's fine'); DROP TABLE standing_grants; --"
    constraints = (Constraint("to", "prefix", "ops'--"), Constraint("subject", "in", ("a'b", 'c"d')))
    grant = await granted(
        store, reason=nasty, max_uses=3, source_approval=new_approval_id(),
        constraints_json=constraints_to_json(constraints), rule=nasty,
    )  # fmt: skip
    assert grant.id.startswith("sg_")
    assert await store.get_standing(grant.id) == grant
    assert (await store.get_standing(grant.id)).constraints == constraints  # type: ignore[union-attr]
    assert await store.get_standing(new_standing_id()) is None
    assert await store.list_standing() == [grant]


async def test_create_refuses_a_grant_that_is_not_new(store: Store) -> None:
    """A used, revoked, zero-use or badly named grant is a programming error; a duplicate id a StoreError."""
    for bad in (
        make_grant(uses=1),
        make_grant(revoked_at=NOW),
        make_grant(max_uses=0),
        make_grant(id=new_approval_id()),
        make_grant(expires_at=NOW),
        make_grant(constraints_json='[{"field": "to", "op": "like"}]'),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - the message is not part of the contract
            await store.create_standing(bad, actor="alice", channel="web")
    grant = await granted(store)
    with pytest.raises(StoreError):
        await store.create_standing(grant, actor="alice", channel="web")
    assert await store.list_standing() == [grant]
    assert len(await store.audit_events()) == 1


async def test_list_is_newest_first_and_filters_by_agent_and_activity(store: Store) -> None:
    """Newest first; grant= narrows to an agent; active_at= drops revoked, expired and used-up ones."""
    oldest = await granted(store, created_at=NOW - 30)
    expired = await granted(store, created_at=NOW - 20, expires_at=NOW)
    used_up = await granted(store, created_at=NOW - 10, max_uses=1)
    revoked = await granted(store, created_at=NOW - 5)
    other_agent = await granted(store, grant="agent-b")
    assert await use(store, used_up.id)
    assert await store.revoke_standing(revoked.id, NOW, actor="bob", channel="web")
    every = await store.list_standing()
    assert [g.id for g in every] == [other_agent.id, revoked.id, used_up.id, expired.id, oldest.id]
    assert [g.id for g in await store.list_standing(limit=2, offset=1)] == [revoked.id, used_up.id]
    assert [g.id for g in await store.list_standing(grant="agent-b")] == [other_agent.id]
    assert [g.id for g in await store.list_standing(active_at=NOW)] == [other_agent.id, oldest.id]
    assert [g.id for g in await store.list_standing(active_at=NOW, grant="agent-a")] == [oldest.id]


async def test_standing_for_is_the_agents_active_grants_of_the_tool_deny_first(store: Store) -> None:
    """Only this agent, upstream and tool, active now; denials first, then oldest first."""
    allow_old = await granted(store, created_at=NOW - 20)
    allow_new = await granted(store, created_at=NOW - 10)
    deny = await granted(store, effect="deny", reason="not on Fridays", created_at=NOW - 5)
    await granted(store, grant="agent-b")
    await granted(store, tool="delete_email")
    await granted(store, upstream="other-mail")
    await granted(store, created_at=NOW - 60, expires_at=NOW)
    revoked = await granted(store)
    await store.revoke_standing(revoked.id, NOW, actor="bob", channel="web")
    found = await store.standing_for("mail", "send_email", "agent-a", NOW)
    assert [g.id for g in found] == [deny.id, allow_old.id, allow_new.id]
    assert await store.standing_for("mail", "send_email", "agent-a", NOW + HOUR) == []


async def test_twenty_concurrent_uses_of_five_get_exactly_five(store: Store) -> None:
    """The last uses race: exactly max_uses succeed, each with one "used" event; then none."""
    grant = await granted(store, max_uses=5)
    results = await asyncio.gather(*(use(store, grant.id) for _ in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 5
    assert sorted(w.uses for w in winners) == [1, 2, 3, 4, 5]
    assert (await store.get_standing(grant.id)).uses == 5  # type: ignore[union-attr]
    assert await use(store, grant.id) is None
    assert await store.standing_for("mail", "send_email", "agent-a", NOW) == []
    used = [e for e in await store.audit_events(approval_id=grant.id) if e.event == "used"]
    assert len(used) == 5
    assert {(e.actor, e.channel, e.args_sha256) for e in used} == {("agent-a", "mcp", sha256_of(EMAIL))}
    assert sorted(json.loads(e.detail or "")["uses"] for e in used) == [1, 2, 3, 4, 5]


async def test_revoking_twice_gives_none_the_second_time_and_stops_every_use(store: Store) -> None:
    """Revoked at once (by whom, when); a second revoke and any use find nothing; unknown ids too."""
    grant = await granted(store)
    assert await use(store, grant.id)
    revoked = await store.revoke_standing(grant.id, NOW + 60, actor="bob", channel="api")
    assert revoked == dataclasses.replace(grant, uses=1, revoked_at=NOW + 60, revoked_by="bob")
    assert revoked.state(NOW + 60) == "revoked"
    assert await store.revoke_standing(grant.id, NOW + 61, actor="carol", channel="web") is None
    assert await use(store, grant.id, NOW + 61) is None
    assert await store.revoke_standing(new_standing_id(), NOW, actor="bob", channel="web") is None
    assert await store.get_standing(grant.id) == revoked


async def test_an_expired_grant_is_not_usable_but_can_still_be_revoked(store: Store) -> None:
    """Usable up to just before expires_at, never at or after it."""
    grant = await granted(store)
    assert await use(store, grant.id, NOW + HOUR - 0.001)
    assert await use(store, grant.id, NOW + HOUR) is None
    assert (await store.get_standing(grant.id)).uses == 1  # type: ignore[union-attr]
    assert await store.revoke_standing(grant.id, NOW + HOUR, actor="bob", channel="web")


async def test_grant_events_join_the_audit_chain_under_the_grants_id(store: Store) -> None:
    """granted / used / revoked, with the request id, interleaved with approvals' events: one chain."""
    approval = make_approval()
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    token = REQUEST_ID.set("req-grant-1")
    try:
        grant = await granted(store, max_uses=2)
    finally:
        REQUEST_ID.reset(token)
    await use(store, grant.id)
    await store.transition(approval.id, from_={"pending"}, to="approved", actor="bob", channel="web")
    await store.append_audit(grant.id, "viewed", actor="bob", channel="web", args_sha256="")
    await store.revoke_standing(grant.id, NOW, actor="bob", channel="web")
    events = await store.audit_events(limit=100)
    assert [(e.approval_id, e.event) for e in events] == [
        (approval.id, "created"),
        (grant.id, "granted"),
        (grant.id, "used"),
        (approval.id, "approved"),
        (grant.id, "viewed"),
        (grant.id, "revoked"),
    ]
    granted_event = events[1]
    assert (granted_event.actor, granted_event.channel, granted_event.request_id) == (
        "alice",
        "web",
        "req-grant-1",
    )
    assert json.loads(granted_event.detail or "") == {
        "effect": "allow",
        "upstream": "mail",
        "tool": "send_email",
        "grant": "agent-a",
        "constraints": [
            {"field": "subject", "op": "eq", "value": "Numbers"},
            {"field": "to", "op": "eq", "value": "ops@example.com"},
        ],
        "expires_at": NOW + HOUR,
        "max_uses": 2,
        "source_approval": "",
    }
    assert [e.event for e in await store.audit_events(approval_id=grant.id)] == [
        "granted",
        "used",
        "viewed",
        "revoked",
    ]
    assert verify(events, await store.audit_head()) is None
    assert await verify_log(store) == (6, None)
    with pytest.raises(StoreError):  # still: every audit line belongs to a record that exists
        await store.append_audit(new_standing_id(), "viewed", actor="bob", channel="web", args_sha256="")


# ---- what only a database has ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database: two processes on one SQLite file, or two PostgreSQL replicas."""
    if request.param == "sqlite":
        first: Store = await SqliteStore.open(tmp_path / "shared.db", clock=lambda: NOW)
        second: Store = await SqliteStore.open(tmp_path / "shared.db", clock=lambda: NOW)
    else:
        url = request.getfixturevalue("postgres_url")
        first = await PostgresStore.open(url, clock=lambda: NOW)
        await first.empty()
        second = await PostgresStore.open(url, clock=lambda: NOW)
    yield first, second
    await first.close()
    await second.close()


async def test_uses_and_votes_racing_from_two_processes_stay_exact(two_stores: tuple[Store, Store]) -> None:
    """Across processes too: 5 of 20 uses, 1 of 10 same-version votes, and the chain holds."""
    first, second = two_stores
    grant = await granted(first, max_uses=5)
    approval = make_approval()
    await first.create_approval(approval, actor="agent-a", channel="mcp")
    uses = [use(first if n % 2 else second, grant.id) for n in range(20)]
    votes = [
        (first if n % 2 else second).transition(
            approval.id,
            from_={"pending"},
            to="pending",
            actor=f"r{n}",
            channel="web",
            event="voted",
            version=0,
        )
        for n in range(10)
    ]
    results = await asyncio.gather(*uses, *votes)
    assert sum(r is not None for r in results[:20]) == 5
    assert sum(r is not None for r in results[20:]) == 1
    assert await verify_log(second) == (8, None)  # created, granted, 5 used, 1 voted


async def test_the_terms_of_a_grant_never_change_even_by_raw_sql(two_stores: tuple[Store, Store]) -> None:
    """A trigger keeps expiry, constraints and max_uses as granted; uses may still be counted."""
    store, _ = two_stores
    grant = await granted(store, max_uses=2)
    if isinstance(store, SqliteStore):
        path = store._db._path
        with sqlite3.connect(path) as conn:
            with pytest.raises(sqlite3.IntegrityError, match="never change"):
                conn.execute("UPDATE standing_grants SET expires_at = expires_at + 1e9")
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute("UPDATE standing_grants SET uses = 3")
    else:
        assert isinstance(store, PostgresStore)
        async with store.pool.acquire() as conn:
            with pytest.raises(asyncpg.RaiseError, match="never change"):
                await conn.execute("UPDATE standing_grants SET max_uses = NULL")
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE standing_grants SET uses = 3")
    assert await store.get_standing(grant.id) == grant


async def test_sqlite_change_feed_skips_grant_events(tmp_path: pathlib.Path) -> None:
    """changes_after (another process's poller) publishes approvals' changes only: sg_ ids have no record."""
    store = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    try:
        grant = await granted(store)
        approval = make_approval()
        await store.create_approval(approval, actor="agent-a", channel="mcp")
        await use(store, grant.id)
        _, last, changes = await store.changes_after(0, None)
        assert last == 3
        assert [(event, a.id) for event, a in changes] == [("created", approval.id)]
    finally:
        await store.close()


async def test_postgres_notifies_approval_changes_only(postgres_url: str) -> None:
    """Grant writes send no NOTIFY (every replica's feed reads each id it hears of as an approval)."""
    store = await PostgresStore.open(postgres_url, clock=lambda: NOW)
    listener = await asyncpg.connect(postgres_url)
    heard: list[str] = []
    created = asyncio.Event()

    def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        heard.append(str(payload))
        if str(payload).endswith(":created"):
            created.set()

    try:
        await store.empty()
        await listener.add_listener(CHANNEL, notified)
        grant = await granted(store, max_uses=1)
        await use(store, grant.id)
        await store.revoke_standing(grant.id, NOW, actor="bob", channel="web")
        approval = make_approval()
        await store.create_approval(approval, actor="agent-a", channel="mcp")
        await asyncio.wait_for(created.wait(), WAIT)  # delivered in commit order: the grant's first
        assert heard == [f"{approval.id}:0:created"]
    finally:
        await listener.close()
        await store.close()


async def test_a_v7_sqlite_file_migrates_to_v8_keeping_its_rows(tmp_path: pathlib.Path) -> None:
    """Records, audit chain and refs survive; old records read with the defaults; the new edges,
    tables and triggers are in place."""
    path = tmp_path / "approvals.db"
    approval = make_approval()
    decided = make_approval()
    v7_fields = [name for name in STORED_FIELDS if name not in _V8_FIELDS]
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("PRAGMA foreign_keys=ON")
        for script in MIGRATIONS[:7]:
            for statement in split_statements(script):
                conn.execute(statement)
        conn.execute("PRAGMA user_version=7")
        columns = ", ".join("grant_name" if name == "grant" else name for name in v7_fields)
        for record in (approval, decided):
            values = [getattr(record, name) for name in v7_fields]
            conn.execute(f"INSERT INTO approvals ({columns}) VALUES ({', '.join('?' * len(values))})", values)  # noqa: S608
            sqlite_approvals.insert_audit(
                conn, at=NOW, approval_id=record.id, event="created", actor="agent-a", channel="mcp",
                args_sha256=record.args_sha256, detail=None, request_id="req-1",
            )  # fmt: skip
        conn.execute("UPDATE approvals SET status = 'denied', version = 1 WHERE id = ?", (decided.id,))
        sqlite_approvals.insert_audit(
            conn, at=NOW, approval_id=decided.id, event="denied", actor="bob", channel="web",
            args_sha256=decided.args_sha256, detail="no", request_id=None,
        )  # fmt: skip
        sqlite_approvals.save_message_ref(conn, approval.id, "slack", '{"ts": "1"}')
        before = sqlite_approvals.audit_events(conn, approval_id=None, after_seq=0, limit=100)
    store = await SqliteStore.open(path, clock=lambda: NOW)
    try:
        assert await store.schema_version() == len(MIGRATIONS) == 8
        assert await store.get_approval(approval.id) == approval
        assert await store.get_approval(decided.id) == dataclasses.replace(
            decided, status="denied", version=1
        )
        assert await store.audit_events() == before
        assert await verify_log(store) == (3, None)
        assert await store.message_ref(approval.id, "slack") == '{"ts": "1"}'
        # The new parts work on the old file: a step, a grant's events, the escalation index.
        assert await store.transition(
            approval.id, from_={"pending"}, to="pending", actor="bob", channel="web", event="voted", version=0
        )
        grant = await granted(store)
        assert await use(store, grant.id)
        assert await store.next_escalation() is None
        assert await verify_log(store) == (6, None)
        new_seq = (await store.audit_head())[0]
        assert new_seq == 6
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET detail = 'x' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="illegal approval status change"):
            conn.execute("UPDATE approvals SET status = 'approved' WHERE id = ?", (decided.id,))
        with pytest.raises(sqlite3.IntegrityError, match="never changes"):
            conn.execute("UPDATE approvals SET review_json = '{}' WHERE id = ?", (approval.id,))
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute(
                "INSERT INTO audit (at, approval_id, event, actor, channel, args_sha256)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (NOW, "sg_nobody", "used", "agent-a", "mcp", ""),
            )
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM standing_grants WHERE grant_name = 'a' AND upstream = 'u'"
                " AND tool = 't' AND revoked_at IS NULL AND expires_at > 0"
            )
        )
        assert "standing_grants_for" in plan


_V8_FIELDS = (
    "review_json",
    "votes_json",
    "edited_json",
    "edited_sha256",
    "edited_by",
    "escalated",
    "escalate_at",
)
