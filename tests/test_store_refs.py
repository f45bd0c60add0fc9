"""Message refs: where a channel posted its message about an approval, kept across restarts (schema v3)."""

from __future__ import annotations

import json
import pathlib
import sqlite3
from collections.abc import AsyncIterator

import pytest

from approvals.audit_chain import verify_log
from approvals.errors import StoreError
from approvals.store.sqlite import MIGRATIONS, SqliteStore
from tests.test_store_approvals import NOW, created, make_approval

REF = json.dumps({"channel": "C0APPROVALS", "ts": "1700000000.000100"})


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    yield opened
    await opened.close()


async def test_saved_ref_is_read_back_as_given(store: SqliteStore) -> None:
    """A saved ref comes back byte for byte; the store does not interpret it."""
    approval = await created(store)
    await store.save_message_ref(approval.id, "slack", REF)
    assert await store.message_ref(approval.id, "slack") == REF


async def test_missing_ref_is_none(store: SqliteStore) -> None:
    """No ref for an approval that was never posted, nor for an unknown id."""
    approval = await created(store)
    assert await store.message_ref(approval.id, "slack") is None
    assert await store.message_ref("no-such-id", "slack") is None


async def test_second_save_replaces_the_ref(store: SqliteStore) -> None:
    """A repost (the request came back for review) replaces the ref; one ref per approval and channel."""
    approval = await created(store)
    await store.save_message_ref(approval.id, "slack", REF)
    newer = json.dumps({"channel": "C0APPROVALS", "ts": "1700000100.000200"})
    await store.save_message_ref(approval.id, "slack", newer)
    assert await store.message_ref(approval.id, "slack") == newer


async def test_refs_are_kept_per_channel_and_per_approval(store: SqliteStore) -> None:
    """Two channels, or two approvals, never see one another's refs."""
    first, second = await created(store), await created(store)
    await store.save_message_ref(first.id, "slack", REF)
    await store.save_message_ref(first.id, "teams", '{"id": 7}')
    assert await store.message_ref(first.id, "teams") == '{"id": 7}'
    assert await store.message_ref(first.id, "slack") == REF
    assert await store.message_ref(second.id, "slack") is None


async def test_ref_for_an_unknown_approval_is_refused(store: SqliteStore) -> None:
    """A ref must point at a stored approval: anything else is a StoreError and nothing is written."""
    orphan = make_approval()
    with pytest.raises(StoreError):
        await store.save_message_ref(orphan.id, "slack", REF)
    assert await store.message_ref(orphan.id, "slack") is None


async def test_ref_survives_a_restart(tmp_path: pathlib.Path) -> None:
    """Reopening the file finds the ref, so an old message can still be updated with its outcome."""
    path = tmp_path / "approvals.db"
    first = await SqliteStore.open(path)
    try:
        approval = await created(first)
        await first.save_message_ref(approval.id, "slack", REF)
    finally:
        await first.close()
    second = await SqliteStore.open(path)
    try:
        assert await second.message_ref(approval.id, "slack") == REF
    finally:
        await second.close()


async def test_v2_database_migrates_to_the_latest_keeping_its_approvals(tmp_path: pathlib.Path) -> None:
    """A file written before message refs existed gains the table, the pending indexes and the
    lease columns, and keeps its records."""
    path = tmp_path / "approvals.db"
    old = await SqliteStore.open(path)
    try:
        approval = await created(old)
    finally:
        await old.close()
    with sqlite3.connect(path) as conn:  # back to what a v2 gateway left behind
        conn.execute("DROP TRIGGER audit_known_subject")  # v8
        conn.execute("DROP TABLE standing_grants")
        conn.execute("DROP INDEX approvals_pending_escalation")
        conn.execute("DROP TRIGGER approvals_request_is_fixed")  # v8 added review_json to it
        conn.execute(
            "CREATE TRIGGER approvals_request_is_fixed BEFORE UPDATE OF id, upstream, tool, arguments_json,"
            " args_sha256, grant_name, owner, created_at ON approvals"
            " BEGIN SELECT RAISE(ABORT, 'the request of an approval never changes'); END"
        )
        for column in ("review_json", "votes_json", "edited_json", "edited_sha256", "edited_by", "escalated"):
            conn.execute(f"ALTER TABLE approvals DROP COLUMN {column}")
        conn.execute("ALTER TABLE approvals DROP COLUMN escalate_at")
        conn.execute("DROP TABLE audit_sinks")  # v7
        conn.execute("DROP TABLE audit_head")
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("ALTER TABLE audit DROP COLUMN prev_hash")
        conn.execute("ALTER TABLE audit DROP COLUMN hash")
        conn.execute("ALTER TABLE audit DROP COLUMN request_id")
        conn.execute(
            "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
            " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
        )
        conn.execute("DROP TABLE used_login_links")  # v6
        conn.execute("DROP TABLE ended_inbox_sessions")
        conn.execute("DROP TABLE message_refs")  # v3
        conn.execute("DROP INDEX approvals_pending_grant")  # v4
        conn.execute("DROP INDEX approvals_pending_expiry")
        conn.execute(
            "CREATE INDEX approvals_live_expiry ON approvals (expires_at)"
            " WHERE status IN ('pending', 'approved')"
        )
        conn.execute("DROP INDEX approvals_released_lease")  # v5
        conn.execute("ALTER TABLE approvals DROP COLUMN lease_owner")
        conn.execute("ALTER TABLE approvals DROP COLUMN lease_expires_at")
        conn.execute("PRAGMA user_version=2")
    store = await SqliteStore.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS) >= 4
        sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
        indexes = await store._db.read(lambda conn: {row[0] for row in conn.execute(sql)})
        assert {"approvals_pending_grant", "approvals_pending_expiry", "approvals_released_lease"} <= indexes
        assert "approvals_live_expiry" not in indexes
        assert await store.get_approval(approval.id) == approval
        assert (await verify_log(store))[1] is None  # the audit rows written before v7 are chained
        await store.save_message_ref(approval.id, "slack", REF)
        assert await store.message_ref(approval.id, "slack") == REF
    finally:
        await store.close()
