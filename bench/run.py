"""`make bench`: the gateway measured side by side with a direct connection and two other proxies.

Starts everything on 127.0.0.1 — the fast upstream (bench/upstream.py), the gateway
(`approvals serve` on bench/config/, exactly as an operator runs it), FastMCP's proxy with one
reused upstream client (bench/fastmcp_proxy.py) and `mcp-proxy` chained streamable→stdio→streamable
(each in its own virtualenv under bench/.venvs/, installed from PyPI on first use) — then:

1. allowed calls: each target at 1 and 32 concurrent clients, rounds interleaved (the order
   rotates every round) to cancel drift; the load generator (bench/load.py) runs in its own
   process;
2. decision latency: calls held for approval, decided one after another through the API — half
   approved, half denied — from the API's answer to the agent holding the outcome (what a person
   feels) and, for approvals, to the upstream receiving the call; then calls whose agent left
   before the decision, approved, and called again: the repeat call's round trip for the kept
   result;
3. held calls: K calls held at once (memory per held call), one bulk approval through the API as
   fast as it answers, and the time until the upstream has received all K.

With `--store-url postgresql://…` a second gateway on PostgreSQL (a database of the run's own on
that server, created and dropped by the run) joins the allowed-call rounds as `approvals-postgres`,
beside the one on SQLite: every call of the bench's policy is counted against a rate limit, so
this measures what shared, exact limits cost one replica.

A second gateway on SQLite with its Prometheus metrics on (APPROVALS_METRICS_TOKEN set; the
`approvals` one runs with it empty, so off) joins the same rounds as `approvals+metrics`, and a line
under the table gives what metrics cost per call; at the end one scrape of its /metrics proves they
were on. `--no-metrics-row` leaves it out.

It prints a table and the goals of the benchmark issue, and keeps results.json, the table and the
processes' logs in bench/results/<time>/. `python bench/run.py --help` for the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from load import cpu_seconds

from approvals.config import METRICS_TOKEN_ENV

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
LINE_LIMIT = 16 * 1024 * 1024  # the longest line read from the load generator
APPROVALS = str(Path(sys.executable).parent / "approvals")
FASTMCP_REQUIREMENT = "fastmcp==4.1.2"
MCP_PROXY_REQUIREMENT = "mcp-proxy==0.13.0"
START_TIMEOUT = 60.0
UPSTREAM_CLIENTS = ["http1", "aiohttp"]  # approvals.config.UPSTREAM_CLIENTS
SIGN_OF_LIFE_SECONDS = 5.0  # approvals.proxy.hold: a held stream writes something this often
METRICS_ROW = "approvals+metrics"
METRICS_COUNTER = "approvals_calls_total"  # approvals.metrics: one count per judged tools/call
T = TypeVar("T")


# ---- processes ----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    pids: list[int]
    token: str | None = None


@dataclass
class Processes:
    workdir: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 15)
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait()


def read_line(process: subprocess.Popen[bytes], marker: str) -> str:
    """The first stdout line that starts with `marker` (the process's readiness signal)."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{process.args!r} exited before it was ready (see its log)")
        if line.startswith(marker):
            return line.strip()
    raise RuntimeError(f"{process.args!r} was not ready within {START_TIMEOUT:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {START_TIMEOUT:.0f} s")


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            for child in map(int, text.split()):
                found += [child, *children(child)]
    return found


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def ensure_venv(name: str, requirement: str) -> Path:
    """bench/.venvs/<name> with `requirement` installed (once; kept between runs)."""
    venv = BENCH / ".venvs" / name
    marker = venv / f".installed-{requirement}"
    if not marker.exists():
        print(f"installing {requirement} into {venv.relative_to(ROOT)} …", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                requirement,
            ],
            check=True,
        )
        marker.touch()
    return venv


# ---- the load generator -------------------------------------------------------------------


async def load(target: Target, clients: int, duration: float, warmup: float) -> dict[str, Any]:
    command = [
        PYTHON,
        str(BENCH / "load.py"),
        "calls",
        "--url",
        target.url,
        "--clients",
        str(clients),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        *(arg for pid in target.pids for arg in ("--pid", str(pid))),
    ]
    env = {**os.environ, "BENCH_AGENT_TOKEN": target.token or ""}
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed against {target.name} ({clients} clients)")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


async def throughput(
    targets: list[Target], concurrency: list[int], rounds: int, duration: float, warmup: float
) -> dict[str, dict[int, dict[str, float]]]:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for clients in concurrency:
            for target in order:
                result = await load(target, clients, duration, warmup)
                runs.setdefault((target.name, clients), []).append(result)
                print(
                    f"  round {r + 1}/{rounds} {target.name:>17} {clients:>3} clients: "
                    f"{result['calls_per_s']:8.0f} calls/s  p50 {result['p50_ms']:6.2f} ms  "
                    f"errors {result['errors']}",
                    flush=True,
                )
                for sample in result["error_samples"]:
                    print(f"      error: {sample}", flush=True)
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for (name, clients), results in runs.items():
        summary.setdefault(name, {})[clients] = {
            "calls_per_s": sum(x["calls"] for x in results) / sum(x["seconds"] for x in results),
            "p50_ms": median([x["p50_ms"] for x in results]),
            "p90_ms": median([x["p90_ms"] for x in results]),
            "p99_ms": median([x["p99_ms"] for x in results]),
            "errors": sum(x["errors"] for x in results),
            "calls": sum(x["calls"] for x in results),
            "cpu_s_per_1000": median([x["cpu_s_per_1000"] for x in results]),
            "peak_rss_mib": max(x["peak_rss_kib"] for x in results) / 1024,
        }
    return summary


# ---- held calls and decisions -------------------------------------------------------------


class Api:
    """The gateway's reviewers' API and the upstream's counters."""

    def __init__(self, http: aiohttp.ClientSession, gateway: str, upstream: str, token: str) -> None:
        self.http = http
        self.gateway = gateway
        self.upstream = upstream
        self.headers = {"Authorization": f"Bearer {token}"}

    async def pending(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        url = f"{self.gateway}/api/approvals?status=pending&limit={limit}&offset={offset}"
        async with self.http.get(url, headers=self.headers) as response:
            response.raise_for_status()
            body = await response.json()
        approvals: list[dict[str, Any]] = body["approvals"]
        return approvals

    async def all_pending(self, expected: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while len(found) < expected:
            page = await self.pending(500, len(found))
            if not page:
                break
            found += page
        return found

    async def approve(self, approval_id: str, verb: str = "approve") -> tuple[int, float]:
        url = f"{self.gateway}/api/approvals/{approval_id}/{verb}"
        async with self.http.post(url, headers=self.headers, json={"reason": "bench"}) as response:
            await response.read()
            return response.status, time.time()

    async def upstream_stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.upstream}/stats") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def received(self) -> dict[str, float]:
        async with self.http.get(f"{self.upstream}/stats/received") as response:
            result: dict[str, float] = (await response.json())["received"]
            return result

    async def reset_upstream(self) -> None:
        async with self.http.post(f"{self.upstream}/stats"):
            pass


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


class HeldCalls:
    """A load generator process holding `calls` approve_echo calls on the gateway."""

    def __init__(
        self, gateway: Target, calls: int, sessions: int, first: int, mode: str = "held", *extra: str
    ) -> None:
        self.args = [
            PYTHON,
            str(BENCH / "load.py"),
            mode,
            *extra,
            "--url",
            gateway.url,
            "--calls",
            str(calls),
            "--sessions",
            str(sessions),
            "--first",
            str(first),
        ]
        self.token = gateway.token or ""
        self.process: asyncio.subprocess.Process | None = None

    async def open_sessions(self) -> None:
        env = {**os.environ, "BENCH_AGENT_TOKEN": self.token}
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=LINE_LIMIT,  # "done" carries every call's answer time: ten thousand of them
        )
        await self.expect("sessions")

    async def expect(self, event: str) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the held-call generator exited before {event!r}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise RuntimeError(f"expected {event!r} from the held-call generator, got {message}")
        return message

    async def call(self) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()
        await self.expect("sent")

    async def done(self) -> dict[str, Any]:
        result = await self.expect("done")
        assert self.process is not None
        await self.process.wait()
        return result


async def decision_latency(api: Api, gateway: Target, calls: int) -> dict[str, Any]:
    """Hold `calls` calls and decide them one after another (half approved, half denied): API
    answer → agent holding the outcome, and → upstream receipt; then the kept-result round trip."""
    await api.reset_upstream()
    held = HeldCalls(gateway, calls, min(calls, 20), first=1_000_000)
    await held.open_sessions()
    await held.call()
    await until(lambda: _pending_at_least(api, calls), 120, f"{calls} pending approvals")
    pending = await api.all_pending(calls)
    decided: dict[str, tuple[float, str]] = {}
    errors = 0
    for i, approval in enumerate(pending):
        verb = "approve" if i % 2 == 0 else "deny"
        status, at = await api.approve(approval["id"], verb)
        decided[str(approval["arguments"]["n"])] = (at, verb)
        errors += status != 200
    approved = sum(verb == "approve" for _, verb in decided.values())
    await until(lambda: _received_at_least(api, approved), 60, "the upstream to receive every approved call")
    received = await api.received()
    outcome = await held.done()
    to_upstream = [(received[n] - at) * 1e3 for n, (at, verb) in decided.items() if n in received]
    to_agent: dict[str, list[float]] = {"approve": [], "deny": []}
    for n, (at, verb) in decided.items():
        if (answer := outcome["answers"].get(n)) is not None:
            to_agent[verb].append((answer[0] - at) * 1e3)
    wrong = sum(
        (outcome["answers"].get(n, [0, ""])[1] == "ok") != (verb == "approve")
        for n, (_, verb) in decided.items()
    )
    return {
        "calls": calls,
        "p50_ms": percentile(to_upstream, 50),
        "p99_ms": percentile(to_upstream, 99),
        "max_ms": max(to_upstream),
        "agent": {verb: _spread(values) for verb, values in to_agent.items()},
        "kept_result": await kept_result_round_trip(api, gateway, min(calls, 50)),
        "errors": errors + wrong + len(decided) - sum(len(v) for v in to_agent.values()),
    }


async def kept_result_round_trip(api: Api, gateway: Target, calls: int) -> dict[str, float]:
    """Calls whose agent left before the decision, approved and completed: the repeat call's round
    trip, which is how long the agent waits for a kept result."""
    await api.reset_upstream()
    dropped = HeldCalls(gateway, calls, 1, 2_000_000, "held", "--drop")
    await dropped.open_sessions()
    await dropped.call()
    await dropped.done()
    await until(lambda: _pending_at_least(api, calls), 60, f"{calls} pending approvals")
    for approval in await api.all_pending(calls):
        await api.approve(approval["id"])
    await until(lambda: _received_at_least(api, calls), 60, "the upstream to receive every approved call")
    # The upstream has each call a moment before the gateway keeps its result: the first repeat
    # call may still attach to the released record, which is the path a person would feel too.
    repeat = HeldCalls(gateway, calls, 1, 2_000_000, "repeat")
    env = {**os.environ, "BENCH_AGENT_TOKEN": repeat.token}
    process = await asyncio.create_subprocess_exec(*repeat.args, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await process.communicate()
    done = json.loads(out.decode().strip().splitlines()[-1])
    return _spread([t * 1e3 for t in done["round_trips_s"]])


def _spread(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    return {
        "n": len(values_ms),
        "p50_ms": percentile(values_ms, 50),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms),
    }


async def _pending_at_least(api: Api, count: int) -> bool:
    return bool(await api.pending(1, count - 1))


async def _received_at_least(api: Api, count: int) -> bool:
    return int((await api.upstream_stats())["held"]) >= count


async def held_calls(api: Api, gateway: Target, calls: int, approvers: int) -> dict[str, Any]:
    """K calls held at once, then approved in bulk; memory per held call and the release time."""
    await api.reset_upstream()
    pid = gateway.pids[0]
    held = HeldCalls(gateway, calls, sessions=max(1, calls // 100), first=0)
    await held.open_sessions()
    rss_before = status_kib(pid, "VmRSS")
    started = time.time()
    await held.call()
    await until(lambda: _pending_at_least(api, calls), 600, f"{calls} pending approvals", every=0.25)
    all_held = time.time()
    # Every held stream has written its first sign of life by now: the steady state of a held call.
    rss_held = status_kib(pid, "VmRSS")
    await asyncio.sleep(SIGN_OF_LIFE_SECONDS + 1)
    rss_held = max(rss_held, status_kib(pid, "VmRSS"))
    pending = await api.all_pending(calls)
    n_of = {a["id"]: str(a["arguments"]["n"]) for a in pending}
    answered: dict[str, float] = {}
    api_errors = 0
    queue = list(n_of)

    async def approver() -> None:
        nonlocal api_errors
        while queue:
            approval_id = queue.pop()
            status, at = await api.approve(approval_id)
            if status == 200:
                answered[n_of[approval_id]] = at
            else:
                api_errors += 1

    cpu_before = cpu_seconds([pid])
    approving = time.time()
    await asyncio.gather(*(approver() for _ in range(approvers)))
    approved = time.time()
    await until(
        lambda: _received_at_least(api, calls), 600, "the upstream to receive every approved call", 0.05
    )
    all_received = time.time()
    cpu_deciding = cpu_seconds([pid]) - cpu_before
    received = await api.received()
    outcome = await held.done()
    per_call = [received[n] - at for n, at in answered.items() if n in received]
    return {
        "calls": calls,
        "admitted_per_s": calls / (all_held - started),
        "kib_per_held_call": (rss_held - rss_before) / calls,
        "rss_before_mib": rss_before / 1024,
        "rss_held_mib": rss_held / 1024,
        "decisions": len(answered),
        "decisions_per_s": len(answered) / (approved - approving),
        # The gateway's CPU for a decision and everything it sets off: the release, the upstream
        # call, the answer to the held call.
        "cpu_ms_per_decision": cpu_deciding * 1e3 / max(len(answered), 1),
        "approve_all_s": approved - approving,
        "released_after_last_approval_s": all_received - approved,
        "released_after_first_approval_s": all_received - approving,
        "max_decision_to_upstream_s": max(per_call, default=float("nan")),
        "p50_decision_to_upstream_s": percentile(per_call, 50),
        "answered_clients": outcome["ok"],
        "errors": api_errors + outcome["errors"],
        "error_samples": outcome["error_samples"],
    }


# ---- report -------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = status_mem_total_gib()
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {system}"


def status_mem_total_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def table(summary: dict[str, dict[int, dict[str, float]]], concurrency: list[int]) -> Iterator[str]:
    yield (
        "| target | clients | calls/s | x direct | p50 ms | p90 ms | p99 ms | errors "
        "| CPU s / 1k calls | peak RSS MiB |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for clients in concurrency:
        direct = summary["direct"][clients]["calls_per_s"] if "direct" in summary else math.nan
        for name, by_clients in summary.items():
            row = by_clients[clients]
            yield (
                f"| {name} | {clients} | {row['calls_per_s']:,.0f} | {row['calls_per_s'] / direct:.2f} | "
                f"{row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']:.0f} | "
                f"{row['cpu_s_per_1000']:.3f} | {row['peak_rss_mib']:.0f} |"
            )


def metrics_cost(summary: dict[str, dict[int, dict[str, float]]]) -> Iterator[str]:
    """What turning metrics on costs: `approvals+metrics` against `approvals`, per client count."""
    if METRICS_ROW not in summary or "approvals" not in summary:
        return
    for clients, on in summary[METRICS_ROW].items():
        off = summary["approvals"][clients]
        cpu_off, cpu_on = off["cpu_s_per_1000"], on["cpu_s_per_1000"]
        rate = on["calls_per_s"] / off["calls_per_s"] - 1
        plural = "" if clients == 1 else "s"
        yield (
            f"Metrics on, {clients} client{plural}: gateway CPU {cpu_on - cpu_off:+.3f} s / 1k calls "
            f"({cpu_on / cpu_off - 1:+.1%}: {cpu_off:.3f} → {cpu_on:.3f}), "
            f"calls/s {rate:+.1%} ({off['calls_per_s']:,.0f} → {on['calls_per_s']:,.0f})"
        )


def goals(results: dict[str, Any]) -> Iterator[tuple[str, bool, str]]:
    summary = results["throughput"]
    if "approvals" in summary and "direct" in summary:
        gw, direct = summary["approvals"], summary["direct"]
        if 32 in gw:
            ratio = gw[32]["calls_per_s"] / direct[32]["calls_per_s"]
            yield "32 clients: ≥ 0.5 x direct", ratio >= 0.5, f"{ratio:.2f} x direct"
            if "fastmcp" in summary:
                vs = gw[32]["calls_per_s"] / summary["fastmcp"][32]["calls_per_s"]
                yield "32 clients: ≥ 5 x FastMCP's proxy", vs >= 5, f"{vs:.1f} x FastMCP"
        if 1 in gw:
            added = gw[1]["p50_ms"] - direct[1]["p50_ms"]
            yield "1 client: ≤ 1 ms added to the median", added <= 1.0, f"+{added:.2f} ms"
    if "approvals" in summary and "approvals-postgres" in summary:
        for clients, row in summary["approvals-postgres"].items():
            ratio = row["calls_per_s"] / summary["approvals"][clients]["calls_per_s"]
            yield (
                f"{clients} clients: PostgreSQL ≥ 0.9 x SQLite (a limit on every call)",
                ratio >= 0.9,
                f"{ratio:.2f} x SQLite",
            )
    if held := results.get("held"):
        yield f"{held['calls']:,} held: no errors", held["errors"] == 0, f"{held['errors']} errors"
        kib = held["kib_per_held_call"]
        yield f"{held['calls']:,} held: ≤ 30 KiB per held call", kib <= 30, f"{kib:.1f} KiB"
        worst = held["max_decision_to_upstream_s"]
        yield (
            f"{held['calls']:,} held: all released within 10 s of being approved",
            worst <= 10,
            f"slowest {worst:.1f} s after its approval; all {held['released_after_first_approval_s']:.1f} s "
            "after the first approval",
        )
        rate = held["decisions_per_s"]
        yield "decisions through the API: ≥ 1,000 / s", rate >= 1000, f"{rate:,.0f} / s"
    if latency := results.get("decision_latency"):
        yield "decision → upstream p99 < 20 ms", latency["p99_ms"] < 20, f"p99 {latency['p99_ms']:.1f} ms"
        for what, spread in (*latency["agent"].items(), ("kept result", latency["kept_result"])):
            yield (
                f"{what} → agent p99 < 20 ms",
                spread["p99_ms"] < 20,
                f"p50 {spread['p50_ms']:.1f} ms, p99 {spread['p99_ms']:.1f} ms",
            )


def report(results: dict[str, Any], concurrency: list[int]) -> str:
    lines = [f"machine: {results['machine']}", f"command: {results['command']}", ""]
    if results.get("throughput"):
        lines += ["Allowed calls (tools/call `echo`):", "", *table(results["throughput"], concurrency), ""]
        if cost := list(metrics_cost(results["throughput"])):
            lines += [*cost, ""]
    if scrape := results.get("metrics_scrape"):
        lines += [scrape["line"], ""]
    if latency := results.get("decision_latency"):
        lines += [
            f"Decision → upstream ({latency['calls']} calls approved one after another through the API): "
            f"p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, "
            f"max {latency['max_ms']:.1f} ms, errors {latency['errors']}",
            *(
                f"{what} → agent holding the outcome: p50 {spread['p50_ms']:.1f} ms, "
                f"p99 {spread['p99_ms']:.1f} ms, max {spread['max_ms']:.1f} ms ({spread['n']} calls)"
                for what, spread in (
                    *latency["agent"].items(),
                    ("kept result (repeat call)", latency["kept_result"]),
                )
            ),
            "",
        ]
    if held := results.get("held"):
        lines += [
            f"Held calls: {held['calls']:,} held at once (admitted at {held['admitted_per_s']:,.0f}/s), "
            f"{held['kib_per_held_call']:.1f} KiB each (RSS {held['rss_before_mib']:.0f} → "
            f"{held['rss_held_mib']:.0f} MiB); errors {held['errors']}",
            f"Bulk approval: {held['decisions']:,} decisions in {held['approve_all_s']:.1f} s "
            f"({held['decisions_per_s']:,.0f}/s through the API; gateway CPU "
            f"{held['cpu_ms_per_decision']:.2f} ms per decision with its release); upstream had all of them "
            f"{held['released_after_last_approval_s']:.1f} s after the last approval "
            f"({held['released_after_first_approval_s']:.1f} s after the first); per call, approval → "
            f"upstream p50 {held['p50_decision_to_upstream_s']:.2f} s, max "
            f"{held['max_decision_to_upstream_s']:.2f} s",
            "",
        ]
    lines += ["Goals:", ""]
    for goal, met, figure in goals(results):
        lines.append(f"  [{'x' if met else ' '}] {goal}: {figure}")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The approvals gateway benchmark (see bench/run.py).")
    parser.add_argument(
        "--held", type=int, default=10_000, help="calls held at once (default 10,000; 0 skips)"
    )
    parser.add_argument("--decisions", type=int, default=200, help="calls for the decision latency (0 skips)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput runs")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per throughput run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32], help="concurrent clients")
    parser.add_argument(
        "--approvers", type=int, default=64, help="concurrent API clients in the bulk approval"
    )
    parser.add_argument("--only", nargs="+", choices=["direct", "approvals", "fastmcp", "mcp-proxy"])
    parser.add_argument(
        "--profile", action="store_true", help="record the gateway with py-spy (pip install py-spy)"
    )
    parser.add_argument(
        "--upstream-client",
        choices=UPSTREAM_CLIENTS,
        default="http1",
        help="the gateway's client for its POSTs to the upstream ([server] upstream_client; default http1)",
    )
    parser.add_argument(
        "--store-url",
        metavar="URL",
        help="also run a gateway on PostgreSQL (postgresql://… of a server; the run creates and drops "
        "a database of its own there) in the allowed-call rounds, as approvals-postgres",
    )
    parser.add_argument(
        "--ab",
        action="store_true",
        help="also run a gateway with the other upstream client, in the same interleaved rounds",
    )
    parser.add_argument(
        "--no-metrics-row",
        action="store_true",
        help=f"leave out {METRICS_ROW}, the gateway with its Prometheus metrics on, run by default "
        "beside approvals to show what metrics cost per call",
    )
    return parser.parse_args()


def start_gateway(
    procs: Processes, target: str, client: str, env: dict[str, str], suffix: str = ""
) -> Target:
    """A gateway on bench/config/gateway.toml with `client` for its upstream POSTs (--ab runs two:
    the second's config, store and log are named with `suffix`)."""
    text = (BENCH / "config" / "gateway.toml").read_text()
    for old, new in (
        ('upstream_client = "http1"', f'upstream_client = "{client}"'),
        ('path = "approvals.db"', f'path = "approvals{suffix}.db"'),
    ):
        assert text.count(old) == 1, f"bench/config/gateway.toml has no line {old!r}"
        text = text.replace(old, new)
    config = procs.workdir / f"gateway{suffix}.toml"
    config.write_text(text)
    command = [APPROVALS, "serve", "--config", str(config), "--port", "0"]
    process = procs.start(f"gateway{suffix}", command, env)
    port = int(read_line(process, "approvals gateway listening on").rsplit(":", 1)[1])
    return Target(target, f"http://127.0.0.1:{port}/mcp/bench", [process.pid], env["BENCH_AGENT_TOKEN"])


def gateway_base(gateway: Target) -> str:
    """http://127.0.0.1:<port> of a gateway target (its API, /metrics)."""
    return gateway.url.removesuffix("/mcp/bench")


@dataclass(frozen=True)
class Variant:
    """A further gateway in the allowed-call rounds, beside `approvals` and different in one way."""

    name: str  # its row in the table
    client: str  # its client for the upstream POSTs
    env: dict[str, str]  # over the environment of `approvals`
    suffix: str  # of its config, store and log file names


def variants(args: argparse.Namespace, database: str | None, metrics_token: str) -> list[Variant]:
    """The gateways the switches add: metrics on (unless --no-metrics-row), --ab, --store-url."""
    found: list[Variant] = []
    if not args.no_metrics_row:
        on = {METRICS_TOKEN_ENV: metrics_token}
        found.append(Variant(METRICS_ROW, args.upstream_client, on, "-metrics"))
    if args.ab:
        other = next(c for c in UPSTREAM_CLIENTS if c != args.upstream_client)
        found.append(Variant(f"approvals-{other}", other, {}, f"-{other}"))
    if database is not None:
        on_postgres = {"APPROVALS_DATABASE_URL": database}
        found.append(Variant("approvals-postgres", args.upstream_client, on_postgres, "-postgres"))
    return found


async def scrape_metrics(off: Target, on: Target, token: str) -> dict[str, Any]:
    """One scrape of `on`'s /metrics with the token, and one of `off`'s: proof that the first
    row measured metrics on (200, calls counted) and the second off (404)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway_base(off)}/metrics") as response:
            off_status = response.status
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{gateway_base(on)}/metrics", headers=headers) as response:
            status, text = response.status, await response.text()
    samples = [line for line in text.splitlines() if line.startswith(METRICS_COUNTER + "{")]
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in samples)
    ok = status == 200 and counted > 0 and off_status == 404
    verdict = "ok" if ok else "FAILED: the rows did not measure what they say"
    line = (
        f"Metrics check: {on.name} GET /metrics {status}, {METRICS_COUNTER} counted {counted:,.0f} calls; "
        f"{off.name} GET /metrics {off_status} (off) — {verdict}"
    )
    return {"ok": ok, "status": status, "counted": counted, "off_status": off_status, "line": line}


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A database of this run's own on the PostgreSQL server at `server_url`, dropped afterwards."""
    name = f"approvals_bench_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f"CREATE DATABASE {name}")
    try:
        yield urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        await admin(f"DROP DATABASE {name} WITH (FORCE)")


async def run(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        database = None
        if args.store_url:
            database = await stack.enter_async_context(fresh_database(args.store_url))
        try:
            return await measure(args, procs, database)
        finally:
            procs.stop()  # before the database is dropped under the gateway


async def measure(args: argparse.Namespace, procs: Processes, database: str | None) -> dict[str, Any]:
    workdir = procs.workdir
    shutil.copy(BENCH / "config" / "policy.json", workdir / "policy.json")
    names = args.only or ["direct", "approvals", "fastmcp", "mcp-proxy"]
    agent_token, reviewer_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    metrics_token = secrets.token_urlsafe(32)

    upstream = procs.start("upstream", [PYTHON, str(BENCH / "upstream.py")])
    upstream_port = int(read_line(upstream, "listening").split()[1])
    upstream_url = f"http://127.0.0.1:{upstream_port}/mcp"
    env = {
        "BENCH_UPSTREAM_URL": upstream_url,
        "BENCH_AGENT_TOKEN": agent_token,
        "BENCH_REVIEWER_TOKEN": reviewer_token,
        METRICS_TOKEN_ENV: "",  # metrics off, even if the bench's own environment has the token
    }
    gateway = start_gateway(procs, "approvals", args.upstream_client, env)
    gateway_pid = gateway.pids[0]
    targets = {"direct": Target("direct", upstream_url, [upstream.pid])}
    targets["approvals"] = gateway
    extra: list[str] = []
    for variant in variants(args, database, metrics_token) if "approvals" in names else []:
        environment = {**env, **variant.env}
        targets[variant.name] = start_gateway(
            procs, variant.name, variant.client, environment, variant.suffix
        )
        extra.append(variant.name)
    names = [*names, *extra]
    if "fastmcp" in names:
        venv = ensure_venv("fastmcp", FASTMCP_REQUIREMENT)
        proc = procs.start(
            "fastmcp", [str(venv / "bin" / "python"), str(BENCH / "fastmcp_proxy.py"), upstream_url]
        )
        port = int(read_line(proc, "listening").split()[1])
        targets["fastmcp"] = Target("fastmcp", f"http://127.0.0.1:{port}/mcp", [proc.pid])
    if "mcp-proxy" in names:
        venv = ensure_venv("mcp-proxy", MCP_PROXY_REQUIREMENT)
        port = free_port()
        mcp_proxy = str(venv / "bin" / "mcp-proxy")
        inner = [mcp_proxy, "--transport", "streamablehttp", "--log-level", "WARNING", upstream_url]
        outer = [
            mcp_proxy,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            "--",
            *inner,
        ]
        proc = procs.start("mcp-proxy", outer)
        wait_port(port)
        targets["mcp-proxy"] = Target("mcp-proxy", f"http://127.0.0.1:{port}/mcp", [proc.pid])
    order = ["direct", "approvals", *extra, "fastmcp", "mcp-proxy"]
    chosen = [targets[n] for n in order if n in names]

    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["make bench  (python bench/run.py", *sys.argv[1:]]) + ")",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    profiler: subprocess.Popen[bytes] | None = None
    if args.profile:
        profiler = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited on here
            [
                str(Path(PYTHON).parent / "py-spy"),
                "record",
                "--pid",
                str(gateway_pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                str(workdir / "gateway-profile.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    # The first call of a session is slower than the rest (imports, caches): one short run each first.
    for target in chosen:
        if target.name == "mcp-proxy":
            target.pids += children(target.pids[0])
        await load(target, 4, 0.5, 0.5)
    print(f"throughput: {', '.join(t.name for t in chosen)} at {args.clients} clients", flush=True)
    results["throughput"] = await throughput(chosen, args.clients, args.rounds, args.duration, args.warmup)
    if "approvals" in names and (args.decisions or args.held):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.approvers)) as http:
            api = Api(http, gateway_base(gateway), f"http://127.0.0.1:{upstream_port}", reviewer_token)
            if args.decisions:
                print(f"decision latency: {args.decisions} held calls approved one by one", flush=True)
                results["decision_latency"] = await decision_latency(api, gateway, args.decisions)
            if args.held:
                print(f"held calls: {args.held:,} held at once, then approved in bulk", flush=True)
                results["held"] = await held_calls(api, gateway, args.held, args.approvers)
    if METRICS_ROW in targets:
        scrape = await scrape_metrics(gateway, targets[METRICS_ROW], metrics_token)
        print(scrape["line"], flush=True)
        results["metrics_scrape"] = scrape
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(30)
    return results


def main() -> None:
    args = arguments()
    workdir = BENCH / "results" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    procs = Processes(workdir)
    try:
        results = asyncio.run(run(args, procs))
    finally:
        procs.stop()
        for store in workdir.glob("approvals*.db*"):
            store.unlink(missing_ok=True)
    text = report(results, args.clients)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (workdir / "table.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\n(results, logs: {workdir.relative_to(ROOT)}/)")


if __name__ == "__main__":
    main()
