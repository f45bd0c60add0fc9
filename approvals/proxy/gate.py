"""The seam where policy meets the proxy: every `tools/call` is admitted here, every tool list filtered.

The proxy knows nothing of policies or limits; it asks a `Gate`. `AllowAll` is the gate of a
gateway without policies (and of the proxy's own tests).
"""

from __future__ import annotations

from typing import Any, Protocol

from approvals.core.model import FORWARD, Admission, ToolCall
from approvals.jsonrpc import JsonObject


class Gate(Protocol):
    async def admit(self, call: ToolCall) -> Admission: ...

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        """The tools a client may see in `tools/list` (hidden ones removed)."""
        ...

    def health(self) -> dict[str, Any]:
        """Problems to show on /healthz (empty when all is well)."""
        ...


class AllowAll:
    """Forwards every call and shows every tool."""

    def health(self) -> dict[str, Any]:
        return {}

    async def admit(self, call: ToolCall) -> Admission:
        return FORWARD

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        return tools
