"""Tasks for 2026-07-28 clients (the io.modelcontextprotocol/tasks extension), through a real gateway.

Raw 2026-07-28 requests over HTTP (every byte the client sends is the test's) and the TypeScript
SDK v2 client with ext-tasks (tests/node/tasks_client_v2.mjs); the gateway on the demo upstream (or
modelscope-mcp-server for an upstream's JSON-RPC error), and two gateways on one store for "any
process answers any task".
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from approvals.config import sha256_hex
from approvals.errors import StoreError
from approvals.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND
from approvals.proxy.sse import read_events
from approvals.proxy.stateless import HEADER_MISMATCH, MISSING_REQUIRED_CLIENT_CAPABILITY
from approvals.proxy.tasks_modern import EXTENSION
from approvals.web.app import create_app
from approvals.web.keys import SERVICE
from tests.approvals_kit import HELD_POLICY, Held, Recorder, start_held
from tests.conformance_kit import CONFORMANCE_ENTRY, NODE22, inject_grant_token, read_results
from tests.conftest import BOB_TOKEN, DEMO_COMMAND, TOKEN_A, TOKEN_B, StartGateway, settings_for
from tests.rawmcp import ACCEPT
from tests.test_tasks import next_line, node_process
from tests.upstreams import MODELSCOPE_COMMAND, MODELSCOPE_OFFLINE_ENV, NODE_DIR

MODERN = "2026-07-28"
EMAIL = {"to": "ops@example.com", "subject": "Quarterly numbers", "body": "Attached."}
NOW = 1_900_000_000.0
TS_CLIENT = NODE_DIR / "tasks_client_v2.mjs"
FIXTURE_SERVER = NODE_DIR / "tasks_fixture_server.mjs"
WITH_TASKS: dict[str, Any] = {"extensions": {EXTENSION: {}}}


@dataclass
class Reply:
    status: int
    body: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        assert "result" in self.body, self.body
        result: dict[str, Any] = self.body["result"]
        return result

    @property
    def code(self) -> int:
        assert "error" in self.body, self.body
        code: int = self.body["error"]["code"]
        return code


@dataclass
class Modern:
    """A 2026-07-28 client spoken by hand: each request carries its envelope and routing headers."""

    http: aiohttp.ClientSession
    url: str
    token: str = TOKEN_A
    capabilities: dict[str, Any] | None = None  # None: declares the tasks extension
    _next: int = 0

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        named: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """POST one request; `named=False` leaves out the Mcp-Name header, `headers` override."""
        self._next += 1
        capabilities = WITH_TASKS if self.capabilities is None else self.capabilities
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": capabilities,
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        }
        params = {"_meta": meta, **(params or {})}
        body = {"jsonrpc": "2.0", "id": self._next, "method": method, "params": params}
        name = params.get("name", params.get("taskId"))
        sent = {
            "Authorization": f"Bearer {self.token}",
            "Accept": ACCEPT,
            "Content-Type": "application/json",
            "MCP-Protocol-Version": MODERN,
            "Mcp-Method": method,
            **({"Mcp-Name": name} if named and isinstance(name, str) else {}),
            **(headers or {}),
        }
        async with self.http.post(self.url, data=json.dumps(body), headers=sent) as response:
            if response.content_type == "text/event-stream":  # a call held in-band: its last event
                events = [json.loads(event.data) async for event in read_events(response.content)]
                return Reply(response.status, events[-1])
            return Reply(response.status, await response.json())

    async def call(self, tool: str, arguments: dict[str, Any]) -> Reply:
        return await self.request("tools/call", {"name": tool, "arguments": arguments})

    async def task(self, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """A held send_email: the CreateTaskResult."""
        reply = await self.call("send_email", arguments or EMAIL)
        assert reply.status == 200
        assert reply.result["resultType"] == "task", reply.body
        return reply.result

    async def get(self, task_id: str) -> dict[str, Any]:
        reply = await self.request("tasks/get", {"taskId": task_id})
        assert reply.status == 200
        return reply.result


@asynccontextmanager
async def modern(
    url: str, token: str = TOKEN_A, capabilities: dict[str, Any] | None = None
) -> AsyncIterator[Modern]:
    async with aiohttp.ClientSession() as http:
        yield Modern(http, url, token, capabilities)


def email(subject: str) -> dict[str, Any]:
    return {**EMAIL, "subject": subject}


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """The gateway on the demo upstream, holding send_email (tests.approvals_kit.start_held)."""
    return await start_held(start_gateway, tmp_path)


# ---- discovery and creation ---------------------------------------------------------------------


async def test_discover_advertises_the_extension_and_no_v1_tasks(held: Held) -> None:
    """server/discover has capabilities.extensions["io.modelcontextprotocol/tasks"] == {}, no .tasks."""
    async with modern(held.url()) as client:
        capabilities = (await client.request("server/discover")).result["capabilities"]
    assert capabilities["extensions"] == {EXTENSION: {}}
    assert "tasks" not in capabilities
    assert "tools" in capabilities


async def test_held_call_is_answered_at_once_with_a_durable_flat_task(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A held call is a CreateTaskResult whose id is the stored pending approval's; it says who decides."""
    held = await start_held(start_gateway, tmp_path, clock=lambda: NOW)
    async with modern(held.url()) as client:
        created = await client.task()
        stored = await held.gateway.service.get(created["taskId"])  # in the store before the answer
        got = await client.get(created["taskId"])
    assert stored is not None
    assert (stored.status, stored.tool, stored.grant) == ("pending", "send_email", "agent-a")
    assert created["status"] == got["status"] == "working"
    assert "Waiting for a reviewer other than alice" in created["statusMessage"]
    assert "expires in 15 min if nobody decides" in created["statusMessage"]
    assert isinstance(created["ttlMs"], int)
    assert created["ttlMs"] > 15 * 60 * 1000
    assert isinstance(created["pollIntervalMs"], int)
    assert created["pollIntervalMs"] > 0
    assert not {"task", "ttl", "pollInterval", "result", "error", "requestState"} & created.keys()
    assert got["resultType"] == "complete"
    assert not {"result", "error"} & got.keys()
    assert held.sent() == []


async def test_only_held_calls_of_declaring_clients_become_tasks(held: Held) -> None:
    """An allowed call is answered in-band even with the extension (and a legacy `task` param)."""
    async with modern(held.url()) as client:
        params = {"name": "get_time", "arguments": {}, "task": {"ttl": 60000}}
        answer = (await client.request("tools/call", params)).result
    assert answer["resultType"] == "complete"
    assert "taskId" not in answer
    assert held.recorder.seen == []


# ---- what becomes of a task ---------------------------------------------------------------------


async def test_approved_task_completes_with_exactly_what_tools_call_gives(held: Held) -> None:
    """Approved, the task is completed and inlines the result a repeat tools/call receives."""
    async with modern(held.url()) as client:
        created = await client.task()
        assert (await held.api("POST", f"/api/approvals/{created['taskId']}/approve"))[0] == 200
        await held.recorder.status("completed", created["taskId"])
        async with modern(held.url(), capabilities={}) as plain:  # no tasks: the kept result, in-band
            repeated = (await plain.call("send_email", EMAIL)).result
        got = await client.get(created["taskId"])
    assert got["status"] == "completed"
    assert got["result"] == repeated
    assert got["result"]["resultType"] == "complete"
    assert got["result"]["isError"] is False
    assert "queued message" in got["result"]["content"][0]["text"]
    assert "io.modelcontextprotocol/related-task" not in got["result"].get("_meta", {})
    assert len(held.sent()) == 1


async def test_denied_task_completes_with_the_denial_an_agent_gets(held: Held) -> None:
    """Denied, the task is completed with the isError result naming the reviewer's decision."""
    async with modern(held.url()) as client:
        created = await client.task()
        body = {"reason": "not this quarter"}
        assert (await held.api("POST", f"/api/approvals/{created['taskId']}/deny", body=body))[0] == 200
        got = await client.get(created["taskId"])
    assert got["status"] == "completed"
    assert got["result"]["isError"] is True
    assert got["result"]["_meta"]["approvals"]["code"] == "denied_by_reviewer"
    assert "not this quarter" in got["result"]["content"][0]["text"]
    assert got["statusMessage"].startswith("Denied by bob")
    assert held.sent() == []


async def test_expired_task_completes_with_the_expiry(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Nobody decided before the deadline: completed, with the isError expiry result."""
    now = [NOW]
    held = await start_held(start_gateway, tmp_path, clock=lambda: now[0])
    async with modern(held.url()) as client:
        created = await client.task()
        now[0] += 16 * 60
        await held.gateway.service.expire_due()
        got = await client.get(created["taskId"])
    assert got["status"] == "completed"
    assert got["result"]["isError"] is True
    assert got["result"]["_meta"]["approvals"]["code"] == "approval_expired"
    assert got["statusMessage"] == "Expired without a decision; the call was not made"


async def test_upstream_json_rpc_error_fails_the_task(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A released call the upstream answers with a JSON-RPC error is failed, the error inlined."""
    policy = {"version": "1", "default": "deny", "tools": {"generate_image": {"action": "require_approval"}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    env = {**MODELSCOPE_OFFLINE_ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    upstreams = {"modelscope": {"command": MODELSCOPE_COMMAND, "policy": "policy.json", "env": env}}
    gateway = await start_gateway(upstreams)
    recorder = Recorder.following(gateway.service.feed)
    async with modern(gateway.url("modelscope")) as client:
        created = (await client.call("generate_image", {"prompt": "a cat"})).result
        assert created["resultType"] == "task"
        assert (
            await Held(gateway, gateway.gatekeeper, recorder, tmp_path).api(
                "POST", f"/api/approvals/{created['taskId']}/approve"
            )
        )[0] == 200
        await recorder.status("failed", created["taskId"])
        got = await client.get(created["taskId"])
    assert got["status"] == "failed"
    assert "result" not in got
    assert got["error"]["code"] == INVALID_PARAMS  # modelscope's answer without an API token
    assert "token" in got["error"]["message"].lower()


# ---- cancel, update, and what is not there --------------------------------------------------------


async def test_cancel_withdraws_a_pending_approval_with_an_empty_ack(held: Held) -> None:
    """tasks/cancel acks {resultType: complete}; the task is cancelled, without a result, for good."""
    async with modern(held.url()) as client:
        created = await client.task()
        ack = (await client.request("tasks/cancel", {"taskId": created["taskId"]})).result
        got = await client.get(created["taskId"])
        again = (await client.request("tasks/cancel", {"taskId": created["taskId"]})).result
    assert ack == again == {"resultType": "complete"}
    assert got["status"] == "cancelled"
    assert not {"result", "error"} & got.keys()
    assert (await held.api("POST", f"/api/approvals/{created['taskId']}/approve"))[0] == 409
    assert held.sent() == []


async def test_cancel_after_a_decision_is_acked_and_changes_nothing(held: Held) -> None:
    """Cancelling a denied task or an approved one is acked; the decision stands, the call is made once."""
    async with modern(held.url()) as client:
        denied, approved = await client.task(email("d")), await client.task(email("a"))
        assert (await held.api("POST", f"/api/approvals/{denied['taskId']}/deny"))[0] == 200
        assert (await held.api("POST", f"/api/approvals/{approved['taskId']}/approve"))[0] == 200
        for task in (denied, approved):
            ack = (await client.request("tasks/cancel", {"taskId": task["taskId"]})).result
            assert ack == {"resultType": "complete"}
        await held.recorder.status("completed", approved["taskId"])
        after = [await client.get(task["taskId"]) for task in (denied, approved)]
    assert [got["status"] for got in after] == ["completed", "completed"]
    assert after[0]["result"]["_meta"]["approvals"]["code"] == "denied_by_reviewer"
    assert after[1]["result"]["isError"] is False
    assert [m["subject"] for m in held.sent()] == ["a"]


async def test_update_is_acked_and_list_and_result_do_not_exist(held: Held) -> None:
    """tasks/update is acked (these tasks ask for nothing); tasks/list and tasks/result are -32601."""
    async with modern(held.url()) as client:
        created = await client.task()
        update = {"taskId": created["taskId"], "inputResponses": {"k": {"action": "accept"}}}
        ack = (await client.request("tasks/update", update)).result
        missing = await client.request("tasks/update", {"taskId": created["taskId"]})
        removed = [await client.request("tasks/list"), await client.request("tasks/result", {"taskId": "x"})]
        still = await client.get(created["taskId"])
    assert ack == {"resultType": "complete"}
    assert (missing.status, missing.code) == (400, INVALID_PARAMS)
    assert [reply.code for reply in removed] == [METHOD_NOT_FOUND, METHOD_NOT_FOUND]
    assert still["status"] == "working"


# ---- who may see a task, and bad requests ----------------------------------------------------------


async def test_another_grants_task_is_no_task_and_stays_untouched(held: Held) -> None:
    """Get, update and cancel of another grant's task, or of an unknown id, are all -32602."""
    async with modern(held.url()) as a, modern(held.url(), TOKEN_B) as b:
        created = await a.task()
        for client, task_id in ((b, created["taskId"]), (a, uuid.uuid4().hex)):
            for method in ("tasks/get", "tasks/cancel", "tasks/update"):
                reply = await client.request(method, {"taskId": task_id, "inputResponses": {}})
                assert (reply.status, reply.code) == (400, INVALID_PARAMS)
                assert "no task" in reply.body["error"]["message"]
        still = await a.get(created["taskId"])
    assert still["status"] == "working"


async def test_malformed_task_requests_get_the_specs_errors(held: Held) -> None:
    """Bad taskId -32602; Mcp-Name missing or not the taskId -32020; no extension declared -32021."""
    async with modern(held.url()) as client, modern(held.url(), capabilities={}) as undeclared:
        created = await client.task()
        task_id = created["taskId"]
        for bad in ({}, {"taskId": 7}, {"taskId": ""}, {"taskId": "x" * 300}):
            assert (await client.request("tasks/get", bad)).code == INVALID_PARAMS
        wrong = await client.request("tasks/get", {"taskId": task_id}, headers={"Mcp-Name": "someone-else"})
        missing = await client.request("tasks/get", {"taskId": task_id}, named=False)
        wrapped = f"=?base64?{base64.b64encode(task_id.encode()).decode()}?="
        encoded = await client.request("tasks/get", {"taskId": task_id}, headers={"Mcp-Name": wrapped})
        gated = await undeclared.request("tasks/get", {"taskId": task_id})
        extensions: object
        for extensions in ([], {EXTENSION: True}):
            declared: dict[str, Any] = {"extensions": extensions}
            async with modern(held.url(), capabilities=declared) as odd:
                assert (await odd.call("send_email", EMAIL)).code == INVALID_PARAMS
    assert (wrong.status, wrong.code) == (400, HEADER_MISMATCH)
    assert (missing.status, missing.code) == (400, HEADER_MISMATCH)
    assert encoded.result["taskId"] == task_id
    assert (gated.status, gated.code) == (400, MISSING_REQUIRED_CLIENT_CAPABILITY)
    assert gated.body["error"]["data"] == {"requiredCapabilities": {"extensions": {EXTENSION: {}}}}


async def test_a_store_failure_is_a_clear_gateway_error(held: Held, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the store cannot be read, tasks/get says so (-32603), with no trace and nothing decided."""

    async def broken(approval_id: str) -> None:
        raise StoreError("database is locked")

    async with modern(held.url()) as client:
        created = await client.task()
        monkeypatch.setattr(held.gateway.service, "get", broken)
        reply = await client.request("tasks/get", {"taskId": created["taskId"]})
    assert (reply.status, reply.code) == (500, INTERNAL_ERROR)
    assert "database is locked" in reply.body["error"]["message"]


# ---- any process answers any task ----------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_task_created_on_one_replica_is_answered_by_another(
    start_gateway: StartGateway, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """Two gateways on one store: created on A, read at once and decided on B, finished on A."""
    grant = f"tasks-{uuid.uuid4().hex[:8]}"  # a PostgreSQL store is shared by the whole test run
    token = f"token-{uuid.uuid4().hex}"
    (tmp_path / "policy.json").write_text(json.dumps(HELD_POLICY))
    outbox = tmp_path / "outbox.jsonl"
    upstreams = {
        "demo": {
            "command": DEMO_COMMAND,
            "policy": "policy.json",
            "env": {"APPROVALS_DEMO_OUTBOX": str(outbox)},
        }
    }
    options: dict[str, Any] = {
        # SQLite: both on the same file (start_gateway's), the change feed polled across processes.
        "store": {"url": request.getfixturevalue("postgres_url")} if store == "postgres" else {},
        "grants": [{"name": grant, "token_sha256": sha256_hex(token), "owner": "alice"}],
    }
    a, b = await start_gateway(upstreams, **options), await start_gateway(upstreams, **options)
    recorder = Recorder.following(a.service.feed)
    async with modern(a.url("demo"), token) as on_a, modern(b.url("demo"), token) as on_b:
        created = await on_a.task(email(uuid.uuid4().hex))
        first = await on_b.get(created["taskId"])
        reviewer = Held(b, b.gatekeeper, recorder, outbox)
        assert (await reviewer.api("POST", f"/api/approvals/{created['taskId']}/approve"))[0] == 200
        await recorder.status("completed", created["taskId"])
        done = await on_a.get(created["taskId"])
    assert first["status"] == "working"
    assert done["status"] == "completed"
    assert done["result"]["isError"] is False


# ---- the TypeScript SDK v2 client with ext-tasks --------------------------------------------------


@asynccontextmanager
async def ts_client(held: Held, subject: str, *action: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """tasks_client_v2.mjs calling send_email as a task (pinned to 2026-07-28), ended at exit."""
    if not os.access(NODE22, os.X_OK):
        pytest.skip(f"{NODE22} not installed: run `make test` (npm ci --prefix tests/node) first")
    arguments = json.dumps(email(subject))
    async with node_process(
        str(NODE22), str(TS_CLIENT), held.url(), TOKEN_A, "send_email", arguments, *action
    ) as client:
        yield client


async def test_ts_v2_client_denied_task_settles_with_the_denial(held: Held) -> None:
    """ext-tasks gets a task for the held call; denied, it settles completed with the isError denial."""
    async with ts_client(held, "deny") as client:
        created = await next_line(client)
        assert (created["type"], created["kind"]) == ("created", "task"), created
        pending = await held.recorder.status("pending", created["taskId"])
        assert (await held.api("POST", f"/api/approvals/{pending.id}/deny"))[0] == 200
        outcome = await next_line(client)
    assert outcome["status"] == "completed"
    assert outcome["result"]["isError"] is True
    assert outcome["result"]["_meta"]["approvals"]["code"] == "denied_by_reviewer"
    assert held.sent() == []


async def test_ts_v2_client_cancelling_its_task_withdraws_the_approval(held: Held) -> None:
    """ext-tasks' cancel reaches the gateway: the approval is cancelled and can no longer be approved."""
    async with ts_client(held, "cancel", "cancel") as client:
        created = await next_line(client)
        assert created["type"] == "created", created
        assert (await next_line(client))["type"] == "cancelled"
        outcome = await next_line(client)
        await held.recorder.status("cancelled", created["taskId"])
    assert outcome["status"] == "cancelled"
    assert (await held.api("POST", f"/api/approvals/{created['taskId']}/approve"))[0] == 409
    assert held.sent() == []


# ---- the conformance suite's tasks-* scenarios -------------------------------------------------------

TASK_SCENARIOS = (
    "tasks-capability-negotiation",
    "tasks-dispatch-and-envelope",
    "tasks-lifecycle",
    "tasks-request-headers",
    "tasks-request-state-removal",
    "tasks-required-task-error",
    "tasks-wire-fields",
)
# The one check that cannot pass: it wants a tool that only runs as a task refused (-32021) to a
# client without the extension; the gateway's held calls serve such a client in-band instead.
NOT_FOR_A_GATEWAY = {"tasks-required-task-error/sep-2663-server-returns-missing-capability-when-required"}


async def approve_short_jobs(gateway: TestServer, recorder: Recorder) -> None:
    """A reviewer who approves every held call at once, except a slow_compute of over 2 s (the
    scenarios cancel those, or read them while they work)."""
    seen: set[str] = set()
    async with aiohttp.ClientSession() as http:
        while True:
            pending = await recorder.wait_for(lambda a: a.status == "pending" and a.id not in seen)
            seen.add(pending.id)
            if pending.tool == "slow_compute" and json.loads(pending.arguments_json).get("seconds", 0) > 2:
                continue
            url = gateway.make_url(f"/api/approvals/{pending.id}/approve")
            async with http.post(url, headers={"Authorization": f"Bearer {BOB_TOKEN}"}) as response:
                assert response.status == 200


@pytest.mark.timeout(300)
async def test_conformance_tasks_scenarios_pass_on_held_calls(tmp_path: Path) -> None:
    """The suite's tasks-* checks pass through the gateway when its policy holds the task fixtures."""
    if not os.access(NODE22, os.X_OK):
        pytest.skip(f"{NODE22} not installed: run `make test` (npm ci --prefix tests/node) first")
    held = {
        tool: {"action": "require_approval"} for tool in ("slow_compute", "failing_job", "protocol_error_job")
    }
    (tmp_path / "policy.json").write_text(json.dumps({"version": "1", "default": "allow", "tools": held}))
    upstream = {"command": [str(NODE22), str(FIXTURE_SERVER)], "policy": "policy.json"}
    settings = settings_for(tmp_path, {"up": upstream}, approvals={"max_pending_per_grant": 100})
    app = await create_app(settings)
    app.middlewares.append(inject_grant_token(TOKEN_A))  # the suite cannot send a grant token
    gateway = TestServer(app, host="127.0.0.1", port=0)
    await gateway.start_server()
    reviewer = asyncio.create_task(approve_short_jobs(gateway, Recorder.following(app[SERVICE].feed)))
    try:
        for scenario in TASK_SCENARIOS:
            suite = await asyncio.create_subprocess_exec(
                str(NODE22), str(CONFORMANCE_ENTRY), "server", "--url", str(gateway.make_url("/mcp/up")),
                "--scenario", scenario, "--spec-version", MODERN, "--force", "--timeout", "60000",
                "--output-dir", str(tmp_path / "results"),
                cwd=NODE_DIR, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.wait_for(suite.wait(), 120)
    finally:
        reviewer.cancel()
        await gateway.close()
    results = read_results(tmp_path / "results")
    assert {key.split("/")[0] for key in results} == set(TASK_SCENARIOS)
    failed = {key: check.reason for key, check in results.items() if not check.passed}
    assert failed.keys() == NOT_FOR_A_GATEWAY, failed
