"""Releasing a call to an upstream tool that must run as a task (MCP 2025-11-25 tasks), pure.

A tool whose definition says ``execution.taskSupport: "required"`` refuses a plain ``tools/call``:
the release sends it with ``params.task``, reads the ``CreateTaskResult`` and follows the task with
``tasks/result``. What the agent keeps is what a plain call would have returned: the tool's result
(without the upstream's task id, which means nothing to the agent), or the JSON-RPC error.

A tool that merely offers tasks ("optional") is called plainly: a plain call is always valid for
it, and whether the upstream declares ``tasks.requests.tools.call`` (without which a client must
not ask for a task) is not known where the release runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from approvals.jsonrpc import INTERNAL_ERROR, JsonObject, error_response

__all__ = [
    "TASK_STATUSES",
    "as_plain_response",
    "follow_params",
    "needs_task",
    "read_created",
    "task_params",
]

RELATED_TASK = "io.modelcontextprotocol/related-task"
TASK_STATUSES = frozenset({"working", "input_required", "completed", "failed", "cancelled"})


def needs_task(definition: Mapping[str, object] | None) -> bool:
    """Whether the upstream refuses this tool unless it is called as a task."""
    execution = definition.get("execution") if definition is not None else None
    return isinstance(execution, Mapping) and execution.get("taskSupport") == "required"


def task_params(params: JsonObject, ttl_seconds: float) -> JsonObject:
    """``tools/call`` params asking for a task kept at least as long as the release follows it."""
    return {**params, "task": {"ttl": max(1, math.ceil(ttl_seconds * 1000))}}


def follow_params(task_id: str) -> JsonObject:
    """Params of ``tasks/result`` and ``tasks/cancel`` for the upstream's task."""
    return {"taskId": task_id}


def read_created(upstream: str, response: JsonObject) -> str | JsonObject:
    """The upstream task's id to follow, or the final response when there is no task to follow.

    The final response is the upstream's own when it refused the call (a JSON-RPC error) or
    answered it at once (a CallToolResult); a malformed answer becomes a JSON-RPC error saying
    what is wrong and where, so that the release ends ``failed`` rather than crashing.
    """
    if "error" in response:
        return response
    result = response.get("result")
    if not isinstance(result, dict):
        return _invalid(upstream, "result", "is not an object")
    if "task" not in result:
        if isinstance(result.get("content"), list):
            return response  # the upstream ran the call without a task: that is its answer
        return _invalid(upstream, "result.task", "is missing")
    task = result["task"]
    if not isinstance(task, dict):
        return _invalid(upstream, "result.task", "is not an object")
    task_id = task.get("taskId")
    if not isinstance(task_id, str) or not task_id:
        return _invalid(upstream, "result.task.taskId", "is missing or not a non-empty string")
    if task.get("status") not in TASK_STATUSES:
        return _invalid(upstream, "result.task.status", f"is not one of {sorted(TASK_STATUSES)}")
    return task_id


def as_plain_response(response: JsonObject, task_id: str) -> JsonObject:
    """The ``tasks/result`` answer as a plain ``tools/call`` would have given it: the upstream's
    related-task marker is dropped (the agent never saw that task), all else is kept untouched."""
    result = response.get("result")
    if not isinstance(result, dict) or not isinstance(meta := result.get("_meta"), dict):
        return response
    if not isinstance(related := meta.get(RELATED_TASK), dict) or related.get("taskId") != task_id:
        return response
    rest = {k: v for k, v in meta.items() if k != RELATED_TASK}
    plain = {k: v for k, v in result.items() if k != "_meta"}
    return {**response, "result": {**plain, "_meta": rest} if rest else plain}


def _invalid(upstream: str, where: str, what: str) -> JsonObject:
    message = (
        f"upstream {upstream} answered the task-augmented tools/call with an invalid CreateTaskResult: "
        f"{where} {what}; the call was not sent again"
    )
    return error_response(None, INTERNAL_ERROR, message)
