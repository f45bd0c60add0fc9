"""Initialize-era sessions live in one process: requests for them are routed to their owner
(being built).

`create_app` calls `install` once the runtime is open, before the application starts.
"""

from __future__ import annotations

from aiohttp import web

from approvals.runtime import Runtime


def install(app: web.Application, runtime: Runtime) -> None:
    """Add session routing to `app` when the gateway runs as several replicas (nothing yet)."""
