"""Tasks for 2026-07-28 clients (the `io.modelcontextprotocol/tasks` extension): the approval is the task.

A 2026-07-28 client that declares the extension in a `tools/call`'s
`_meta["io.modelcontextprotocol/clientCapabilities"].extensions` lets the server decide whether the
call runs as a task. The gateway decides so for exactly the calls the policy holds: the answer is at
once a `CreateTaskResult` (`resultType: "task"`, flat) whose `taskId` is the approval's id, read
back from the store, so it is durable before the client sees it. Allowed calls run as they always
do, and a client that does not declare the extension keeps the hold-then-call-again behaviour.

The task's state is the approval's, mapped as in `tasks.py` (2025-11-25), which this module shares
its pieces with (`task_base`, `kept_ms`, `bad_task_id`). What 2026-07-28 changes:

- `tasks/get` returns the DetailedTask: `completed` inlines `result` — exactly what `tools/call`
  would have answered (`resultType: "complete"`), an isError result for a denial or an expiry —
  and `failed` inlines the upstream's JSON-RPC `error`. There is no `tasks/result` and no
  `tasks/list` (both -32601, answered by `stateless.py` as methods it does not serve).
- `tasks/cancel` answers an empty `{resultType: "complete"}` ack, also for a task that has ended
  or that a reviewer approved (the call is then being made: the next `tasks/get` shows it);
  only a pending approval is withdrawn.
- `tasks/update` is acked: these tasks never ask for input.
- `ttlMs` and `pollIntervalMs` replace `ttl` and `pollInterval`.
- A tasks/* request names its task in the `Mcp-Name` header (-32020 if it disagrees with
  `params.taskId`) and must itself declare the extension (-32021 otherwise).

Nothing here is kept in a process: every request reads the approval from the store, so any
process on the shared store answers any task. Status notifications (`notifications/tasks`, sent
on `subscriptions/listen` streams) are not sent yet: clients poll at `pollIntervalMs`.
"""

from __future__ import annotations

import logging

from aiohttp import web

from approvals.config import Principal
from approvals.core.model import Approval, Hold
from approvals.core.service import ApprovalService
from approvals.errors import StoreError
from approvals.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, JsonObject, Message, result_response
from approvals.outcomes import final_outcome
from approvals.proxy import handlers, stateless
from approvals.proxy.tasks import (
    POLL_INTERVAL_MS,
    RELATED_TASK,
    as_object,
    bad_task_id,
    kept_ms,
    task_base,
)
from approvals.web.keys import SERVICE

__all__ = [
    "EXTENSION",
    "METHODS",
    "advertise",
    "answer",
    "create",
    "detailed_task",
    "handle",
    "no_such_task",
    "task_problem",
    "wants_task",
]

log = logging.getLogger(__name__)

EXTENSION = "io.modelcontextprotocol/tasks"
# The extension's methods that this module answers (routed here before anything else).
METHODS: frozenset[str] = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
_ACK: JsonObject = {"resultType": "complete"}


# ---- server/discover ---------------------------------------------------------------------------


def advertise(capabilities: JsonObject) -> JsonObject:
    """The `server/discover` capabilities with the extension under `extensions` (its value is `{}`)."""
    extensions = as_object(capabilities.get("extensions"))
    return {**capabilities, "extensions": {**extensions, EXTENSION: {}}}


# ---- what the client declared --------------------------------------------------------------------


def _declared(message: Message) -> object:
    """The request's `extensions` of its client capabilities, as sent (None if absent)."""
    meta = as_object(message.params.get("_meta"))
    return as_object(meta.get(stateless.CLIENT_CAPABILITIES_KEY)).get("extensions")


def task_problem(message: Message) -> str | None:
    """What is wrong with how a `tools/call` declares the extension, if anything.

    A 2025-11-25 `params.task` is tolerated and ignored (2026-07-28 tasks are the server's choice).
    """
    extensions = _declared(message)
    where = f"params._meta[{stateless.CLIENT_CAPABILITIES_KEY!r}].extensions"
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        return f"{where} must be an object"
    if EXTENSION in extensions and not isinstance(extensions[EXTENSION], dict):
        return f'{where}["{EXTENSION}"] must be an object ({{}})'
    return None


def wants_task(message: Message) -> bool:
    """Whether a request declares the extension, so a held `tools/call` may be answered with a task."""
    extensions = _declared(message)
    return isinstance(extensions, dict) and isinstance(extensions.get(EXTENSION), dict)


# ---- the task an approval is ------------------------------------------------------------------


def _task(approval: Approval, now: float) -> JsonObject:
    return {**task_base(approval, now), "ttlMs": kept_ms(approval), "pollIntervalMs": POLL_INTERVAL_MS}


def detailed_task(approval: Approval, now: float) -> JsonObject:
    """`tasks/get`'s answer: the task, with its result (completed) or its error (failed) inlined."""
    task = _task(approval, now)
    if task["status"] in ("completed", "failed"):
        outcome = final_outcome(approval)
        if task["status"] == "completed":
            task["result"] = _inlined(as_object(outcome.get("result")))
        else:
            task["error"] = _error(outcome.get("error"))
    return {**task, "resultType": "complete"}


def _inlined(result: JsonObject) -> JsonObject:
    """The call's result as `tools/call` gives it; a related-task key has no place here (the task
    id is the DetailedTask's own), so one an upstream's own task left is dropped."""
    meta = as_object(result.get("_meta"))
    if RELATED_TASK in meta:
        rest = {k: v for k, v in meta.items() if k != RELATED_TASK}
        result = {k: v for k, v in result.items() if k != "_meta"} | ({"_meta": rest} if rest else {})
    return stateless.complete(result, "tools/call")


def _error(error: object) -> JsonObject:
    """The upstream's JSON-RPC error, in the shape the spec's `Error` has (a malformed one is replaced)."""
    given = as_object(error)
    code, message = given.get("code"), given.get("message")
    if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
        return {k: v for k, v in given.items() if k in ("code", "message", "data")}
    return {"code": INTERNAL_ERROR, "message": "the upstream answered the call with a malformed error"}


# ---- a held call becomes a task -----------------------------------------------------------------


async def create(
    request: web.Request, grant: Principal, upstream: str, message: Message, hold: Hold
) -> web.StreamResponse:
    """Answer a held call with its task at once (the approval's id is the task's).

    The approval is read back from the store, so the task is durable before the client learns of
    it: a `tasks/get` to any process finds it. Nothing follows it here: every poll reads the store.
    """
    assert message.id is not None
    service = request.app[SERVICE]
    try:
        approval = await service.get(hold.approval_id)
    except StoreError as exc:  # the approval is durable: the client may still find it by tools/call
        return _store_failed(message, exc)
    finally:
        hold.close()
    if approval is None:  # the record is durable before a hold is handed out: not expected
        return stateless.error(message.id, INTERNAL_ERROR, "the approval for this call was not found")
    created = {**_task(approval, service.clock()), "resultType": "task"}
    return handlers.json_message(result_response(message.id, created))


# ---- tasks/get, tasks/update, tasks/cancel -------------------------------------------------------


async def handle(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """One of the extension's methods (`METHODS`); a task that is not one of this grant's approvals
    is no task at all (-32602)."""
    answered = await answer(request, grant, upstream, message)
    return answered if answered is not None else no_such_task(message)


def no_such_task(message: Message) -> web.Response:
    """-32602 for a task id this client has no task by (another grant's approval shows nothing)."""
    assert message.id is not None
    task_id = message.params.get("taskId")
    return stateless.error(message.id, INVALID_PARAMS, f"no task {task_id!r} for this client")


async def answer(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse | None:
    """One of the extension's methods, answered here; None when its task id is not one of this
    grant's approvals on this upstream (an upstream that serves the extension itself may know it:
    pass the request on to it, else answer `no_such_task`)."""
    assert message.id is not None
    if (problem := bad_task_id(message.method, message.params)) is not None:
        return stateless.error(message.id, INVALID_PARAMS, problem)
    task_id: str = message.params["taskId"]
    named = stateless.decode_header_value(request.headers.get(stateless.NAME_HEADER))
    if named != task_id:
        return stateless.error(
            message.id,
            stateless.HEADER_MISMATCH,
            f"the {stateless.NAME_HEADER} header ({named!r}) must be the task's id, params.taskId",
        )
    if (declared_badly := task_problem(message)) is not None:
        return stateless.error(message.id, INVALID_PARAMS, declared_badly)
    if not wants_task(message):
        return stateless.error(
            message.id,
            stateless.MISSING_REQUIRED_CLIENT_CAPABILITY,
            f"{message.method} needs the {EXTENSION} extension declared in "
            f"params._meta[{stateless.CLIENT_CAPABILITIES_KEY!r}].extensions",
            {"requiredCapabilities": {"extensions": {EXTENSION: {}}}},
        )
    if message.method == "tasks/update" and not isinstance(message.params.get("inputResponses"), dict):
        return stateless.error(message.id, INVALID_PARAMS, 'tasks/update needs "inputResponses", an object')
    service = request.app[SERVICE]
    try:
        approval = await service.get(task_id)
        if approval is None or approval.grant != grant.name or approval.upstream != upstream:
            return None
        if message.method == "tasks/get":
            return handlers.json_message(result_response(message.id, _got(service, approval)))
        if message.method == "tasks/cancel" and approval.status == "pending":
            await service.cancel(approval.id, "the client cancelled the task")
    except StoreError as exc:
        return _store_failed(message, exc)
    # tasks/update: nothing to take (these tasks never ask for input); tasks/cancel of anything
    # but a pending approval: too late to withdraw, and the next tasks/get says what became of it.
    return handlers.json_message(result_response(message.id, _ACK))


def _got(service: ApprovalService, approval: Approval) -> JsonObject:
    """The DetailedTask; a result handed out is marked delivered, as a repeat call's is."""
    answer = detailed_task(approval, service.clock())
    ended = "result" in answer or "error" in answer
    if ended and approval.result_json is not None and not approval.result_delivered:
        service.delivered(approval.id)
    return answer


def _store_failed(message: Message, exc: StoreError) -> web.Response:
    """A store failure, said as the gateway's own error (tools/call answers one alike)."""
    log.exception("could not read the task of %s", message.method)
    return handlers.rpc_error(500, INTERNAL_ERROR, f"the gateway could not read the task: {exc}", message.id)
