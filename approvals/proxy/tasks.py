"""MCP Tasks (2025-11-25 `tasks` capability) for held calls: the approval is the task.

A client that sends `tools/call` with `params.task` for a call the policy holds is answered at
once with a task whose id is the approval's id, instead of a request held open on SSE: however long
the reviewer takes, no request meets the client's timeout. The task's state is the approval's:

    pending · approved · released  → working
    completed · denied · expired   → completed  (denied / expired: the isError result of a held call)
    failed                         → failed when the upstream answered a JSON-RPC error, else completed
    cancelled                      → cancelled

`tasks/get`, `tasks/result`, `tasks/cancel` and `tasks/list` on an approval of the calling grant
are answered here; a task id that is not one (the upstream's own tasks, or another grant's
approval) goes to the upstream, which answers for its own tasks — another grant's approval is never
shown. A decision reaches the session as `notifications/tasks/status` on its stream.

The task an approval is (`task_base`, `kept_ms`) and the taskId check are shared with
`tasks_modern.py`, which serves the same tasks to 2026-07-28 clients.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from aiohttp import web

from approvals.core import render
from approvals.core.model import FINAL, Approval, Hold
from approvals.core.service import KEEP_RESULT_SECONDS, ApprovalService
from approvals.gatekeeper import Gatekeeper
from approvals.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    JsonObject,
    Message,
    encode,
    error_response,
    result_response,
)
from approvals.outcomes import final_outcome, waiting_status
from approvals.proxy.gate import Gate
from approvals.proxy.keys import GATEWAY
from approvals.proxy.session import Session
from approvals.web.keys import SERVICE

__all__ = [
    "METHODS",
    "POLL_INTERVAL_MS",
    "RELATED_TASK",
    "advertise",
    "as_object",
    "bad_task_id",
    "create",
    "handle",
    "kept_ms",
    "mark_tools",
    "not_ours",
    "task_base",
    "task_of",
    "task_problem",
    "wants_task",
]

log = logging.getLogger(__name__)

METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})
RELATED_TASK = "io.modelcontextprotocol/related-task"
POLL_INTERVAL_MS = 1000  # what clients are asked to poll at; a decision also comes as a notification
PAGE_SIZE = 50
MAX_TASK_ID_CHARS = 256
CAPABILITY: JsonObject = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
_WORKING = frozenset({"pending", "approved", "released"})
Transform = Callable[[JsonObject], JsonObject]


# ---- what the client sent -------------------------------------------------------------------


def wants_task(params: JsonObject) -> bool:
    return "task" in params


def task_problem(params: JsonObject) -> str | None:
    """What is wrong with a `tools/call`'s `params.task`, or None (absent or well formed)."""
    if "task" not in params:
        return None
    task = params["task"]
    if not isinstance(task, dict):
        return 'the "task" of tools/call must be an object, such as {"ttl": 60000}'
    ttl = task.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        return 'the "task.ttl" of tools/call must be a number of milliseconds, 0 or more'
    return None


def bad_task_id(method: str | None, params: JsonObject) -> str | None:
    """What is wrong with the `taskId` of a tasks/* request (both eras), or None."""
    task_id = params.get("taskId")
    if not isinstance(task_id, str) or not task_id:
        return f'{method} needs "taskId", a non-empty string'
    if len(task_id) > MAX_TASK_ID_CHARS:
        return f'"taskId" is longer than {MAX_TASK_ID_CHARS} characters'
    return None


def _task_id(message: Message) -> str | JsonObject:
    """The `taskId` of a tasks/* request, or the error response saying what is wrong with it."""
    assert message.id is not None
    if (problem := bad_task_id(message.method, message.params)) is not None:
        return error_response(message.id, INVALID_PARAMS, problem)
    task_id: str = message.params["taskId"]
    return task_id


# ---- the task an approval is ----------------------------------------------------------------


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def _status(approval: Approval) -> str:
    if approval.status in _WORKING:
        return "working"
    if approval.status == "cancelled":
        return "cancelled"
    return "failed" if "error" in final_outcome(approval) else "completed"


def _message(approval: Approval, now: float) -> str:
    if approval.status == "pending":
        who = f"a reviewer other than {render.visible(approval.owner)}" if approval.owner else "a reviewer"
        left = render.expires_in(approval.expires_at, now)
        return (
            f"Waiting for {who} to approve {render.visible(approval.tool)} (approval {approval.id}); "
            f"expires {left} if nobody decides"
        )
    if approval.status in _WORKING:
        return waiting_status(approval, now)
    if approval.status == "expired" and not approval.decided_by:
        return "Expired without a decision; the call was not made"
    if approval.status == "cancelled":
        return "Cancelled; the call was not made"
    done = render.outcome(approval)
    return render.decision_text(approval) + (f"; {done}" if done else "")


def task_base(approval: Approval, now: float) -> JsonObject:
    """The fields of the task `approval` is that both eras name alike (2026-07-28 renames the rest)."""
    updated = max(
        t for t in (approval.created_at, approval.decided_at, approval.released_at, approval.finished_at) if t
    )
    return {
        "taskId": approval.id,
        "status": _status(approval),
        "statusMessage": _message(approval, now),
        "createdAt": _iso(approval.created_at),
        "lastUpdatedAt": _iso(updated),
    }


def kept_ms(approval: Approval) -> int:
    """How long the task is kept from its creation, in ms: until its deadline, then its result's time."""
    return int((approval.expires_at - approval.created_at + KEEP_RESULT_SECONDS) * 1000)


def task_of(approval: Approval, now: float) -> JsonObject:
    """The MCP Task that `approval` is, as 2025-11-25's `tasks/get` returns it."""
    return {**task_base(approval, now), "ttl": kept_ms(approval), "pollInterval": POLL_INTERVAL_MS}


# ---- initialize and tools/list ----------------------------------------------------------------


def advertise(answer: JsonObject) -> JsonObject:
    """The initialize answer with `capabilities.tasks` merged into the upstream's own."""
    result = answer.get("result")
    capabilities = result.get("capabilities") if isinstance(result, dict) else None
    if not isinstance(result, dict) or not isinstance(capabilities, dict):
        return answer
    theirs = as_object(capabilities.get("tasks"))
    requests = as_object(theirs.get("requests"))
    tools = as_object(requests.get("tools"))
    tasks = {
        **theirs,
        "list": {},
        "cancel": {},
        "requests": {**requests, "tools": {**tools, "call": {}}},
    }
    return {**answer, "result": {**result, "capabilities": {**capabilities, "tasks": tasks}}}


def as_object(value: object) -> JsonObject:
    """`value` if it is a JSON object, else an empty one (for reading optional nested fields)."""
    return value if isinstance(value, dict) else {}


def mark_tools(gate: Gate, upstream: str, inner: Transform) -> Transform:
    """`inner`, then `execution.taskSupport: "optional"` on every tool whose calls may be held.

    An upstream's own "required" is kept (such a tool is only ever called as a task).
    """

    def mark(answer: JsonObject) -> JsonObject:
        answer = inner(answer)
        result = answer.get("result")
        if not isinstance(gate, Gatekeeper) or not isinstance(result, dict):
            return answer
        tools = result.get("tools")
        if not isinstance(tools, list):
            return answer
        policy = gate.policies[upstream]
        marked = [
            _optional(t)
            if isinstance(t, dict) and isinstance(t.get("name"), str) and policy.may_need_approval(t["name"])
            else t
            for t in tools
        ]
        return {**answer, "result": {**result, "tools": marked}}

    return mark


def _optional(tool: JsonObject) -> JsonObject:
    execution = tool.get("execution")
    execution = execution if isinstance(execution, dict) else {}
    if execution.get("taskSupport") == "required":
        return tool
    return {**tool, "execution": {**execution, "taskSupport": "optional"}}


# ---- a held call becomes a task ---------------------------------------------------------------


async def create(request: web.Request, session: Session, message: Message, hold: Hold) -> web.Response:
    """Answer a held, task-augmented call with its task at once; follow it for the status notice."""
    assert message.id is not None
    service = request.app[SERVICE]
    try:
        approval = await service.get(hold.approval_id)
    except BaseException:
        hold.close()
        raise
    if approval is None:  # the record is durable before a hold is handed out: not expected
        hold.close()
        return _json(error_response(message.id, INTERNAL_ERROR, "the approval for this call was not found"))
    name = f"task-status:{approval.id}"
    if approval.status in FINAL or any(t.get_name() == name for t in session.task_watchers):
        hold.close()  # ended already, or this session already follows it (a repeat call)
    else:
        task = asyncio.create_task(_notify_when_final(service, session, hold, approval), name=name)
        session.task_watchers.add(task)
        task.add_done_callback(session.task_watchers.discard)
    return _json(result_response(message.id, {"task": task_of(approval, service.clock())}))


async def _notify_when_final(
    service: ApprovalService, session: Session, hold: Hold, approval: Approval
) -> None:
    """Tell the session when its task ends (a decision, an expiry, the upstream's answer)."""
    try:
        # Bounded: an approval expires by its deadline; a released call ends within its call timeout.
        timeout = (
            approval.expires_at - service.clock() + service.settings.upstreams[approval.upstream].call_timeout
        )
        if await hold.wait(max(timeout, 1.0) + 60.0) is None or session.closed_reason is not None:
            return
        final = await service.get(approval.id)
        if final is not None:
            params = task_of(final, service.clock())
            session.divert({"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": params})
    finally:
        hold.close()


# ---- tasks/* ----------------------------------------------------------------------------------


async def handle(request: web.Request, session: Session, message: Message) -> web.Response | None:
    """Answer a tasks/* request on one of this grant's approvals; None when the task is not ours."""
    assert message.id is not None
    service = request.app[SERVICE]
    if message.method == "tasks/list":
        return _json(await _list(service, session, message))
    task_id = _task_id(message)
    if isinstance(task_id, dict):
        return _json(task_id)
    approval = await service.get(task_id)
    if approval is None or approval.grant != session.grant or approval.upstream != session.upstream_name:
        return None  # the upstream's own task, or nobody's: the upstream answers
    if message.method == "tasks/get":
        return _json(result_response(message.id, task_of(approval, service.clock())))
    if message.method == "tasks/cancel":
        return _json(await _cancel(service, approval, message.id))
    hold_seconds = request.app[GATEWAY].settings.approvals.hold_seconds
    return _json(await _result(service, approval, message.id, hold_seconds))


def not_ours(message: Message) -> Transform:
    """For a tasks/* request the upstream answers: "no such method" there means no such task."""
    assert message.id is not None
    request_id = message.id

    def translate(answer: JsonObject) -> JsonObject:
        error = answer.get("error")
        if isinstance(error, dict) and error.get("code") == METHOD_NOT_FOUND:
            task_id = message.params.get("taskId")
            return error_response(request_id, INVALID_PARAMS, f"no task {task_id!r} for this client")
        return answer

    return translate


async def _list(service: ApprovalService, session: Session, message: Message) -> JsonObject:
    assert message.id is not None
    cursor = message.params.get("cursor")
    if cursor is None:
        offset = 0
    elif isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) < 10:
        offset = int(cursor)
    else:
        return error_response(message.id, INVALID_PARAMS, '"cursor" is not one this server gave out')
    page = await service.list_approvals(
        grant=session.grant, upstream=session.upstream_name, limit=PAGE_SIZE + 1, offset=offset
    )
    now = service.clock()
    result: JsonObject = {"tasks": [task_of(a, now) for a in page[:PAGE_SIZE]]}
    if len(page) > PAGE_SIZE:
        result["nextCursor"] = str(offset + PAGE_SIZE)
    return result_response(message.id, result)


async def _cancel(service: ApprovalService, approval: Approval, request_id: str | int) -> JsonObject:
    if approval.status != "pending":
        why = (
            "it has already ended"
            if approval.status in FINAL
            else "a reviewer approved it: the call is being made"
        )
        return error_response(
            request_id, INVALID_PARAMS, f"task {approval.id} cannot be cancelled: {why} ({approval.status})"
        )
    await service.cancel(approval.id, "the client cancelled the task")
    current = await service.get(approval.id)
    assert current is not None
    return result_response(request_id, task_of(current, service.clock()))


async def _result(
    service: ApprovalService, approval: Approval, request_id: str | int, wait_seconds: float
) -> JsonObject:
    """What the call answered (the tool's result or the JSON-RPC error), once the task has ended.

    Follows the approval on the change feed for at most `wait_seconds`; a client that gets the
    "not finished yet" error asks again.
    """
    hold = service.follow(approval)
    try:
        outcome = await hold.wait(wait_seconds)  # at once when it has already ended
    finally:
        hold.close()
    if outcome is None:
        return error_response(
            request_id,
            INVALID_PARAMS,
            f"task {approval.id} is still working after {render.duration(wait_seconds)}; "
            "ask for its result again",
        )
    if "error" not in outcome and _cancelled(outcome):
        return error_response(
            request_id, INVALID_PARAMS, f"task {approval.id} was cancelled: it has no result"
        )
    service.delivered(approval.id)
    return _related({"jsonrpc": "2.0", "id": request_id, **outcome}, approval.id)


def _cancelled(outcome: JsonObject) -> bool:
    result = outcome.get("result")
    meta = result.get("_meta") if isinstance(result, dict) else None
    ours = meta.get("approvals") if isinstance(meta, dict) else None
    return isinstance(ours, dict) and ours.get("code") == "approval_cancelled"


def _related(response: JsonObject, task_id: str) -> JsonObject:
    result = response.get("result")
    if not isinstance(result, dict):
        return response
    meta = as_object(result.get("_meta"))
    return {**response, "result": {**result, "_meta": {**meta, RELATED_TASK: {"taskId": task_id}}}}


def _json(body: JsonObject) -> web.Response:
    return web.Response(body=encode(body), content_type="application/json")
