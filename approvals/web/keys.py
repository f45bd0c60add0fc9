"""Typed keys for what the application holds (no module globals)."""

from __future__ import annotations

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.gatekeeper import Gatekeeper
from approvals.proxy.gateway import Gateway

SETTINGS = web.AppKey("settings", Settings)
GATEWAY = web.AppKey("gateway", Gateway)
GRANTS = web.AppKey("grants", TokenIndex)
GATEKEEPER = web.AppKey("gatekeeper", Gatekeeper)
REVIEWERS = web.AppKey("reviewers", TokenIndex)
