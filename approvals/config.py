"""Load `gateway.toml` into frozen, typed settings. All validation and every `os.environ` read live here.

Paths in the file are relative to the file. `${NAME}` in an upstream's `url`, `headers` and `env`
values is replaced from the environment; secrets (tokens, Slack credentials) come only from the
environment, never from the file. Every problem is reported with its path
(`upstreams.demo.command: must be a non-empty list of strings`), all at once, as a `ConfigError`.

A stdio upstream does not inherit the gateway's own secrets (grant and reviewer `token_env`
variables, the Slack credentials, `APPROVALS_TOKEN`, the metrics token): the upstream is the very
thing being gated, and a tool that can read its environment must not find a reviewer's token there.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from approvals.durations import parse_duration
from approvals.errors import ConfigError, Issue
from approvals.policy_approval import group_names

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
_SLACK_SECRETS = ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN")
_CLI_SECRETS = ("APPROVALS_TOKEN",)  # the reviewer token `approvals list|approve|deny` use
# Signs the inbox's session cookies and login links: whoever holds it can log in as any reviewer.
SESSION_SECRET_ENV = "APPROVALS_SESSION_SECRET"  # noqa: S105 -- the variable's name
AUDIT_SECRET_ENV = "APPROVALS_AUDIT_WEBHOOK_SECRET"  # noqa: S105 -- [audit] webhook_secret_env's default
METRICS_TOKEN_ENV = "APPROVALS_METRICS_TOKEN"  # noqa: S105 -- [metrics] token_env's default
LOG_FORMATS = ("json", "text")  # [server] log_format; unset: text on a terminal, JSON lines otherwise
MIN_SESSION_SECRET_LENGTH = 32
MIN_TOKEN_LENGTH = 16
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    # False when public_url was derived from host and port: `approvals serve` then derives it
    # again from the address it actually listens on (--port, or the port 0 picked).
    public_url_explicit: bool = False
    # Host names a request may name in Host / Origin (DNS-rebinding defence); the public URL's
    # host and the loopback names are always allowed.
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    session_idle_seconds: float = 3600.0
    # A session whose client seems gone (it never sent notifications/initialized, or its last
    # GET stream closed) ends after this long with no request and no stream open.
    abandoned_session_idle_seconds: float = 120.0
    max_sessions: int = 256  # each may be an upstream process: bounded in total and per grant
    max_sessions_per_grant: int = 16
    # The longest a connection may take to send a request's headers (and body), and the longest
    # an idle keep-alive connection is kept: slow or silent clients do not hold sockets for ever.
    read_timeout_seconds: float = 30.0
    # Per session: the bytes of messages kept for a client stream that is not open, and the most
    # a GET stream may fall behind before it is ended (the client reconnects and gets what is kept).
    max_backlog_bytes: int = 4 * 1024 * 1024
    # Undocumented, for the A/B benchmark: which HTTP client POSTs to Streamable HTTP upstreams,
    # the gateway's own (proxy/http1.py) or aiohttp's.
    upstream_client: str = "http1"
    # Processes `approvals serve` runs on this machine, sharing the port (`--workers` overrides).
    workers: int = 1
    # Where the other replicas reach this one, for requests of a session it owns
    # (approvals.proxy.affinity): None on one replica. Port 0 picks a free port per process.
    internal_url: str | None = None
    # "json" (one JSON object a line, for a log shipper) or "text"; None: text when stderr is a
    # terminal (a person reading), JSON otherwise (a service manager collecting lines).
    log_format: str | None = None


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: Path  # the SQLite file, unless `url` names a PostgreSQL database
    # postgresql://… from [store] url or APPROVALS_DATABASE_URL: several replicas share it.
    url: str | None = field(default=None, repr=False)  # may carry a password


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    hold_seconds: float = 45.0
    timeout: float = 900.0
    max_pending_per_grant: int = 20
    # Repeat calls held open at once for one approval; more are answered at once with its status.
    max_holds_per_approval: int = 16


UPSTREAM_CLIENTS = ("http1", "aiohttp")  # [server] upstream_client
DEFAULT_CALL_TIMEOUT = 300.0  # seconds: [upstreams.NAME] call_timeout


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One upstream MCP server: `command` (stdio) or `url` (Streamable HTTP), never both."""

    name: str
    policy_path: Path | None
    command: tuple[str, ...] = ()
    cwd: Path | None = None
    # The full child environment, or None to inherit the gateway's (only when there is nothing
    # to add and no gateway secret to withhold). Kept out of repr: it may hold credentials.
    env: Mapping[str, str] | None = field(default=None, repr=False)
    url: str = ""
    headers: Mapping[str, str] = field(
        default_factory=dict, repr=False
    )  # may carry the upstream's credential
    # The longest the gateway waits for the upstream's answer to a call it makes itself (a
    # release, a tool listing): a release whose upstream never answers ends failed/timeout.
    call_timeout: float = DEFAULT_CALL_TIMEOUT

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
    groups: tuple[str, ...] = ()  # reviewers: the groups a policy's approval.reviewers may name


@dataclass(frozen=True, slots=True)
class SlackSettings:
    channel: str
    mode: str
    bot_token: str = field(repr=False)
    signing_secret: str = field(repr=False)
    app_token: str | None = field(repr=False)
    api_url: str | None
    team_id: str | None = None  # when set, clicks from any other Slack workspace are refused
    # A channel per reviewer group: a request goes to the channels of the groups that may decide it
    # (else `channel`), an escalation to the channels of the groups it is escalated to.
    group_channels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InboxSettings:
    """The web inbox: how long a login lasts, and the key its session cookies are signed with."""

    session_hours: float = 8.0  # sliding: a session ends after this long without a request
    # From APPROVALS_SESSION_SECRET; None: a random key per process (sessions end on restart).
    session_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """[audit]: where the audit log is copied as it grows (approvals.audit_sink); nowhere by default."""

    webhook_url: str | None = None
    # From the variable `webhook_secret_env` names: the HMAC key of every delivery.
    webhook_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """[metrics]: `/metrics` answers only a bearer of this token; without one it is off (404)."""

    # The sha256 of the token in the variable `token_env` names (APPROVALS_METRICS_TOKEN by default).
    token_sha256: str | None = field(default=None, repr=False)


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
    inbox: InboxSettings = InboxSettings()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()


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
            self.error(where, f"must be a table ([{where}]), not {_kind(value)}")
            return {}
        self.unknown(value, where, known)
        return value

    def unknown(self, data: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(sorted(known))})"
                self.error(f"{path}.{key}" if path else str(key), f"unknown setting{hint}")

    def get(self, data: Mapping[str, Any], path: str, key: str, default: T, check: Callable[[Any], T]) -> T:
        if key not in data:
            return default
        try:
            return check(data[key])
        except ValueError as exc:
            self.error(f"{path}.{key}", str(exc))
            return default

    def expand(self, text: str, path: str) -> str | None:
        """`text` with every `${NAME}` replaced; None (and an issue) when a variable is not set."""
        missing = [name for name in _ENV_REF.findall(text) if name not in self.env]
        for name in dict.fromkeys(missing):
            self.error(path, f"environment variable {name} is not set (it is used as ${{{name}}})")
        if missing:
            return None
        return _ENV_REF.sub(lambda match: self.env[match.group(1)], text)


def _kind(value: Any) -> str:
    """How TOML would name the type of `value`, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


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
    return parse_duration(value)  # raises ValueError with a readable message for anything else


def _database_url(r: _Reader, table: Mapping[str, Any]) -> str | None:
    """[store] url (with ${ENV} expanded) or APPROVALS_DATABASE_URL, which wins: a deployment names
    its database, and its password, in the environment."""
    raw = r.env.get("APPROVALS_DATABASE_URL") or r.get(table, "store", "url", "", _string)
    where = "APPROVALS_DATABASE_URL" if r.env.get("APPROVALS_DATABASE_URL") else "store.url"
    if not raw:
        return None
    url = r.expand(raw, where) if where == "store.url" else raw
    if url is not None and urlsplit(url).scheme not in ("postgresql", "postgres"):
        r.error(where, f"must be a postgresql:// URL (got scheme {urlsplit(url).scheme!r})")
        return None
    return url


def _http_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL (got {text!r})")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"must be a URL with a port from 0 to 65535 (got {text!r})") from None
    return text.rstrip("/")


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a non-empty list of strings")
    return tuple(value)


def _host_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of host names")
    return tuple(v.lower() for v in value)


def _string_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("must be a table of strings")
    return value


def _read_server(r: _Reader, data: Mapping[str, Any]) -> ServerSettings:
    known = {"host", "port", "public_url", "allowed_hosts", "max_body_bytes", "session_idle"}
    known |= {"abandoned_session_idle", "max_sessions", "max_sessions_per_grant", "read_timeout"}
    known |= {"max_backlog_bytes", "upstream_client", "workers", "internal_url", "log_format"}
    t = r.table(data, "", "server", known)
    d = ServerSettings()
    port = r.get(t, "server", "port", d.port, _port)
    host = r.get(t, "server", "host", d.host, _string)
    public_url = r.get(t, "server", "public_url", "", _http_url)
    # APPROVALS_PUBLIC_URL lets a Procfile deployment name its public address without a file edit.
    if override := r.env.get("APPROVALS_PUBLIC_URL"):
        try:
            public_url = _http_url(override)
        except ValueError as exc:
            r.error("server.public_url", f"{exc}; it comes from APPROVALS_PUBLIC_URL")
    return ServerSettings(
        host=host,
        port=port,
        public_url=public_url or served_url(host, port),
        public_url_explicit=bool(public_url),
        allowed_hosts=r.get(t, "server", "allowed_hosts", (), _host_list),
        max_body_bytes=r.get(t, "server", "max_body_bytes", d.max_body_bytes, _positive_int),
        session_idle_seconds=r.get(t, "server", "session_idle", d.session_idle_seconds, _seconds),
        abandoned_session_idle_seconds=r.get(
            t, "server", "abandoned_session_idle", d.abandoned_session_idle_seconds, _seconds
        ),
        max_sessions=r.get(t, "server", "max_sessions", d.max_sessions, _positive_int),
        max_sessions_per_grant=r.get(
            t, "server", "max_sessions_per_grant", d.max_sessions_per_grant, _positive_int
        ),
        read_timeout_seconds=r.get(t, "server", "read_timeout", d.read_timeout_seconds, _seconds),
        max_backlog_bytes=r.get(t, "server", "max_backlog_bytes", d.max_backlog_bytes, _positive_int),
        upstream_client=r.get(t, "server", "upstream_client", d.upstream_client, _upstream_client),
        workers=r.get(t, "server", "workers", d.workers, _worker_count),
        internal_url=r.get(t, "server", "internal_url", None, internal_url),
        log_format=r.get(t, "server", "log_format", None, _log_format),
    )


def _log_format(value: Any) -> str:
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)} (got {value!r})")
    return str(value)


MAX_WORKERS = 256


def _worker_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be an integer from 1 to {MAX_WORKERS}")
    return value


def internal_url(value: Any) -> str:
    """`http://HOST:PORT` and nothing more: the address replicas forward session requests to.

    Plain http with an explicit port and no path: it is an address on a private network (or
    loopback), listened on by this process, not a public URL.
    """
    text = _string(value)
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"must be http://HOST:PORT, with no path (got {text!r}); port 0 picks a free one")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"must be http://HOST:PORT, with nothing else (got {text!r})")
    return text.rstrip("/")


def _upstream_client(value: Any) -> str:
    if value not in UPSTREAM_CLIENTS:
        raise ValueError(f"must be one of {', '.join(map(repr, UPSTREAM_CLIENTS))} (got {value!r})")
    return str(value)


def served_url(host: str, port: int) -> str:
    """The base URL of a gateway listening on `host`:`port`, for links when no public_url is set."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_approvals(r: _Reader, data: Mapping[str, Any]) -> ApprovalSettings:
    known = {"hold_seconds", "timeout", "max_pending_per_grant", "max_holds_per_approval"}
    t = r.table(data, "", "approvals", known)
    d = ApprovalSettings()
    return ApprovalSettings(
        hold_seconds=r.get(t, "approvals", "hold_seconds", d.hold_seconds, _seconds),
        timeout=r.get(t, "approvals", "timeout", d.timeout, _seconds),
        max_pending_per_grant=r.get(
            t, "approvals", "max_pending_per_grant", d.max_pending_per_grant, _positive_int
        ),
        max_holds_per_approval=r.get(
            t, "approvals", "max_holds_per_approval", d.max_holds_per_approval, _positive_int
        ),
    )


def _read_upstream(
    r: _Reader, name: str, t: Any, base: Path, secrets: frozenset[str]
) -> UpstreamSettings | None:
    path = f"upstreams.{name}"
    if not _NAME.match(name):
        r.error(
            path,
            "the name may use only letters, digits, '_', '.' and '-', up to 64 characters"
            " (it becomes the URL path /mcp/NAME)",
        )
    if not isinstance(t, dict):
        r.error(path, f"must be a table ([upstreams.{name}] with command or url), not {_kind(t)}")
        return None
    r.unknown(t, path, {"command", "url", "headers", "policy", "env", "cwd", "call_timeout"})
    if ("command" in t) == ("url" in t):
        r.error(path, 'needs exactly one of "command" (stdio) or "url" (Streamable HTTP)')
    no_command: tuple[str, ...] = ()
    command = r.get(t, path, "command", no_command, _string_list)
    if command and command[0] in ("python", "python3"):
        # The gateway's own interpreter, so an upstream installed beside the gateway (the demo,
        # a PyPI server) runs whichever virtualenv or PATH the gateway was started from.
        command = (sys.executable, *command[1:])
    url = ""
    if "url" in t:
        raw_url = r.get(t, path, "url", "", _string)
        expanded = r.expand(raw_url, f"{path}.url") if raw_url else None
        if expanded is not None:
            url = r.get({"url": expanded}, path, "url", "", _http_url)
    for key, kind in (("headers", "url"), ("env", "command"), ("cwd", "command")):
        if key in t and kind not in t and ("command" in t or "url" in t):
            r.error(f"{path}.{key}", f'applies only to an upstream with "{kind}"')
    headers = _read_headers(r, t, path)
    env = _child_env(r, t, path, secrets) if "command" in t else None
    policy: Path | None = None
    if policy_name := r.get(t, path, "policy", "", _string):
        policy = base / policy_name
        if policy.is_dir():
            r.error(f"{path}.policy", f"must name a policy file, but {policy} is a directory")
        elif not policy.is_file():
            r.error(f"{path}.policy", f"must name an existing policy file (there is no {policy})")
    cwd = base
    if cwd_name := r.get(t, path, "cwd", "", _string):
        cwd = base / cwd_name
        if not cwd.is_dir():
            r.error(f"{path}.cwd", f"must name an existing directory (there is no directory {cwd})")
    call_timeout = r.get(t, path, "call_timeout", DEFAULT_CALL_TIMEOUT, _seconds)
    return UpstreamSettings(name, policy, command, cwd, env, url, headers, call_timeout)


def _read_headers(r: _Reader, t: Mapping[str, Any], path: str) -> dict[str, str]:
    no_headers: dict[str, str] = {}
    headers: dict[str, str] = {}
    for key, value in r.get(t, path, "headers", no_headers, _string_table).items():
        where = f"{path}.headers.{key}"
        if not _HEADER_NAME.match(key):
            r.error(where, "is not a valid HTTP header name")
        expanded = r.expand(value, where)
        if expanded is not None and re.search(r"[\r\n\0]", expanded):
            r.error(where, "must not contain line breaks or NUL characters")
        elif expanded is not None:
            headers[key] = expanded
    return headers


def _child_env(r: _Reader, t: Mapping[str, Any], path: str, secrets: frozenset[str]) -> dict[str, str] | None:
    """A stdio upstream's environment: None (inherit) when nothing is added and nothing withheld."""
    no_env: dict[str, str] = {}
    extra = {
        key: expanded
        for key, value in r.get(t, path, "env", no_env, _string_table).items()
        if (expanded := r.expand(value, f"{path}.env.{key}")) is not None
    }
    if "env" not in t and not any(var in r.env for var in secrets):
        return None
    # The gateway's environment (so PATH and friends still work) minus its own secrets, plus what
    # the file adds: an entry in the file may still pass a secret on, on purpose.
    return {k: v for k, v in r.env.items() if k not in secrets} | extra


def _secret_names(data: Mapping[str, Any]) -> frozenset[str]:
    """The environment variables that hold the gateway's own secrets."""
    names = {*_SLACK_SECRETS, *_CLI_SECRETS, SESSION_SECRET_ENV, "APPROVALS_DATABASE_URL", AUDIT_SECRET_ENV}
    names.add(METRICS_TOKEN_ENV)
    for table, key in (("audit", "webhook_secret_env"), ("metrics", "token_env")):
        section = data.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            names.add(section[key])
    for key in ("grants", "reviewers"):
        entries = data.get(key)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("token_env"), str):
                names.add(entry["token_env"])
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A principal as read, with where its token came from, for the cross-checks."""

    path: str
    principal: Principal
    token_key: str


def _read_principal(r: _Reader, path: str, t: Any, kind: str) -> _Entry | None:
    known = {"name", "token_env", "token_sha256"}
    known |= {"owner"} if kind == "grant" else {"slack_user_id", "groups"}
    if not isinstance(t, dict):
        r.error(path, f"must be a table (name = ..., token_env or token_sha256 = ...), not {_kind(t)}")
        return None
    if kind == "grant" and "groups" in t:
        # A group is whom a policy lets decide; an agent decides nothing, so its groups would mean nothing.
        r.error(f"{path}.groups", "only [[reviewers]] have groups (a grant is an agent; it decides nothing)")
        t = {k: v for k, v in t.items() if k != "groups"}
    r.unknown(t, path, known)
    if "name" not in t:
        r.error(f"{path}.name", "is required")
    name = r.get(t, path, "name", "", _string)
    digest = ""
    token_key = "token_env" if "token_env" in t else "token_sha256"
    if ("token_env" in t) == ("token_sha256" in t):
        r.error(path, 'needs exactly one of "token_env" (an environment variable) or "token_sha256"')
    elif "token_env" in t:
        var = r.get(t, path, "token_env", "", _string)
        token = r.env.get(var, "") if var else ""
        if var and not token:
            r.error(f"{path}.token_env", f"environment variable {var} is not set")
        elif var and len(token) < MIN_TOKEN_LENGTH:
            r.error(
                f"{path}.token_env",
                f"environment variable {var} must hold at least {MIN_TOKEN_LENGTH} characters"
                " (`approvals token` makes one)",
            )
        else:
            digest = sha256_hex(token) if token else ""
    elif raw := r.get(t, path, "token_sha256", "", _string):
        if _SHA256.match(raw.lower()):
            digest = raw.lower()
        else:
            r.error(f"{path}.token_sha256", "must be 64 hex digits (see `approvals token`)")
    owner = r.get(t, path, "owner", None, _string) if kind == "grant" else None
    slack = r.get(t, path, "slack_user_id", None, _string) if kind == "reviewer" else None
    groups = group_names(r.error, t["groups"], f"{path}.groups") if "groups" in t else ()
    return _Entry(path, Principal(name, digest, owner, slack, groups), token_key)


def _read_principals(r: _Reader, data: Mapping[str, Any], key: str, kind: str) -> list[_Entry]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        r.error(key, f"must be an array of tables ([[{key}]]), not {_kind(raw)}")
        return []
    found = [_read_principal(r, f"{key}[{i}]", t, kind) for i, t in enumerate(raw)]
    entries = [e for e in found if e is not None]
    seen: set[str] = set()
    for entry in entries:
        name = entry.principal.name
        if name and name in seen:
            r.error(f"{entry.path}.name", f'"{name}" is used by an earlier entry; names must be unique')
        seen.add(name)
    return entries


def _check_principals(r: _Reader, grants: list[_Entry], reviewers: list[_Entry]) -> None:
    """Checks across entries: owners are reviewers, and no two principals share a token."""
    reviewer_names = sorted({e.principal.name for e in reviewers if e.principal.name})
    for entry in grants:
        owner = entry.principal.owner
        if owner is not None and owner not in reviewer_names:
            close = difflib.get_close_matches(owner, reviewer_names, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            r.error(f"{entry.path}.owner", f'must name a [[reviewers]] entry; "{owner}" is not one{hint}')
    first: dict[str, str] = {}
    for entry in [*grants, *reviewers]:
        digest = entry.principal.token_sha256
        if not digest:
            continue
        if digest in first:
            # A shared token makes the two indistinguishable; a grant sharing a reviewer's token
            # could approve its own calls.
            r.error(
                f"{entry.path}.{entry.token_key}",
                f"must be a token of its own (the same token as {first[digest]})",
            )
        else:
            first[digest] = entry.path


def _read_slack(r: _Reader, data: Mapping[str, Any], groups: frozenset[str]) -> SlackSettings | None:
    if "slack" not in data:
        return None
    if not isinstance(data["slack"], dict):
        r.error("slack", f"must be a table ([slack] with channel and mode), not {_kind(data['slack'])}")
        return None
    t = r.table(data, "", "slack", {"channel", "mode", "api_url", "team_id", "group_channels"})
    mode = r.get(t, "slack", "mode", "http", _string)
    if mode not in ("http", "socket"):
        r.error("slack.mode", f'must be "http" or "socket" (got {mode!r})')
    if "channel" not in t:
        r.error("slack.channel", "is required (the ID of the channel approvals are posted to, C0...)")
    needed = [*_SLACK_SECRETS[:2], *(_SLACK_SECRETS[2:] if mode == "socket" else ())]
    for var in needed:
        if not r.env.get(var):
            r.error(
                "slack", f"needs the environment variable {var} (Slack secrets come from the environment)"
            )
    return SlackSettings(
        channel=r.get(t, "slack", "channel", "", _string),
        mode=mode,
        bot_token=r.env.get("SLACK_BOT_TOKEN", ""),
        signing_secret=r.env.get("SLACK_SIGNING_SECRET", ""),
        app_token=r.env.get("SLACK_APP_TOKEN"),
        api_url=r.get(t, "slack", "api_url", None, _http_url),
        team_id=r.get(t, "slack", "team_id", None, _string),
        group_channels=_group_channels(r, t, groups),
    )


def _group_channels(r: _Reader, t: Mapping[str, Any], groups: frozenset[str]) -> dict[str, str]:
    """[slack] group_channels: a channel per reviewer group, each a group some reviewer is in
    (a channel for a group nobody is in would be announced to with nobody able to decide)."""
    raw = t.get("group_channels", {})
    if not isinstance(raw, dict):
        r.error(
            "slack.group_channels", f'must be a table like {{ payments = "C0PAYMENTS" }}, not {_kind(raw)}'
        )
        return {}
    channels: dict[str, str] = {}
    for group, channel in raw.items():
        where = f"slack.group_channels.{group}"
        if group not in groups:
            r.error(where, no_group_message(group, groups))
        elif not isinstance(channel, str) or not channel.strip():
            r.error(where, "must be a non-empty channel ID (C0...)")
        else:
            channels[group] = channel
    return channels


def no_group_message(group: str, groups: Iterable[str]) -> str:
    """The error for a group no [[reviewers]] entry is in (policy_files says it the same way)."""
    known = ", ".join(sorted(groups)) or "none"
    return f'no [[reviewers]] entry is in group "{group}" (groups: {known})'


def _positive_hours(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 24 * 30:
        raise ValueError("must be a number of hours greater than 0 and at most 720")
    return float(value)


def _read_inbox(r: _Reader, data: Mapping[str, Any]) -> InboxSettings:
    t = r.table(data, "", "inbox", {"session_hours"})
    hours = r.get(t, "inbox", "session_hours", InboxSettings().session_hours, _positive_hours)
    secret = r.env.get(SESSION_SECRET_ENV) or None
    if secret is not None and len(secret) < MIN_SESSION_SECRET_LENGTH:
        r.error(
            "inbox",
            f"environment variable {SESSION_SECRET_ENV} must hold at least {MIN_SESSION_SECRET_LENGTH}"
            " characters (`approvals token` makes one)",
        )
        secret = None
    return InboxSettings(session_hours=hours, session_secret=secret)


MIN_AUDIT_SECRET_LENGTH = 32


def _read_audit(r: _Reader, data: Mapping[str, Any]) -> AuditSettings:
    t = r.table(data, "", "audit", {"webhook_url", "webhook_secret_env"})
    url = r.get(t, "audit", "webhook_url", None, _http_url)
    var = r.get(t, "audit", "webhook_secret_env", AUDIT_SECRET_ENV, _string)
    if url is None:
        return AuditSettings()
    secret = r.env.get(var) or None
    if secret is None or len(secret) < MIN_AUDIT_SECRET_LENGTH:
        r.error(
            "audit.webhook_secret_env",
            f"environment variable {var} must hold the webhook's signing key, at least"
            f" {MIN_AUDIT_SECRET_LENGTH} characters (`approvals token` makes one)",
        )
    return AuditSettings(webhook_url=url, webhook_secret=secret)


def _read_metrics(r: _Reader, data: Mapping[str, Any]) -> MetricsSettings:
    """The token from the variable [metrics] token_env names (APPROVALS_METRICS_TOKEN by default).

    No token: metrics are off. A [metrics] table without a usable token is an error rather than
    metrics silently off: the operator asked for them.
    """
    t = r.table(data, "", "metrics", {"token_env"})
    var = r.get(t, "metrics", "token_env", METRICS_TOKEN_ENV, _string)
    token = r.env.get(var) or None
    asked = "metrics" in data
    if token is None and not asked:
        return MetricsSettings()
    if token is None or len(token) < MIN_TOKEN_LENGTH:
        where = "metrics.token_env" if "token_env" in t else "metrics"
        r.error(
            where,
            f"environment variable {var} must hold the token Prometheus scrapes /metrics with, at"
            f" least {MIN_TOKEN_LENGTH} characters (`approvals token` makes one)",
        )
        return MetricsSettings()
    return MetricsSettings(token_sha256=sha256_hex(token))


def parse_settings(data: Mapping[str, Any], source: Path, env: Mapping[str, str]) -> Settings:
    """Validate parsed TOML; raise `ConfigError` listing every problem."""
    r = _Reader(env)
    base = source.parent
    sections = {"server", "store", "approvals", "upstreams", "grants", "reviewers", "slack", "inbox", "audit"}
    sections |= {"metrics"}
    r.unknown(data, "", sections)
    server = _read_server(r, data)
    store_table = r.table(data, "", "store", {"path", "url"})
    store = StoreSettings(
        (base / r.get(store_table, "store", "path", "data/approvals.db", _string)).resolve(),
        _database_url(r, store_table),
    )
    if server.workers > 1 and store.url is None:
        r.error(
            "server.workers",
            "more than 1 needs a PostgreSQL store ([store] url or APPROVALS_DATABASE_URL):"
            " the SQLite store is used by one process only",
        )
    if server.internal_url is not None and store.url is None:
        r.error(
            "server.internal_url",
            "needs a PostgreSQL store ([store] url or APPROVALS_DATABASE_URL): it routes sessions"
            " between replicas sharing one",
        )
    approvals = _read_approvals(r, data)
    upstream_table = data.get("upstreams", {})
    if not isinstance(upstream_table, dict):
        r.error("upstreams", f"must be a table of [upstreams.NAME] tables, not {_kind(upstream_table)}")
        upstream_table = None
    elif not upstream_table:
        r.error("upstreams", "at least one upstream is required ([upstreams.NAME] with command or url)")
    secrets = _secret_names(data)
    upstreams = {
        name: up
        for name, t in (upstream_table or {}).items()
        if (up := _read_upstream(r, name, t, base, secrets)) is not None
    }
    grants = _read_principals(r, data, "grants", "grant")
    reviewers = _read_principals(r, data, "reviewers", "reviewer")
    _check_principals(r, grants, reviewers)
    slack = _read_slack(r, data, frozenset(g for e in reviewers for g in e.principal.groups))
    inbox = _read_inbox(r, data)
    audit = _read_audit(r, data)
    metrics = _read_metrics(r, data)
    if r.issues:
        raise ConfigError(str(source), r.issues)
    return Settings(
        source,
        server,
        store,
        approvals,
        upstreams,
        tuple(e.principal for e in grants),
        tuple(e.principal for e in reviewers),
        slack,
        inbox,
        audit,
        metrics,
    )


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a gateway.toml. `env` defaults to the process environment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [Issue("", f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path), [Issue("", f"cannot read the file: not UTF-8 text ({exc.reason})")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Issue("", f"not valid TOML: {exc}")]) from None
    return parse_settings(data, path.resolve(), os.environ if env is None else env)


def environment_with(extra: Mapping[str, str]) -> dict[str, str]:
    """The process environment plus `extra`: what `approvals serve --workers` starts its workers with."""
    return {**os.environ, **extra}


def reviewer_environment(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(APPROVALS_URL, APPROVALS_TOKEN) for the reviewer commands `list`, `approve`, `deny`."""
    env = os.environ if env is None else env
    return env.get("APPROVALS_URL") or None, env.get("APPROVALS_TOKEN") or None
