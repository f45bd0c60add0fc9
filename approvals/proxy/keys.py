"""Typed keys for what the proxy's handlers find on the application (no module globals)."""

from __future__ import annotations

from aiohttp import web

from approvals.auth import TokenIndex
from approvals.proxy.gate import Gate
from approvals.proxy.gateway import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
GATE = web.AppKey("gate", Gate)
GRANTS = web.AppKey("grants", TokenIndex)
