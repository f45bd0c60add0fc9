"""The audit webhook sink: signed batches to a real local receiver, retried after a failure, never
sent twice by two replicas, and never in the way of a decision."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from approvals.audit_chain import event_record
from approvals.audit_sink import SIGNATURE_HEADER, TIMESTAMP_HEADER, AuditSink, SinkStore, WebhookTarget
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore
from approvals.web.app import create_app
from tests import conftest
from tests.approvals_kit import start_held
from tests.conftest import WAIT, StartGateway, mcp_client
from tests.test_store_approvals import NOW, make_approval

SECRET = "webhook-secret-0123456789abcdef"
EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}


class Receiver:
    """A SIEM's webhook endpoint on 127.0.0.1: checks each request's signature, answers 500 to the
    first ``fail_first`` requests, and holds requests while ``hold`` is clear."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.answered: list[int] = []  # the status given to each request, in order
        self.batches: list[dict[str, Any]] = []  # the bodies accepted
        self.hold = asyncio.Event()
        self.hold.set()
        self.arrived = asyncio.Event()  # a request came in (it may be held)
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived.set()
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        batch = json.loads(body)
        signed = hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected)
        stamped = request.headers.get(TIMESTAMP_HEADER) == str(batch["sent_at"])
        status = 401 if not (signed and stamped) else 500 if len(self.answered) < self.fail_first else 200
        await self.hold.wait()
        async with self._changed:
            self.answered.append(status)
            if status == 200:
                self.batches.append(batch)
            self._changed.notify_all()
        return web.Response(status=status)

    def seqs(self) -> list[int]:
        return [event["seq"] for batch in self.batches for event in batch["events"]]

    async def received_up_to(self, seq: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: seq in self.seqs())


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver that answers 500 once, then 200; and its URL."""
    found = Receiver(fail_first=1)
    app = web.Application()
    app.router.add_post("/audit", found.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield found, str(server.make_url("/audit"))
    found.hold.set()
    await server.close()


def _sink(store: SinkStore, url: str, **options: Any) -> AuditSink:
    return AuditSink(store, WebhookTarget(url, SECRET), poll_seconds=0.05, first_backoff=0.01, **options)


async def test_events_arrive_signed_in_order_and_a_failed_post_is_retried(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """The first POST gets a 500; the same events come again, signed, and every event arrives once,
    as the API shows it (hashes included); batches are bounded."""
    found, url = receiver
    store = await SqliteStore.open(tmp_path / "approvals.db", clock=lambda: NOW)
    sink = _sink(store, url, batch=4)
    try:
        for _ in range(5):
            await store.create_approval(make_approval(), actor="agent-a", channel="mcp")
        sink.start()
        await found.received_up_to(5)
        assert found.answered[0] == 500
        assert 401 not in found.answered
        assert found.seqs() == [1, 2, 3, 4, 5]
        assert [len(b["events"]) for b in found.batches] == [4, 1]
        assert (found.batches[0]["first_seq"], found.batches[0]["last_seq"]) == (1, 4)
        expected = [event_record(e) for e in await store.audit_events()]
        assert [e for b in found.batches for e in b["events"]] == expected
        # New events are followed (a nudge stands in for the change feed of a gateway).
        await store.create_approval(make_approval(), actor="agent-a", channel="mcp")
        sink.nudge()
        await found.received_up_to(6)
        assert found.seqs() == [1, 2, 3, 4, 5, 6]
    finally:
        await sink.close()
        await store.close()


async def test_two_sinks_on_one_postgres_database_never_send_an_event_twice(
    receiver: tuple[Receiver, str], postgres_url: str
) -> None:
    """Two replicas' sinks race for the one cursor: each event is delivered once, in order, even
    when the delivering one stops and the other takes over."""
    found, url = receiver
    found.fail_first = 0
    first = await PostgresStore.open(postgres_url, clock=lambda: NOW)
    second = await PostgresStore.open(postgres_url, clock=lambda: NOW)
    await first.empty()
    sinks = [_sink(first, url, batch=5), _sink(second, url, batch=5)]
    try:
        for sink in sinks:
            sink.start()
        for n in range(30):
            await (first if n % 2 else second).create_approval(make_approval(), actor="a", channel="mcp")
            for sink in sinks:
                sink.nudge()
        await found.received_up_to(30)
        await sinks[0].close()  # the other takes over at once (the lease was released)
        for _ in range(10):
            await second.create_approval(make_approval(), actor="a", channel="mcp")
        sinks[1].nudge()
        await found.received_up_to(40)
        assert found.seqs() == list(range(1, 41))
    finally:
        for sink in sinks:
            await sink.close()
        await first.close()
        await second.close()


async def test_a_lease_held_elsewhere_keeps_the_other_replica_out(postgres_url: str) -> None:
    """The cursor's lease: one owner at a time, taken over only once it ran out; a lost lease
    cannot move the cursor."""
    store = await PostgresStore.open(postgres_url)
    try:
        await store.empty()
        assert await store.claim_audit_sink("w", "a", NOW, 30) == 0
        assert await store.claim_audit_sink("w", "b", NOW + 10, 30) is None
        assert await store.advance_audit_sink("w", "a", 7, NOW + 10, 30)
        assert await store.claim_audit_sink("w", "b", NOW + 41, 30) == 7  # a's lease ran out
        assert not await store.advance_audit_sink("w", "a", 9, NOW + 42, 30)
        await store.release_audit_sink("w", "b")
        assert await store.claim_audit_sink("w", "a", NOW + 43, 30) == 7
    finally:
        await store.close()


async def test_a_slow_receiver_does_not_delay_a_decision(
    receiver: tuple[Receiver, str],
    start_gateway: StartGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receiver holds every POST: a held call is still approved, released and answered at once."""
    found, url = receiver
    found.fail_first = 0
    found.hold.clear()
    # The gateway of the start_gateway fixture, with the webhook configured.
    monkeypatch.setattr(
        conftest, "create_app", functools.partial(create_app, audit_webhook=WebhookTarget(url, SECRET))
    )
    held = await start_held(start_gateway, tmp_path)
    async with mcp_client(held.url()) as client:
        call = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        await asyncio.wait_for(found.arrived.wait(), WAIT)  # the sink is stuck on its POST
        status, _ = await held.api("POST", f"/api/approvals/{pending.id}/approve")
        assert status == 200
        result = await asyncio.wait_for(call, WAIT)
        assert not result.is_error
    assert found.answered == []  # the POST was still held all along
    found.hold.set()
    await found.received_up_to(4)  # created, approved, released, completed
