"""The gateway's parts, opened fully started in one step and closed in one: the composition root.

    Runtime.open(settings) ─▶ policies (ConfigError before anything starts)
                            ─▶ store ─▶ change feed ─▶ gateway (upstream sessions, the UpstreamCaller)
                            ─▶ rate limits (in process; on PostgreSQL shared by every replica)
                            ─▶ tool catalog ─▶ approval service ─▶ gate
                            ─▶ audit webhook sink (only when a webhook is given)
    Runtime.close()        ─▶ the same, in reverse

Nothing here is ever None but the optional audit sink: every part exists once `open` returns, and
the web side and channels are handed the parts they use (the service, the store as a port, the
feed), never the runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from approvals.audit_sink import AuditSink, WebhookTarget
from approvals.config import Settings
from approvals.core.feed import SharedFeed
from approvals.core.ports import Store
from approvals.core.service import ApprovalService
from approvals.gatekeeper import Gatekeeper
from approvals.gateway_secret import gateway_secret
from approvals.limits import RateLimiter
from approvals.policy import Limit
from approvals.policy_files import WATCH_INTERVAL_SECONDS, PolicyBook
from approvals.proxy.gateway import Gateway
from approvals.shared_limits import SharedRateLimiter
from approvals.store.postgres import PostgresStore
from approvals.store.postgres_feed import PostgresFeed
from approvals.store.postgres_quota import PostgresQuota
from approvals.store.sqlite import SqliteStore
from approvals.store.sqlite_feed import POLL_SECONDS, SqliteFeed
from approvals.tool_catalog import ToolCatalog

__all__ = ["Runtime", "open_limiter", "open_store"]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Every long-lived part of one gateway process."""

    settings: Settings
    policies: PolicyBook
    store: Store
    feed: SharedFeed
    gateway: Gateway
    limiter: RateLimiter | SharedRateLimiter
    catalog: ToolCatalog
    service: ApprovalService
    gatekeeper: Gatekeeper
    secret: str | None  # the replicas' shared secret (approvals.gateway_secret); None: random per process
    audit_sink: AuditSink | None = None

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        watch_interval: float = WATCH_INTERVAL_SECONDS,
        poll_interval: float = POLL_SECONDS,
        audit_webhook: WebhookTarget | None = None,
    ) -> Runtime:
        """Every part, started; raises ConfigError (an invalid policy) before anything starts.

        ``audit_webhook``: where to copy the audit log as it grows (``[audit] webhook_url``); none
        by default.
        """
        policies = PolicyBook.load(settings)
        store, feed = await open_store(settings, poll_interval)
        try:
            secret = await gateway_secret(settings, store)
        except BaseException:
            await feed.aclose()
            await store.close()
            raise
        gateway = Gateway(settings, secret=secret)
        await gateway.start()
        limiter = open_limiter(store, clock)
        await limiter.start()
        catalog = ToolCatalog(gateway)

        def limits_for(upstream: str, tool: str, arguments: Mapping[str, object]) -> Sequence[Limit]:
            # Limits at release come from the policy in force then: an edit applies to what waits.
            return policies[upstream].evaluate(tool, arguments).limits

        service = await ApprovalService.open(
            settings,
            store=store,
            counters=limiter,
            upstreams=gateway,
            catalog=catalog,
            feed=feed,
            limits_for=limits_for,
            clock=clock,
            judge=lambda upstream, tool, arguments: policies[upstream].evaluate(tool, arguments),
        )
        policies.start(watch_interval)
        gatekeeper = Gatekeeper(policies, limiter, catalog, service, clock)
        sink = None
        if audit_webhook is not None:
            sink = AuditSink(store, audit_webhook, feed=feed, clock=clock, owner=service.owner)
            sink.start()
        return cls(
            settings,
            policies,
            store,
            feed,
            gateway,
            limiter,
            catalog,
            service,
            gatekeeper,
            secret,
            audit_sink=sink,
        )

    def drain(self) -> None:
        """First step of shutdown: held calls answer now, idle streams end."""
        self.gateway.drain()

    async def close(self) -> None:
        if self.audit_sink is not None:
            await self.audit_sink.close()
        await self.policies.close()
        await self.service.close()
        await self.gateway.close()
        await self.feed.aclose()
        await self.limiter.close()
        await self.store.close()


async def open_store(settings: Settings, poll_interval: float = POLL_SECONDS) -> tuple[Store, SharedFeed]:
    """PostgreSQL when `[store] url` (or APPROVALS_DATABASE_URL) names one; else the SQLite file."""
    if settings.store.url is not None:
        postgres = await PostgresStore.open(settings.store.url)
        try:
            return postgres, await PostgresFeed.open(postgres)
        except BaseException:
            await postgres.close()
            raise
    sqlite = await SqliteStore.open(settings.store.path)
    return sqlite, await SqliteFeed.open(sqlite, poll_interval)


def open_limiter(store: Store, clock: Callable[[], float] = time.time) -> RateLimiter | SharedRateLimiter:
    """Rate limits counted in the shared database when it is PostgreSQL (several replicas, one
    count: exact over all of them); else in this process, written behind to the store."""
    if isinstance(store, PostgresStore):
        return SharedRateLimiter(PostgresQuota(store.pool), clock=clock)
    return RateLimiter(store, clock=clock)
