"""`make bench` scale-out run: the gateway on PostgreSQL as 1, 2 and 4 replicas behind HAProxy,
and as `approvals serve --workers N` on one port, beside a direct connection and one process on
SQLite.

Everything on 127.0.0.1: the fast upstream (bench/upstream.py), a PostgreSQL database of the run's
own (created and dropped here; APPROVALS_BENCH_POSTGRES names the server, default the local one
with trust auth), the gateways on bench/config/ (a limit on every call, as `make bench`'s policy
has), and HAProxy on docs/haproxy.cfg (its `bind` and `server` lines replaced). Then:

1. allowed calls at 32 and 128 clients for each set-up, rounds interleaved (bench/run.py's
   `throughput`, the load generator in its own process); every client has its own session and
   keep-alive connection, so behind HAProxy its session sticks to one replica, and with
   `--workers` its requests are routed to the session's process when they land on another. The
   `--workers` set-ups run after the others are stopped, each beside direct only: at most four
   gateway processes hold PostgreSQL connections at once (about 13 each);
2. decision → agent across replicas: calls held through HAProxy (spread over the replicas) and
   approved one by one through the API of the first replica, so with N replicas (N-1)/N of the
   approvals wake a call held by another process: from the API's answer to the agent holding the
   result.

Prints a table and keeps results.json and the processes' logs in bench/results/<time>-scale/.
A machine with fewer cores than replicas measures contention, not scale-out: the report says how
many cores there were.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from run import (
    APPROVALS,
    BENCH,
    PYTHON,
    ROOT,
    Api,
    HeldCalls,
    Processes,
    Target,
    _pending_at_least,
    _spread,
    children,
    load,
    machine,
    read_line,
    table,
    throughput,
    until,
)

sys.path.insert(0, str(ROOT))
from tests.replica_kit import HAPROXY, free_ports, haproxy_config

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
CONCURRENCY = [32, 128]


def gateway_config(workdir: Path, database_url: str | None, name: str) -> Path:
    """bench/config/gateway.toml, on PostgreSQL when `database_url` is given."""
    text = (BENCH / "config" / "gateway.toml").read_text()
    old = 'path = "approvals.db"'
    assert text.count(old) == 1, f"bench/config/gateway.toml has no line {old!r}"
    store = f'path = "{name}.db"' + (f'\nurl = "{database_url}"' if database_url else "")
    config = workdir / f"{name}.toml"
    config.write_text(text.replace(old, store))
    return config


def start_gateway(
    procs: Processes, name: str, config: Path, env: dict[str, str], *args: str
) -> tuple[int, list[int]]:
    """`approvals serve` (perhaps a supervisor of workers): its port and every gateway pid."""
    process = procs.start(name, [APPROVALS, "serve", "--config", str(config), "--port", "0", *args], env)
    port = int(read_line(process, "approvals gateway listening on").rsplit(":", 1)[1])
    return port, [process.pid, *children(process.pid)]


def stop(procs: Processes, pids: list[int]) -> None:
    """Stop the processes started as `pids` (SIGTERM, as an operator would), and wait for them:
    their database connections are given back before the next set-up takes its own."""
    for process in procs.running:
        if process.pid in pids and process.poll() is None:
            process.terminate()
    for process in procs.running:
        if process.pid in pids:
            process.wait(30)


def start_haproxy(procs: Processes, servers: dict[str, int]) -> tuple[int, int]:
    """HAProxy on docs/haproxy.cfg for `servers`, without its request log (it would cost CPU the
    gateways need, and nothing reads it here)."""
    (port,) = free_ports(1)
    config = procs.workdir / f"haproxy-{len(servers)}.cfg"
    lines = haproxy_config(port, servers).splitlines()
    kept = [line for line in lines if not line.strip().startswith(("log ", "option httplog"))]
    config.write_text("\n".join(kept) + "\n")
    process = procs.start(f"haproxy-{len(servers)}", [HAPROXY, "-W", "-db", "-f", str(config)])
    return port, process.pid


async def create_database(admin_url: str) -> str:
    name = f"approvals_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def drop_database(admin_url: str, url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        await conn.close()


async def wait_listening(url: str) -> None:
    """Until HAProxy answers (its health checks take the replicas into rotation at once)."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url.replace("/mcp/bench", "/healthz")) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} does not answer")
            await asyncio.sleep(0.1)


async def cross_replica_latency(api: Api, target: Target, calls: int, first: int) -> dict[str, Any]:
    """Calls held through `target` and approved one after another through `api` (one replica):
    from the API's answer to the agent holding the result. Arguments from `first` on, unlike any
    earlier run's (a repeat of an earlier call would get its kept result instead of a new hold)."""
    held = HeldCalls(target, calls, min(calls, 20), first=first)
    await held.open_sessions()
    await held.call()
    await until(lambda: _pending_at_least(api, calls), 120, f"{calls} pending approvals")
    decided: dict[str, float] = {}
    errors = 0
    for approval in await api.all_pending(calls):
        status, at = await api.approve(approval["id"])
        decided[str(approval["arguments"]["n"])] = at
        errors += status != 200
    outcome = await held.done()
    answers = outcome["answers"]
    to_agent = [(answers[n][0] - at) * 1e3 for n, at in decided.items() if n in answers]
    errors += len(decided) - len(to_agent) + sum(answers[n][1] != "ok" for n in decided if n in answers)
    return {"calls": calls, **_spread(to_agent), "errors": errors}


async def run(args: argparse.Namespace, procs: Processes, database_url: str) -> dict[str, Any]:
    workdir = procs.workdir
    shutil.copy(BENCH / "config" / "policy.json", workdir / "policy.json")
    agent, reviewer = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    upstream = procs.start("upstream", [PYTHON, str(BENCH / "upstream.py")])
    upstream_url = f"http://127.0.0.1:{int(read_line(upstream, 'listening').split()[1])}/mcp"
    env = {"BENCH_UPSTREAM_URL": upstream_url, "BENCH_AGENT_TOKEN": agent, "BENCH_REVIEWER_TOKEN": reviewer}
    env["APPROVALS_SESSION_SECRET"] = secrets.token_urlsafe(32)
    targets = [Target("direct", upstream_url, [upstream.pid])]
    port, pids = start_gateway(procs, "sqlite", gateway_config(workdir, None, "sqlite"), env)
    targets.append(Target("1 process, SQLite", f"http://127.0.0.1:{port}/mcp/bench", pids, agent))
    postgres = gateway_config(workdir, database_url, "postgres")
    replicas: list[tuple[int, list[int]]] = []
    for i in range(max(args.replicas)):
        replicas.append(start_gateway(procs, f"replica{i + 1}", postgres, env))
    first_replica = f"http://127.0.0.1:{replicas[0][0]}"
    # The first replica on its own too: what PostgreSQL costs beside SQLite, and HAProxy beside it.
    targets.append(Target("1 process, PostgreSQL", f"{first_replica}/mcp/bench", replicas[0][1], agent))
    behind: dict[int, Target] = {}
    for count in args.replicas:
        servers = {f"replica{i + 1}": replicas[i][0] for i in range(count)}
        lb_port, lb_pid = start_haproxy(procs, servers)
        pids = [lb_pid, *children(lb_pid), *(p for _, ps in replicas[:count] for p in ps)]
        target = Target(f"{count} replica(s) + HAProxy", f"http://127.0.0.1:{lb_port}/mcp/bench", pids, agent)
        await wait_listening(target.url)
        behind[count] = target
        targets.append(target)
    for target in targets:  # the first calls of a session are slower (imports, caches)
        await load(target, 4, 0.5, 0.5)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python bench/scale.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"throughput: {len(targets)} set-ups at {args.clients} clients", flush=True)
    results["throughput"] = await throughput(targets, args.clients, args.rounds, args.duration, args.warmup)
    if args.decisions:
        results["decision_latency"] = {}
        async with aiohttp.ClientSession() as http:
            api = Api(http, first_replica, upstream_url.removesuffix("/mcp"), reviewer)
            for count, target in behind.items():
                print(f"decision → agent: {args.decisions} calls held over {count} replica(s)", flush=True)
                first = 1_000_000 * (count + 1)
                results["decision_latency"][count] = await cross_replica_latency(
                    api, target, args.decisions, first
                )
    # --workers next, one set-up at a time beside direct: every PostgreSQL process keeps a pool of
    # connections, and all of them at once would pass the server's max_connections (100 by default).
    stop(procs, [pid for _, pids in replicas for pid in pids])
    for count in args.workers:
        port, pids = start_gateway(procs, f"workers{count}", postgres, env, "--workers", str(count))
        workers = Target(f"--workers {count}", f"http://127.0.0.1:{port}/mcp/bench", pids, agent)
        await load(workers, 4, 0.5, 0.5)
        print(f"throughput: --workers {count} beside direct at {args.clients} clients", flush=True)
        measured = await throughput(
            [targets[0], workers], args.clients, args.rounds, args.duration, args.warmup
        )
        results["throughput"][workers.name] = measured[workers.name]
        results["throughput"][f"direct (beside --workers {count})"] = measured["direct"]
        stop(procs, pids[:1])
    return results


def report(results: dict[str, Any], clients: list[int]) -> str:
    lines = [f"machine: {results['machine']}", f"command: {results['command']}", ""]
    lines += [
        "Allowed calls (tools/call `echo`, a limit on every call):",
        "",
        *table(results["throughput"], clients),
    ]
    summary = results["throughput"]
    singles = [name for name in summary if name.startswith("1 replica")]
    if singles:
        lines += ["", "Scale-out (calls/s of N replicas behind HAProxy / 1 replica behind HAProxy):"]
        for n_clients in clients:
            one = summary[singles[0]][n_clients]["calls_per_s"]
            steps = [
                f"{name}: {row[n_clients]['calls_per_s'] / one:.2f}"
                for name, row in summary.items()
                if "replica" in name
            ]
            lines.append(f"  {n_clients} clients: " + ", ".join(steps))
    for count, latency in results.get("decision_latency", {}).items():
        lines.append(
            f"approval → agent, calls held over {count} replica(s), approved through one:"
            f" p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, max {latency['max_ms']:.1f} ms"
            f" (n={latency['n']}); errors {latency['errors']}"
        )
    lines.append(f"\n{os.cpu_count()} cores: with more replicas than cores this measures contention.")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The gateway's scale-out benchmark (see bench/scale.py).")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="replicas behind HAProxy")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="--workers runs on one port")
    parser.add_argument("--clients", type=int, nargs="+", default=CONCURRENCY, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the throughput runs")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per throughput run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each run")
    parser.add_argument("--decisions", type=int, default=100, help="calls for the decision latency (0 skips)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if not Path(HAPROXY).exists():
        sys.exit(f"bench/scale.py needs HAProxy at {HAPROXY} (Debian: apt-get install haproxy)")
    admin = os.environ.get("APPROVALS_BENCH_POSTGRES", DEFAULT_POSTGRES)
    workdir = BENCH / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-scale")
    workdir.mkdir(parents=True)
    database_url = asyncio.run(create_database(admin))
    procs = Processes(workdir)
    try:
        results = asyncio.run(run(args, procs, database_url))
    finally:
        procs.stop()
        asyncio.run(drop_database(admin, database_url))
        for store in workdir.glob("*.db*"):
            store.unlink(missing_ok=True)
    text = report(results, args.clients)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (workdir / "table.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\n(results, logs: {workdir.relative_to(ROOT)}/)")


if __name__ == "__main__":
    main()
