"""Prometheus metrics of one gateway process, served at `/metrics` to the bearer of `[metrics]`'s token.

    each tools/call, as the gatekeeper judges it ──▶ approvals_calls_total{upstream,tool,outcome}
    a forwarded call's answer, a release         ──▶ approvals_upstream_call_seconds, …_errors_total
    the change feed (what this process did)      ──▶ decisions, final states, request → decision
    a held call answered with its outcome        ──▶ decision → agent
    each scrape                                  ──▶ pending now (the store), held connections,
                                                     sessions, upstream processes, policy reloads

The registry is the application's own, not prometheus_client's global one, so two gateways in one
process (the tests) count apart. Counters of decisions and final states take only the changes
made in this process (`Change.here`): summed over replicas they count each approval once.
`approvals_pending` is read from the shared store, so every replica reports the same queue (take
`max`, not `sum`, over replicas).

The per-call cost is an increment and an observation on labelled children kept after their
first use (about 2 µs in all, against some 300 µs of the gateway's CPU per call). Label values
are bounded: upstreams come from the config, outcomes are fixed, and a tool is named only when
its upstream listed it or the policy names it exactly; any other name a client sends is counted
as "other", so a client cannot create series at will.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from approvals.auth import bearer_token
from approvals.config import sha256_hex
from approvals.core.model import FINAL
from approvals.core.ports import ApprovalStore, Change, ChangeFeed

if TYPE_CHECKING:
    from approvals.policy_files import PolicyBook
    from approvals.proxy.gateway import Gateway

__all__ = ["METRICS", "OTHER_TOOL", "Metrics", "Outcome", "serve_metrics"]

log = logging.getLogger(__name__)

Outcome = Literal["allowed", "denied", "rate_limited", "held", "invalid"]
OTHER_TOOL = "other"
MAX_TOOLS_PER_UPSTREAM = 1_000  # an upstream listing more names than this is not believed for labels
MAX_PENDING_COUNTED = 10_000  # pending now is read up to this many per upstream at a scrape
REMEMBERED = 10_000  # decisions (and early deliveries) kept to join into decision → agent
# Seconds: a person deciding (request → decision) and the gateway telling the agent (decision → agent).
HUMAN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
MACHINE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_T = TypeVar("_T")


class Metrics:
    """Every metric of one gateway. The gatekeeper, the gateway and held calls report to it;
    `follow` counts the change feed; `attach_sources` names what a scrape reads."""

    def __init__(self, token_sha256: str, clock: Callable[[], float] = time.time) -> None:
        self.token_sha256 = token_sha256  # of the bearer token a scrape must carry
        self.clock = clock
        self.registry = r = CollectorRegistry()
        self.calls = Counter(
            "approvals_calls",
            "tools/call requests judged, by outcome",
            ["upstream", "tool", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "approvals_decisions",
            "Reviewer decisions made in this process",
            ["upstream", "decision"],
            registry=r,
        )
        self.final = Counter(
            "approvals_final",
            "Approvals that reached a final state in this process",
            ["upstream", "state"],
            registry=r,
        )
        self.request_to_decision = Histogram(
            "approvals_request_to_decision_seconds",
            "From a held call's request to a reviewer's decision",
            ["upstream", "decision"],
            buckets=HUMAN_BUCKETS,
            registry=r,
        )
        self.decision_to_agent = Histogram(
            "approvals_decision_to_agent_seconds",
            "From a reviewer's decision to the held agent receiving the outcome",
            ["upstream"],
            buckets=MACHINE_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "approvals_upstream_call_seconds",
            "tools/call round trips to the upstream (forwarded and released calls)",
            ["upstream"],
            buckets=MACHINE_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "approvals_upstream_errors",
            "tools/call answered with a JSON-RPC error or not at all",
            ["upstream"],
            registry=r,
        )
        self.store_write_seconds = Histogram(
            "approvals_store_write_seconds",
            "Durable writes to the store, as a store that reports its writes tells them",
            ["operation"],
            buckets=MACHINE_BUCKETS,
            registry=r,
        )
        # The labelled children of the per-call metrics, kept: `labels()` costs more than the update.
        self._call_children: dict[tuple[str, str, str], Counter] = {}
        self._upstream_children: dict[str, tuple[Histogram, Counter]] = {}
        self._listed: dict[str, frozenset[str]] = {}
        # approval id → (upstream, decided_at) of recent decisions, and → delivered time of held
        # calls answered before this process heard of the decision: whichever comes second observes.
        self._decided: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._early: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._scraped = _ScrapeTime()
        r.register(self._scraped)

    # ---- per call ----------------------------------------------------------------------------

    def count_call(self, upstream: str, tool: str, outcome: Outcome, rule: str) -> None:
        """One judged call. `rule` is the policy key that matched (an exact key names the tool)."""
        child = self._call_children.get((upstream, tool, outcome))
        if child is None:
            known = tool == rule or tool in self._listed.get(upstream, ())
            key = (upstream, tool if known else OTHER_TOOL, outcome)
            child = self._call_children.get(key)
            if child is None:
                child = self._call_children[key] = self.calls.labels(*key)
        child.inc()

    def listed(self, upstream: str, names: Iterable[str]) -> None:
        """The tool names an upstream listed (they may appear as `tool` labels from now on)."""
        known = self._listed.get(upstream, frozenset())
        fresh = [n for n in names if n not in known]
        if fresh and len(known) < MAX_TOOLS_PER_UPSTREAM:
            self._listed[upstream] = known | frozenset(fresh[: MAX_TOOLS_PER_UPSTREAM - len(known)])

    def upstream_call(self, upstream: str, seconds: float, failed: bool) -> None:
        """A tools/call round trip to `upstream` (failed: a JSON-RPC error, the transport's too)."""
        children = self._upstream_children.get(upstream)
        if children is None:
            children = (self.upstream_seconds.labels(upstream), self.upstream_errors.labels(upstream))
            self._upstream_children[upstream] = children
        children[0].observe(seconds)
        if failed:
            children[1].inc()

    def store_write(self, operation: str, seconds: float) -> None:
        """A durable write that took `seconds` (for a store that reports its writes)."""
        self.store_write_seconds.labels(operation).observe(seconds)

    # ---- approvals ---------------------------------------------------------------------------

    def changed(self, change: Change) -> None:
        """One change from the feed."""
        approval = change.approval
        if change.event in ("approved", "denied") and approval.decided_at is not None:
            self._remember(self._decided, approval.id, (approval.upstream, approval.decided_at))
            if (delivered := self._early.pop(approval.id, None)) is not None:
                self._to_agent(approval.upstream, delivered - approval.decided_at)
            if change.here:
                self.decisions.labels(approval.upstream, change.event).inc()
                seconds = approval.decided_at - approval.created_at
                self.request_to_decision.labels(approval.upstream, change.event).observe(max(seconds, 0.0))
        if change.here and approval.status in FINAL:
            self.final.labels(approval.upstream, approval.status).inc()

    def answered(self, approval_id: str) -> None:
        """A held call received its approval's outcome (decision → agent, if a reviewer decided)."""
        now = self.clock()
        decided = self._decided.pop(approval_id, None)
        if decided is None:
            self._remember(self._early, approval_id, now)  # the feed has not told us yet
        else:
            self._to_agent(decided[0], now - decided[1])

    def _to_agent(self, upstream: str, seconds: float) -> None:
        self.decision_to_agent.labels(upstream).observe(max(seconds, 0.0))

    @staticmethod
    def _remember(kept: collections.OrderedDict[str, _T], key: str, value: _T) -> None:
        kept[key] = value
        if len(kept) > REMEMBERED:
            kept.popitem(last=False)

    async def follow(self, feed: ChangeFeed) -> None:
        """Count every change on the feed (a task of its own, until cancelled)."""
        while True:
            listener = feed.listen()
            try:
                async for change in listener:
                    self.changed(change)
            finally:
                listener.close()
            log.warning("metrics fell behind the change feed; counting on from now")

    # ---- scrape ------------------------------------------------------------------------------

    def attach_sources(self, store: ApprovalStore, gateway: Gateway, policies: PolicyBook) -> None:
        """Where the values read at scrape time come from."""
        self._scraped.sources = (store, gateway, policies)

    async def exposition(self) -> bytes:
        """The text format of every metric, the store's values read now."""
        await self._scraped.refresh()
        return generate_latest(self.registry)


class _ScrapeTime(Collector):
    """Gauges whose value is read at the scrape: pending approvals (from the store, refreshed by
    `refresh` since reading it is async), held connections, sessions, upstream processes, reloads."""

    def __init__(self) -> None:
        self.sources: tuple[ApprovalStore, Gateway, PolicyBook] | None = None
        self.pending: Mapping[str, int] = {}

    async def refresh(self) -> None:
        if self.sources is None:
            return
        store, gateway, _ = self.sources
        pending: dict[str, int] = {}
        for upstream in gateway.settings.upstreams:
            found = await store.list_approvals(status="pending", upstream=upstream, limit=MAX_PENDING_COUNTED)
            pending[upstream] = len(found)
        self.pending = pending

    def describe(self) -> Iterable[Metric]:
        return []  # values only exist at a scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        if self.sources is None:
            return
        _, gateway, policies = self.sources
        pending = GaugeMetricFamily(
            "approvals_pending", "Approvals waiting for a decision now", labels=["upstream"]
        )
        for upstream, count in sorted(self.pending.items()):
            pending.add_metric([upstream], count)
        yield pending
        yield GaugeMetricFamily(
            "approvals_held_connections",
            "tools/call held open for a decision now",
            value=gateway.holds.total(),
        )
        yield GaugeMetricFamily(
            "approvals_sessions", "MCP client sessions open now", value=len(gateway.sessions)
        )
        yield GaugeMetricFamily(
            "approvals_upstream_processes",
            "stdio upstream processes running now",
            value=gateway.upstream_processes(),
        )
        reloads = CounterMetricFamily(
            "approvals_policy_reloads", "Policy file reloads", labels=["upstream", "result"]
        )
        for upstream in sorted(gateway.settings.upstreams):
            reloads.add_metric([upstream, "ok"], policies.reloads[upstream])
            reloads.add_metric([upstream, "failed"], policies.reload_failures[upstream])
        yield reloads


METRICS = web.AppKey("metrics", Metrics)  # only on an application with metrics on


async def serve_metrics(request: web.Request) -> web.StreamResponse:
    """GET /metrics: 404 when no token is configured (off), 401 without the right bearer token."""
    metrics = request.app.get(METRICS)
    if metrics is None:
        return web.json_response(
            {"error": "/metrics is off: set [metrics] token_env (APPROVALS_METRICS_TOKEN) to turn it on"},
            status=404,
        )
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not hmac.compare_digest(sha256_hex(token), metrics.token_sha256):
        return web.json_response(
            {"error": "/metrics needs Authorization: Bearer <the [metrics] token>"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="approvals-metrics"'},
        )
    body = await metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
