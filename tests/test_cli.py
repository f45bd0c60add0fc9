"""The `approvals` command as users run it: a real subprocess, its output, exit status and signals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals import supervisor
from approvals.store.sqlite import SqliteStore
from tests.conftest import WAIT, mcp_client
from tests.rawmcp import RawSession

REPO = Path(__file__).resolve().parent.parent
GOOD_CONFIG = """
[server]
host = "127.0.0.1"
port = 8080

[store]
path = "data/approvals.db"

[upstreams.demo]
command = ["python", "-m", "approvals.demo_server"]
policy = "policy.json"
"""
BAD_CONFIG = """
[server]
prot = 8080

[approvals]
timeout = "soon"

[upstreams.demo]
command = "python -m approvals.demo_server"
policy = "missing.json"
"""
BAD_CONFIG_ERRORS = [
    'server.prot: unknown setting (did you mean "port"?)',
    'approvals.timeout: must be a duration like "30s", "15m", "2h" or "1d" (got "soon")',
    "upstreams.demo.command: must be a non-empty list of strings",
    "upstreams.demo.policy: must name an existing policy file",
]
BANNER_END = "    }"  # the closing brace of the mcpServers snippet: the banner's last line
PROMPT = 5.0  # an idle gateway stops well within this after SIGTERM


def _environment() -> dict[str, str]:
    """The test process's environment without anything that would change the gateway's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("APPROVALS_", "SLACK_"))}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with a valid gateway.toml and the shipped policy.json beside it."""
    (tmp_path / "gateway.toml").write_text(GOOD_CONFIG)
    (tmp_path / "policy.json").write_text((REPO / "config" / "policy.json").read_text())
    return tmp_path


async def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `approvals ARGS` (with `env` added) to completion: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "approvals",
        *args,
        cwd=cwd,
        env={**_environment(), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class Served:
    """A running `approvals serve` and what its banner said."""

    process: asyncio.subprocess.Process
    banner: list[str]
    stderr: list[str] = field(default_factory=list)

    @property
    def snippet(self) -> dict[str, Any]:
        start = self.banner.index("    {")
        parsed: dict[str, Any] = json.loads("\n".join(self.banner[start:]))
        return parsed

    @property
    def url(self) -> str:
        line = next(line for line in self.banner if "MCP URL for upstream 'demo':" in line)
        return line.split(": ", 1)[1]

    @property
    def token(self) -> str:
        index = next(i for i, line in enumerate(self.banner) if "development agent token" in line)
        return self.banner[index + 1].strip()

    def children(self) -> set[int]:
        """Pids of the gateway's child processes (its stdio upstreams)."""
        pids: set[int] = set()
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids |= {int(pid) for pid in (task / "children").read_text().split()}
        return pids

    async def stop(self, within: float = PROMPT) -> int:
        """SIGTERM, then the exit status once the process has ended (within `within` seconds)."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), within)


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace").rstrip("\n"))


def _dev_banner_end(line: str) -> bool:
    return line == BANNER_END


@asynccontextmanager
async def serving(cwd: Path, banner_end: Callable[[str], bool] = _dev_banner_end) -> AsyncIterator[Served]:
    """`approvals serve --port 0` in `cwd`, yielded once its whole banner is out (its last line
    satisfies `banner_end`; by default the development banner's); killed at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "approvals",
        "serve",
        "--config",
        "gateway.toml",
        "--port",
        "0",
        cwd=cwd,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    served = Served(process, [])
    # Always read stderr: the gateway logs there, and a full pipe would stall it.
    drain = asyncio.create_task(_drain(process.stderr, served.stderr))
    try:
        while not served.banner or not banner_end(served.banner[-1]):
            line = await asyncio.wait_for(process.stdout.readline(), WAIT)
            assert line, f"serve ended before its banner: {served.banner}, stderr: {served.stderr}"
            served.banner.append(line.decode().rstrip("\n"))
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(drain, WAIT)


async def test_check_accepts_a_good_config(workdir: Path) -> None:
    """`approvals check` on a valid config prints OK and exits 0."""
    status, out, err = await run_cli(workdir, "check", "--config", "gateway.toml")
    assert status == 0, err
    assert "gateway.toml: OK (1 upstream(s), 0 grant(s))" in out


async def test_check_lists_every_error_of_a_bad_config(workdir: Path) -> None:
    """`approvals check` prints every error with its path to stderr and exits 1, without a traceback."""
    (workdir / "gateway.toml").write_text(BAD_CONFIG)
    status, out, err = await run_cli(workdir, "check", "--config", "gateway.toml")
    assert status == 1
    assert out == ""
    assert "4 error(s)" in err
    for message in BAD_CONFIG_ERRORS:
        assert message in err
    assert "Traceback" not in err


async def test_check_lists_policy_errors_with_their_paths(workdir: Path) -> None:
    """`approvals check` validates every policy file too, naming the file and the field."""
    policy = {
        "version": "1",
        "default": "allow",
        "tools": {
            "generate_image": {"limits": [{"counter": "c", "window": "week", "max": 1, "scope": "grant"}]}
        },
    }
    (workdir / "policy.json").write_text(json.dumps(policy))
    status, _, err = await run_cli(workdir, "check", "--config", "gateway.toml")
    assert status == 1
    assert "policy.json" in err
    assert "tools.generate_image.limits[0].window: must be one of second, minute, hour, day" in err
    assert "Traceback" not in err


async def test_check_reports_a_missing_or_broken_file(workdir: Path) -> None:
    """A missing config file and invalid TOML are one-line errors with exit 1."""
    status, _, err = await run_cli(workdir, "check", "--config", "nowhere.toml")
    assert (status, "cannot read the file: No such file or directory" in err) == (1, True), err
    (workdir / "gateway.toml").write_text("[server\n")
    status, _, err = await run_cli(workdir, "check", "--config", "gateway.toml")
    assert (status, "not valid TOML" in err, "line 1" in err) == (1, True, True), err
    assert "Traceback" not in err


async def test_token_prints_a_token_and_its_sha256(workdir: Path) -> None:
    """`approvals token` prints a fresh random token and the sha256 that token_sha256 expects."""
    tokens = []
    for _ in range(2):
        status, out, _ = await run_cli(workdir, "token")
        assert status == 0
        fields = dict(line.split(":", 1) for line in out.splitlines())
        token, digest = fields["token"].strip(), fields["sha256"].strip()
        assert len(token) >= 32
        assert digest == hashlib.sha256(token.encode()).hexdigest()
        tokens.append(token)
    assert tokens[0] != tokens[1]


async def test_serve_prints_a_working_url_token_and_client_snippet(workdir: Path) -> None:
    """The banner's URL, development token and mcpServers snippet connect an MCP client to the demo."""
    async with serving(workdir) as served:
        server = served.snippet["mcpServers"]["approvals-demo"]
        assert server["url"] == served.url
        assert served.url.startswith("http://127.0.0.1:")
        assert served.url.endswith("/mcp/demo")
        assert served.url != "http://127.0.0.1:8080/mcp/demo"  # the port actually bound, not the file's
        assert server["headers"] == {"Authorization": f"Bearer {served.token}"}
        async with mcp_client(server["url"], served.token) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"generate_image", "send_email", "delete_file", "get_time"} <= tools
        assert await served.stop() == 0


async def test_serve_keeps_the_development_token(workdir: Path) -> None:
    """The dev token is kept owner-only in data/dev-agent.token, and a restart prints the same one."""
    async with serving(workdir) as first:
        assert await first.stop() == 0
    token_file = workdir / "data" / "dev-agent.token"
    assert token_file.read_text() == first.token + "\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    async with serving(workdir) as second:
        assert second.token == first.token
        assert await second.stop() == 0


async def test_serve_replaces_an_emptied_token_file(workdir: Path) -> None:
    """An empty dev-agent.token is never used as a token: a new one is made and kept."""
    (workdir / "data").mkdir()
    (workdir / "data" / "dev-agent.token").write_text("\n")
    async with serving(workdir) as served:
        assert len(served.token) >= 32
        assert await served.stop() == 0
    assert (workdir / "data" / "dev-agent.token").read_text() == served.token + "\n"


async def test_sigterm_stops_the_gateway_and_its_stdio_upstream(workdir: Path) -> None:
    """SIGTERM: exit status 0, promptly, and the demo server the session started is gone."""
    async with serving(workdir) as served, aiohttp.ClientSession() as http:
        session = RawSession(http, served.url, token=served.token)
        await session.initialize()  # a session: the gateway starts the stdio upstream for it
        children = served.children()
        assert len(children) == 1
        (child,) = children
        assert "-m approvals.demo_server" in _command_line(child)
        assert await served.stop() == 0
    assert not _exists(child)
    assert not any("Traceback" in line for line in served.stderr)


async def test_sigterm_is_prompt_with_a_client_connected(workdir: Path) -> None:
    """SIGTERM while an SDK client holds its session (and GET stream) open still exits promptly."""
    async with serving(workdir) as served, mcp_client(served.url, served.token) as client:
        await client.list_tools()
        assert await served.stop(within=3.0) == 0


async def test_serve_with_an_invalid_config_exits_1(workdir: Path) -> None:
    """serve refuses to start on a bad config, printing every error, without a traceback."""
    (workdir / "gateway.toml").write_text(BAD_CONFIG)
    status, out, err = await run_cli(workdir, "serve", "--config", "gateway.toml", "--port", "0")
    assert status == 1
    assert out == ""
    for message in BAD_CONFIG_ERRORS:
        assert message in err
    assert "Traceback" not in err


async def test_serve_on_a_port_in_use_exits_1(workdir: Path) -> None:
    """serve on a port another socket listens on says it cannot listen, exit 1, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = await run_cli(workdir, "serve", "--config", "gateway.toml", "--port", str(port))
    assert status == 1
    assert out == ""
    assert f"error: cannot listen on 127.0.0.1:{port}:" in err
    assert "Traceback" not in err


async def test_serve_rejects_a_port_out_of_range(workdir: Path) -> None:
    """--port outside 0..65535 is a usage error (exit 2), not a crash."""
    status, _, err = await run_cli(workdir, "serve", "--config", "gateway.toml", "--port", "70000")
    assert status == 2
    assert "--port: must be a number from 0 to 65535" in err
    assert "Traceback" not in err


async def test_check_names_a_policy_file_once_on_bad_json(workdir: Path) -> None:
    """A policy file that is not JSON is one line naming the file once, then where the syntax broke."""
    (workdir / "policy.json").write_text('{"version": "1", ')
    status, out, err = await run_cli(workdir, "check", "--config", "gateway.toml")
    policy = (workdir / "policy.json").resolve()
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        "error: policy files: 1 error(s)",
        f"  {policy}: invalid JSON at line 1 column 18: Expecting property name enclosed in double quotes",
    ]


async def test_login_link_says_which_gateway_url_it_uses(workdir: Path) -> None:
    """Without public_url, login-link links to --url, else $APPROVALS_URL, else the config's port, and
    says on stderr which one it guessed (it cannot see the port `serve --port` chose)."""
    secret = {"APPROVALS_SESSION_SECRET": "s" * 32}
    cases = [
        ({}, (), "http://127.0.0.1:8080", True),
        ({"APPROVALS_URL": "http://127.0.0.1:8090"}, (), "http://127.0.0.1:8090", True),
        (
            {"APPROVALS_URL": "http://127.0.0.1:8090"},
            ("--url", "http://127.0.0.1:8091/"),
            "http://127.0.0.1:8091",
            False,
        ),
    ]
    for env, url, base, says in cases:
        status, out, err = await run_cli(
            workdir, "login-link", "dev-reviewer", "--config", "gateway.toml", *url, env=secret | env
        )
        assert status == 0, err
        assert out.startswith(f"{base}/inbox/login/link?t="), out
        assert (f"the link uses {base}" in err) == says, err


async def test_serve_refuses_several_workers_on_sqlite(workdir: Path) -> None:
    """--workers 2 without a PostgreSQL store: exit 1 saying why (SQLite is one process's)."""
    status, out, err = await run_cli(
        workdir, "serve", "--config", "gateway.toml", "--port", "0", "--workers", "2"
    )
    assert status == 1
    assert out == ""
    assert "error: 2 workers need a PostgreSQL store ([store] url or APPROVALS_DATABASE_URL)" in err
    assert "Traceback" not in err


async def test_serve_rejects_a_worker_count_out_of_range(workdir: Path) -> None:
    """--workers 0 is a usage error (exit 2)."""
    status, _, err = await run_cli(workdir, "serve", "--config", "gateway.toml", "--workers", "0")
    assert status == 2
    assert "--workers: must be a number from 1 to 256" in err


async def test_serve_exits_1_when_a_worker_cannot_start(workdir: Path) -> None:
    """--workers 2 on a database nobody listens on: each worker's error, then the supervisor's
    message naming a worker that stopped while starting; exit 1, no worker left behind."""
    env = {"APPROVALS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}
    status, out, err = await run_cli(
        workdir, "serve", "--config", "gateway.toml", "--port", "0", "--workers", "2", env=env
    )
    assert status == 1
    assert out == ""
    assert "error: cannot connect to the database" in err
    assert "stopped while starting (exit status 1)" in err
    assert "Traceback" not in err


# ---- the supervisor of --workers, with stand-in workers -----------------------------------


def _stand_in(behaviour: str) -> Callable[[int], list[str]]:
    """A worker command: a tiny Python process given the supervisor's channel, which says ready
    and waits for the channel to close ("serve"), says ready and exits ("crash"), or exits 3
    without a word ("fail")."""
    script = {
        "serve": "s.send(b'ready\\n'); s.recv(1)",
        "crash": "s.send(b'ready\\n')",
        "fail": "sys.exit(3)",
    }[behaviour]
    code = f"import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); {script}"
    return lambda channel: [sys.executable, "-c", code, str(channel)]


async def test_supervisor_stops_its_workers_on_request() -> None:
    """Workers ready, then a stop: each gets SIGTERM and the supervisor's status is 0."""
    workers = supervisor.Supervisor(3, _stand_in("serve"))
    await workers.start()
    running = asyncio.create_task(workers.run())
    workers.request_stop()
    assert await asyncio.wait_for(running, WAIT) == 0
    assert {w.process.returncode for w in workers.workers.values()} == {-signal.SIGTERM}


async def test_supervisor_fails_when_a_worker_cannot_start() -> None:
    """A worker that exits before it is ready: WorkerFailed naming it and its status."""
    workers = supervisor.Supervisor(2, _stand_in("fail"))
    with pytest.raises(supervisor.WorkerFailed, match=r"of 2 stopped while starting \(exit status 3\)"):
        await asyncio.wait_for(workers.start(), WAIT)


async def test_supervisor_gives_up_on_workers_that_keep_dying() -> None:
    """A worker that dies after it was ready is started again, up to MAX_RESTARTS times a minute;
    then everything stops and the status is 1."""
    workers = supervisor.Supervisor(1, _stand_in("crash"))
    await workers.start()
    assert await asyncio.wait_for(workers.run(), WAIT) == 1
    assert len(workers.restarts) == supervisor.MAX_RESTARTS + 1


async def test_audit_verify_and_export_are_commands(workdir: Path) -> None:
    """`approvals audit verify|export` run from the command line: a store with no events yet is an
    intact chain and an empty export; one that does not exist is exit 2 (it is never created)."""
    status, out, err = await run_cli(workdir, "audit", "verify", "--config", "gateway.toml")
    assert status == 2, (out, err)
    store = await SqliteStore.open(workdir / "data" / "approvals.db")
    await store.close()
    status, out, err = await run_cli(workdir, "audit", "verify", "--config", "gateway.toml")
    assert (status, out) == (0, "chain intact: 0 events\n"), err
    status, out, err = await run_cli(workdir, "audit", "export", "--since", "7d", "--config", "gateway.toml")
    assert (status, out) == (0, ""), err


async def test_policy_replay_is_a_command(workdir: Path) -> None:
    """`approvals policy replay` runs from the command line: with no history recorded yet (no store
    file, which it never creates) it exits 2 saying so; on an empty store it reports no calls."""
    args = ("policy", "replay", "--policy", "policy.json", "--since", "7d", "--config", "gateway.toml")
    status, _, err = await run_cli(workdir, *args)
    assert status == 2
    assert "no history" in err
    assert not (workdir / "data" / "approvals.db").exists()
    store = await SqliteStore.open(workdir / "data" / "approvals.db")
    await store.close()
    status, out, err = await run_cli(workdir, *args, "--format", "json")
    assert status == 0, err
    assert json.loads(out)["calls"] == 0
