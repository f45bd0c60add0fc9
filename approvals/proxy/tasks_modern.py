"""Tasks for 2026-07-28 clients: the `io.modelcontextprotocol/tasks` extension (stub, being built).

`stateless.py` calls into this module at four points: `advertise` (the `server/discover`
capabilities), `task_problem` / `wants_task` (a `tools/call` that asks for a task) and `create`
(answer a held call with a task at once), and `handle` (the extension's own methods).
"""

from __future__ import annotations

from aiohttp import web

from approvals.config import Principal
from approvals.core.model import Hold
from approvals.jsonrpc import JsonObject, Message

# The extension's methods that this module answers (routed here before anything else).
METHODS: frozenset[str] = frozenset()


def advertise(capabilities: JsonObject) -> JsonObject:
    """The `server/discover` capabilities with the extension added (unchanged while a stub)."""
    return capabilities


def task_problem(message: Message) -> str | None:
    """What is wrong with a task request on `tools/call`, if anything."""
    return None


def wants_task(message: Message) -> bool:
    """Whether a `tools/call` asks to run as a task."""
    return False


async def create(
    request: web.Request, grant: Principal, upstream: str, message: Message, hold: Hold
) -> web.StreamResponse:
    """Answer a held call with its task at once (the approval's id is the task's)."""
    raise NotImplementedError


async def handle(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """One of the extension's methods (`METHODS`)."""
    raise NotImplementedError
