"""Slack: approval requests posted with Approve / Deny buttons (being written)."""

from __future__ import annotations

from aiohttp import web

from approvals.config import Settings
from approvals.gatekeeper import Gatekeeper


def setup(app: web.Application, settings: Settings, gatekeeper: Gatekeeper) -> None:
    """Mount POST /slack/events (or start Socket Mode) and register the Slack channel."""
