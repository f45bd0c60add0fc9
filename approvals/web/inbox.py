"""The reviewers' web inbox: server-rendered pages (jinja2, autoescaped), a little plain JavaScript.

    GET  /inbox                          pending approvals, newest first; ?upstream=&tool=&agent=;
                                         each with its quorum progress, escalation, read-only reason
    GET  /inbox/pending/events           the list's live feed (server-sent events), same filters
    POST /inbox/batch                    several selected requests approved or denied, each on its own
    GET  /inbox/events?id=               one approval's live feed (its page)
    GET  /inbox/approvals/{id}           one approval in full, with why it was held and its review;
                                         POST …/approve (optional `arguments`: edit before approve;
                                         `remember`=preview|confirm: a standing grant), …/deny (reason)
    GET  /inbox/grants                   standing grants; POST …/{id}/revoke; GET …/{id}/export (policy rule)
    GET  /inbox/history                  decided approvals; .csv and .json export the same search
    GET  /inbox/stats                    the reviewer dashboard (?days=7|30): figures and SVG charts
    GET  /inbox/login, POST /inbox/login a reviewer's token → a session cookie; POST /inbox/logout
    GET  /inbox/login/link?t=…           a one-time link from `approvals login-link REVIEWER`
    GET  /inbox/static/…                 inbox.css, inbox.js, stats.css, pending.*, review.*

Modules: inbox_auth (sessions, CSRF, Origin), inbox_state (what replicas share: used links, ended
sessions, the key), inbox_login (login, links, logout), inbox_views (the request page and decisions),
inbox_list (the pending list), inbox_batch (batch decisions), inbox_review and inbox_review_forms
(why, the review, edits and remember forms), inbox_grants (standing grants),
inbox_viewed (the `viewed` event), inbox_history (history and exports), inbox_dashboard (the
dashboard's page and its bounded reads), inbox_stats and inbox_charts (its figures and charts,
pure), inbox_format (what is shown, pure), live (the live feed channel). Every /inbox response
carries a strict Content-Security-Policy (no inline script or style) and the other security
headers; see inbox_views.security_headers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jinja2
from aiohttp import web

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.core.service import ApprovalService
from approvals.web import (
    inbox_batch,
    inbox_charts,
    inbox_dashboard,
    inbox_grants,
    inbox_history,
    inbox_list,
    inbox_login,
    inbox_views,
)
from approvals.web import inbox_format as fmt
from approvals.web.inbox_auth import InboxAuth
from approvals.web.inbox_state import InboxState, InboxStateStore
from approvals.web.inbox_viewed import ViewLog
from approvals.web.live import LiveFeed

HERE = Path(__file__).parent


def templates() -> jinja2.Environment:
    """The inbox's templates, autoescaped; the formatting helpers are their filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name: nothing from data is ever markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        visible=fmt.visible,
        segments=fmt.segments,
        is_long=fmt.is_long,
        fold_label=fmt.fold_label,
        iso=fmt.iso,
        iso_machine=fmt.iso_machine,
        pretty_json=fmt.pretty_json,
        json_tokens=fmt.json_tokens,
        percent=inbox_charts.percent,
        seconds=inbox_charts.seconds,
    )
    return env


async def open_auth(
    settings: Settings, store: object, secret: str | None, clock: Callable[[], float]
) -> InboxAuth:
    """The inbox's logins over the gateway's store, signed with the gateway's `secret`, and the
    state every replica shares (kept fresh until `auth.state.close()`). Raises StoreError when the
    store cannot be read."""
    if not isinstance(store, InboxStateStore):
        raise TypeError(f"{type(store).__name__} does not keep the inbox's login links and sessions")
    state = await InboxState.open(store, clock)
    return InboxAuth(settings.reviewers, secret, settings.inbox.session_hours, state)


def setup(app: web.Application, settings: Settings, service: ApprovalService, auth: InboxAuth) -> LiveFeed:
    """Mount /inbox; the inbox's live feed is returned, to be told of every change."""
    feed = LiveFeed()
    app[inbox_views.INBOX] = inbox_views.Inbox(
        settings=settings,
        service=service,
        auth=auth,
        feed=feed,
        templates=templates(),
        reviewers=TokenIndex(settings.reviewers),
        grants=TokenIndex(settings.grants),
        views=ViewLog(service.store),
    )
    app.on_response_prepare.append(inbox_views.on_prepare)
    app.on_shutdown.append(feed.close)
    add = app.router
    add.add_get("/inbox", inbox_list.pending_page)
    add.add_get("/inbox/pending/events", inbox_list.events)
    add.add_get("/inbox/events", inbox_views.events)
    add.add_get("/inbox/login", inbox_login.login_page)
    add.add_post("/inbox/login", inbox_login.login)
    add.add_get("/inbox/login/link", inbox_login.link_page)
    add.add_post("/inbox/login/link", inbox_login.link_login)
    add.add_post("/inbox/logout", inbox_login.logout)
    add.add_get("/inbox/approvals/{id}", inbox_views.detail)
    add.add_post("/inbox/approvals/{id}/approve", inbox_views.approve)
    add.add_post("/inbox/approvals/{id}/deny", inbox_views.deny)
    add.add_post("/inbox/batch", inbox_batch.batch)
    add.add_get("/inbox/grants", inbox_grants.grants_page)
    add.add_post("/inbox/grants/{id}/revoke", inbox_grants.revoke)
    add.add_get("/inbox/grants/{id}/export", inbox_grants.export)
    add.add_get("/inbox/history", inbox_history.history)
    add.add_get("/inbox/history.csv", inbox_history.history_csv)
    add.add_get("/inbox/history.json", inbox_history.history_json)
    add.add_get("/inbox/stats", inbox_dashboard.stats_page)
    add.add_static("/inbox/static", HERE / "static", append_version=False)
    return feed
