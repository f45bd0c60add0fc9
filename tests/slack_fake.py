"""A local fake of the Slack Web API and of Socket Mode, and Slack's request signing, for tests.

The fake serves ``/api/{method}`` on 127.0.0.1 (port 0), records every call in order — failed ones
too, so retries can be counted — and wakes waiters through one ``asyncio.Condition``. It fails on
demand: an error (HTTP 500), rate limiting (429 with Retry-After), a permanent error, or a hang that
outlasts the client's timeout. ``apps.connections.open`` hands out a ``ws://`` URL on the same
server, where a test pushes Socket Mode envelopes and reads the acknowledgements.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tests.conftest import WAIT

Failure = Literal["error", "ratelimited", "permanent", "hang"]
SECRET = "test-signing-secret-0123456789abcdef"
BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"
CHANNEL = "C0APPROVALS"
TEAM = "T0TEAM"


@dataclass
class Call:
    """One request the fake received."""

    method: str
    params: dict[str, Any]
    token: str | None
    answer: dict[str, Any] | None = None  # what the fake answered, when it succeeded


class FakeSlack:
    """The Slack Web API as the gateway sees it, plus a Socket Mode endpoint."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.acks: list[dict[str, Any]] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.retry_after = "7"
        self._failures: dict[str, list[Failure]] = {}
        self._changed = asyncio.Condition()
        self._hangs_end = asyncio.Event()
        self._ts = itertools.count(1)
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def start(self) -> FakeSlack:
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self._hangs_end.set()  # a hung request must not hold up the server's shutdown
        for socket in self.sockets:
            await socket.close()
        await self.server.close()

    @property
    def api_url(self) -> str:
        return str(self.server.make_url("/api/"))

    def fail(self, method: str, *failures: Failure) -> None:
        """The next calls of `method` fail in these ways, in order; later calls succeed."""
        self._failures.setdefault(method, []).extend(failures)

    def of(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    async def wait_for(
        self, method: str, predicate: Callable[[Call], bool] = lambda _: True, count: int = 1
    ) -> list[Call]:
        """The first `count` calls of `method` matching `predicate`, once there are that many."""
        async with asyncio.timeout(WAIT), self._changed:
            while len(found := [c for c in self.of(method) if predicate(c)]) < count:
                await self._changed.wait()
            return found[:count]

    async def wait_connected(self) -> web.WebSocketResponse:
        async with asyncio.timeout(WAIT), self._changed:
            while not self.sockets:
                await self._changed.wait()
            return self.sockets[-1]

    async def push(self, envelope: dict[str, Any]) -> None:
        """Send a Socket Mode envelope to the connected app."""
        await (await self.wait_connected()).send_json(envelope)

    async def wait_ack(self, envelope_id: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT), self._changed:
            while not (found := [a for a in self.acks if a.get("envelope_id") == envelope_id]):
                await self._changed.wait()
            return found[0]

    async def _record(self, call: Call | None = None, ack: dict[str, Any] | None = None) -> None:
        async with self._changed:
            if call is not None:
                self.calls.append(call)
            if ack is not None:
                self.acks.append(ack)
            self._changed.notify_all()

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or None
        pending = self._failures.get(method)
        failure = pending.pop(0) if pending else None
        answer = {"ok": True, **self._answer(method, params)} if failure in (None, "hang") else None
        await self._record(Call(method, params, token, answer if failure is None else None))
        if failure == "error":
            return web.json_response({"ok": False, "error": "internal_error"}, status=500)
        if failure == "ratelimited":
            headers = {"Retry-After": self.retry_after}
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers=headers)
        if failure == "permanent":
            return web.json_response({"ok": False, "error": "channel_not_found"})
        if failure == "hang":
            await self._hangs_end.wait()
        return web.json_response(answer)

    def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "chat.postMessage":
            return {"channel": params.get("channel"), "ts": f"1700000000.{next(self._ts):06d}"}
        if method == "chat.update":
            return {"channel": params.get("channel"), "ts": params.get("ts")}
        if method == "chat.postEphemeral":
            return {"message_ts": f"1700000001.{next(self._ts):06d}"}
        if method == "views.open":
            return {"view": {"id": "V0DENY", **params.get("view", {})}}
        if method == "apps.connections.open":
            return {"url": str(self.server.make_url("/socket")).replace("http://", "ws://")}
        return {}

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.sockets.append(socket)
        await socket.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0"}})
        await self._record()
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await self._record(ack=json.loads(message.data))
        return socket


# ---- what Slack sends -------------------------------------------------------------------------------


def signed(body: str | bytes, *, secret: str = SECRET, timestamp: float | None = None) -> dict[str, str]:
    """The headers Slack sends with `body`: v0 HMAC-SHA256 of `v0:{timestamp}:{body}`."""
    stamp = str(int(time.time() if timestamp is None else timestamp))
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + raw, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest}",
    }


def form(payload: dict[str, Any]) -> str:
    """An interactivity request body as Slack posts it: `payload=<url-encoded JSON>`."""
    return urlencode({"payload": json.dumps(payload)})


def block_actions(
    action_id: str, value: str, *, user: str = "U0BOB", team: str = TEAM, channel: str = CHANNEL
) -> dict[str, Any]:
    """A button click on the approval message (in `channel`: a group channel's message, too)."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "team_id": team},
        "api_app_id": "A0",
        "token": "legacy-verification-token",
        "team": {"id": team, "domain": "example"},
        "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": channel},
        "trigger_id": f"trigger-{user}-{action_id}",
        "channel": {"id": channel, "name": "approvals"},
        "response_url": "https://hooks.slack.com/actions/T0TEAM/1/x",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "approvals_decide",
                "value": value,
                "action_ts": "1700000002.000001",
            }
        ],
    }


def view_submission(
    view: dict[str, Any], reason: str, *, user: str = "U0BOB", team: str = TEAM
) -> dict[str, Any]:
    """The submission of a modal the gateway opened (`view` as it was passed to views.open)."""
    return {
        "type": "view_submission",
        "user": {"id": user, "username": user.lower(), "team_id": team},
        "api_app_id": "A0",
        "token": "legacy-verification-token",
        "team": {"id": team, "domain": "example"},
        "trigger_id": "trigger-submit",
        "view": {
            **view,
            "id": "V0DENY",
            "team_id": team,
            "state": {"values": {"reason": {"reason_input": {"type": "plain_text_input", "value": reason}}}},
        },
    }


def select_action(
    action_id: str, value: str, *, user: str = "U0BOB", team: str = TEAM, channel: str = CHANNEL
) -> dict[str, Any]:
    """An option picked from a static select on the approval message (e.g. approve & remember)."""
    click = block_actions(action_id, "", user=user, team=team, channel=channel)
    [action] = click["actions"]
    del action["value"]
    action.update(
        type="static_select",
        block_id="approvals_remember",
        selected_option={"text": {"type": "plain_text", "text": "chosen"}, "value": value},
    )
    return click
