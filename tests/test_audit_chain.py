"""The tamper-evident audit log: the hash chain on every store, `approvals audit verify | export`,
and the chain's hashes in GET /api/audit."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from approvals import cli_audit
from approvals.audit_chain import GENESIS, BrokenLink, event_record, seal, verify, verify_log
from approvals.config import load_settings
from approvals.core.model import Approval, AuditEvent, Status
from approvals.core.ports import Store
from approvals.store import postgres
from approvals.store.memory import MemoryStore
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import MIGRATIONS, SqliteStore, split_statements
from tests.approvals_kit import HELD_POLICY, start_held
from tests.conftest import POSTGRES_ADMIN_URL, WAIT, StartGateway, mcp_client
from tests.test_store_approvals import NOW, make_approval

EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}


async def _history(store: Store, count: int = 3) -> list[str]:
    """``count`` approvals, each created then approved, denied or expired in turn: 2 events each."""
    ids = []
    for n in range(count):
        approval = make_approval()
        await store.create_approval(approval, actor="agent-a", channel="mcp")
        to: Status = ("approved", "denied", "expired")[n % 3]
        moved = await store.transition(approval.id, from_={"pending"}, to=to, actor="alice", channel="web")
        assert moved is not None
        ids.append(approval.id)
    return ids


def _chain(count: int) -> list[AuditEvent]:
    """A well-formed chain of ``count`` events, as a store writes it."""
    events: list[AuditEvent] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        event = seal(AuditEvent(seq, NOW + seq, "a1", "created", "agent-a", "mcp", "h", None), prev)
        events.append(event)
        prev = event.hash
    return events


# ---- the verifier, on values -------------------------------------------------------------------


def test_an_intact_chain_verifies_with_its_head() -> None:
    """Rows chained one after another, ending at the head, hold."""
    events = _chain(5)
    assert verify(events, (5, events[-1].hash)) is None
    assert verify([], (0, GENESIS)) is None


def test_an_edited_field_is_named_at_its_seq() -> None:
    """A row whose fields changed no longer matches its own hash."""
    events = _chain(5)
    events[2] = dataclasses.replace(events[2], detail="nothing to see")
    assert verify(events) == BrokenLink(3, "edited", "its fields do not match its hash")


def test_a_row_rewritten_with_a_fresh_hash_is_named_by_the_next_link() -> None:
    """Recomputing the edited row's own hash does not help: the next row was chained to the old one."""
    events = _chain(5)
    events[2] = seal(dataclasses.replace(events[2], actor="mallory"), events[1].hash)
    broken = verify(events)
    assert broken is not None
    assert (broken.seq, broken.kind) == (3, "edited")


@pytest.mark.parametrize(("gone", "first"), [([2], 3), ([1, 2], 2), ([0], 1)])
def test_deleted_rows_are_named_as_the_gap(gone: list[int], first: int) -> None:
    """Rows taken out of the middle or the start show as the seqs missing."""
    events = [e for n, e in enumerate(_chain(5)) if n not in gone]
    broken = verify(events)
    assert broken is not None
    assert (broken.seq, broken.kind) == (first, "deleted")


def test_a_cut_off_tail_shows_against_the_head() -> None:
    """The last rows deleted: every link holds, but the head names a later seq."""
    events = _chain(5)
    broken = verify(events[:3], (5, events[-1].hash))
    assert broken is not None
    assert (broken.seq, broken.kind) == (4, "deleted")


def test_rows_moved_to_other_seqs_are_named_reordered() -> None:
    """Two rows' seqs swapped: the first moved row is named, and where it was written."""
    events = _chain(5)
    events[1], events[2] = (
        dataclasses.replace(events[2], seq=2),
        dataclasses.replace(events[1], seq=3),
    )
    broken = verify(events)
    assert broken is not None
    assert (broken.seq, broken.kind) == (2, "reordered")
    assert "written as seq 3" in broken.detail


def test_a_seq_gap_the_chain_was_written_over_is_not_a_deletion() -> None:
    """A migrated log whose seqs had gaps (PostgreSQL sequences skip) still verifies."""
    first = seal(AuditEvent(1, NOW, "a1", "created", "a", "mcp", "h", None), GENESIS)
    third = seal(AuditEvent(3, NOW, "a1", "approved", "b", "web", "h", None), first.hash)
    assert verify([first, third], (3, third.hash)) is None


# ---- every store chains what it appends --------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    elif request.param == "postgres":
        opened = await PostgresStore.open(request.getfixturevalue("postgres_url"), clock=lambda: NOW)
        await opened.empty()
    else:
        opened = MemoryStore(clock=lambda: NOW)
    yield opened
    await opened.close()


async def test_every_store_chains_transitions_and_appended_events(store: Store) -> None:
    """Creates, decisions and appended events form one chain whose last link is the head."""
    ids = await _history(store)
    await store.append_audit(ids[0], "viewed", actor="bob", channel="web", args_sha256="h")
    events = await store.audit_events(limit=100)
    assert [e.seq for e in events] == list(range(1, 8))
    assert events[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    assert await store.audit_head() == (7, events[-1].hash)
    assert await verify_log(store) == (7, None)


# ---- tampering with the database ----------------------------------------------------------------


def _tamper(path: Path, sql: str, *params: object) -> None:
    """Change the file as someone with write access would: the append-only triggers dropped first."""
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        conn.execute(sql, params)


def _config(tmp_path: Path, store: str) -> Path:
    """A gateway.toml naming the store (`path = …` or `url = …`) and one upstream."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[store]\n{store}\n\n[upstreams.demo]\ncommand = ["python", "-m", "approvals.demo_server"]\n'
    )
    return config


def _cli(*argv: str) -> tuple[int, str]:
    """`approvals audit …` as the CLI runs it (its own event loop, on a thread); status and output."""
    out = io.StringIO()
    return cli_audit.main(list(argv), out), out.getvalue()


async def _run_cli(*argv: str) -> tuple[int, str]:
    return await asyncio.to_thread(_cli, *argv)


async def test_verify_passes_then_names_an_edited_row_and_a_deleted_one(tmp_path: Path) -> None:
    """verify exits 0 on an intact file; 1 naming the seq of an edited detail, then of a deleted row."""
    path = tmp_path / "approvals.db"
    store = await SqliteStore.open(path, clock=lambda: NOW)
    await _history(store)
    await store.close()
    config = str(_config(tmp_path, f'path = "{path}"'))

    assert await _run_cli("audit", "verify", "--config", config) == (0, "chain intact: 6 events\n")
    _tamper(path, "UPDATE audit SET detail = 'approved after all' WHERE seq = 4")
    status, out = await _run_cli("audit", "verify", "--config", config)
    assert status == cli_audit.EXIT_BROKEN
    assert out.startswith("audit chain broken at seq 4: edited:")
    _tamper(path, "DELETE FROM audit WHERE seq = 2")
    status, out = await _run_cli("audit", "verify", "--config", config)
    assert status == cli_audit.EXIT_BROKEN
    assert out.startswith("audit chain broken at seq 2: deleted: seq 2 missing")


async def test_verify_without_a_database_or_with_a_bad_since_exits_2(tmp_path: Path) -> None:
    """A log that cannot be read is not reported intact, nor created by the reading."""
    path = tmp_path / "none.db"
    config = str(_config(tmp_path, f'path = "{path}"'))
    assert (await _run_cli("audit", "verify", "--config", config))[0] == cli_audit.EXIT_TROUBLE
    assert not path.exists()
    status = (await _run_cli("audit", "export", "--config", config, "--since", "last week"))[0]
    assert status == cli_audit.EXIT_TROUBLE


def test_since_accepts_a_seq_a_duration_and_an_iso_time() -> None:
    """--since: seq:N from seq N; 7d back from now; an ISO time, UTC unless it says otherwise."""
    assert cli_audit.parse_since("seq:5", NOW) == cli_audit.Since(seq=5)
    assert cli_audit.parse_since("7d", NOW) == cli_audit.Since(at=NOW - 7 * 86400)
    assert cli_audit.parse_since("2023-11-14T22:13:20", NOW) == cli_audit.Since(at=NOW)
    assert cli_audit.parse_since("2023-11-14T23:13:20+01:00", NOW) == cli_audit.Since(at=NOW)
    for bad in ("seq:0", "seq:x", "7", "yesterday"):
        with pytest.raises(ValueError, match="seq:N"):
            cli_audit.parse_since(bad, NOW)


async def test_an_upgraded_v6_sqlite_file_with_audit_rows_verifies(tmp_path: Path) -> None:
    """Rows written before the chain are chained by the migration, in seq order, and verify."""
    path = tmp_path / "approvals.db"
    approval = make_approval()
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:6]:
            for statement in split_statements(script):
                conn.execute(statement)
        conn.execute("PRAGMA user_version=6")
        columns = ", ".join(f.name if f.name != "grant" else "grant_name" for f in _stored(approval))
        values = [getattr(approval, f.name) for f in _stored(approval)]
        conn.execute(f"INSERT INTO approvals ({columns}) VALUES ({', '.join('?' * len(values))})", values)  # noqa: S608
        for event in ("created", "viewed", "approved"):
            conn.execute(
                "INSERT INTO audit (at, approval_id, event, actor, channel, args_sha256, detail)"
                " VALUES (?, ?, ?, 'alice', 'web', 'h', NULL)",
                (NOW, approval.id, event),
            )
    store = await SqliteStore.open(path, clock=lambda: NOW)
    try:
        assert await verify_log(store) == (3, None)
        await store.transition(approval.id, from_={"pending"}, to="denied", actor="bob", channel="web")
        assert await verify_log(store) == (4, None)
        assert [e.event for e in await store.audit_events()] == ["created", "viewed", "approved", "denied"]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET detail = 'x' WHERE seq = 1")  # chained rows stay read-only


# Columns SQLite v8 / PostgreSQL migration 6 added (review workflows): not in an older schema.
_REVIEW_FIELDS = frozenset(
    {"review_json", "votes_json", "edited_json", "edited_sha256", "edited_by", "escalated", "escalate_at"}
)


def _stored(approval: Any) -> list[dataclasses.Field[Any]]:
    """The fields an older schema (before the review workflows) has columns for."""
    return [f for f in dataclasses.fields(approval) if f.init and f.name not in _REVIEW_FIELDS]


# ---- PostgreSQL ---------------------------------------------------------------------------------


async def _tamper_postgres(store: PostgresStore, sql: str) -> None:
    """Change the log as someone with write access would: past the append-only trigger."""
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
        await conn.execute(sql)
        await conn.execute("ALTER TABLE audit ENABLE TRIGGER audit_append_only")


async def test_postgres_refuses_to_change_or_delete_a_chained_row(postgres_url: str) -> None:
    """The append-only trigger: UPDATE and DELETE of a chained row fail; the chain still holds."""
    store = await PostgresStore.open(postgres_url)
    try:
        await store.empty()
        await _history(store, 1)
        async with store.pool.acquire() as conn:
            for sql in ("UPDATE audit SET detail = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 2"):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(sql)
        assert await verify_log(store) == (2, None)
    finally:
        await store.close()


async def test_concurrent_transitions_from_two_postgres_stores_chain_in_seq_order(postgres_url: str) -> None:
    """Two replicas appending at once: seqs dense and in chain order, every link holding."""
    first = await PostgresStore.open(postgres_url)
    second = await PostgresStore.open(postgres_url)
    try:
        await first.empty()
        approvals = [make_approval() for _ in range(40)]
        await asyncio.gather(
            *(
                (first if n % 2 else second).create_approval(a, actor="agent-a", channel="mcp")
                for n, a in enumerate(approvals)
            )
        )
        await asyncio.gather(
            *(
                (second if n % 2 else first).transition(
                    a.id, from_={"pending"}, to="approved", actor="b", channel="web"
                )
                for n, a in enumerate(approvals)
            )
        )
        events = await first.audit_events(limit=1000)
        assert [e.seq for e in events] == list(range(1, 81))
        assert await verify_log(second) == (80, None)
        # An edit in the database is named by either replica.
        await _tamper_postgres(first, "UPDATE audit SET actor = 'mallory' WHERE seq = 33")
        count, broken = await verify_log(second)
        assert (count, broken and broken.seq, broken and broken.kind) == (32, 33, "edited")
    finally:
        await first.close()
        await second.close()


async def test_postgres_verify_through_the_cli(postgres_url: str, tmp_path: Path) -> None:
    """`approvals audit verify` with `[store] url`: intact, then the deleted row's seq."""
    store = await PostgresStore.open(postgres_url)
    try:
        await store.empty()
        await _history(store, 2)
        config = str(_config(tmp_path, f'url = "{postgres_url}"'))
        assert await _run_cli("audit", "verify", "--config", config) == (0, "chain intact: 4 events\n")
        await _tamper_postgres(store, "DELETE FROM audit WHERE seq = 3")
        status, out = await _run_cli("audit", "verify", "--config", config)
        assert (status, out.split(":")[0]) == (cli_audit.EXIT_BROKEN, "audit chain broken at seq 3")
    finally:
        await store.close()


@pytest.fixture
async def fresh_postgres() -> AsyncIterator[str]:
    """A database of this test's own (the migration test starts from an older schema)."""
    name = f"approvals_audit_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_postgres_migration_5_chains_the_rows_already_there(
    fresh_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at migration 4 with audit rows (and a seq gap) verifies once migrated."""
    with monkeypatch.context() as patch:
        patch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:4])
        old = await PostgresStore.open(fresh_postgres)
    approval = make_approval()
    try:
        async with old.pool.acquire() as conn:
            columns = ", ".join(f.name if f.name != "grant" else "grant_name" for f in _stored(approval))
            values = [getattr(approval, f.name) for f in _stored(approval)]
            marks = ", ".join(f"${n}" for n in range(1, len(values) + 1))
            await conn.execute(f"INSERT INTO approvals ({columns}) VALUES ({marks})", *values)  # noqa: S608
            for seq, event in ((1, "created"), (2, "viewed"), (4, "approved")):  # 3: a rolled-back insert
                await conn.execute(
                    "INSERT INTO audit (seq, at, approval_id, event, actor, channel, args_sha256)"
                    " VALUES ($1, $2, $3, $4, 'alice', 'web', 'h')",
                    seq,
                    NOW,
                    approval.id,
                    event,
                )
    finally:
        await old.close()
    store = await PostgresStore.open(fresh_postgres)
    try:
        assert await store.schema_version() == len(postgres.MIGRATIONS)
        assert await verify_log(store) == (3, None)
        await store.transition(approval.id, from_={"pending"}, to="denied", actor="bob", channel="web")
        assert (await store.audit_head())[0] == 5
        assert await verify_log(store) == (4, None)
    finally:
        await store.close()


# ---- a real gateway run, the API and the export ------------------------------------------------


def _pending_about(subject: str) -> Callable[[Approval], bool]:
    return lambda approval: approval.status == "pending" and subject in approval.arguments_json


async def test_a_gateway_run_leaves_an_intact_chain_that_the_export_and_the_api_agree_on(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Held calls approved, denied and expired through the gateway: the chain holds; the API shows
    each event with its hashes, and the export prints the same events, field for field."""
    policy: dict[str, Any] = {
        **HELD_POLICY,
        "tools": {
            **HELD_POLICY["tools"],  # type: ignore[dict-item]
            "delete_file": {"action": "require_approval", "approval": {"timeout": "0.5s"}},
        },
    }
    held = await start_held(start_gateway, tmp_path, policy)
    async with mcp_client(held.url()) as client:
        for decision in ("approve", "deny"):
            call = asyncio.create_task(client.call_tool("send_email", {**EMAIL, "subject": decision}))
            pending = await held.recorder.wait_for(_pending_about(decision))
            status, _ = await held.api(
                "POST", f"/api/approvals/{pending.id}/{decision}", body={"reason": "r"}
            )
            assert status == 200
            await asyncio.wait_for(call, WAIT)
        expiring = await asyncio.wait_for(client.call_tool("delete_file", {"path": "notes.txt"}), WAIT)
        assert expiring.is_error
    await held.recorder.status("expired")
    await held.recorder.status("completed")

    status, body = await held.api("GET", "/api/audit?limit=1000")
    assert status == 200
    events = body["events"]
    assert {"created", "approved", "released", "completed", "denied", "expired"} <= {
        e["event"] for e in events
    }
    assert events[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(events))
    settings = load_settings(_config(tmp_path, f'path = "{tmp_path / "approvals.db"}"'))
    assert await cli_audit.verify(settings, io.StringIO()) == 0

    out = io.StringIO()
    assert await cli_audit.export(settings, cli_audit.Since(), out) == 0
    assert [json.loads(line) for line in out.getvalue().splitlines()] == events
    later = io.StringIO()
    await cli_audit.export(settings, cli_audit.Since(seq=3), later)
    assert [json.loads(line) for line in later.getvalue().splitlines()] == events[2:]
    assert [event_record(e) for e in await held.gateway.service.audit(limit=1000)] == events
