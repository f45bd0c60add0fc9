"""Typed keys for what the application holds (no module globals)."""

from __future__ import annotations

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.proxy.gateway import Gateway
from approvals.store.sqlite import SqliteStore

SETTINGS = web.AppKey("settings", Settings)
GATEWAY = web.AppKey("gateway", Gateway)
GRANTS = web.AppKey("grants", TokenIndex)
STORE = web.AppKey("store", SqliteStore)
