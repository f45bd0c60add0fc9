"""Policy files on disk: loaded per upstream at start, watched, and swapped atomically when edited.

A reload that fails validation keeps the policy in force and records the errors (logged, and
shown by `/healthz`); a good one replaces it in one assignment. A call holds on to the `Policy`
object it was admitted with, so calls in flight finish under the policy they started with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from approvals.config import Settings
from approvals.errors import ConfigError, Issue
from approvals.policy import Policy, PolicyError, load_policy

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 1.0
# What an upstream without a `policy` file gets: everything allowed, as the operator chose.
ALLOW_ALL = load_policy('{"version": "1", "default": "allow"}', "(no policy file)")


def read_policy(path: Path) -> Policy:
    """Load one policy file; `ConfigError` names the file and every problem in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [Issue("", f"cannot read the file: {exc.strerror or exc}")]) from None
    try:
        # No source: the ConfigError names the file, so a file-wide issue (bad JSON) has no path.
        return load_policy(text, source="")
    except PolicyError as exc:
        raise ConfigError(str(path), exc.errors) from None


def check_policies(settings: Settings) -> dict[str, Policy]:
    """Every upstream's policy; one `ConfigError` listing the problems of every file."""
    policies: dict[str, Policy] = {}
    issues: list[Issue] = []
    for name, upstream in settings.upstreams.items():
        if upstream.policy_path is None:
            policies[name] = ALLOW_ALL
            continue
        try:
            policies[name] = read_policy(upstream.policy_path)
        except ConfigError as exc:
            issues += [
                Issue(f"{exc.source}: {i.path}" if i.path else exc.source, i.message) for i in exc.issues
            ]
    if issues:
        raise ConfigError("policy files", issues)
    return policies


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@dataclass
class PolicyBook:
    """The policy in force for each upstream, and what went wrong with the last reload of each."""

    settings: Settings
    policies: dict[str, Policy]
    errors: dict[str, list[str]] = field(default_factory=dict)
    generation: int = 0  # bumped on every reload attempt, so tests can wait for one
    # Reloads per upstream, good and refused (read by the metrics at a scrape).
    reloads: collections.Counter[str] = field(default_factory=collections.Counter)
    reload_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    _stamps: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    _changed: asyncio.Condition | None = None
    _task: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, settings: Settings) -> PolicyBook:
        book = cls(settings, check_policies(settings))
        book._stamps = {name: _stamp(path) for name, path in book._paths().items()}
        return book

    def _paths(self) -> Mapping[str, Path]:
        return {n: u.policy_path for n, u in self.settings.upstreams.items() if u.policy_path is not None}

    def __getitem__(self, upstream: str) -> Policy:
        return self.policies[upstream]

    def reload(self, only_changed: bool = False) -> None:
        """Re-read the policy files (all, or those whose file changed); keep the old one when invalid."""
        for name, path in self._paths().items():
            stamp = _stamp(path)
            if only_changed and stamp == self._stamps.get(name):
                continue
            self._stamps[name] = stamp
            try:
                self.policies[name] = read_policy(path)
            except ConfigError as exc:
                self.errors[name] = [str(issue) for issue in exc.issues]
                self.reload_failures[name] += 1
                log.error("policy for upstream %s not reloaded, the old one stays in force:\n%s", name, exc)
            else:
                self.errors.pop(name, None)
                self.reloads[name] += 1
                log.info("policy for upstream %s reloaded from %s", name, path)
        self.generation += 1
        if self._changed is not None:
            self._changed.notify_all()

    async def wait_reloaded(self, after: int) -> None:
        """Wait until a reload attempt later than generation `after` has happened."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > after)

    async def reload_async(self, only_changed: bool = False) -> None:
        assert self._changed is not None
        async with self._changed:
            self.reload(only_changed)

    def start(self, interval: float = WATCH_INTERVAL_SECONDS) -> None:
        """Watch the files for edits (mtime and size), reloading the ones that changed."""
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._watch(interval), name="policy-watch")

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if any(_stamp(p) != self._stamps.get(n) for n, p in self._paths().items()):
                await self.reload_async(only_changed=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
