"""Run the official MCP conformance suite (``@modelcontextprotocol/conformance``, pinned in
``tests/node/package.json``) against a server URL and read back its per-check results.

The suite needs Node 22; the npm package ``node`` (pinned to 22.x beside it) ships that binary in
``node_modules/node/bin/node``, so the machine's own Node (20 is enough for the rest) is not used.

The suite writes ``<output-dir>/server-<scenario>-<timestamp>/checks.json`` per scenario; a check is
keyed ``<scenario>/<check id>`` (``wire-schema-valid`` recurs in every scenario), and a key that
occurs several times in one scenario passes only if every occurrence does.

The suite has no option for request headers, so ``inject_grant_token`` lets the gateway under test
see the grant token on every request, as a client configured with it would send it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from tests.upstreams import NODE_DIR

NODE22 = NODE_DIR / "node_modules" / "node" / "bin" / "node"
CONFORMANCE_ENTRY = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
ARTIFACTS = Path(__file__).resolve().parent / ".artifacts"
UPSTREAM = Path(__file__).resolve().parent / "conformance_upstream.py"
READY_TIMEOUT = 30.0

SCENARIO_TIMEOUT_MS = 15_000  # the suite's per-scenario bound (its default is 30 s)
RUN_TIMEOUT = 240.0  # the bound on one whole run of the suite
PASS = "SUCCESS"
INFO = "INFO"
MISSING = "-"

_SCENARIO_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
_RANK = {PASS: 0, INFO: 1, "SKIPPED": 2, "WARNING": 3, "FAILURE": 4}


class ConformanceError(RuntimeError):
    """The suite could not be run, or wrote nothing to read."""


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome in one run (the worst of its occurrences) and why, when it did not pass."""

    status: str
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def kept(self) -> bool:
        """Not a failure: passed, or informational only."""
        return self.status in (PASS, INFO)


Results = dict[str, Check]


def _require_suite() -> None:
    for path in (NODE22, CONFORMANCE_ENTRY):
        if not path.is_file():
            raise ConformanceError(f"{path} not found: run `make test` (npm ci --prefix tests/node) first")


async def run_suite(url: str, revision: str, output_dir: Path) -> Results:
    """Run every server scenario `revision` requires against `url`; return the checks by key."""
    _require_suite()
    argv = [str(NODE22), str(CONFORMANCE_ENTRY), "server", "--url", url, "--requirements", revision]
    argv += ["--timeout", str(SCENARIO_TIMEOUT_MS), "--output-dir", str(output_dir)]
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=NODE_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ConformanceError(
            f"the conformance suite ran longer than {RUN_TIMEOUT:.0f}s against {url}"
        ) from None
    # The suite exits 1 whenever a check fails; only a run that left no results is an error.
    results = read_results(output_dir)
    if not results:
        tail = output.decode(errors="replace")[-2000:]
        raise ConformanceError(f"the conformance suite wrote no results (exit {process.returncode}):\n{tail}")
    return results


def read_results(output_dir: Path) -> Results:
    """The checks the suite wrote under `output_dir`, keyed ``<scenario>/<check id>``."""
    results: Results = {}
    for checks_file in sorted(output_dir.glob("*/checks.json")):
        match = _SCENARIO_DIR.match(checks_file.parent.name)
        if match is None:
            continue
        for check in json.loads(checks_file.read_text()):
            key = f"{match['scenario']}/{check['id']}"
            seen = Check(str(check["status"]), _reason(check))
            earlier = results.get(key)
            if earlier is None or _RANK.get(seen.status, 5) > _RANK.get(earlier.status, 5):
                results[key] = seen
    return results


def _reason(check: Mapping[str, Any]) -> str:
    message = check.get("errorMessage") or ""
    return " ".join(str(message).split())[:160]


def listed(key: str, keys: frozenset[str]) -> bool:
    """Whether `keys` names the check `key`, itself or by its scenario (``<scenario>/*``)."""
    return key in keys or f"{key.split('/', 1)[0]}/*" in keys


def regressions(direct: Results, gateway: Results, only: frozenset[str] | None = None) -> dict[str, Check]:
    """Checks that pass directly but fail through the gateway (restricted to `only` when given).

    INFO through the gateway is not a failure: the suite uses it for a behaviour the server may
    choose (e.g. JSON instead of an SSE stream) and does not count it. A check the gateway run did
    not emit fails only when its whole scenario is missing; a scenario that did run may omit
    checks that apply only to what the server chose (a priming event on an SSE stream it did not
    open).
    """
    ran = {key.split("/", 1)[0] for key in gateway}
    failed: dict[str, Check] = {}
    for key, check in direct.items():
        if not check.passed or (only is not None and not listed(key, only)):
            continue
        there = gateway.get(key)
        if there is None and key.split("/", 1)[0] not in ran:
            failed[key] = Check(MISSING, "the scenario did not run through the gateway")
        elif there is not None and not there.kept:
            failed[key] = there
    return failed


def table(revision: str, upstream: str, direct: Results, gateway: Results) -> str:
    """A Markdown table of every check: its status directly and through the gateway, with counts."""
    passed_direct = sum(check.passed for check in direct.values())
    lost = regressions(direct, gateway)
    gained = sum(
        check.passed and not direct.get(key, Check(MISSING)).passed for key, check in gateway.items()
    )
    lines = [
        f"# Conformance {revision}: {upstream} directly and through the gateway",
        "",
        f"Checks passing directly: {passed_direct} of {len(direct)}. "
        f"Of those, failing through the gateway: {len(lost)}. "
        f"Passing only through the gateway: {gained}.",
        "",
        "| check | direct | through gateway | why (through gateway) |",
        "| --- | --- | --- | --- |",
    ]
    for key in sorted(direct.keys() | gateway.keys()):
        here, there = direct.get(key, Check(MISSING)), gateway.get(key, Check(MISSING))
        why = there.reason.replace("|", "\\|")
        mark = " **(lost)**" if key in lost else ""
        lines.append(f"| {key} | {here.status} | {there.status}{mark} | {why} |")
    return "\n".join(lines) + "\n"


def write_table(name: str, text: str) -> Path:
    """Write `text` to tests/.artifacts/<name> (git-ignored) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_text(text)
    return path


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def inject_grant_token(token: str) -> Middleware:
    """An aiohttp middleware that gives every request without credentials `Authorization: Bearer token`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if hdrs.AUTHORIZATION not in request.headers:
            headers = request.headers.copy()
            headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
            request = request.clone(headers=headers)
        return await handler(request)

    return middleware


@asynccontextmanager
async def conformance_upstream() -> AsyncIterator[str]:
    """tests/conformance_upstream.py over Streamable HTTP; yields its /mcp URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(UPSTREAM), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
        if not line.startswith(b"LISTENING "):
            raise ConformanceError(f"{UPSTREAM.name} did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.kill()
        await process.wait()
