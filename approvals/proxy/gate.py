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


class Hold(Protocol):
    """A call waiting for a reviewer. The proxy keeps the client's request open on an SSE stream
    while it waits, for at most the configured hold time."""

    approval_id: str

    async def wait(self, timeout: float) -> JsonObject | None:
        """The call's outcome as a JSON-RPC response without its id (`result` or `error`), or None
        if it is not decided within `timeout` seconds."""
        ...

    def status(self, now: float) -> str:
        """One line for progress notifications: "Waiting for approval 7f3c… — expires in 9 min"."""
        ...

    def pending_result(self, now: float) -> JsonObject:
        """The tool result to answer with when the hold runs out before a decision."""
        ...

    def delivered(self) -> None:
        """The outcome reached the client; a kept result is not handed out again."""

    async def cancel(self, reason: str) -> None:
        """The client cancelled the request (or its session ended) while it was held."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The gate's answer: forward the call, answer the agent with `answer`, or `hold` it.

    `on_result` is told the upstream's final response (or a transport error in JSON-RPC form) of
    a forwarded call, so that counters can be rolled back when the upstream fails the call.
    """

    answer: JsonObject | None = None
    on_result: Callable[[JsonObject], None] | None = None
    hold: Hold | None = None


FORWARD = Admission()


class UpstreamCaller(Protocol):
    """How the gate reaches an upstream itself: one request, its JSON-RPC response."""

    async def call(
        self, upstream: str, method: str, params: JsonObject, *, prefer_session: str | None = None
    ) -> JsonObject: ...


class Gate(Protocol):
    async def start(self, store: Store, upstreams: UpstreamCaller) -> None: ...

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

    async def start(self, store: Store, upstreams: UpstreamCaller) -> None:
        pass

    async def close(self) -> None:
        pass

    def health(self) -> dict[str, Any]:
        return {}

    async def admit(self, call: ToolCall) -> Admission:
        return FORWARD

    def visible_tools(self, upstream: str, tools: list[JsonObject]) -> list[JsonObject]:
        return tools
