"""The approvals store: records, compare-and-set transitions, repeat-call lookup, expiry and audit.

Every test that takes the ``store`` fixture runs against both adapters, SQLite and the in-memory
twin, so they keep one semantics. Tests of what only SQLite has (its triggers, its durability, a
second connection to the file, a reopened file) take ``sqlite_store`` or open files themselves;
they are gathered under "SQLite only" below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import pathlib
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from approvals.audit_chain import verify
from approvals.core.model import (
    FINAL,
    RESULT_DROPPED_NOTE,
    STATUSES,
    TRANSITIONS,
    Approval,
    Status,
    new_approval_id,
    sha256_of,
)
from approvals.core.ports import Store
from approvals.errors import StoreError
from approvals.store.memory import MemoryStore
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
T = TypeVar("T")


def make_approval(**overrides: Any) -> Approval:
    """A pending request of agent-a to delete a file, created at NOW, expiring ten minutes later."""
    arguments = {"path": "/srv/report.txt"}
    tool = {"name": "delete_file", "inputSchema": {"type": "object"}}
    approval = Approval(
        id=new_approval_id(),
        upstream="files",
        tool="delete_file",
        arguments_json=json.dumps(arguments),
        args_sha256=sha256_of(arguments),
        tool_json=json.dumps(tool),
        tool_sha256=sha256_of(tool),
        grant="agent-a",
        owner="alice",
        session_id="session-1",
        rule="deletes-need-review",
        explanation="deleting files needs a human",
        status="pending",
        created_at=NOW,
        expires_at=NOW + 600,
    )
    return dataclasses.replace(approval, **overrides)


async def open_store(kind: str, path: pathlib.Path, postgres_url: str = "") -> Store:
    """A fresh store of this kind ("sqlite" at ``path``, "memory", or "postgres" emptied), stamping
    audit events at NOW."""
    if kind == "sqlite":
        return await SqliteStore.open(path, clock=lambda: NOW)
    if kind == "postgres":
        store = await PostgresStore.open(postgres_url, clock=lambda: NOW)
        await store.empty()
        return store
    return MemoryStore(clock=lambda: NOW)


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    opened = await open_store(request.param, tmp_path / "approvals.db", url)
    yield opened
    await opened.close()


@pytest.fixture
async def sqlite_store(tmp_path: pathlib.Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    yield opened
    await opened.close()


async def created(store: Store, **overrides: Any) -> Approval:
    approval = make_approval(**overrides)
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    return approval


async def moved(store: Store, approval_id: str, *path: Status, **fields: Any) -> Approval:
    """Walk the record along ``path`` (each step from its current status), returning the last record."""
    record = await store.get_approval(approval_id)
    assert record is not None
    for to in path:
        moved_to = await store.transition(
            approval_id, from_={record.status}, to=to, actor="alice", channel="web", **fields
        )
        assert moved_to is not None, f"{record.status} → {to}"
        record = moved_to
    return record


# ---- create, get, list ----------------------------------------------------------------------


async def test_create_then_get_returns_the_same_record(store: Store) -> None:
    """A created record reads back field for field, with floats and bools in their own types."""
    approval = await created(store)
    assert await store.get_approval(approval.id) == approval
    assert await store.get_approval(new_approval_id()) is None


async def test_create_appends_a_created_audit_event(store: Store) -> None:
    """The record and its "created" event are written together."""
    approval = await created(store)
    [event] = await store.audit_events(approval_id=approval.id)
    assert (event.event, event.actor, event.channel, event.at) == ("created", "agent-a", "mcp", NOW)
    assert event.args_sha256 == approval.args_sha256


async def test_create_refuses_a_record_that_is_not_new(store: Store) -> None:
    """Nothing enters the store already decided or at a later version."""
    with pytest.raises(ValueError, match="pending"):
        await store.create_approval(make_approval(status="approved"), actor="a", channel="mcp")
    with pytest.raises(ValueError, match="version 0"):
        await store.create_approval(make_approval(version=3), actor="a", channel="mcp")
    assert await store.list_approvals() == []
    assert await store.audit_events() == []


async def test_create_with_a_duplicate_id_fails_and_writes_nothing(store: Store) -> None:
    """A duplicate id is a store error, and its audit event is rolled back with it."""
    approval = await created(store)
    with pytest.raises(StoreError):
        await store.create_approval(dataclasses.replace(approval, tool="other"), actor="a", channel="mcp")
    assert await store.get_approval(approval.id) == approval
    assert len(await store.audit_events()) == 1


async def test_list_filters_by_status_upstream_tool_and_grant(store: Store) -> None:
    """Every given filter applies; none given lists everything."""
    a = await created(store, created_at=NOW + 1)
    b = await created(store, created_at=NOW + 2, upstream="mail", tool="send")
    c = await created(store, created_at=NOW + 3, grant="agent-b")
    await moved(store, c.id, "approved")

    def ids(records: list[Approval]) -> list[str]:
        return [r.id for r in records]

    assert ids(await store.list_approvals()) == [c.id, b.id, a.id]
    assert ids(await store.list_approvals(status="pending")) == [b.id, a.id]
    assert ids(await store.list_approvals(status="approved")) == [c.id]
    assert ids(await store.list_approvals(upstream="mail")) == [b.id]
    assert ids(await store.list_approvals(tool="delete_file", grant="agent-a")) == [a.id]
    assert ids(await store.list_approvals(status="pending", grant="agent-b")) == []


async def test_list_is_newest_first_with_id_breaking_ties_and_pages(store: Store) -> None:
    """Order is created_at then id, both descending; limit and offset page through it."""
    same_time = [await created(store, id=f"{n:032x}", created_at=NOW) for n in range(3)]
    newer = await created(store, created_at=NOW + 5)
    expected = [newer.id, *(r.id for r in reversed(same_time))]
    assert [r.id for r in await store.list_approvals()] == expected
    pages = [await store.list_approvals(limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [[r.id for r in page] for page in pages] == [expected[:2], expected[2:], []]


# ---- transitions ------------------------------------------------------------------------------


async def test_transition_sets_fields_bumps_version_and_audits(store: Store) -> None:
    """A successful move returns the new record and appends one event named after the move."""
    approval = await created(store)
    denied = await store.transition(
        approval.id,
        from_={"pending"},
        to="denied",
        actor="alice",
        channel="slack",
        decided_at=NOW + 10,
        decided_by="alice",
        decided_via="slack",
        reason="wrong file",
    )
    assert denied is not None
    assert (denied.status, denied.version, denied.decided_by, denied.decided_via, denied.reason) == (
        "denied",
        1,
        "alice",
        "slack",
        "wrong file",
    )
    assert denied.decided_at == NOW + 10
    assert await store.get_approval(approval.id) == denied
    events = await store.audit_events(approval_id=approval.id)
    assert [(e.event, e.actor, e.channel, e.detail) for e in events] == [
        ("created", "agent-a", "mcp", None),
        ("denied", "alice", "slack", "wrong file"),
    ]


async def test_transition_returns_floats_for_whole_number_times(store: Store) -> None:
    """UPDATE … RETURNING hands whole-number REALs back as ints; the record still has floats."""
    approval = await created(store, created_at=1.0, expires_at=2.0)
    record = await moved(store, approval.id, "approved")
    assert isinstance(record.created_at, float)
    assert isinstance(record.expires_at, float)


async def test_transition_event_name_can_differ_from_the_status(store: Store) -> None:
    """`event` names the audit line (e.g. tool_changed for approved → pending)."""
    approval = await created(store)
    await moved(store, approval.id, "approved")
    back = await store.transition(
        approval.id,
        from_=["approved"],
        to="pending",
        actor="gateway",
        channel="gateway",
        event="tool_changed",
        tool_sha256="new",
        decided_by=None,
        decided_via=None,
    )
    assert back is not None
    assert (back.status, back.version, back.tool_sha256, back.decided_by) == ("pending", 2, "new", None)
    events = await store.audit_events(approval_id=approval.id)
    assert [e.event for e in events] == ["created", "approved", "tool_changed"]


async def test_second_decision_on_the_same_record_returns_none(store: Store) -> None:
    """The first decision wins; a later one changes nothing and is not audited."""
    approval = await created(store)
    first = await moved(store, approval.id, "approved")
    second = await store.transition(approval.id, from_={"pending"}, to="denied", actor="bob", channel="web")
    assert second is None
    assert await store.get_approval(approval.id) == first
    assert len(await store.audit_events(approval_id=approval.id)) == 2


async def test_transition_of_an_unknown_id_returns_none(store: Store) -> None:
    """An id the store does not know is a lost compare-and-set, not an error."""
    missing = new_approval_id()
    assert await store.transition(missing, from_={"pending"}, to="approved", actor="a", channel="web") is None
    assert await store.audit_events() == []


async def test_fifty_concurrent_decisions_have_exactly_one_winner(store: Store) -> None:
    """50 reviewers deciding at once: one decision lands, and the audit has one decision event."""
    approval = await created(store)
    results = await asyncio.gather(
        *(
            store.transition(
                approval.id,
                from_={"pending"},
                to="approved" if n % 2 else "denied",
                actor=f"reviewer-{n}",
                channel="web",
                decided_by=f"reviewer-{n}",
            )
            for n in range(50)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    record = await store.get_approval(approval.id)
    assert record == winners[0]
    assert record.version == 1
    decisions = [e for e in await store.audit_events(approval_id=approval.id) if e.event != "created"]
    assert [(e.event, e.actor) for e in decisions] == [(record.status, record.decided_by)]


async def test_release_happens_once_under_twenty_concurrent_calls(store: Store) -> None:
    """approved → released is single use: twenty concurrent releases forward the call once."""
    approval = await created(store)
    await moved(store, approval.id, "approved")
    results = await asyncio.gather(
        *(
            store.transition(
                approval.id, from_={"approved"}, to="released", actor="gateway", channel="gateway"
            )
            for _ in range(20)
        )
    )
    assert sum(r is not None for r in results) == 1
    events = await store.audit_events(approval_id=approval.id)
    assert [e.event for e in events].count("released") == 1


@pytest.mark.parametrize(
    ("from_", "to"),
    [
        ({"pending"}, "released"),
        ({"pending"}, "completed"),
        ({"pending"}, "pending"),  # legal, but only as a step conditional on version=
        ({"approved"}, "denied"),
        ({"approved", "pending"}, "released"),  # one illegal source spoils the set
        ({"released"}, "approved"),
        ({"denied"}, "approved"),
        ({"completed"}, "failed"),
        ({"expired"}, "pending"),
        ({"cancelled"}, "pending"),
        (set(), "approved"),
        ({"bogus"}, "approved"),
        ({"pending"}, "bogus"),
    ],
)
async def test_illegal_transition_pair_raises_value_error(
    store: Store, from_: set[Status], to: Status
) -> None:
    """A move off the life-cycle graph is a programming error, refused before the store is touched."""
    approval = await created(store)
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not part of the contract
        await store.transition(approval.id, from_=from_, to=to, actor="a", channel="web")
    assert await store.get_approval(approval.id) == approval


async def test_from_as_a_bare_string_is_refused(store: Store) -> None:
    """from_="pending" would be a set of characters; it is refused rather than silently never matching."""
    approval = await created(store)
    with pytest.raises(ValueError, match="collection"):
        await store.transition(approval.id, from_="pending", to="approved", actor="a", channel="web")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    # Not "version": it is the keyword of the compare (transition(version=…)), never a value to set.
    "field",
    ["id", "status", "arguments_json", "args_sha256", "grant", "upstream", "review_json", "nonsense"],
)
async def test_transition_refuses_fields_it_may_not_set(store: Store, field: str) -> None:
    """Unknown names, store-managed fields and the request itself cannot be set by a move."""
    approval = await created(store)
    fields: dict[str, Any] = {field: "x"}
    with pytest.raises(ValueError, match=field):
        await store.transition(
            approval.id, from_={"pending"}, to="approved", actor="a", channel="web", **fields
        )
    assert await store.get_approval(approval.id) == approval


@pytest.mark.parametrize(
    "path",
    [
        ("denied",),
        ("expired",),
        ("cancelled",),
        ("approved", "expired"),
        ("approved", "released", "completed"),
        ("approved", "released", "failed"),
    ],
)
async def test_final_states_never_change(store: Store, path: tuple[Status, ...]) -> None:
    """Once final, every legal move from any other state finds nothing to change."""
    approval = await created(store)
    final = await moved(store, approval.id, *path)
    assert final.status in FINAL
    for source, targets in TRANSITIONS.items():
        for to in targets:
            # At the record's own version: the status alone refuses the move.
            moved_to = await store.transition(
                approval.id, from_={source}, to=to, actor="a", channel="web", version=final.version
            )
            assert moved_to is None
    assert await store.get_approval(approval.id) == final


# ---- update_fields ----------------------------------------------------------------------------


async def test_update_fields_sets_delivery_fields_without_version_or_audit(store: Store) -> None:
    """result_delivered and note change; status, version and the audit log do not."""
    approval = await created(store)
    await store.update_fields(approval.id, result_delivered=True, note="told the agent")
    record = await store.get_approval(approval.id)
    assert record == dataclasses.replace(approval, result_delivered=True, note="told the agent")
    assert len(await store.audit_events()) == 1


@pytest.mark.parametrize("field", ["status", "version", "decided_by", "arguments_json", "nonsense"])
async def test_update_fields_refuses_state_and_request_fields(store: Store, field: str) -> None:
    """State only changes through transition, with its compare-and-set and audit event."""
    approval = await created(store)
    with pytest.raises(ValueError, match=field):
        await store.update_fields(approval.id, **{field: "x"})
    assert await store.get_approval(approval.id) == approval


# ---- repeat calls -----------------------------------------------------------------------------


async def reusable(store: Store, approval: Approval, now: float = NOW) -> Approval | None:
    return await store.find_reusable(
        grant=approval.grant,
        upstream=approval.upstream,
        tool=approval.tool,
        args_sha256=approval.args_sha256,
        now=now,
    )


@pytest.mark.parametrize("path", [(), ("approved",), ("approved", "released")])
async def test_find_reusable_attaches_to_an_open_request(store: Store, path: tuple[Status, ...]) -> None:
    """Pending, approved and released records take the repeat call."""
    approval = await created(store)
    record = await moved(store, approval.id, *path)
    assert await reusable(store, approval) == record


async def test_find_reusable_matches_grant_upstream_tool_and_arguments(store: Store) -> None:
    """A different grant, upstream, tool or argument hash is a different request."""
    approval = await created(store)
    changes: list[dict[str, Any]] = [
        {"grant": "agent-b"},
        {"upstream": "mail"},
        {"tool": "send"},
        {"args_sha256": "0" * 64},
    ]
    for change in changes:
        assert await reusable(store, dataclasses.replace(approval, **change)) is None


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_find_reusable_hands_out_a_kept_result_until_delivered_or_dropped(
    store: Store, outcome: Status
) -> None:
    """A finished call is reused while its result is kept, undelivered and within its window."""
    approval = await created(store)
    done = await moved(
        store,
        approval.id,
        "approved",
        "released",
        outcome,
        result_json='{"result":{}}',
        result_expires_at=NOW + 60,
    )
    assert await reusable(store, approval) == done
    assert await reusable(store, approval, now=NOW + 60) is None  # window over
    await store.update_fields(approval.id, result_delivered=True)
    assert await reusable(store, approval) is None


async def test_find_reusable_ignores_a_finished_call_without_a_kept_result(store: Store) -> None:
    """No result (too big, or dropped) or no keep window: the repeat call is a new request."""
    no_result = await created(store)
    await moved(store, no_result.id, "approved", "released", "completed", result_expires_at=NOW + 60)
    assert await reusable(store, no_result) is None
    no_window = await created(store, args_sha256="1" * 64)
    await moved(store, no_window.id, "approved", "released", "completed", result_json="{}")
    assert await reusable(store, no_window) is None


@pytest.mark.parametrize("path", [("denied",), ("expired",), ("approved", "expired")])
async def test_find_reusable_repeats_a_denial_or_expiry_within_its_window(
    store: Store, path: tuple[Status, ...]
) -> None:
    """Denied or expired records answer repeat calls until result_expires_at, then no longer."""
    approval = await created(store)
    await moved(store, approval.id, *path)
    assert await reusable(store, approval) is None  # the caller has not set a window
    await store.update_fields(approval.id, result_expires_at=NOW + 60)
    found = await reusable(store, approval)
    assert found is not None
    assert found.status == path[-1]
    assert await reusable(store, approval, now=NOW + 60) is None


async def test_find_reusable_skips_cancelled_and_prefers_the_newest(store: Store) -> None:
    """A cancelled record is never reused; among reusable ones the newest wins."""
    older = await created(store, created_at=NOW)
    newer = await created(store, created_at=NOW + 1)
    assert await reusable(store, older) == newer
    await moved(store, newer.id, "cancelled")
    assert await reusable(store, older) == older
    await moved(store, older.id, "cancelled")
    assert await reusable(store, older) is None


# ---- opening a request: look-up, count and insert as one step --------------------------------


async def opened(store: Store, approval: Approval, max_pending: int = 10) -> Approval | None:
    return await store.open_approval(approval, actor="agent-a", channel="mcp", max_pending=max_pending)


async def test_open_approval_inserts_a_new_request_with_its_created_event(store: Store) -> None:
    """No request like it and room under max_pending: the record is inserted and audited."""
    approval = make_approval()
    assert await opened(store, approval, max_pending=1) == approval
    assert await store.get_approval(approval.id) == approval
    [event] = await store.audit_events(approval_id=approval.id)
    assert (event.event, event.actor, event.channel) == ("created", "agent-a", "mcp")


@pytest.mark.parametrize("path", [(), ("approved",), ("approved", "released")])
async def test_open_approval_attaches_to_an_open_identical_request(
    store: Store, path: tuple[Status, ...]
) -> None:
    """An identical call while the request is open gets that record; nothing is inserted."""
    first = await created(store)
    record = await moved(store, first.id, *path)
    again = make_approval(created_at=NOW + 1, session_id="session-2")
    assert await opened(store, again, max_pending=1) == record
    assert await store.get_approval(again.id) is None
    assert len(await store.audit_events()) == 1 + len(path)


async def test_open_approval_attaches_to_a_denial_within_its_window_only(store: Store) -> None:
    """A denial kept for repeat calls answers an identical call; once its window ends, a new request opens."""
    first = await created(store)
    denied = await moved(store, first.id, "denied")
    await store.update_fields(first.id, result_expires_at=NOW + 60)
    assert await opened(store, make_approval(created_at=NOW + 59)) == dataclasses.replace(
        denied, result_expires_at=NOW + 60
    )
    later = make_approval(created_at=NOW + 60)
    assert await opened(store, later) == later


async def test_open_approval_refuses_at_max_pending_exactly(store: Store) -> None:
    """With max_pending - 1 pending a request opens; with max_pending it is refused and nothing is written.

    Other grants' requests and decided ones do not count."""
    for n in range(2):
        await created(store, args_sha256=f"{n}" * 64)
    await moved(store, (await created(store, args_sha256="a" * 64)).id, "approved")
    await created(store, grant="agent-b", args_sha256="b" * 64)
    third = make_approval(args_sha256="3" * 64)
    assert await opened(store, third, max_pending=3) == third
    fourth = make_approval(args_sha256="4" * 64)
    assert await opened(store, fourth, max_pending=3) is None
    assert await store.get_approval(fourth.id) is None
    assert await store.count_pending("agent-a") == 3
    assert [e.approval_id for e in await store.audit_events()].count(fourth.id) == 0


async def test_open_approval_refuses_a_record_that_is_not_new(store: Store) -> None:
    """Like create_approval: nothing enters the store decided, and nothing is written."""
    with pytest.raises(ValueError, match="pending"):
        await opened(store, make_approval(status="approved"))
    assert await store.list_approvals() == []


async def test_concurrent_opens_make_one_request_and_respect_max_pending(store: Store) -> None:
    """Ten identical calls at once open one request; ten different ones open exactly max_pending."""
    same = [make_approval(session_id=f"s{n}") for n in range(10)]
    results = await asyncio.gather(*(opened(store, approval) for approval in same))
    assert len({r.id for r in results if r is not None}) == 1
    different = [make_approval(args_sha256=f"{n}" * 64) for n in range(10)]
    results = await asyncio.gather(*(opened(store, approval, max_pending=4) for approval in different))
    assert sum(r is not None for r in results) == 3  # one slot went to the first request
    assert await store.count_pending("agent-a") == 4


# ---- what a caller gets is its own ----------------------------------------------------------


async def test_records_read_are_copies_a_caller_cannot_change_the_store_through(store: Store) -> None:
    """Mutating the parsed arguments of a record read (or created) leaves the stored one as it was."""
    approval = make_approval()
    await store.create_approval(approval, actor="agent-a", channel="mcp")
    approval.arguments["path"] = "/etc/passwd"
    read = await store.get_approval(approval.id)
    assert read is not None
    read.arguments["path"] = "/etc/shadow"
    again = await store.get_approval(approval.id)
    assert again is not None
    assert again.arguments == {"path": "/srv/report.txt"}


# ---- counters and message refs ----------------------------------------------------------------


async def test_counters_are_upserted_as_absolute_values_and_pruned_by_window(store: Store) -> None:
    """save replaces a row's value; load returns rows from `since`; prune drops windows before `before`."""
    await store.save_counters([("calls", "*", 60, 1.0), ("calls", "grant:a", 120, 2.0)])
    await store.save_counters([("calls", "*", 60, 5.0)])
    assert sorted(await store.load_counters(0)) == [("calls", "*", 60, 5.0), ("calls", "grant:a", 120, 2.0)]
    assert await store.load_counters(61) == [("calls", "grant:a", 120, 2.0)]
    await store.prune_counters(120)
    assert await store.load_counters(0) == [("calls", "grant:a", 120, 2.0)]


async def test_message_refs_replace_and_refuse_an_unknown_approval(store: Store) -> None:
    """One ref per approval and channel, the last save wins; a ref to no approval is a StoreError."""
    approval = await created(store)
    assert await store.message_ref(approval.id, "slack") is None
    await store.save_message_ref(approval.id, "slack", '{"ts": "1"}')
    await store.save_message_ref(approval.id, "slack", '{"ts": "2"}')
    assert await store.message_ref(approval.id, "slack") == '{"ts": "2"}'
    assert await store.message_ref(approval.id, "teams") is None
    with pytest.raises(StoreError):
        await store.save_message_ref(new_approval_id(), "slack", "{}")


# ---- counting, expiry, recovery, kept results --------------------------------------------------


async def test_count_pending_counts_only_pending_records_of_that_grant(store: Store) -> None:
    """Approved or other grants' records do not count against the grant's pending limit."""
    for _ in range(3):
        await created(store)
    await moved(store, (await created(store)).id, "approved")
    await created(store, grant="agent-b")
    assert await store.count_pending("agent-a") == 3
    assert await store.count_pending("agent-b") == 1
    assert await store.count_pending("agent-c") == 0


async def test_due_for_expiry_and_next_expiry_see_only_pending_records(store: Store) -> None:
    """Pending records expire; approved (given in time), decided or released ones never show up."""
    assert await store.next_expiry() is None
    soon = await created(store, expires_at=NOW + 10)
    approved = await created(store, expires_at=NOW + 20)
    await moved(store, approved.id, "approved")
    later = await created(store, expires_at=NOW + 30)
    for path in (("denied",), ("approved", "released")):
        await moved(store, (await created(store, expires_at=NOW + 1)).id, *path)
    assert await store.next_expiry() == NOW + 10
    assert await store.due_for_expiry(NOW + 9) == []
    assert [r.id for r in await store.due_for_expiry(NOW + 20)] == [soon.id]
    await moved(store, soon.id, "expired")
    assert await store.next_expiry() == NOW + 30
    assert [r.id for r in await store.due_for_expiry(NOW + 100)] == [later.id]
    assert approved.id not in [r.id for r in await store.due_for_expiry(NOW + 100)]


async def test_interrupted_releases_lists_released_records_whose_lease_ran_out(store: Store) -> None:
    """A released record is interrupted once its lease has run out (or if it never had one), oldest
    first; a live lease, or a record that finished, is never listed."""
    unleased = await created(store, created_at=NOW + 1)
    await moved(store, unleased.id, "approved", "released")
    leased = await created(store, created_at=NOW)
    await moved(store, leased.id, "approved", "released", lease_owner="host:1:a", lease_expires_at=NOW + 100)
    finished = await created(store)
    await moved(store, finished.id, "approved", "released", "completed", lease_expires_at=NOW)
    await created(store)
    assert [r.id for r in await store.interrupted_releases(NOW + 99)] == [unleased.id]
    at_expiry = await store.interrupted_releases(NOW + 100)
    assert [r.id for r in at_expiry] == [leased.id, unleased.id]
    assert (at_expiry[0].lease_owner, at_expiry[0].lease_expires_at) == ("host:1:a", NOW + 100)


async def test_drop_expired_results_clears_results_past_their_window(store: Store) -> None:
    """Results whose window has ended are dropped and the record says so; others are kept."""
    old = await created(store)
    await moved(store, old.id, "approved", "released", "completed", result_json="{}", result_expires_at=NOW)
    fresh = await created(store)
    await moved(
        store, fresh.id, "approved", "released", "completed", result_json="{}", result_expires_at=NOW + 60
    )
    assert await store.drop_expired_results(NOW) == 1
    dropped = await store.get_approval(old.id)
    assert dropped is not None
    assert (dropped.result_json, dropped.note, dropped.status) == (None, RESULT_DROPPED_NOTE, "completed")
    assert (await store.get_approval(fresh.id)).result_json == "{}"  # type: ignore[union-attr]
    assert await store.drop_expired_results(NOW) == 0


# ---- audit ------------------------------------------------------------------------------------


async def test_append_audit_records_events_that_are_not_transitions(store: Store) -> None:
    """ "viewed" or "notify_failed" go in the log without touching the record."""
    approval = await created(store)
    await store.append_audit(
        approval.id, "notify_failed", actor="gateway", channel="slack", args_sha256="h", detail="timeout"
    )
    last = (await store.audit_events(approval_id=approval.id))[-1]
    assert (last.event, last.actor, last.channel, last.args_sha256, last.detail) == (
        "notify_failed",
        "gateway",
        "slack",
        "h",
        "timeout",
    )
    assert await store.get_approval(approval.id) == approval


async def test_append_audit_for_an_unknown_approval_fails(store: Store) -> None:
    """Every audit line belongs to a record that exists."""
    with pytest.raises(StoreError):
        await store.append_audit(new_approval_id(), "viewed", actor="a", channel="web", args_sha256="h")


async def test_audit_events_page_by_seq_and_filter_by_approval(store: Store) -> None:
    """Events come oldest first; after_seq and limit page; approval_id narrows to one record."""
    a = await created(store)
    b = await created(store)
    await moved(store, a.id, "approved")
    every = await store.audit_events()
    assert [(e.approval_id, e.event) for e in every] == [
        (a.id, "created"),
        (b.id, "created"),
        (a.id, "approved"),
    ]
    assert [e.seq for e in every] == sorted(e.seq for e in every)
    assert await store.audit_events(after_seq=every[0].seq, limit=1) == every[1:2]
    assert [e.event for e in await store.audit_events(approval_id=a.id)] == ["created", "approved"]


# ---- SQLite only: its triggers, its durability, a second connection, a reopened file --------


async def test_concurrent_decisions_through_two_connections_have_one_winner(tmp_path: pathlib.Path) -> None:
    """Two stores on one file (two processes) race on one record: still exactly one winner."""
    path = tmp_path / "shared.db"
    first = await SqliteStore.open(path)
    second = await SqliteStore.open(path)
    try:
        approval = await created(first)
        replicas: list[tuple[SqliteStore, Status]] = [(first, "approved"), (second, "denied")]
        results = await asyncio.gather(
            *(
                replica.transition(
                    approval.id, from_={"pending"}, to=to, actor=f"r{n}", channel="web", decided_by=f"r{n}"
                )
                for n, (replica, to) in enumerate(itertools.islice(itertools.cycle(replicas), 20))
            )
        )
        assert sum(r is not None for r in results) == 1
        assert len(await second.audit_events(approval_id=approval.id)) == 2
    finally:
        await first.close()
        await second.close()


async def test_raw_sql_cannot_move_a_record_off_the_graph_or_rewrite_its_request(
    sqlite_store: SqliteStore, tmp_path: pathlib.Path
) -> None:
    """Triggers hold the life cycle even for SQL that bypasses the store."""
    approval = await created(sqlite_store)
    await moved(sqlite_store, approval.id, "denied")
    with sqlite3.connect(tmp_path / "approvals.db") as conn:
        with pytest.raises(sqlite3.IntegrityError, match="illegal approval status change"):
            conn.execute("UPDATE approvals SET status = 'approved' WHERE id = ?", (approval.id,))
        with pytest.raises(sqlite3.IntegrityError, match="never changes"):
            conn.execute("UPDATE approvals SET arguments_json = '{}' WHERE id = ?", (approval.id,))
    assert (await sqlite_store.get_approval(approval.id)).status == "denied"  # type: ignore[union-attr]


async def test_audit_log_is_append_only_against_raw_sql(
    sqlite_store: SqliteStore, tmp_path: pathlib.Path
) -> None:
    """UPDATE and DELETE on the audit table fail, even from another connection."""
    await created(sqlite_store)
    with sqlite3.connect(tmp_path / "approvals.db") as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET actor = 'mallory'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")
    assert [e.actor for e in await sqlite_store.audit_events()] == ["agent-a"]


async def test_approval_writes_commit_at_synchronous_full(sqlite_store: SqliteStore) -> None:
    """Creations and transitions commit at FULL; the connection goes back to NORMAL for counters."""
    statements: list[str] = []
    await sqlite_store._db.read(lambda conn: conn.set_trace_callback(statements.append))
    try:
        approval = await created(sqlite_store)
        await moved(sqlite_store, approval.id, "approved")
        await sqlite_store.save_counters([("calls", "*", 60, 1.0)])
    finally:
        await sqlite_store._db.read(lambda conn: conn.set_trace_callback(None))
    marks = [s for s in statements if s.startswith(("PRAGMA synchronous", "BEGIN", "COMMIT"))]
    assert marks == [
        *("PRAGMA synchronous=FULL", "BEGIN IMMEDIATE", "COMMIT"),  # create
        *("BEGIN IMMEDIATE", "COMMIT"),  # approve: still FULL
        *("PRAGMA synchronous=NORMAL", "BEGIN IMMEDIATE", "COMMIT"),  # counters
    ]


async def test_reopened_store_keeps_records_and_audit(tmp_path: pathlib.Path) -> None:
    """A restart (a new SqliteStore on the same file) sees every record, state and audit line."""
    path = tmp_path / "approvals.db"
    first = await SqliteStore.open(path, clock=lambda: NOW)
    try:
        released = await created(first)
        record = await moved(first, released.id, "approved", "released")
        pending = await created(first)
        events = await first.audit_events()
    finally:
        await first.close()
    second = await SqliteStore.open(path)
    try:
        assert await second.get_approval(released.id) == record
        assert await second.get_approval(pending.id) == pending
        assert await second.audit_events() == events
        assert [r.id for r in await second.interrupted_releases(NOW)] == [released.id]
        # The compare-and-set still holds after the restart: released stays single use.
        assert (
            await second.transition(released.id, from_={"approved"}, to="released", actor="g", channel="g")
            is None
        )
    finally:
        await second.close()


# ---- the life cycle under random moves ---------------------------------------------------------


@dataclasses.dataclass
class _Expected:
    status: Status = "pending"
    version: int = 0
    moves: int = 0


def _sources(to: Status) -> list[Status]:
    return [source for source, targets in TRANSITIONS.items() if to in targets]


class ApprovalLifecycle(RuleBasedStateMachine):
    """Random creations and transitions (legal, illegal, racing) against a model of the graph."""

    approvals = Bundle("approvals")
    kind = "sqlite"  # which store: "sqlite" or "memory"

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self._runner = asyncio.Runner()
        self._store = self._run(open_store(self.kind, pathlib.Path(self._dir.name) / "a.db"))
        self._expected: dict[str, _Expected] = {}

    def _run(self, coro: Awaitable[T]) -> T:
        return self._runner.run(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        try:
            self._run(self._store.close())
        finally:
            self._runner.close()
            self._dir.cleanup()

    @initialize(target=approvals)
    def first(self) -> str:
        return self._create()

    # A few records walked deep find more than many records that stay pending.
    @precondition(lambda self: len(self._expected) < 4)
    @rule(target=approvals)
    def create(self) -> str:
        return self._create()

    def _create(self) -> str:
        approval = make_approval(created_at=NOW + len(self._expected))
        self._run(self._store.create_approval(approval, actor="agent", channel="mcp"))
        self._expected[approval.id] = _Expected()
        return approval.id

    def _aimed(self, approval_id: str, data: st.DataObject) -> tuple[frozenset[Status], Status]:
        """A legal move out of the record's current status (any legal pair once it is final)."""
        current = self._expected[approval_id].status
        if current in FINAL:
            to = data.draw(st.sampled_from(STATUSES), label="to")
            return data.draw(st.frozensets(st.sampled_from(_sources(to)), min_size=1), label="from_"), to
        to = data.draw(st.sampled_from(sorted(TRANSITIONS[current])), label="to")
        others = data.draw(st.frozensets(st.sampled_from(_sources(to))), label="other sources")
        return others | {current}, to

    def _version(self, approval_id: str, from_: frozenset[Status], to: Status) -> int | None:
        """The version a pending → pending step is conditional on (the record's, as the model has it)."""
        return self._expected[approval_id].version if to == "pending" and "pending" in from_ else None

    @rule(approval_id=approvals, data=st.data())
    def advance(self, approval_id: str, data: st.DataObject) -> None:
        from_, to = self._aimed(approval_id, data)
        version = self._version(approval_id, from_, to)
        result = self._run(
            self._store.transition(approval_id, from_=from_, to=to, actor="r", channel="web", version=version)
        )
        self._check(self._expected[approval_id], result, from_, to)

    @rule(approval_id=approvals, to=st.sampled_from(STATUSES), data=st.data())
    def transition(self, approval_id: str, to: Status, data: st.DataObject) -> None:
        # Any set of sources: usually an illegal pair; otherwise a compare-and-set that may miss.
        from_ = data.draw(st.frozensets(st.sampled_from(STATUSES), min_size=1), label="from_")
        if any(to not in TRANSITIONS.get(source, ()) for source in from_):
            with pytest.raises(ValueError):  # noqa: PT011
                self._run(self._store.transition(approval_id, from_=from_, to=to, actor="r", channel="web"))
            event("illegal pair refused")
            return
        version = self._version(approval_id, from_, to)
        result = self._run(
            self._store.transition(approval_id, from_=from_, to=to, actor="r", channel="web", version=version)
        )
        self._check(self._expected[approval_id], result, from_, to)

    @rule(approval_id=approvals, racers=st.integers(2, 8), data=st.data())
    def race(self, approval_id: str, racers: int, data: st.DataObject) -> None:
        from_, to = self._aimed(approval_id, data)
        version = self._version(approval_id, from_, to)

        async def all_at_once() -> list[Approval | None]:
            moves = (
                self._store.transition(
                    approval_id, from_=from_, to=to, actor=f"r{n}", channel="web", version=version
                )
                for n in range(racers)
            )
            return await asyncio.gather(*moves)

        results = self._run(all_at_once())
        winners = [r for r in results if r is not None]
        assert len(winners) <= 1
        if winners:
            event("race won once")
        self._check(self._expected[approval_id], winners[0] if winners else None, from_, to)

    def _check(
        self, expected: _Expected, result: Approval | None, from_: frozenset[Status], to: Status
    ) -> None:
        if expected.status not in from_:
            assert result is None
            event("compare-and-set lost")
            return
        assert result is not None
        assert expected.status not in FINAL
        assert to in TRANSITIONS[expected.status]
        assert (result.status, result.version) == (to, expected.version + 1)
        expected.status, expected.version, expected.moves = to, expected.version + 1, expected.moves + 1
        event(f"moved to {to}")

    @invariant()
    def store_matches_the_model(self) -> None:
        every_event = self._run(self._store.audit_events(limit=100_000))
        assert len(every_event) == len(self._expected) + sum(e.moves for e in self._expected.values())
        for approval_id, expected in self._expected.items():
            record = self._run(self._store.get_approval(approval_id))
            assert record is not None
            assert (record.status, record.version) == (expected.status, expected.version)
            events = [e.event for e in every_event if e.approval_id == approval_id]
            assert events[0] == "created"
            # Replaying the audit log walks the graph from pending to the current status.
            path: list[Status] = ["pending", *events[1:]]  # type: ignore[list-item]
            for before, after in itertools.pairwise(path):
                assert after in TRANSITIONS.get(before, ())
            assert path[-1] == record.status
            assert path.count("released") <= 1
        # Whatever raced, the log is one hash chain ending at the head, seqs dense from 1.
        head = self._run(self._store.audit_head())
        assert verify(every_event, head) is None
        assert [e.seq for e in every_event] == list(range(1, head[0] + 1))


class MemoryApprovalLifecycle(ApprovalLifecycle):
    """The same machine against the in-memory twin."""

    kind = "memory"


LIFECYCLE_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,  # each step fsyncs; disk latency is not what this test is about
    database=None,  # no .hypothesis/ directory in the working tree
    suppress_health_check=[HealthCheck.too_slow],
)
ApprovalLifecycle.TestCase.settings = LIFECYCLE_SETTINGS
MemoryApprovalLifecycle.TestCase.settings = LIFECYCLE_SETTINGS
test_approval_lifecycle_sqlite = ApprovalLifecycle.TestCase
test_approval_lifecycle_memory = MemoryApprovalLifecycle.TestCase
