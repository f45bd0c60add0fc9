"""MCP 2026-07-28 (stateless) clients, in front of upstreams of either era.

A 2026-07-28 request stands alone: no `initialize`, no `Mcp-Session-Id`; every request carries its
protocol version, client info and capabilities in `params._meta`, and mirrors its method (and the
tool, prompt or resource it names) in HTTP headers. The gateway checks that envelope as the spec's
validation ladder has it, then serves the request one of two ways:

- the upstream speaks 2026-07-28 (modern_upstream.py asks it once): the request is passed through
  as it is (passthrough.py), `tools/call` judged by the gate first; an InputRequiredResult's
  `requestState` is wrapped in the gateway's signed one (request_state.py), so the client's retry
  continues the judged call instead of being judged, held or counted again;
- the upstream speaks only the initialize era: `server/discover` is answered from its
  `initialize`, and every other request goes over an upstream session the gateway keeps per
  (grant, upstream) (`pool.py`).

Nothing here depends on state of one process beyond that pool: a held call follows its approval
through the change feed, and a wrapped `requestState` is checked with a key every replica derives
from the same secret, so any process can serve any request.

What cannot be bridged to an initialize-era upstream: its requests to the client (sampling,
elicitation, roots) during a stateless request. The gateway opens those sessions declaring no
client capabilities, so a conforming upstream sends none; one that does anyway is answered with
"method not found" (a `ping` with an empty result). They are not turned into `input_required`
results: the client's retry may reach another process, and the upstream's call would have to
stay open, waiting, in this one. `subscriptions/listen` is passed through to a 2026-07-28
upstream, and served from the pooled session's list changes for the others (listen_bridge.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from approvals.config import Principal
from approvals.core.model import Hold, ToolCall
from approvals.errors import ApprovalsError
from approvals.jsonrpc import (
    HANDSHAKE_VERSIONS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    Message,
    RequestId,
    encode,
    error_response,
    result_response,
)
from approvals.outcomes import with_meta
from approvals.proxy import handlers, listen_bridge, passthrough, pooled_serving, tasks_modern
from approvals.proxy.hold import stream_hold
from approvals.proxy.keys import GATE, GATEWAY

# Re-exported (`as`): tasks_modern.py and affinity.py name these as stateless.*.
from approvals.proxy.modern_results import PASSTHROUGH, as_modern
from approvals.proxy.modern_results import complete as complete
from approvals.proxy.modern_upstream import CLIENT_CAPABILITIES_KEY as CLIENT_CAPABILITIES_KEY
from approvals.proxy.modern_upstream import CLIENT_INFO_KEY, METHOD_HEADER, NAMED_BY, PROTOCOL_VERSION_KEY
from approvals.proxy.modern_upstream import MODERN_VERSIONS as MODERN_VERSIONS
from approvals.proxy.modern_upstream import NAME_HEADER as NAME_HEADER
from approvals.proxy.modern_upstream import VERSION_HEADER as VERSION_HEADER
from approvals.proxy.modern_upstream import decode_header_value as decode_header_value
from approvals.proxy.pool import stateless_session
from approvals.proxy.request_state import Judged, RequestStates, StateError, with_upstream_state, wrap_answer
from approvals.proxy.session import Session, bad_progress_token

log = logging.getLogger(__name__)


# Error codes of 2026-07-28 (schema: "MCP error codes").
HEADER_MISMATCH = -32020
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
UNSUPPORTED_PROTOCOL_VERSION = -32022

# The HTTP status of an error answer, by JSON-RPC code (transports: "Sending Messages to the
# Server" — a request the server cannot accept gets a 4xx, an unknown method 404); others 200.
HTTP_STATUS = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    MISSING_REQUIRED_CLIENT_CAPABILITY: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}


def is_stateless(headers: CIMultiDictProxy[str], message: Message) -> bool:
    """Whether a POST is of the 2026-07-28 era: no session, and a 2026 method, envelope or header.

    A 2026-07-28 version header wins over everything else, as the `mcp` SDK routes: a stray
    Mcp-Session-Id is ignored (the era has no sessions), and its `initialize` is a removed method
    (404). A version header of the initialize era without a session stays on the session path
    (which asks for the session); anything else without a session is checked here, so an unknown
    version is told which ones are served.
    """
    if headers.get(VERSION_HEADER) in MODERN_VERSIONS:
        return True
    if "Mcp-Session-Id" in headers or message.method == "initialize":
        return False
    if message.method == "server/discover":
        return True
    version = headers.get(VERSION_HEADER)
    if version is not None and version not in HANDSHAKE_VERSIONS:
        return True
    meta = message.params.get("_meta")
    return isinstance(meta, dict) and PROTOCOL_VERSION_KEY in meta


def no_stream(headers: CIMultiDictProxy[str]) -> web.Response | None:
    """405 for a GET or DELETE of 2026-07-28, which has no session stream to open or end."""
    version = headers.get(VERSION_HEADER)
    if version in MODERN_VERSIONS:
        return web.Response(status=405, headers={"Allow": "POST"})  # a stray Mcp-Session-Id changes nothing
    if "Mcp-Session-Id" in headers or version is None or version in HANDSHAKE_VERSIONS:
        return None
    return web.Response(status=405, headers={"Allow": "POST"})


def error(request_id: RequestId | None, code: int, message: str, data: object = None) -> web.Response:
    """A JSON-RPC error with the request's id, and the HTTP status the transport gives its code."""
    body = encode(error_response(request_id, code, message, data))
    return web.Response(status=HTTP_STATUS.get(code, 200), body=body, content_type="application/json")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused, as its JSON-RPC error."""

    code: int
    message: str
    data: object = None


async def handle(
    request: web.Request, grant: Principal, upstream: str, message: Message
) -> web.StreamResponse:
    """One 2026-07-28 message, checked as the spec's ladder has it, then served."""
    if message.kind == "response":
        return error(None, INVALID_REQUEST, "a 2026-07-28 client sends no responses: nothing asked it")
    if message.kind == "notification":
        # No client notification means anything on this wire (cancelling is closing the stream).
        version = request.headers.get(VERSION_HEADER, "")
        if version not in MODERN_VERSIONS:
            return _reject(None, _unsupported(version))
        return web.Response(status=202)
    assert message.id is not None
    rejection = check_envelope(request.headers, message)
    if rejection is not None:
        return _reject(message.id, rejection)
    if (bad_token := bad_progress_token(message.params)) is not None:
        return error(message.id, INVALID_PARAMS, bad_token)
    if (bad_responses := bad_input_responses(message.params)) is not None:
        return error(message.id, INVALID_PARAMS, bad_responses)
    method = message.method
    if method == "initialize":
        return error(
            message.id,
            METHOD_NOT_FOUND,
            "initialize does not exist in 2026-07-28 (there is no handshake): send server/discover,"
            " or initialize with an initialize-era MCP-Protocol-Version header",
        )
    modern = (await request.app[GATEWAY].eras.of(upstream)).modern
    if method in tasks_modern.METHODS:
        if (answered := await tasks_modern.answer(request, grant, upstream, message)) is not None:
            return answered
        if modern:  # not an approval of this grant: the upstream's own task (it serves the extension)
            response, _ = await passthrough.relay(request, upstream, message.id, message.body, None)
            return response
        return tasks_modern.no_such_task(message)
    if method == "server/discover":
        if modern:
            return await _discover_modern(request, upstream, message)
        return await pooled_serving.discover(request, grant, upstream, message)
    if method == "tools/call":
        return await _tool_call(request, grant, upstream, message, modern)
    if method == passthrough.LISTEN and modern:
        return await passthrough.listen(request, grant.name, upstream, message.id, message.body)
    if method == passthrough.LISTEN:
        return await listen_bridge.listen(request, grant, upstream, message)
    if method in PASSTHROUGH:
        transform = handlers._tool_filter(request.app[GATE], upstream) if method == "tools/list" else None
        if modern:
            response, _ = await passthrough.relay(request, upstream, message.id, message.body, transform)
            return response
        return await pooled_serving.forward(request, grant, upstream, message, message.body, transform)
    return error(
        message.id,
        METHOD_NOT_FOUND,
        f"method {method!r} is not served to 2026-07-28 clients by this gateway (served: server/discover,"
        f" tools/call, {passthrough.LISTEN}, {', '.join(sorted(PASSTHROUGH))})",
    )


def _reject(request_id: RequestId | None, rejection: Rejection) -> web.Response:
    return error(request_id, rejection.code, rejection.message, rejection.data)


def _unsupported(version: object) -> Rejection:
    return Rejection(
        UNSUPPORTED_PROTOCOL_VERSION,
        f"unsupported protocol version {version!r}; supported without a session: {', '.join(MODERN_VERSIONS)}"
        " (initialize-era versions: send initialize)",
        {"supported": list(MODERN_VERSIONS), "requested": version},
    )


def check_envelope(headers: CIMultiDictProxy[str], message: Message) -> Rejection | None:
    """What is wrong with a request's envelope and headers, first problem first; None if nothing.

    The order is the spec's: the `_meta` fields must be there (-32602); the headers must agree
    with the body (-32020), before the version is judged, so a client that disagrees with itself
    is told so; the version must be a served one (-32022); then the fields' shapes (-32602).
    """
    for name in (VERSION_HEADER, METHOD_HEADER, NAME_HEADER):
        if len(headers.getall(name, [])) > 1:
            return Rejection(HEADER_MISMATCH, f"the {name} header appears more than once")
    meta = message.params.get("_meta")
    if not isinstance(meta, dict):
        return Rejection(
            INVALID_PARAMS,
            f"params._meta must be an object with {PROTOCOL_VERSION_KEY!r} and {CLIENT_CAPABILITIES_KEY!r}",
        )
    missing = [key for key in (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY) if key not in meta]
    if missing:
        return Rejection(INVALID_PARAMS, f"params._meta is missing {', '.join(missing)}")
    if (mismatch := _header_mismatch(headers, message, meta[PROTOCOL_VERSION_KEY])) is not None:
        return Rejection(HEADER_MISMATCH, mismatch)
    version = meta[PROTOCOL_VERSION_KEY]
    if not isinstance(version, str):
        return Rejection(INVALID_PARAMS, f"params._meta[{PROTOCOL_VERSION_KEY!r}] must be a string")
    if version not in MODERN_VERSIONS:
        return _unsupported(version)
    if not isinstance(meta[CLIENT_CAPABILITIES_KEY], dict):
        return Rejection(INVALID_PARAMS, f"params._meta[{CLIENT_CAPABILITIES_KEY!r}] must be an object")
    info = meta.get(CLIENT_INFO_KEY)
    if info is not None and not (
        isinstance(info, dict) and isinstance(info.get("name"), str) and isinstance(info.get("version"), str)
    ):
        return Rejection(
            INVALID_PARAMS, f'params._meta[{CLIENT_INFO_KEY!r}] needs string "name" and "version"'
        )
    return None


def _header_mismatch(headers: CIMultiDictProxy[str], message: Message, version: object) -> str | None:
    sent = headers.get(VERSION_HEADER)
    if sent is None or sent != version:
        return f"the {VERSION_HEADER} header ({sent!r}) does not match params._meta[{PROTOCOL_VERSION_KEY!r}]"
    if headers.get(METHOD_HEADER) != message.method:
        return f"the {METHOD_HEADER} header does not match the body's method {message.method!r}"
    field = NAMED_BY.get(message.method or "")
    named = message.params.get(field) if field is not None else None
    # Only a string can be mirrored in a header; any other value is the params' own error (-32602).
    if isinstance(named, str) and decode_header_value(headers.get(NAME_HEADER)) != named:
        return f"the {NAME_HEADER} header does not match the body's params.{field}"
    return None


def bad_input_responses(params: JsonObject) -> str | None:
    """What is wrong with `params.inputResponses`, if anything (schema: `InputResponses`).

    It is optional, but when present it is an object of responses, each an object (an
    `ElicitResult`, `CreateMessageResult` or `ListRootsResult`). The initialize-era upstream behind
    the gateway ignores the field, so a malformed one would pass unnoticed: it is refused here.
    """
    if "inputResponses" not in params:
        return None
    responses = params["inputResponses"]
    if not isinstance(responses, dict):
        got = "null" if responses is None else handlers._json_type(responses)
        return f"params.inputResponses must be an object of responses (got {got})"
    for key, response in responses.items():
        if not isinstance(response, dict):
            return f"params.inputResponses[{key!r}] must be an object (got {handlers._json_type(response)})"
    return None


async def _discover_modern(request: web.Request, upstream: str, message: Message) -> web.StreamResponse:
    """The upstream's own `server/discover`, with what the gateway adds (tasks for held calls)."""
    assert message.id is not None

    def merge(answer: JsonObject) -> JsonObject:
        result = answer.get("result")
        if not isinstance(result, dict):
            return answer
        given = result.get("capabilities")
        capabilities = tasks_modern.advertise(dict(given) if isinstance(given, dict) else {})
        versions = result.get("supportedVersions")
        served = [v for v in versions if v in MODERN_VERSIONS] if isinstance(versions, list) else []
        merged = {
            **result,
            "capabilities": capabilities,
            "supportedVersions": served or list(MODERN_VERSIONS),
        }
        return {**answer, "result": merged}

    response, _ = await passthrough.relay(request, upstream, message.id, message.body, merge)
    return response


async def _tool_call(
    request: web.Request, grant: Principal, upstream: str, message: Message, modern: bool
) -> web.StreamResponse:
    """Judged by the gate exactly as a call in a session is, before anything reaches the upstream.

    To a 2026-07-28 upstream, the retry of an input-required call (`inputResponses` with the
    gateway's `requestState`, the same arguments) continues the judged call: it is passed through
    without being judged again. Other arguments make it a new call, judged as any other.
    """
    assert message.id is not None
    judged = handlers._judged(message)
    if isinstance(judged, str):
        return error(message.id, INVALID_PARAMS, judged)
    name, arguments, body = judged
    if (bad_task := tasks_modern.task_problem(message)) is not None:
        return error(message.id, INVALID_PARAMS, bad_task)
    gateway = request.app[GATEWAY]
    if modern and "requestState" in message.params:
        try:
            continued = gateway.states.unwrap(
                message.params["requestState"], grant.name, upstream, name, arguments
            )
        except StateError as exc:
            return error(message.id, INVALID_PARAMS, str(exc))
        body = with_upstream_state(body, continued.upstream_state)
        if continued.same_call and "inputResponses" in message.params:
            wrap = _state_wrapper(
                gateway.states, Judged.of(grant.name, upstream, name, arguments, continued.approval_id)
            )
            response, _ = await passthrough.relay(
                request, upstream, message.id, body, wrap, arguments=arguments
            )
            return response
    call = ToolCall(upstream, grant.name, stateless_session(grant.name), name, arguments)
    try:
        admission = await request.app[GATE].admit(call)
    except ApprovalsError as exc:
        log.exception("could not admit %s on %s", name, upstream)
        return handlers.rpc_error(
            500, INTERNAL_ERROR, f"the gateway could not check this call: {exc}", message.id
        )
    if admission.hold is not None and tasks_modern.wants_task(message):
        return await tasks_modern.create(request, grant, upstream, message, admission.hold)
    if admission.hold is not None:
        holder = Session(
            f"stateless-{secrets.token_urlsafe(12)}", grant.name, gateway.settings.upstreams[upstream]
        )
        holder.draining = gateway.pool.draining
        hold_seconds = gateway.settings.approvals.hold_seconds
        held_as = Judged.of(grant.name, upstream, name, arguments, admission.hold.approval_id)
        hold = ModernHold(admission.hold, _state_wrapper(gateway.states, held_as))
        return await stream_hold(request, holder, message, hold, hold_seconds)
    if admission.answer is not None:
        return handlers.json_message(result_response(message.id, complete(admission.answer, "tools/call")))
    meta = admission.meta
    if modern:
        wrap = _state_wrapper(gateway.states, Judged.of(grant.name, upstream, name, arguments))
        marked = wrap if meta is None else (lambda answer: with_meta(wrap(answer), meta))
        response, answer = await passthrough.relay(
            request, upstream, message.id, body, marked, arguments=arguments
        )
    else:
        marked_pooled = None if meta is None else (lambda answer: with_meta(answer, meta))
        response, answer = await pooled_serving.serve(request, grant, upstream, message, body, marked_pooled)
    if admission.on_result is not None:
        await admission.on_result(answer or error_response(message.id, UPSTREAM_UNAVAILABLE, "no answer"))
    return response


def _state_wrapper(states: RequestStates, judged: Judged) -> Callable[[JsonObject], JsonObject]:
    return lambda answer: wrap_answer(states, judged, answer)


class ModernHold:
    """A hold whose answers are 2026-07-28 results (`resultType`): the hold path is shared with
    sessions of the initialize era, whose clients do not know the field. A released call's
    InputRequiredResult gets the gateway's `requestState` (`wrap`), naming the approval."""

    def __init__(self, hold: Hold, wrap: Callable[[JsonObject], JsonObject] | None = None) -> None:
        self._hold = hold
        self._wrap = wrap
        self.approval_id = hold.approval_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hold, name)  # anything else a hold offers, as it is

    async def wait(self, timeout: float) -> JsonObject | None:
        outcome = await self._hold.wait(timeout)
        if outcome is None:
            return None
        modern = as_modern(outcome, "tools/call")
        return self._wrap(modern) if self._wrap is not None else modern

    def status(self, now: float) -> str:
        return self._hold.status(now)

    def pending_result(self, now: float) -> JsonObject:
        return complete(self._hold.pending_result(now), "tools/call")

    def delivered(self) -> None:
        self._hold.delivered()

    async def cancel(self, reason: str) -> None:
        await self._hold.cancel(reason)

    def close(self) -> None:
        self._hold.close()
