"""The bounds on sessions, backlogs, reads and holds: defaults, values, and path-named errors."""

from __future__ import annotations

from pathlib import Path

from approvals.config import ApprovalSettings, ServerSettings
from tests.test_config import DEMO, assert_issues, config_dir, issues_of, load

__all__ = ["config_dir"]  # the fixture, used by name below


def test_bounds_have_defaults(config_dir: Path) -> None:
    """A file that names no bound gets every default."""
    settings = load(config_dir, DEMO)
    assert settings.server.max_sessions == ServerSettings().max_sessions == 256
    assert settings.server.max_sessions_per_grant == 16
    assert settings.server.abandoned_session_idle_seconds == 120.0
    assert settings.server.read_timeout_seconds == 30.0
    assert settings.server.max_backlog_bytes == 4 * 1024 * 1024
    assert settings.approvals.max_holds_per_approval == ApprovalSettings().max_holds_per_approval == 16


def test_bounds_are_read_from_the_file(config_dir: Path) -> None:
    """Each bound is read from [server] / [approvals], durations in the usual forms."""
    text = """
[server]
max_sessions = 40
max_sessions_per_grant = 4
abandoned_session_idle = "30s"
read_timeout = 5
max_backlog_bytes = 65536
[approvals]
max_holds_per_approval = 3
"""
    settings = load(config_dir, text + DEMO)
    assert settings.server.max_sessions == 40
    assert settings.server.max_sessions_per_grant == 4
    assert settings.server.abandoned_session_idle_seconds == 30.0
    assert settings.server.read_timeout_seconds == 5.0
    assert settings.server.max_backlog_bytes == 65536
    assert settings.approvals.max_holds_per_approval == 3


def test_bad_bounds_are_reported_with_their_paths(config_dir: Path) -> None:
    """Zero, negative, non-integer or non-duration bounds are each an issue at their path."""
    text = """
[server]
max_sessions = 0
max_sessions_per_grant = -1
abandoned_session_idle = "soon"
read_timeout = 0
max_backlog_bytes = 1.5
[approvals]
max_holds_per_approval = true
"""
    assert_issues(
        issues_of(config_dir, text + DEMO),
        [
            ("server.abandoned_session_idle", "duration"),
            ("server.max_sessions", "positive integer"),
            ("server.max_sessions_per_grant", "positive integer"),
            ("server.read_timeout", ""),
            ("server.max_backlog_bytes", "positive integer"),
            ("approvals.max_holds_per_approval", "positive integer"),
        ],
    )
