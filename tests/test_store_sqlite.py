"""The SQLite store: schema migrations, pragmas and the counter round trip."""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import AsyncIterator

import pytest

from approvals.errors import StoreError
from approvals.store.sqlite import MIGRATIONS, SqliteStore, split_statements


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "approvals.db")
    yield opened
    await opened.close()


def _user_version(path: pathlib.Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def test_open_creates_parent_directories_and_applies_every_migration(tmp_path: pathlib.Path) -> None:
    """A fresh path gets its directories, its file and the latest schema version."""
    path = tmp_path / "nested" / "dir" / "approvals.db"
    store = await SqliteStore.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
    finally:
        await store.close()
    assert path.is_file()
    assert _user_version(path) == len(MIGRATIONS)


async def test_reopen_does_not_reapply_migrations(tmp_path: pathlib.Path) -> None:
    """Opening an up-to-date file again keeps its data and runs no script twice."""
    path = tmp_path / "approvals.db"
    first = await SqliteStore.open(path)
    await first.save_counters([("calls", "*", 60, 3.0)])
    await first.close()
    # A second run of v1 would fail with "table counters already exists".
    second = await SqliteStore.open(path)
    try:
        assert await second.load_counters(0) == [("calls", "*", 60, 3.0)]
        assert await second.schema_version() == len(MIGRATIONS)
    finally:
        await second.close()


async def test_newer_schema_version_is_refused(tmp_path: pathlib.Path) -> None:
    """A file written by a newer gateway is not opened, and the error says to upgrade."""
    path = tmp_path / "approvals.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this gateway supports") as caught:
        await SqliteStore.open(path)
    assert f"version {len(MIGRATIONS) + 1} " in str(caught.value)
    assert _user_version(path) == len(MIGRATIONS) + 1


async def test_v1_database_migrates_to_the_latest_schema_keeping_its_counters(tmp_path: pathlib.Path) -> None:
    """A file written before approvals existed gains the approvals tables and keeps its counters."""
    path = tmp_path / "approvals.db"
    with sqlite3.connect(path) as conn:
        for statement in split_statements(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("INSERT INTO counters VALUES ('calls', '*', 60, 4.0)")
        conn.execute("PRAGMA user_version=1")
    store = await SqliteStore.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        assert await store.load_counters(0) == [("calls", "*", 60, 4.0)]
        assert await store.list_approvals() == []
        assert await store.audit_events() == []
    finally:
        await store.close()


async def test_v5_database_gains_the_inbox_tables_which_outlive_a_reopen(tmp_path: pathlib.Path) -> None:
    """v6 adds used login links and ended sessions to a v5 file; a used link stays used after a reopen."""
    path = tmp_path / "approvals.db"
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:5]:
            for statement in split_statements(script):
                conn.execute(statement)
        conn.execute("PRAGMA user_version=5")
    first = await SqliteStore.open(path)
    assert await first.schema_version() == len(MIGRATIONS) >= 6
    assert await first.use_login_link("nonce-1", 100.0)
    await first.end_inbox_session("session-1", 200.0)
    await first.close()
    second = await SqliteStore.open(path)
    try:
        assert not await second.use_login_link("nonce-1", 100.0)
        assert await second.login_link_used("nonce-1")
        assert await second.ended_inbox_sessions(0.0) == {"session-1": 200.0}
    finally:
        await second.close()


async def test_sqlite_older_than_the_minimum_is_refused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without STRICT tables and RETURNING the compare-and-set cannot work: the store will not open."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(StoreError, match="too old"):
        await SqliteStore.open(tmp_path / "approvals.db")
    assert not (tmp_path / "approvals.db").exists()


async def test_journal_mode_is_wal(store: SqliteStore, tmp_path: pathlib.Path) -> None:
    """The file is in WAL mode, so readers in other processes never block the gateway."""
    with sqlite3.connect(tmp_path / "approvals.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_save_upserts_absolute_values(store: SqliteStore) -> None:
    """Saving a row twice keeps the last value, not a sum."""
    await store.save_counters([("calls", "grant:a", 60, 1.0), ("calls", "grant:b", 60, 2.0)])
    await store.save_counters([("calls", "grant:a", 60, 5.0)])
    expected = [("calls", "grant:a", 60, 5.0), ("calls", "grant:b", 60, 2.0)]
    assert sorted(await store.load_counters(0)) == expected


async def test_load_and_prune_select_by_window_start(store: SqliteStore) -> None:
    """load_counters returns rows from `since` on; prune_counters deletes rows before `before`."""
    rows = [("c", "*", start, float(start)) for start in (0, 60, 120, 180)]
    await store.save_counters(rows)
    assert sorted(await store.load_counters(120)) == rows[2:]
    await store.prune_counters(before=120)
    assert sorted(await store.load_counters(0)) == rows[2:]


async def test_failed_save_leaves_no_partial_write(store: SqliteStore) -> None:
    """save_counters is one transaction: a bad row rolls back the good ones before it."""
    bad = ("c", "*", 0, None)
    with pytest.raises(StoreError):
        await store.save_counters([("c", "*", 60, 1.0), bad])  # type: ignore[list-item]
    assert await store.load_counters(0) == []
    await store.save_counters([("c", "*", 60, 2.0)])  # the connection is usable afterwards
    assert await store.load_counters(0) == [("c", "*", 60, 2.0)]


def test_split_statements_keeps_semicolons_in_strings_and_comments() -> None:
    """Migration scripts split on statement ends only."""
    script = "CREATE TABLE t (x TEXT DEFAULT 'a;b'); -- note; here\nCREATE INDEX i ON t (x);\n"
    assert split_statements(script) == [
        "CREATE TABLE t (x TEXT DEFAULT 'a;b');",
        "-- note; here\nCREATE INDEX i ON t (x);",
    ]
