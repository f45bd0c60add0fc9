"""The seam where policy meets the proxy: every `tools/call` is admitted here, every tool list filtered.

The proxy knows nothing of policies or limits; it asks a `Gate`. `AllowAll` is the gate of a
gateway without policies (and of the proxy's own tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from approvals.jsonrpc import JsonObject
from approvals.store import Store


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A `tools/call` as the gate sees it: who asks, where, for what."""

    upstream: str
    grant: str
    session: str
    tool: str
    arguments: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Admission:
    """The gate's answer: forward the call (`answer is None`), or answer the agent with `answer`.

    `on_result` is told the upstream's final response (or a transport error in JSON-RPC form) of
    a forwarded call, so that counters can be rolled back when the upstream fails the call.
    """

    answer: JsonObject | None = None
    on_result: Callable[[JsonObject], None] | None = None


FORWARD = Admission()


class Gate(Protocol):
    async def start(self, store: Store) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, call: ToolCall) -> Admission: ...

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        """The tools a client may see in `tools/list` (hidden ones removed)."""
        ...

    def health(self) -> dict[str, Any]:
        """Problems to show on /healthz (empty when all is well)."""
        ...


class AllowAll:
    """Forwards every call and shows every tool."""

    async def start(self, store: Store) -> None:
        pass

    async def close(self) -> None:
        pass

    def health(self) -> dict[str, Any]:
        return {}

    async def admit(self, call: ToolCall) -> Admission:
        return FORWARD

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        return tools
