"""The client x upstream-era matrix (issue 13, "Real clients"): real MCP clients through the gateway.

Each (client, upstream) pair runs five cases against one gateway: list tools, an allowed call, a
held call approved through the API, a held call denied, and a held call as a task approved after the
client's own request timeout. What every case got is written to tests/.artifacts/client-matrix.md;
the cases that work today are asserted (EXPECTED_OK), the others are only recorded there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from approvals.core.model import Approval
from tests.approvals_kit import Held, Recorder, start_held
from tests.conftest import TOKEN_A, WAIT, StartGateway, mcp_client
from tests.modern_upstream import start_modern_only
from tests.upstreams import NODE_DIR, start_everything

NODE = NODE_DIR / "node_modules" / "node" / "bin" / "node"  # Node 22, which the v2 SDK wants
ARTIFACT = Path(__file__).parent / ".artifacts" / "client-matrix.md"
CASES = ("list", "allowed", "approved", "denied", "task")
CLIENT_TIMEOUT_MS = 2000  # the TypeScript clients' request timeout in the task case
NO_TASKS = "n/a: mcp.Client has no tasks API"

# How each upstream is driven: the held tool and the arguments that tell the decider what to do.
UPSTREAMS: dict[str, dict[str, Any]] = {
    "demo": {
        "allowed": ["get_time", {}],
        "held": "send_email",
        "args": {d: {"to": "a@example.com", "subject": d, "body": "b"} for d in ("approve", "deny", "task")},
    },
    "everything": {
        "allowed": ["get-sum", {"a": 1, "b": 2}],
        "held": "echo",
        "args": {d: {"message": d} for d in ("approve", "deny", "task")},
    },
    "modern-only": {  # 2026-07-28 only: tests/modern_upstream.py
        "allowed": ["test_simple_text", {}],
        "held": "matrix_echo",
        "args": {d: {"message": d} for d in ("approve", "deny", "task")},
    },
}
PYTHON_MODES = {"mcp-auto": "auto", "mcp-legacy": "legacy", "mcp-2026-07-28": "2026-07-28"}
NODE_CLIENTS = {
    "ts-v1": ("matrix_client_v1.mjs", "legacy"),
    "ts-v2-legacy": ("matrix_client_v2.mjs", "legacy"),
    "ts-v2-auto": ("matrix_client_v2.mjs", "auto"),
    "ts-v2-2026-07-28": ("matrix_client_v2.mjs", "2026-07-28"),
}
CLIENTS = (*PYTHON_MODES, *NODE_CLIENTS)

# The cases that work today, asserted for both upstreams; everything else is only recorded in the
# artifact. Every TypeScript client gets its task: at 2025-11-25 through the `tasks` capability, at
# 2026-07-28 through the io.modelcontextprotocol/tasks extension (ext-tasks with rawDispatch).
CALLS = frozenset({"list", "allowed", "approved", "denied"})
EXPECTED_OK: dict[str, frozenset[str]] = {
    "mcp-auto": CALLS,
    "mcp-legacy": CALLS,
    "mcp-2026-07-28": CALLS,
    "ts-v1": CALLS | {"task"},
    "ts-v2-legacy": CALLS | {"task"},
    "ts-v2-auto": CALLS | {"task"},
    "ts-v2-2026-07-28": CALLS | {"task"},
}
# The revision each client ends up speaking through the gateway: auto mode must not downgrade.
EXPECTED_VERSION = {
    "mcp-auto": "2026-07-28",
    "mcp-legacy": "2025-11-25",
    "mcp-2026-07-28": "2026-07-28",
    "ts-v1": "2025-11-25",
    "ts-v2-legacy": "2025-11-25",
    "ts-v2-auto": "2026-07-28",
    "ts-v2-2026-07-28": "2026-07-28",
}

RESULTS: dict[tuple[str, str], dict[str, str]] = {}


# ---- judging what a case got ----------------------------------------------------------------------


def judge(case: str, upstream: str, got: dict[str, Any]) -> str:
    """Return "ok", or what was wrong with `got` (a case's result as JSON)."""
    if case == "list":
        wanted = {UPSTREAMS[upstream]["held"], UPSTREAMS[upstream]["allowed"][0]}
        missing = wanted - set(got.get("tools", []))
        return f"tools missing: {sorted(missing)}" if missing else "ok"
    text = json.dumps(got)[:200]
    if case == "denied":
        ok = got.get("isError") is True and "denied_by_reviewer" in json.dumps(got.get("_meta"))
        return "ok" if ok else f"not a denial: {text}"
    if got.get("isError"):
        return f"isError result: {text}"
    if case == "task" and not got.get("task"):
        return "no task created (answered in-band)"
    if case == "task" and got.get("elapsedMs", 0) <= CLIENT_TIMEOUT_MS:
        return f"approved before the client timeout: {got.get('elapsedMs')} ms"
    return "ok"


def failure(error: BaseException) -> str:
    """A one-line account of an exception (the leaves of an exception group)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    code = getattr(getattr(error, "error", None), "code", None)
    return f"{type(error).__name__}{f' {code}' if code is not None else ''}: {error}"[:240]


# ---- the decider: a reviewer who approves or denies as the call's arguments say ----------------------


def marker(approval: Approval) -> str:
    values = json.loads(approval.arguments_json).values()
    return next((v for v in values if v in ("approve", "deny", "task")), "approve")


async def decide(held: Held, past_timeout: asyncio.Event) -> None:
    """Decide every pending approval: deny "deny", approve "task" only after the client's timeout."""
    handled: set[str] = set()
    while True:
        pending = await held.recorder.wait_for(
            lambda a: a.status == "pending" and a.id not in handled, timeout=WAIT * 10
        )
        handled.add(pending.id)
        what = marker(pending)
        if what == "task":
            await past_timeout.wait()
            past_timeout.clear()
        verb = "deny" if what == "deny" else "approve"
        await held.api("POST", f"/api/approvals/{pending.id}/{verb}")


# ---- the gateway in front of each upstream ----------------------------------------------------------


@asynccontextmanager
async def gateway_on(
    upstream: str, start_gateway: StartGateway, tmp_path: Path
) -> AsyncIterator[tuple[Held, str]]:
    """The gateway on `upstream` holding its held tool, and the client URL."""
    if upstream == "demo":
        held = await start_held(start_gateway, tmp_path)
        yield held, held.url()
        return
    held_tool = UPSTREAMS[upstream]["held"]
    policy = {"version": "1", "default": "allow", "tools": {held_tool: {"action": "require_approval"}}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    start = start_everything if upstream == "everything" else start_modern_only
    async with start() as url:
        running = await start_gateway(
            {upstream: {"url": url, "policy": "policy.json"}}, approvals={"hold_seconds": 10}
        )
        recorder = Recorder.following(running.service.feed)
        yield (
            Held(running, running.gatekeeper, recorder, tmp_path / "outbox.jsonl"),
            running.url(upstream),
        )


# ---- the clients ------------------------------------------------------------------------------------


async def python_cases(client_name: str, upstream: str, url: str) -> dict[str, str]:
    """mcp.Client in its mode: what each case got."""
    spec = UPSTREAMS[upstream]
    outcomes: dict[str, str] = {"version": "-", "task": NO_TASKS}

    async def attempt(case: str, call: Callable[[Any], Awaitable[Any]]) -> None:
        try:
            async with asyncio.timeout(WAIT):
                got = await call(client)
        except Exception as error:  # the matrix records whatever the client raised
            outcomes[case] = failure(error)
            return
        dumped = got.model_dump(by_alias=True, mode="json")
        if case == "list":
            dumped = {"tools": [tool["name"] for tool in dumped["tools"]]}
        outcomes[case] = judge(case, upstream, dumped)

    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(mcp_client(url, TOKEN_A, mode=PYTHON_MODES[client_name]))
        except Exception as error:
            return {case: f"connect: {failure(error)}" for case in CASES if case != "task"} | outcomes
        outcomes["version"] = str(client.protocol_version)
        await attempt("list", lambda c: c.list_tools())
        await attempt("allowed", lambda c: c.call_tool(spec["allowed"][0], spec["allowed"][1]))
        await attempt("approved", lambda c: c.call_tool(spec["held"], spec["args"]["approve"]))
        await attempt("denied", lambda c: c.call_tool(spec["held"], spec["args"]["deny"]))
    return outcomes


async def node_cases(
    client_name: str, upstream: str, url: str, past_timeout: asyncio.Event
) -> dict[str, str]:
    """A TypeScript SDK client script: what each case got (it prints one JSON line per case)."""
    script, mode = NODE_CLIENTS[client_name]
    spec = {**UPSTREAMS[upstream], "mode": mode, "timeoutMs": CLIENT_TIMEOUT_MS}
    process = await asyncio.create_subprocess_exec(
        str(NODE), str(NODE_DIR / script), url, TOKEN_A, json.dumps(spec),
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    outcomes: dict[str, str] = {}
    try:
        while line := await asyncio.wait_for(process.stdout.readline(), WAIT):
            message = json.loads(line)
            if "connected" in message:
                outcomes["version"] = str(message["version"])
            elif message.get("event") == "past-timeout":
                past_timeout.set()
            elif message.get("case") == "connect":
                return {"version": "-"} | {case: f"connect: {message['error']}" for case in CASES}
            elif "case" in message:
                got = message.get("result")
                outcomes[message["case"]] = (
                    message["error"] if got is None else judge(message["case"], upstream, got)
                )
    except TimeoutError:
        pass
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    return {case: outcomes.get(case, "no answer (client hung)") for case in ("version", *CASES)}


# ---- the matrix -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def matrix_artifact() -> Iterator[None]:
    """Writes what every pair got to tests/.artifacts/client-matrix.md once the module is done."""
    yield
    if not RESULTS:
        return
    ARTIFACT.parent.mkdir(exist_ok=True)
    columns = ("version", *CASES)
    rows = ["| client | upstream | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for (client_name, upstream), outcomes in sorted(RESULTS.items()):
        cells = (outcomes[column].replace("|", "\\|").replace("\n", " ") for column in columns)
        rows.append(f"| {client_name} | {upstream} | " + " | ".join(cells) + " |")
    ARTIFACT.write_text("# Client x upstream-era matrix (through the gateway)\n\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("client_name", CLIENTS)
async def test_client_matrix(
    client_name: str, upstream: str, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A real client through the gateway gets list / allowed / approved / denied / task as recorded."""
    if client_name in NODE_CLIENTS and not os.access(NODE, os.X_OK):
        pytest.skip(f"{NODE} not installed: run `make test` (npm ci --prefix tests/node) first")
    past_timeout = asyncio.Event()
    async with gateway_on(upstream, start_gateway, tmp_path) as (held, url):
        reviewer = asyncio.create_task(decide(held, past_timeout))
        try:
            if client_name in PYTHON_MODES:
                outcomes = await python_cases(client_name, upstream, url)
            else:
                outcomes = await node_cases(client_name, upstream, url, past_timeout)
        finally:
            reviewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await reviewer
    RESULTS[client_name, upstream] = outcomes
    print(f"{client_name} x {upstream}: {outcomes}")
    assert outcomes["version"] == EXPECTED_VERSION[client_name]
    assert {case: outcomes[case] for case in EXPECTED_OK[client_name] if outcomes[case] != "ok"} == {}
