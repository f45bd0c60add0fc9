"""The reviewers' web inbox (being written)."""

from __future__ import annotations

from aiohttp import web

from approvals.config import Settings
from approvals.gatekeeper import Gatekeeper


def setup(app: web.Application, settings: Settings, gatekeeper: Gatekeeper) -> None:
    """Mount /inbox and register the inbox's live-feed channel."""
