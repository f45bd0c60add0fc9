"""The deployment files, tested without a container engine (this machine has none).

What an image would run is read from the Dockerfile itself — its ENTRYPOINT + CMD, its built-in
gateway.toml, its HEALTHCHECK — and run here as a subprocess with only the address changed (host
127.0.0.1, port 0) and the paths of the image's volume moved into a temporary directory. The
compose file is read as YAML and checked against the variables the gateway reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import WAIT, mcp_client

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
IMAGE_CONFIG = "/etc/approvals/gateway.toml"
IMAGE_DATA = "/var/lib/approvals"
SECRETS = {
    "APPROVALS_AGENT_TOKEN": "deploy-agent-token-0123456789abcdef",
    "APPROVALS_REVIEWER_TOKEN": "deploy-reviewer-token-0123456789abc",
    "APPROVALS_SESSION_SECRET": "deploy-session-secret-0123456789abcdef",
}
STOPPED_WITHIN = 15.0  # the gateway's own shutdown grace is 10 s


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile (continuations joined) and its heredoc files by target."""

    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)
    heredocs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        parsed = cls()
        lines = iter(path.read_text().splitlines())
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            while line.endswith("\\"):
                line = line[:-1] + " " + next(lines).strip()
            keyword, _, rest = line.strip().partition(" ")
            heredoc = re.fullmatch(r"<<'?(\w+)'?\s+(\S+)", rest.strip()) if keyword == "COPY" else None
            if heredoc:
                end, target = heredoc.groups()
                body = []
                for body_line in lines:
                    if body_line == end:
                        break
                    body.append(body_line)
                parsed.heredocs[target] = "\n".join(body) + "\n"
            parsed.instructions.append((keyword.upper(), rest.strip()))
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the Dockerfile has no {keyword}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        """A JSON-array instruction (ENTRYPOINT, CMD), as the engine reads it."""
        words = json.loads(self.last(keyword))
        assert isinstance(words, list), words
        return [str(word) for word in words]

    def command(self) -> list[str]:
        """What `docker run IMAGE` runs: ENTRYPOINT then CMD."""
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    def healthcheck(self) -> list[str]:
        options, _, command = self.last("HEALTHCHECK").partition("CMD ")
        assert "--interval" in options
        words = json.loads(command)
        assert isinstance(words, list)
        return words


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read(DOCKERFILE)


def _with_option(command: list[str], option: str, value: str) -> list[str]:
    """`command` with the value after `option` replaced (the option must be there)."""
    index = command.index(option)
    return [*command[: index + 1], value, *command[index + 2 :]]


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """The test's environment without the gateway's own variables, the venv first on PATH (as
    the image has its Python), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPROVALS_", "SLACK_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@dataclass
class Container:
    """The image's command, running here."""

    process: asyncio.subprocess.Process
    port: int
    stderr: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def run_image_command(
    dockerfile: Dockerfile, tmp_path: Path, env: dict[str, str]
) -> AsyncIterator[Container]:
    """ENTRYPOINT + CMD with host 127.0.0.1, port 0 and the image's built-in config written to
    tmp_path (its volume path moved there too), once it says where it listens; stopped at the end."""
    config = dockerfile.heredocs[IMAGE_CONFIG].replace(IMAGE_DATA, str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "gateway.toml").write_text(config)
    (tmp_path / "policy.json").write_text((REPO / "config" / "policy.json").read_text())
    command = dockerfile.command()
    command = _with_option(command, "--host", "127.0.0.1")
    command = _with_option(command, "--port", "0")
    command = _with_option(command, "--config", str(tmp_path / "gateway.toml"))
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path / "data",  # the image's WORKDIR is its volume
        env=_environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stderr: list[str] = []

    async def drain(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode(errors="replace").rstrip("\n"))

    # Both pipes are read to the end: a full pipe would stall the gateway.
    errors = asyncio.create_task(drain(process.stderr, stderr))
    try:
        first = (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode()
        listening = re.match(r"approvals gateway listening on 127\.0\.0\.1:(\d+)$", first.strip())
        if not listening:  # it ended (or said something else): report all it said on stderr
            if not first:
                await asyncio.wait_for(process.wait(), WAIT)
                await asyncio.wait_for(errors, WAIT)
            raise AssertionError(f"{shlex.join(command)} printed {first!r}; stderr: {stderr}")
        output = asyncio.create_task(drain(process.stdout, []))
        yield Container(process, int(listening.group(1)), stderr)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(errors, WAIT)
    await asyncio.wait_for(output, WAIT)


async def _healthcheck(dockerfile: Dockerfile, port: int) -> int:
    """The HEALTHCHECK command, aimed at `port` instead of the image's 8080; its exit status."""
    command = [word.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for word in dockerfile.healthcheck()]
    assert command[0] == "python"  # the slim image has no curl
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command[1:], stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), WAIT)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_the_image_command_serves_healthz_and_mcp_and_stops_on_sigterm(
    dockerfile: Dockerfile, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """The image's command with its own config: /healthz ok, the healthcheck passes, the agent token
    from the environment lists the demo's tools, and SIGTERM (docker stop) ends it with status 0."""
    env = dict(SECRETS)
    if store == "postgres":  # as docker-compose.yml runs it
        env["APPROVALS_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    async with run_image_command(dockerfile, tmp_path, env) as container:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
            http.get(container.base + "/healthz") as response,
        ):
            assert response.status == 200
            health = await response.json()
        assert (health["status"], health["upstreams"]) == ("ok", ["demo"])
        assert await _healthcheck(dockerfile, container.port) == 0
        token = SECRETS["APPROVALS_AGENT_TOKEN"]
        async with mcp_client(f"{container.base}/mcp/demo", token=token) as client:
            tools = await client.list_tools()
        assert "get_time" in {tool.name for tool in tools.tools}
        container.process.terminate()
        assert await asyncio.wait_for(container.process.wait(), STOPPED_WITHIN) == 0
    assert (tmp_path / "data" / "approvals.db").exists() == (store == "sqlite")


async def test_the_healthcheck_fails_when_nothing_answers(dockerfile: Dockerfile) -> None:
    """Unhealthy is a non-zero exit, not a hang: the check has its own timeout."""
    assert await _healthcheck(dockerfile, _closed_port()) != 0


async def test_the_image_refuses_to_start_without_its_secrets(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """No token in the environment: a config error naming the variable, not a gateway without grants."""
    with pytest.raises(AssertionError, match="APPROVALS_AGENT_TOKEN") as refused:
        async with run_image_command(dockerfile, tmp_path, {}):
            pass
    assert "Traceback" not in str(refused.value)


def test_the_image_is_slim_python_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    """python:3.11-slim, `pip install` of the package, a numeric non-root USER, the documented command."""
    assert dockerfile.all("FROM") == ["python:3.11-slim"]
    assert any(run.startswith("pip install /src") for run in dockerfile.all("RUN"))
    user = dockerfile.last("USER").split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    assert shlex.join(dockerfile.command()) == (
        "approvals serve --host 0.0.0.0 --port 8080 --config /etc/approvals/gateway.toml"
    )
    assert not any("curl" in rest for _, rest in dockerfile.instructions)


def test_dockerignore_lets_in_what_the_dockerfile_copies(dockerfile: Dockerfile) -> None:
    """Everything is ignored but the sources COPY names, so the 450 MB venv never reaches the daemon."""
    kept = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    sources = {
        word
        for copy in dockerfile.all("COPY")
        if not copy.startswith("<<")
        for word in copy.split()[:-1]
        if not word.startswith("--")
    }
    assert sources == kept
    assert all((REPO / source).exists() for source in sources)


def _gateway_variables() -> set[str]:
    """Every APPROVALS_* variable the package's source names."""
    names: set[str] = set()
    for path in (REPO / "approvals").rglob("*.py"):
        names |= set(re.findall(r"\bAPPROVALS_[A-Z_]+\b", path.read_text()))
    return names


def test_compose_runs_the_gateway_on_postgres_15_with_the_variables_it_reads(dockerfile: Dockerfile) -> None:
    """Parsed as YAML: PostgreSQL 15; the gateway gets the database URL, the session secret and the
    token variables its built-in config names, and no variable the gateway does not read."""
    yaml = pytest.importorskip("yaml")
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["db"]["image"] == "postgres:15"
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert gateway["depends_on"]["db"]["condition"] == "service_healthy"
    env = gateway["environment"]
    assert {"APPROVALS_DATABASE_URL", "APPROVALS_SESSION_SECRET"} <= set(env)
    token_envs = set(re.findall(r'token_env = "(\w+)"', dockerfile.heredocs[IMAGE_CONFIG]))
    assert token_envs == {"APPROVALS_AGENT_TOKEN", "APPROVALS_REVIEWER_TOKEN"}
    assert set(env) <= _gateway_variables() | token_envs
    assert token_envs <= set(env)
    # The database URL names the db service; its password comes from the environment, never the file.
    assert env["APPROVALS_DATABASE_URL"].startswith("postgresql://approvals:${POSTGRES_PASSWORD")
    assert env["APPROVALS_DATABASE_URL"].endswith("@db:5432/approvals")
    secrets = [
        services["db"]["environment"]["POSTGRES_PASSWORD"],
        *(env[k] for k in (*token_envs, "APPROVALS_SESSION_SECRET")),
    ]
    assert all(value.startswith("${") and ":?" in value for value in secrets), secrets
