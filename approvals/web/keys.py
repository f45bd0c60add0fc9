"""Typed keys for what the web side finds on the application (no module globals).

The proxy's own keys (GATEWAY, GATE, GRANTS) are in `approvals.proxy.keys`.
"""

from __future__ import annotations

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.config import Settings
from approvals.core.service import ApprovalService
from approvals.gatekeeper import Gatekeeper

SETTINGS = web.AppKey("settings", Settings)
GATEKEEPER = web.AppKey("gatekeeper", Gatekeeper)
SERVICE = web.AppKey("service", ApprovalService)
REVIEWERS = web.AppKey("reviewers", TokenIndex)
