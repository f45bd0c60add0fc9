"""JSON-RPC batches: accepted in 2025-03-26 sessions (each element judged as if alone), refused elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import aiohttp

from approvals.proxy.batch import MAX_BATCH
from tests.approvals_kit import Held, start_held
from tests.conftest import TOKEN_A, StartGateway
from tests.rawmcp import RawSession, Reply

INVALID_REQUEST = -32600


def _call(request_id: int, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments or {}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def _ping(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "ping"}


def _answers(reply: Reply) -> list[dict[str, Any]]:
    """The array a batch is answered with."""
    assert reply.status == 200
    return cast(list[dict[str, Any]], reply.messages[0])


async def _batch(held: Held, items: list[Any], version: str = "2025-03-26") -> Reply:
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), TOKEN_A, version=version)
        result = await raw.initialize()
        assert result["protocolVersion"] == version
        return await raw.post(json.dumps(items).encode())


async def test_a_mixed_batch_is_answered_with_an_array_in_order(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Requests, a notification and a call in one batch: one response per request, in order."""
    held = await start_held(start_gateway, tmp_path)
    items = [
        {"jsonrpc": "2.0", "id": "a", "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
        _call(2, "get_time"),
        _ping(3),
    ]
    answers = _answers(await _batch(held, items))
    assert [a["id"] for a in answers] == ["a", 2, 3]
    assert {t["name"] for t in answers[0]["result"]["tools"]} >= {"get_time", "send_email"}
    assert answers[1]["result"].get("isError") is not True
    assert answers[2]["result"] == {}


async def test_an_empty_or_oversize_batch_is_an_invalid_request(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """`[]` and a batch over MAX_BATCH get HTTP 400 with -32600, nothing forwarded."""
    held = await start_held(start_gateway, tmp_path)
    for items in ([], [_ping(i) for i in range(MAX_BATCH + 1)]):
        reply = await _batch(held, items)
        assert reply.status == 400
        assert reply.last["error"]["code"] == INVALID_REQUEST


async def test_each_call_in_a_batch_goes_through_the_gate(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Denied, allowed and held calls in one batch: each judged alone; the held one answers pending now."""
    held = await start_held(start_gateway, tmp_path)
    email = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}
    items = [_call(1, "delete_file", {"path": "x"}), _call(2, "get_time"), _call(3, "send_email", email)]
    denied, allowed, pending = _answers(await _batch(held, items))
    assert denied["result"]["isError"] is True
    assert allowed["result"].get("isError") is not True
    assert pending["result"]["_meta"]["approvals"]["status"] == "pending"
    assert (await held.recorder.status("pending")).tool == "send_email"
    assert held.sent() == []  # the held call did not run


async def test_garbage_elements_get_errors_and_the_rest_is_answered(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Non-objects and malformed envelopes get -32600 each; the good request beside them is answered."""
    held = await start_held(start_gateway, tmp_path)
    bad_version = {"jsonrpc": "1.0", "id": 6, "method": "ping"}
    reply = await _batch(
        held, [1, "x", {}, _ping(5), bad_version, {"jsonrpc": "2.0", "method": "tools/call"}]
    )
    answers = _answers(reply)
    assert [(a["id"], a.get("error", {}).get("code")) for a in answers] == [
        (None, INVALID_REQUEST),
        (None, INVALID_REQUEST),
        (None, INVALID_REQUEST),
        (5, None),
        (6, INVALID_REQUEST),
    ]


async def test_a_batch_of_notifications_only_is_accepted_with_202(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Nothing to answer: 202 and no body, as for a single notification."""
    held = await start_held(start_gateway, tmp_path)
    reply = await _batch(held, [{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}])
    assert reply.status == 202


async def test_a_batch_in_a_later_session_is_refused(start_gateway: StartGateway, tmp_path: Path) -> None:
    """2025-06-18 removed batching: a 2025-11-25 session's batch gets 400 / -32600, nothing run."""
    held = await start_held(start_gateway, tmp_path)
    reply = await _batch(held, [_call(1, "get_time")], version="2025-11-25")
    assert reply.status == 400
    assert reply.last["error"]["code"] == INVALID_REQUEST
