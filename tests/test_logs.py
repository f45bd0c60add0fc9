"""Structured logs: JSON lines, and one request id on every line of a call and on its answer."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.audit_chain import verify_log
from approvals.log_format import REQUEST_ID_HEADER, JsonFormatter, configure_logging
from tests.approvals_kit import start_held
from tests.conftest import BOB_TOKEN, DEMO_COMMAND, TOKEN_A, WAIT, StartGateway
from tests.rawmcp import RawSession
from tests.test_cli import serving

EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every line the gateway logs (DEBUG and up) during the test, as the JSON formatter writes it."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("approvals")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield buffer
    logger.removeHandler(handler)
    logger.setLevel(level)


def _parsed(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def test_every_line_of_a_call_carries_its_request_id(
    start_gateway: StartGateway, tmp_path: Path, json_lines: io.StringIO
) -> None:
    """A held call sent with X-Request-Id: every gateway line for it has that id, and so does its answer."""
    held = await start_held(start_gateway, tmp_path)
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), token=TOKEN_A)
        await raw.initialize()
        call = {"name": "send_email", "arguments": EMAIL}
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": call}
        reply = asyncio.create_task(raw.post(body, **{REQUEST_ID_HEADER: "agent-trace-42"}))
        pending = await held.recorder.status("pending")
        async with http.post(
            f"{held.gateway.base}/api/approvals/{pending.id}/approve",
            json={},
            headers={"Authorization": f"Bearer {BOB_TOKEN}"},
        ) as decided:
            decision_id = decided.headers[REQUEST_ID_HEADER]
        answer = await asyncio.wait_for(reply, WAIT)
    assert answer.headers[REQUEST_ID_HEADER] == "agent-trace-42"
    assert decision_id != "agent-trace-42"
    lines = _parsed(json_lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    mine = [line for line in lines if line.get("request_id") == "agent-trace-42"]
    # The gatekeeper's verdict and the access line of the call, both under the caller's id.
    assert any(pending.id in line["message"] and line["logger"] == "approvals.gatekeeper" for line in mine)
    assert any(line["message"].startswith("POST /mcp/demo 200") for line in mine)
    about_the_call = [line for line in lines if "held for approval" in line["message"]]
    assert about_the_call
    assert all(line.get("request_id") == "agent-trace-42" for line in about_the_call)
    assert any(line.get("request_id") == decision_id for line in lines)  # the API request's own
    assert not any(EMAIL["body"] in line["message"] for line in lines)  # arguments are never logged
    # The audit log names the request behind each event: the call opened it, the decision approved
    # it and started its release; the chain covers the ids.
    await held.gateway.service.settled()
    events = await held.gateway.service.audit(approval_id=pending.id)
    by_event = {event.event: event.request_id for event in events}
    assert by_event["created"] == "agent-trace-42"
    assert by_event["approved"] == by_event["released"] == by_event["completed"] == decision_id
    async with aiohttp.ClientSession() as http:
        url = f"{held.gateway.base}/api/audit?approval_id={pending.id}"
        async with http.get(url, headers={"Authorization": f"Bearer {BOB_TOKEN}"}) as response:
            listed = await response.json()
    rows = listed["events"] if isinstance(listed, dict) else listed
    assert [row["request_id"] for row in rows] == [event.request_id for event in events]
    assert await verify_log(held.gateway.service.store) == (len(events), None)


async def test_an_unusable_request_id_is_replaced(start_gateway: StartGateway) -> None:
    """An id too long or with spaces or quotes is not echoed; a fresh one is given instead."""
    running = await start_gateway({"demo": {"command": DEMO_COMMAND}})
    async with aiohttp.ClientSession() as http:
        for given in ("x" * 200, 'two words"', "ok-id_1.2:3"):
            async with http.get(f"{running.base}/healthz", headers={REQUEST_ID_HEADER: given}) as response:
                echoed = response.headers[REQUEST_ID_HEADER]
            assert (echoed == given) == (given == "ok-id_1.2:3")
            assert 0 < len(echoed) <= 128


def test_json_lines_hold_the_traceback() -> None:
    """A logged exception stays one JSON line, its traceback in exc_info."""
    record = logging.LogRecord("approvals.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["level"], parsed["logger"], parsed["message"]) == ("ERROR", "approvals.x", "failed here")
    assert "ValueError: boom" in parsed["exc_info"]
    assert parsed["time"].endswith("+00:00")


@pytest.mark.parametrize(("given", "chosen"), [(None, "json"), ("json", "json"), ("text", "text")])
def test_log_format_default_is_json_off_a_terminal(given: str | None, chosen: str) -> None:
    """Unset, a stream that is not a terminal gets JSON; the setting wins when given."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        assert configure_logging(given, stream) == chosen
        logging.getLogger("approvals.test").info("hello")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line = stream.getvalue().strip()
    if chosen == "json":
        assert json.loads(line)["message"] == "hello"
    else:
        assert line.endswith("INFO approvals.test [-]: hello")


async def test_serve_writes_json_lines(tmp_path: Path) -> None:
    """`approvals serve` with log_format = "json": every line it logs on stderr is a JSON object."""
    (tmp_path / "gateway.toml").write_text(
        '[server]\nlog_format = "json"\n[store]\npath = "approvals.db"\n'
        f"[upstreams.demo]\ncommand = {json.dumps(DEMO_COMMAND)}\n"
    )
    async with serving(tmp_path) as served:
        assert await served.stop() == 0
    lines = [json.loads(line) for line in served.stderr]
    assert lines, "the gateway logged nothing on the way down"
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
