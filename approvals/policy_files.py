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

from approvals.config import Settings, no_group_message
from approvals.core import render
from approvals.core.review import ReviewRule, eligible_groups
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


def read_checked_policy(settings: Settings, path: Path) -> Policy:
    """`read_policy`, then its approval rules checked against the config's reviewers
    (`review_issues`); `ConfigError` names the file and every problem."""
    policy = read_policy(path)
    if issues := review_issues(settings, policy):
        raise ConfigError(str(path), issues)
    return policy


def review_issues(settings: Settings, policy: Policy) -> list[Issue]:
    """What makes a policy's approval rules impossible to satisfy with this config's reviewers.

    Every group a rule names (``reviewers``, ``from``, ``escalate[].to``) must be a group of some
    ``[[reviewers]]`` entry, and enough reviewers must be eligible to meet the ``quorum``: else
    every call under the rule waits until it times out. With no ``[[reviewers]]``, ``approvals
    serve`` makes one development reviewer, in no group, and it is counted as such.
    """
    groups = frozenset(g for reviewer in settings.reviewers for g in reviewer.groups)
    # An owner never approves their own agent's calls: when one reviewer owns every agent, they
    # never count. (With agents of several owners, each is left out only of their agent's calls.)
    owners = {grant.owner for grant in settings.grants}
    owner = next(iter(owners)) if len(owners) == 1 else None
    issues: list[Issue] = []
    for path, rule in policy.reviews():
        named = [(f"{path}.reviewers[{i}]", g) for i, g in enumerate(rule.reviewers)]
        named += [(f"{path}.from[{i}]", g) for i, g in enumerate(rule.from_groups)]
        for s, step in enumerate(rule.escalate):
            named += [(f"{path}.escalate[{s}].to[{i}]", g) for i, g in enumerate(step.to)]
        missing = [Issue(where, no_group_message(g, groups)) for where, g in named if g not in groups]
        issues += missing
        if not missing:  # a missing group already says why nobody may decide
            issues += _quorum_issues(settings, path, rule, owner)
        issues += _timing_issues(settings, path, rule)
    return issues


def _quorum_issues(settings: Settings, path: str, rule: ReviewRule, owner: str | None) -> list[Issue]:
    allowed = eligible_groups(rule, len(rule.escalate))  # escalation adds deciders, in the end
    if not settings.reviewers:
        count = 1 if allowed is None else 0  # the development reviewer, in no group
        why = " (no [[reviewers]] are configured: `approvals serve` makes one development reviewer)"
    else:
        count = sum(
            1
            for r in settings.reviewers
            if r.name != owner and (allowed is None or not allowed.isdisjoint(r.groups))
        )
        mine = owner is not None and any(r.name == owner for r in settings.reviewers)
        why = f" ({owner} owns every agent, and an owner never approves their agent's calls)" if mine else ""
    if count >= rule.quorum:
        return []
    noun = "reviewer" if count == 1 else "reviewers"
    message = f"{rule.quorum} approvals needed but only {count} {noun} may decide{why}"
    return [Issue(f"{path}.quorum", message)]


def _timing_issues(settings: Settings, path: str, rule: ReviewRule) -> list[Issue]:
    """Steps the request is over before (a rule's own timeout is checked with the policy), and
    a `via` no configured channel can take."""
    issues: list[Issue] = []
    if rule.timeout is None:
        default = settings.approvals.timeout
        for s, step in enumerate(rule.escalate):
            if step.after >= default:
                issues.append(
                    Issue(
                        f"{path}.escalate[{s}].after",
                        f"must be shorter than the approval timeout ({render.duration(default)},"
                        " [approvals] timeout in the config); or give the rule a longer timeout",
                    )
                )
    if rule.via and set(rule.via) <= {"slack"} and settings.slack is None:
        issues.append(Issue(f"{path}.via", "decisions only through Slack, but the config has no [slack]"))
    return issues


def check_policies(settings: Settings) -> dict[str, Policy]:
    """Every upstream's policy; one `ConfigError` listing the problems of every file."""
    policies: dict[str, Policy] = {}
    issues: list[Issue] = []
    for name, upstream in settings.upstreams.items():
        if upstream.policy_path is None:
            policies[name] = ALLOW_ALL
            continue
        try:
            policies[name] = read_checked_policy(settings, upstream.policy_path)
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
                self.policies[name] = read_checked_policy(self.settings, path)
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
