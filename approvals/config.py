"""Load `gateway.toml` into frozen, typed settings. All validation and every `os.environ` read live here.

Paths in the file are relative to the file. `${NAME}` in strings is replaced from the environment;
secrets (tokens, Slack credentials) come only from the environment, never from the file. Every
problem is reported with its path (`upstreams.demo.command: must be a non-empty list of strings`),
all at once, as a `ConfigError`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from approvals.durations import parse_duration
from approvals.errors import ConfigError, Issue

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    # Host names a request may name in Host / Origin (DNS-rebinding defence); the public URL's
    # host and the loopback names are always allowed.
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    session_idle_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: Path


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    hold_seconds: float = 45.0
    timeout: float = 900.0
    max_pending_per_grant: int = 20


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One upstream MCP server: `command` (stdio) or `url` (Streamable HTTP), never both."""

    name: str
    policy_path: Path | None
    command: tuple[str, ...] = ()
    cwd: Path | None = None
    env: Mapping[str, str] | None = None  # full child environment when the file sets `env`
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_stdio(self) -> bool:
        return bool(self.command)


@dataclass(frozen=True, slots=True)
class Principal:
    """A grant (an MCP client's credential) or a reviewer; only the token's sha256 is kept."""

    name: str
    token_sha256: str
    owner: str | None = None  # grants: the reviewer who runs this agent
    slack_user_id: str | None = None  # reviewers


@dataclass(frozen=True, slots=True)
class SlackSettings:
    channel: str
    mode: str
    bot_token: str
    signing_secret: str
    app_token: str | None
    api_url: str | None


@dataclass(frozen=True, slots=True)
class Settings:
    source: Path
    server: ServerSettings
    store: StoreSettings
    approvals: ApprovalSettings
    upstreams: Mapping[str, UpstreamSettings]
    grants: tuple[Principal, ...]
    reviewers: tuple[Principal, ...]
    slack: SlackSettings | None = None


def sha256_hex(token: str) -> str:
    """The form in which tokens are stored and compared."""
    return hashlib.sha256(token.encode()).hexdigest()


class _Reader:
    """Walks the parsed TOML, collecting issues instead of stopping at the first one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.issues: list[Issue] = []

    def error(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message))

    def table(self, data: Mapping[str, Any], path: str, key: str, known: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        where = f"{path}.{key}" if path else key
        if not isinstance(value, dict):
            self.error(where, "must be a table")
            return {}
        self.unknown(value, where, known)
        return value

    def unknown(self, data: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.error(f"{path}.{key}" if path else key, f"unknown setting{hint}")

    def get(self, data: Mapping[str, Any], path: str, key: str, default: T, check: Callable[[Any], T]) -> T:
        if key not in data:
            return default
        try:
            return check(data[key])
        except ValueError as exc:
            self.error(f"{path}.{key}", str(exc))
            return default

    def expand(self, text: str, path: str) -> str:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.env:
                self.error(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        return _ENV_REF.sub(sub, text)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("must be an integer from 0 to 65535")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError('must be a duration like "30s", "15m", "2h" or "1d"')
    return parse_duration(value)


def _http_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a non-empty list of strings")
    return tuple(value)


def _host_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of host names")
    return tuple(v.lower() for v in value)


def _read_server(r: _Reader, data: Mapping[str, Any]) -> ServerSettings:
    known = {"host", "port", "public_url", "allowed_hosts", "max_body_bytes", "session_idle"}
    t = r.table(data, "", "server", known)
    d = ServerSettings()
    port = r.get(t, "server", "port", d.port, _port)
    host = r.get(t, "server", "host", d.host, _string)
    return ServerSettings(
        host=host,
        port=port,
        # APPROVALS_PUBLIC_URL lets a Procfile deployment name its public address without a file edit.
        public_url=_http_url(r.env["APPROVALS_PUBLIC_URL"])
        if r.env.get("APPROVALS_PUBLIC_URL")
        else r.get(t, "server", "public_url", f"http://{host}:{port}", _http_url),
        allowed_hosts=r.get(t, "server", "allowed_hosts", (), _host_list),
        max_body_bytes=r.get(t, "server", "max_body_bytes", d.max_body_bytes, _positive_int),
        session_idle_seconds=r.get(t, "server", "session_idle", d.session_idle_seconds, _seconds),
    )


def _read_approvals(r: _Reader, data: Mapping[str, Any]) -> ApprovalSettings:
    t = r.table(data, "", "approvals", {"hold_seconds", "timeout", "max_pending_per_grant"})
    d = ApprovalSettings()
    return ApprovalSettings(
        hold_seconds=r.get(t, "approvals", "hold_seconds", d.hold_seconds, _seconds),
        timeout=r.get(t, "approvals", "timeout", d.timeout, _seconds),
        max_pending_per_grant=r.get(
            t, "approvals", "max_pending_per_grant", d.max_pending_per_grant, _positive_int
        ),
    )


def _read_upstream(r: _Reader, name: str, t: Any, base: Path) -> UpstreamSettings | None:
    path = f"upstreams.{name}"
    if not _NAME.match(name):
        r.error(path, "upstream names may use letters, digits, '_', '.' and '-' (it becomes the URL path)")
    if not isinstance(t, dict):
        r.error(path, "must be a table")
        return None
    r.unknown(t, path, {"command", "url", "headers", "policy", "env", "cwd"})
    no_command: tuple[str, ...] = ()
    command = r.get(t, path, "command", no_command, _string_list)
    if command and command[0] in ("python", "python3"):
        # The gateway's own interpreter, so an upstream installed beside the gateway (the demo,
        # a PyPI server) runs whichever virtualenv or PATH the gateway was started from.
        command = (sys.executable, *command[1:])
    url = r.get(t, path, "url", "", _http_url)
    if bool(command) == bool(url):
        r.error(path, 'needs exactly one of "command" (stdio) or "url" (Streamable HTTP)')
    if url:
        url = r.expand(url, f"{path}.url")
    headers: dict[str, str] = {}
    raw_headers = t.get("headers", {})
    if not isinstance(raw_headers, dict) or not all(isinstance(v, str) for v in raw_headers.values()):
        r.error(f"{path}.headers", "must be a table of strings")
    else:
        headers = {k: r.expand(v, f"{path}.headers.{k}") for k, v in raw_headers.items()}
    env: dict[str, str] | None = None
    raw_env = t.get("env")
    if raw_env is not None:
        if not isinstance(raw_env, dict) or not all(isinstance(v, str) for v in raw_env.values()):
            r.error(f"{path}.env", "must be a table of strings")
        else:
            # The child gets the gateway's environment plus these, so PATH and friends still work.
            env = {**r.env, **{k: r.expand(v, f"{path}.env.{k}") for k, v in raw_env.items()}}
    policy: Path | None = None
    if "policy" in t:
        policy = base / r.get(t, path, "policy", "", _string)
        if not policy.is_file():
            r.error(f"{path}.policy", f"file {policy} does not exist")
    cwd = base / r.get(t, path, "cwd", ".", _string)
    return UpstreamSettings(name, policy, command, cwd, env, url, headers)


def _read_principal(r: _Reader, path: str, t: Any, kind: str) -> Principal | None:
    known = {"name", "token_env", "token_sha256"}
    known |= {"owner"} if kind == "grant" else {"slack_user_id"}
    if not isinstance(t, dict):
        r.error(path, "must be a table")
        return None
    r.unknown(t, path, known)
    name = r.get(t, path, "name", "", _string)
    if not name:
        r.error(f"{path}.name", "is required")
    digest = ""
    if ("token_env" in t) == ("token_sha256" in t):
        r.error(path, 'needs exactly one of "token_env" (an environment variable) or "token_sha256"')
    elif "token_env" in t:
        var = r.get(t, path, "token_env", "", _string)
        token = r.env.get(var, "") if var else ""
        if var and len(token) < 16:
            state = "is not set" if not token else "is shorter than 16 characters"
            r.error(f"{path}.token_env", f"environment variable {var} {state}")
        digest = sha256_hex(token) if token else ""
    else:
        digest = r.get(t, path, "token_sha256", "", _string).lower()
        if not _SHA256.match(digest):
            r.error(f"{path}.token_sha256", "must be 64 hex digits (see `approvals token`)")
    owner = r.get(t, path, "owner", None, _string) if kind == "grant" else None
    slack = r.get(t, path, "slack_user_id", None, _string) if kind == "reviewer" else None
    return Principal(name, digest, owner, slack)


def _read_principals(r: _Reader, data: Mapping[str, Any], key: str, kind: str) -> tuple[Principal, ...]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        r.error(key, f"must be an array of tables ([[{key}]])")
        return ()
    found = [_read_principal(r, f"{key}[{i}]", t, kind) for i, t in enumerate(raw)]
    out = tuple(p for p in found if p is not None)
    seen: set[str] = set()
    for i, p in enumerate(out):
        if p.name in seen:
            r.error(f"{key}[{i}].name", f'"{p.name}" is used twice')
        seen.add(p.name)
    return out


def _read_slack(r: _Reader, data: Mapping[str, Any]) -> SlackSettings | None:
    if "slack" not in data:
        return None
    t = r.table(data, "", "slack", {"channel", "mode", "api_url"})
    mode = r.get(t, "slack", "mode", "http", _string)
    if mode not in ("http", "socket"):
        r.error("slack.mode", 'must be "http" or "socket"')
    needed = ["SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"] + (["SLACK_APP_TOKEN"] if mode == "socket" else [])
    for var in needed:
        if not r.env.get(var):
            r.error(
                "slack", f"environment variable {var} is not set (Slack secrets come from the environment)"
            )
    return SlackSettings(
        channel=r.get(t, "slack", "channel", "", _string),
        mode=mode,
        bot_token=r.env.get("SLACK_BOT_TOKEN", ""),
        signing_secret=r.env.get("SLACK_SIGNING_SECRET", ""),
        app_token=r.env.get("SLACK_APP_TOKEN"),
        api_url=r.get(t, "slack", "api_url", None, _http_url),
    )


def parse_settings(data: Mapping[str, Any], source: Path, env: Mapping[str, str]) -> Settings:
    """Validate parsed TOML; raise `ConfigError` listing every problem."""
    r = _Reader(env)
    base = source.parent
    r.unknown(data, "", {"server", "store", "approvals", "upstreams", "grants", "reviewers", "slack"})
    server = _read_server(r, data)
    store_table = r.table(data, "", "store", {"path"})
    store = StoreSettings(
        (base / r.get(store_table, "store", "path", "data/approvals.db", _string)).resolve()
    )
    approvals = _read_approvals(r, data)
    upstream_table = data.get("upstreams", {})
    if not isinstance(upstream_table, dict):
        r.error("upstreams", "must be a table of [upstreams.NAME] tables")
        upstream_table = {}
    upstreams = {
        name: up for name, t in upstream_table.items() if (up := _read_upstream(r, name, t, base)) is not None
    }
    if not upstream_table:
        r.error("upstreams", "at least one upstream is required ([upstreams.NAME] with command or url)")
    grants = _read_principals(r, data, "grants", "grant")
    reviewers = _read_principals(r, data, "reviewers", "reviewer")
    slack = _read_slack(r, data)
    if r.issues:
        raise ConfigError(str(source), r.issues)
    return Settings(source, server, store, approvals, upstreams, grants, reviewers, slack)


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a gateway.toml. `env` defaults to the process environment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [Issue("", f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Issue("", f"not valid TOML: {exc}")]) from None
    return parse_settings(data, path.resolve(), os.environ if env is None else env)
