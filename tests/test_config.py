"""gateway.toml → Settings: the shipped file loads, and every mistake is reported with its path, at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from approvals.config import Settings, load_settings, parse_settings, sha256_hex
from approvals.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "gateway.toml"
TOKEN = "grant-token-0123456789abcdef"
REVIEWER_TOKEN = "reviewer-token-0123456789abcdef"
DEMO = """
[upstreams.demo]
command = ["python", "-m", "approvals.demo_server"]
policy = "policy.json"
"""
MINIMAL_POLICY = '{"version": "1", "default": "allow"}'


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A directory with a policy.json, where each test writes its gateway.toml."""
    (tmp_path / "policy.json").write_text(MINIMAL_POLICY)
    return tmp_path


def load(directory: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = directory / "gateway.toml"
    path.write_text(text)
    return load_settings(path, env={} if env is None else env)


def issues_of(directory: Path, text: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The (path, message) of every issue loading `text` reports."""
    with pytest.raises(ConfigError) as error:
        load(directory, text, env)
    return [(issue.path, issue.message) for issue in error.value.issues]


def parse_issues(data: dict[str, Any], env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Like `issues_of` for already parsed TOML (shapes the TOML syntax itself cannot show)."""
    with pytest.raises(ConfigError) as error:
        parse_settings(data, REPO / "config" / "gateway.toml", {} if env is None else env)
    return [(issue.path, issue.message) for issue in error.value.issues]


def assert_issues(found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    """Exactly the expected paths, in order, each message containing its key phrase."""
    assert [path for path, _ in found] == [path for path, _ in expected], found
    for (path, message), (_, phrase) in zip(found, expected, strict=True):
        assert phrase in message, (path, message)


def test_shipped_config_loads_with_an_empty_environment() -> None:
    """config/gateway.toml is valid as shipped: demo over stdio, paths relative to the file."""
    settings = load_settings(SHIPPED, env={})
    demo = settings.upstreams["demo"]
    assert list(settings.upstreams) == ["demo"]
    assert demo.is_stdio
    assert demo.command == (sys.executable, "-m", "approvals.demo_server")
    assert demo.policy_path == SHIPPED.parent / "policy.json"
    assert demo.cwd == SHIPPED.parent
    assert settings.store.path == REPO / "data" / "approvals.db"
    assert settings.server.public_url == "http://127.0.0.1:8080"
    assert (settings.approvals.hold_seconds, settings.approvals.timeout) == (45.0, 900.0)
    assert settings.grants == ()
    assert settings.slack is None


def test_paths_are_relative_to_the_file_not_the_working_directory(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store.path, policy and cwd resolve against the config file's directory."""
    (config_dir / "servers").mkdir()
    monkeypatch.chdir("/")
    text = '[store]\npath = "state/gw.db"\n' + DEMO + 'cwd = "servers"\n'
    settings = load(config_dir, text)
    assert settings.store.path == config_dir / "state" / "gw.db"
    assert settings.upstreams["demo"].policy_path == config_dir / "policy.json"
    assert settings.upstreams["demo"].cwd == config_dir / "servers"


def test_every_error_is_reported_at_once(config_dir: Path) -> None:
    """Problems in several sections come back together, in file order, each with its path."""
    text = """
[server]
prot = 1
[approvals]
timeout = "soon"
[upstreams.demo]
command = "python -m approvals.demo_server"
policy = "missing.json"
[[grants]]
name = "agent"
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("server.prot", 'unknown setting (did you mean "port"?)'),
            ("approvals.timeout", 'must be a duration like "30s"'),
            ("upstreams.demo.command", "must be a non-empty list of strings"),
            ("upstreams.demo.policy", "must name an existing policy file"),
            ("grants[0]", 'needs exactly one of "token_env"'),
        ],
    )


def test_unknown_keys_are_named_with_a_did_you_mean_hint(config_dir: Path) -> None:
    """A misspelt key is an error naming the closest known key, at every level."""
    text = """
[server]
prot = 1
[upstreams.x]
comand = ["python"]
[[grants]]
name = "a"
token_sha = "x"
[sever]
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("sever", 'unknown setting (did you mean "server"?)'),
            ("server.prot", 'unknown setting (did you mean "port"?)'),
            ("upstreams.x.comand", 'unknown setting (did you mean "command"?)'),
            ("upstreams.x", 'needs exactly one of "command" (stdio) or "url"'),
            ("grants[0].token_sha", 'unknown setting (did you mean "token_sha256"?)'),
            ("grants[0]", 'needs exactly one of "token_env"'),
        ],
    )


def test_unknown_key_without_a_close_match_lists_the_known_ones(config_dir: Path) -> None:
    """With nothing close, the message lists what the table accepts."""
    found = issues_of(config_dir, DEMO + "[store]\nzzz = 1\n")
    assert_issues(found, [("store.zzz", "unknown setting (known: path, url)")])


def test_upstream_shape_errors(config_dir: Path) -> None:
    """command must be a list, exactly one of command/url, http(s) URLs with a valid port."""
    text = """
[upstreams.a]
command = []
[upstreams.b]
command = ["python"]
url = "http://127.0.0.1:1/mcp"
[upstreams.c]
policy = "policy.json"
[upstreams.d]
url = "ftp://example.com/mcp"
[upstreams.e]
url = "http://127.0.0.1:99999/mcp"
[upstreams.f]
command = ["python", 3]
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("upstreams.a.command", "must be a non-empty list of strings"),
            ("upstreams.b", 'needs exactly one of "command" (stdio) or "url" (Streamable HTTP)'),
            ("upstreams.c", 'needs exactly one of "command" (stdio) or "url" (Streamable HTTP)'),
            ("upstreams.d.url", "must be an http:// or https:// URL (got 'ftp://example.com/mcp')"),
            ("upstreams.e.url", "port from 0 to 65535"),
            ("upstreams.f.command", "must be a non-empty list of strings"),
        ],
    )


def test_bad_upstream_name_is_reported(config_dir: Path) -> None:
    """An upstream name becomes a URL path, so only URL-safe names are accepted."""
    text = DEMO + '[upstreams."my demo"]\ncommand = ["python"]\n'
    assert_issues(issues_of(config_dir, text), [("upstreams.my demo", "the name may use only letters")])


def test_missing_policy_file_and_directory(config_dir: Path) -> None:
    """policy must name an existing file; a directory or a missing file is reported with its path."""
    (config_dir / "policies").mkdir()
    text = """
[upstreams.a]
command = ["python"]
policy = "nope.json"
[upstreams.b]
command = ["python"]
policy = "policies"
[upstreams.c]
command = ["python"]
cwd = "nowhere"
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("upstreams.a.policy", f"there is no {config_dir / 'nope.json'}"),
            ("upstreams.b.policy", "is a directory"),
            ("upstreams.c.cwd", "must name an existing directory"),
        ],
    )


def test_settings_for_the_other_kind_of_upstream_are_reported(config_dir: Path) -> None:
    """headers only apply to url upstreams; env and cwd only to command upstreams."""
    text = """
[upstreams.a]
command = ["python"]
headers = { X-Key = "1" }
[upstreams.b]
url = "http://127.0.0.1:1/mcp"
env = { A = "1" }
cwd = "."
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("upstreams.a.headers", 'applies only to an upstream with "url"'),
            ("upstreams.b.env", 'applies only to an upstream with "command"'),
            ("upstreams.b.cwd", 'applies only to an upstream with "command"'),
        ],
    )


def test_server_and_approvals_values_are_checked(config_dir: Path) -> None:
    """Ports, durations, counts and URLs in [server] and [approvals] are validated."""
    text = (
        DEMO
        + """
[server]
port = 70000
host = ""
public_url = "127.0.0.1:8080"
session_idle = "0s"
[approvals]
hold_seconds = true
timeout = "soon"
max_pending_per_grant = 0
"""
    )
    assert_issues(
        issues_of(config_dir, text),
        [
            ("server.port", "must be an integer from 0 to 65535"),
            ("server.host", "must be a non-empty string"),
            ("server.public_url", "must be an http:// or https:// URL"),
            ("server.session_idle", "greater than 0"),
            ("approvals.hold_seconds", "must be a duration"),
            ("approvals.timeout", 'must be a duration like "30s", "15m", "2h" or "1d" (got "soon")'),
            ("approvals.max_pending_per_grant", "must be a positive integer"),
        ],
    )


def test_durations_accept_units_and_bare_seconds(config_dir: Path) -> None:
    """ "15m" and a bare number of seconds are both durations."""
    settings = load(config_dir, DEMO + '[approvals]\nhold_seconds = 30\ntimeout = "2h"\n')
    assert (settings.approvals.hold_seconds, settings.approvals.timeout) == (30.0, 7200.0)


def test_grant_token_errors(config_dir: Path) -> None:
    """Each grant needs one token source; env tokens must be set and long; digests 64 hex digits."""
    text = (
        DEMO
        + """
[[grants]]
name = "neither"
[[grants]]
name = "both"
token_env = "TOKEN_OK"
token_sha256 = "00"
[[grants]]
name = "unset"
token_env = "TOKEN_UNSET"
[[grants]]
name = "short"
token_env = "TOKEN_SHORT"
[[grants]]
name = "digest"
token_sha256 = "not-hex"
[[grants]]
token_sha256 = "%s"
"""
        % ("a" * 64)
    )
    env = {"TOKEN_OK": TOKEN, "TOKEN_SHORT": "too-short"}
    assert_issues(
        issues_of(config_dir, text, env),
        [
            ("grants[0]", 'needs exactly one of "token_env" (an environment variable) or "token_sha256"'),
            ("grants[1]", 'needs exactly one of "token_env" (an environment variable) or "token_sha256"'),
            ("grants[2].token_env", "environment variable TOKEN_UNSET is not set"),
            ("grants[3].token_env", "environment variable TOKEN_SHORT must hold at least 16 characters"),
            ("grants[4].token_sha256", "must be 64 hex digits"),
            ("grants[5].name", "is required"),
        ],
    )


def test_duplicate_names_and_shared_tokens_are_reported(config_dir: Path) -> None:
    """Names are unique per section, and no grant or reviewer shares another's token."""
    digest = sha256_hex(REVIEWER_TOKEN)
    text = (
        DEMO
        + f"""
[[grants]]
name = "agent"
token_env = "AGENT_TOKEN"
[[grants]]
name = "agent"
token_sha256 = "{"b" * 64}"
[[reviewers]]
name = "alice"
token_sha256 = "{digest}"
[[reviewers]]
name = "bob"
token_env = "BOB_TOKEN"
"""
    )
    env = {"AGENT_TOKEN": REVIEWER_TOKEN, "BOB_TOKEN": REVIEWER_TOKEN}
    assert_issues(
        issues_of(config_dir, text, env),
        [
            ("grants[1].name", '"agent" is used by an earlier entry'),
            ("reviewers[0].token_sha256", "the same token as grants[0]"),
            ("reviewers[1].token_env", "the same token as grants[0]"),
        ],
    )


def test_grant_owner_must_be_a_reviewer(config_dir: Path) -> None:
    """A misspelt owner would silently allow self-approval, so it is an error with a hint."""
    text = (
        DEMO
        + f"""
[[grants]]
name = "agent"
token_sha256 = "{sha256_hex(TOKEN)}"
owner = "alcie"
[[reviewers]]
name = "alice"
token_sha256 = "{sha256_hex(REVIEWER_TOKEN)}"
"""
    )
    assert_issues(
        issues_of(config_dir, text),
        [("grants[0].owner", 'must name a [[reviewers]] entry; "alcie" is not one (did you mean "alice"?)')],
    )


def test_slack_needs_its_secrets_from_the_environment(config_dir: Path) -> None:
    """[slack] without SLACK_BOT_TOKEN / SLACK_SIGNING_SECRET (and SLACK_APP_TOKEN for socket) fails."""
    http = DEMO + '[slack]\nchannel = "C0APPROVALS"\n'
    assert_issues(
        issues_of(config_dir, http),
        [
            ("slack", "needs the environment variable SLACK_BOT_TOKEN"),
            ("slack", "needs the environment variable SLACK_SIGNING_SECRET"),
        ],
    )
    socket = http + 'mode = "socket"\n'
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s"}
    assert_issues(
        issues_of(config_dir, socket, env), [("slack", "needs the environment variable SLACK_APP_TOKEN")]
    )
    settings = load(config_dir, socket, {**env, "SLACK_APP_TOKEN": "xapp-1"})
    assert settings.slack is not None
    assert (settings.slack.mode, settings.slack.channel, settings.slack.app_token) == (
        "socket",
        "C0APPROVALS",
        "xapp-1",
    )


def test_slack_mode_and_channel_are_checked(config_dir: Path) -> None:
    """slack.mode is "http" or "socket"; slack.channel is required."""
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s"}
    assert_issues(
        issues_of(config_dir, DEMO + '[slack]\nmode = "websocket"\n', env),
        [
            ("slack.mode", 'must be "http" or "socket"'),
            ("slack.channel", "is required"),
        ],
    )


def test_env_references_expand_in_url_and_headers(config_dir: Path) -> None:
    """${VAR} in an upstream's url and header values is replaced from the environment."""
    text = """
[upstreams.remote]
url = "http://${HOST}:3001/mcp/"
headers = { Authorization = "Bearer ${REMOTE_TOKEN}" }
"""
    settings = load(config_dir, text, {"HOST": "127.0.0.1", "REMOTE_TOKEN": "abc"})
    remote = settings.upstreams["remote"]
    assert not remote.is_stdio
    assert remote.url == "http://127.0.0.1:3001/mcp"
    assert remote.headers == {"Authorization": "Bearer abc"}


def test_unset_env_references_are_reported(config_dir: Path) -> None:
    """An unset ${VAR} is an error naming the variable, once per place, with no follow-on errors."""
    text = """
[upstreams.remote]
url = "${REMOTE_URL}"
headers = { Authorization = "Bearer ${REMOTE_TOKEN}", "Bad Name" = "x" }
"""
    assert_issues(
        issues_of(config_dir, text),
        [
            ("upstreams.remote.url", "environment variable REMOTE_URL is not set"),
            ("upstreams.remote.headers.Authorization", "environment variable REMOTE_TOKEN is not set"),
            ("upstreams.remote.headers.Bad Name", "is not a valid HTTP header name"),
        ],
    )


def test_expanded_url_is_validated(config_dir: Path) -> None:
    """The URL is checked after expansion, so a bad value in the environment is caught."""
    text = '[upstreams.remote]\nurl = "${REMOTE_URL}"\n'
    assert_issues(
        issues_of(config_dir, text, {"REMOTE_URL": "localhost:3001"}),
        [("upstreams.remote.url", "must be an http:// or https:// URL (got 'localhost:3001')")],
    )


def test_invalid_toml_names_the_line(config_dir: Path) -> None:
    """A syntax error is one issue saying the file is not valid TOML, with the line."""
    found = issues_of(config_dir, '[server]\nport = 80\nhost = "a\n')
    assert len(found) == 1
    path, message = found[0]
    assert path == ""
    assert message.startswith("not valid TOML:")
    assert "line 3" in message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file, a directory or a non-UTF-8 file is a ConfigError, not an OSError."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[server]\n")
    for path, phrase in [
        (tmp_path / "missing.toml", "cannot read the file: No such file or directory"),
        (tmp_path, "cannot read the file: Is a directory"),
        (binary, "cannot read the file: not UTF-8 text"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_settings(path, env={})
        assert error.value.source == str(path)
        assert [(i.path, phrase in i.message) for i in error.value.issues] == [("", True)], error.value


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"upstreams": 5}, [("upstreams", "must be a table of [upstreams.NAME] tables, not an integer")]),
        ({"upstreams": [{"command": ["x"]}]}, [("upstreams", "not an array")]),
        ({"upstreams": {}}, [("upstreams", "at least one upstream is required")]),
        ({"upstreams": {"demo": "python"}}, [("upstreams.demo", "must be a table")]),
        ({"upstreams": {"demo": [{"command": ["x"]}]}}, [("upstreams.demo", "not an array")]),
        ({"server": [1], "upstreams": {"d": {"command": ["x"]}}}, [("server", "must be a table ([server])")]),
        ({"store": "db", "upstreams": {"d": {"command": ["x"]}}}, [("store", "not a string")]),
        ({"approvals": 1, "upstreams": {"d": {"command": ["x"]}}}, [("approvals", "must be a table")]),
        ({"grants": ["agent"], "upstreams": {"d": {"command": ["x"]}}}, [("grants[0]", "not a string")]),
        ({"grants": {"name": "a"}, "upstreams": {"d": {"command": ["x"]}}}, [("grants", "[[grants]]")]),
        ({"reviewers": 3, "upstreams": {"d": {"command": ["x"]}}}, [("reviewers", "[[reviewers]]")]),
        ({"slack": ["C0"], "upstreams": {"d": {"command": ["x"]}}}, [("slack", "must be a table")]),
        ({"upstreams": {"d": {"url": 5}}}, [("upstreams.d.url", "must be a non-empty string")]),
        ({"upstreams": {"d": {"url": "http://h", "headers": "x"}}}, [("upstreams.d.headers", "table")]),
        ({"upstreams": {"d": {"command": ["x"], "env": {"A": 1}}}}, [("upstreams.d.env", "table")]),
        ({"upstreams": {"d": {"command": ["x"], "policy": 5}}}, [("upstreams.d.policy", "non-empty")]),
        (
            {"grants": [{"name": 5, "token_sha256": 5}], "upstreams": {"d": {"command": ["x"]}}},
            [("grants[0].name", "non-empty string"), ("grants[0].token_sha256", "non-empty string")],
        ),
    ],
)
def test_wrong_shapes_are_config_errors_not_crashes(
    data: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    """A table where a value belongs, or the reverse, is one clear issue, never another exception."""
    assert_issues(parse_issues(data), expected)


def test_public_url_comes_from_the_environment_when_set(config_dir: Path) -> None:
    """APPROVALS_PUBLIC_URL overrides [server] public_url, and is validated like it."""
    text = DEMO + '[server]\npublic_url = "http://127.0.0.1:8080"\n'
    settings = load(config_dir, text, {"APPROVALS_PUBLIC_URL": "https://gw.example.com/"})
    assert settings.server.public_url == "https://gw.example.com"
    assert_issues(
        issues_of(config_dir, text, {"APPROVALS_PUBLIC_URL": "gw.example.com"}),
        [("server.public_url", "it comes from APPROVALS_PUBLIC_URL")],
    )


def test_public_url_defaults_to_host_and_port(config_dir: Path) -> None:
    """Without public_url, links use the listen address (IPv6 in brackets)."""
    settings = load(config_dir, DEMO + '[server]\nhost = "::1"\nport = 9000\n')
    assert settings.server.public_url == "http://[::1]:9000"


def test_tokens_are_kept_only_as_sha256(config_dir: Path) -> None:
    """No raw token appears in the settings: grants and reviewers keep digests, secrets stay out of repr."""
    text = (
        DEMO
        + """
env = { EXTRA = "1" }
[upstreams.remote]
url = "http://127.0.0.1:1/mcp"
headers = { Authorization = "Bearer ${REMOTE_TOKEN}" }
[[grants]]
name = "agent"
token_env = "AGENT_TOKEN"
owner = "alice"
[[reviewers]]
name = "alice"
token_env = "ALICE_TOKEN"
[slack]
channel = "C0APPROVALS"
"""
    )
    env = {
        "AGENT_TOKEN": TOKEN,
        "ALICE_TOKEN": REVIEWER_TOKEN,
        "REMOTE_TOKEN": "remote-secret-0123456789",
        "SLACK_BOT_TOKEN": "xoxb-secret-0123456789",
        "SLACK_SIGNING_SECRET": "signing-secret-0123456789",
    }
    settings = load(config_dir, text, env)
    assert [(g.name, g.token_sha256, g.owner) for g in settings.grants] == [
        ("agent", sha256_hex(TOKEN), "alice")
    ]
    assert [(r.name, r.token_sha256) for r in settings.reviewers] == [("alice", sha256_hex(REVIEWER_TOKEN))]
    text_form = repr(settings)
    for secret in env.values():
        assert secret not in text_form


def test_stdio_upstreams_do_not_inherit_the_gateway_secrets(config_dir: Path) -> None:
    """A stdio child gets the environment minus token_env and Slack variables, plus its own env table."""
    text = (
        DEMO
        + """
env = { GREETING = "hi ${WHO}", PASSED_ON = "${SLACK_BOT_TOKEN}" }
[upstreams.plain]
command = ["python"]
[[grants]]
name = "agent"
token_env = "AGENT_TOKEN"
"""
    )
    env = {"PATH": "/usr/bin", "WHO": "you", "AGENT_TOKEN": TOKEN, "SLACK_BOT_TOKEN": "xoxb-1"}
    settings = load(config_dir, text, env)
    assert settings.upstreams["demo"].env == {
        "PATH": "/usr/bin",
        "WHO": "you",
        "GREETING": "hi you",
        "PASSED_ON": "xoxb-1",  # named explicitly in the file: passed on on purpose
    }
    assert settings.upstreams["plain"].env == {"PATH": "/usr/bin", "WHO": "you"}


def test_stdio_upstreams_inherit_the_environment_when_nothing_is_withheld(config_dir: Path) -> None:
    """With no secret in the environment and no env table, the child simply inherits (env is None)."""
    settings = load(config_dir, DEMO, {"PATH": os.defpath})
    assert settings.upstreams["demo"].env is None


def test_inbox_settings_default_to_eight_hours_and_a_per_process_key(config_dir: Path) -> None:
    """No [inbox] table: sessions slide over 8 h and no session secret is configured."""
    settings = load(config_dir, DEMO)
    assert settings.inbox.session_hours == 8.0
    assert settings.inbox.session_secret is None


def test_inbox_session_hours_and_secret_come_from_the_file_and_the_environment(config_dir: Path) -> None:
    """[inbox] session_hours is read; APPROVALS_SESSION_SECRET signs sessions and is never in repr."""
    secret = "s" * 40
    settings = load(config_dir, DEMO + "[inbox]\nsession_hours = 1.5\n", {"APPROVALS_SESSION_SECRET": secret})
    assert settings.inbox.session_hours == 1.5
    assert settings.inbox.session_secret == secret
    assert secret not in repr(settings)


def test_inbox_settings_are_checked(config_dir: Path) -> None:
    """A bad session_hours, an unknown key and a short secret are reported with their paths."""
    found = issues_of(
        config_dir,
        DEMO + '[inbox]\nsession_hours = "long"\nsesion_hours = 2\n',
        {"APPROVALS_SESSION_SECRET": "short"},
    )
    assert_issues(
        found,
        [
            ("inbox.sesion_hours", 'did you mean "session_hours"'),
            ("inbox.session_hours", "must be a number of hours"),
            ("inbox", "APPROVALS_SESSION_SECRET must hold at least 32 characters"),
        ],
    )
    assert_issues(
        issues_of(config_dir, DEMO + "[inbox]\nsession_hours = 0\n"),
        [("inbox.session_hours", "greater than 0")],
    )


def test_session_secret_is_withheld_from_stdio_upstreams(config_dir: Path) -> None:
    """APPROVALS_SESSION_SECRET could forge inbox logins: a stdio upstream never inherits it."""
    env = {"PATH": "/usr/bin", "APPROVALS_SESSION_SECRET": "s" * 40}
    settings = load(config_dir, DEMO, env)
    assert settings.upstreams["demo"].env == {"PATH": "/usr/bin"}


def test_store_url_selects_postgresql_and_the_environment_wins(config_dir: Path) -> None:
    """[store] url (with ${ENV}) names a PostgreSQL database; APPROVALS_DATABASE_URL overrides it;
    neither reaches a stdio upstream's environment."""
    text = DEMO + '[store]\nurl = "postgresql://gw:${DB_PASSWORD}@db.internal/approvals"\n'
    settings = load(config_dir, text, env={"DB_PASSWORD": "s3cret"})
    assert settings.store.url == "postgresql://gw:s3cret@db.internal/approvals"
    env = {"APPROVALS_DATABASE_URL": "postgresql://other/approvals", "DB_PASSWORD": "x"}
    overridden = load(config_dir, text, env=env)
    assert overridden.store.url == "postgresql://other/approvals"
    child = overridden.upstreams["demo"].env or {}
    assert "APPROVALS_DATABASE_URL" not in child
    assert load(config_dir, DEMO).store.url is None


def test_store_url_must_be_postgresql(config_dir: Path) -> None:
    """Any other scheme is an error at store.url (or at the variable that gave it)."""
    found = issues_of(config_dir, DEMO + '[store]\nurl = "mysql://db/approvals"\n')
    assert [path for path, _ in found] == ["store.url"]
    found = issues_of(config_dir, DEMO, env={"APPROVALS_DATABASE_URL": "sqlite:///x.db"})
    assert [path for path, _ in found] == ["APPROVALS_DATABASE_URL"]


def test_workers_and_internal_url_are_read_and_checked(config_dir: Path) -> None:
    """[server] workers is a count from 1 to 256; internal_url is plain http://HOST:PORT and needs
    a PostgreSQL store (it routes sessions between replicas sharing one)."""
    text = DEMO + '[server]\nworkers = 4\ninternal_url = "http://10.0.0.5:9080/"\n'
    settings = load(config_dir, text, {"APPROVALS_DATABASE_URL": "postgresql://db/approvals"})
    assert (settings.server.workers, settings.server.internal_url) == (4, "http://10.0.0.5:9080")
    assert (load(config_dir, DEMO).server.workers, load(config_dir, DEMO).server.internal_url) == (1, None)
    bad = DEMO + '[server]\nworkers = 0\ninternal_url = "https://10.0.0.5:9080/x"\n'
    assert_issues(
        issues_of(config_dir, bad, {"APPROVALS_DATABASE_URL": "postgresql://db/approvals"}),
        [
            ("server.workers", "must be an integer from 1 to 256"),
            ("server.internal_url", "must be http://HOST:PORT, with no path"),
        ],
    )
    assert_issues(
        issues_of(config_dir, DEMO + '[server]\ninternal_url = "http://127.0.0.1"\nworkers = true\n'),
        [
            ("server.workers", "must be an integer from 1 to 256"),
            ("server.internal_url", "must be http://HOST:PORT"),
        ],
    )
    assert_issues(
        issues_of(config_dir, DEMO + '[server]\ninternal_url = "http://127.0.0.1:0"\nworkers = 2\n'),
        [
            ("server.workers", "more than 1 needs a PostgreSQL store"),
            ("server.internal_url", "needs a PostgreSQL store"),
        ],
    )


def test_audit_webhook_needs_an_http_url_and_a_signing_key(config_dir: Path) -> None:
    """[audit] webhook_url is http(s); its key comes from the variable webhook_secret_env names
    (APPROVALS_AUDIT_WEBHOOK_SECRET by default), 32 characters at least, and is withheld from stdio
    upstreams like the gateway's other secrets."""
    key = "k" * 32
    assert load(config_dir, DEMO).audit.webhook_url is None
    text = DEMO + '[audit]\nwebhook_url = "https://siem.example/hook"\nwebhook_secret_env = "SIEM_KEY"\n'
    settings = load(config_dir, text, {"SIEM_KEY": key})
    assert (settings.audit.webhook_url, settings.audit.webhook_secret) == ("https://siem.example/hook", key)
    assert "SIEM_KEY" not in repr(settings.audit)
    demo = settings.upstreams["demo"]
    assert demo.env is None or "SIEM_KEY" not in demo.env
    default = DEMO + '[audit]\nwebhook_url = "http://127.0.0.1:9/hook"\n'
    assert load(config_dir, default, {"APPROVALS_AUDIT_WEBHOOK_SECRET": key}).audit.webhook_secret == key
    assert_issues(
        issues_of(config_dir, DEMO + '[audit]\nwebhook_url = "ftp://x"\n'),
        [("audit.webhook_url", "must be an http:// or https:// URL")],
    )
    assert_issues(
        issues_of(config_dir, default, {"APPROVALS_AUDIT_WEBHOOK_SECRET": "short"}),
        [("audit.webhook_secret_env", "APPROVALS_AUDIT_WEBHOOK_SECRET must hold the webhook's signing key")],
    )


def test_metrics_token_comes_from_the_environment_and_is_kept_as_its_sha256(config_dir: Path) -> None:
    """/metrics is off without a token; on with the one [metrics] token_env names (by default
    APPROVALS_METRICS_TOKEN), kept only as its sha256 and withheld from stdio upstreams."""
    token = "metrics-token-0123456789abcdef"
    assert load(config_dir, DEMO).metrics.token_sha256 is None
    by_default = load(config_dir, DEMO, {"APPROVALS_METRICS_TOKEN": token, "PATH": "/usr/bin"})
    assert by_default.metrics.token_sha256 == sha256_hex(token)
    assert by_default.upstreams["demo"].env == {"PATH": "/usr/bin"}
    named = load(config_dir, DEMO + '[metrics]\ntoken_env = "PROM_TOKEN"\n', {"PROM_TOKEN": token, "X": "1"})
    assert named.metrics.token_sha256 == sha256_hex(token)
    assert named.upstreams["demo"].env == {"X": "1"}
    assert token not in repr(named)


def test_metrics_table_without_a_usable_token_is_an_error(config_dir: Path) -> None:
    """Asking for metrics ([metrics]) with the variable unset or too short is reported, not ignored."""
    assert_issues(
        issues_of(config_dir, DEMO + "[metrics]\n"),
        [("metrics", "APPROVALS_METRICS_TOKEN must hold the token")],
    )
    assert_issues(
        issues_of(config_dir, DEMO + '[metrics]\ntoken_env = "PROM_TOKEN"\n', {"PROM_TOKEN": "short"}),
        [("metrics.token_env", "at least 16 characters")],
    )
    assert_issues(
        issues_of(config_dir, DEMO + '[metrics]\ntoken = "x"\n'),
        [("metrics.token", "unknown setting"), ("metrics", "APPROVALS_METRICS_TOKEN")],
    )


def test_log_format_is_json_or_text(config_dir: Path) -> None:
    """[server] log_format: "json" or "text"; unset (None) lets `serve` choose by the terminal."""
    assert load(config_dir, DEMO).server.log_format is None
    assert load(config_dir, DEMO + '[server]\nlog_format = "json"\n').server.log_format == "json"
    assert_issues(
        issues_of(config_dir, DEMO + '[server]\nlog_format = "xml"\n'),
        [("server.log_format", "must be one of json, text")],
    )
