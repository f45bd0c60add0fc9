"""Initialize-era sessions in front of an upstream that speaks only MCP 2026-07-28.

The client keeps its session at the gateway as with any upstream; this module is that session's
upstream connection (an `upstream.Upstream`). It has no session with the upstream: it answers
`initialize` itself from the upstream's `server/discover`, and sends every other request as a
2026-07-28 request whose `_meta` envelope is built from the client's `initialize` (its client
info and capabilities; and the level of its `logging/setLevel`, which 2026-07-28 asks per
request). `ping` is answered here. Results lose the fields the client's era does not know
(`resultType`, the caching hints).

An `InputRequiredResult` (the upstream needs the user's or the model's answer) becomes what the
initialize era has for it: requests from the server to the client — `elicitation/create`,
`sampling/createMessage`, `roots/list` — sent on the request's stream, one per input request,
if the client declared the capability. Their answers go back as `inputResponses` on the retry,
with the upstream's `requestState`, for at most `MAX_ROUNDS` rounds. An input request the client
cannot answer ends the call with an error that names it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import aiohttp

from approvals.config import UpstreamSettings
from approvals.jsonrpc import (
    HANDSHAKE_VERSIONS,
    INVALID_PARAMS,
    INVALID_REQUEST,
    UPSTREAM_UNAVAILABLE,
    JsonObject,
    error_response,
    result_response,
)
from approvals.proxy.modern_upstream import (
    LOG_LEVEL_KEY,
    SERVER_INFO_KEY,
    envelope,
    first_answer,
    post,
    routing_headers,
    with_envelope,
)

log = logging.getLogger(__name__)

Sink = Callable[[JsonObject, "int | None"], None]
MAX_ROUNDS = 8
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021  # 2026-07-28's code; the client learns what is missing
# The capability an input request needs the client to have declared.
NEEDS = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
MODERN_ONLY_FIELDS = ("resultType", "ttlMs", "cacheScope")
# Capabilities whose notifications need a subscriptions/listen stream, which is not bridged yet.
UNBRIDGED_FIELDS = frozenset({"listChanged", "subscribe"})


class BridgeError(Exception):
    """A round could not be completed; `error` is the JSON-RPC error object for the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ModernBridge:
    """An initialize-era session's connection to a 2026-07-28-only HTTP upstream."""

    def __init__(
        self,
        settings: UpstreamSettings,
        http: aiohttp.ClientSession,
        max_bytes: int,
        sink: Sink,
        on_failure: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._http = http
        self._max_bytes = max_bytes
        self._sink = sink
        self._on_failure = on_failure  # the gateway forgets what it knew of the upstream's eras
        self._client_info: object = None
        self._capabilities: JsonObject = {}
        self._log_level: str | None = None  # `logging/setLevel`: 2026-07-28 asks per request
        self._tasks: dict[object, asyncio.Task[None]] = {}
        self._asked: dict[str, asyncio.Future[JsonObject]] = {}
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Nothing to open: every request is its own POST."""

    def send(self, message: JsonObject) -> None:
        """A message from the session: a request runs as a task; a response answers our question."""
        method = message.get("method")
        if method is None:
            waiter = self._asked.pop(str(message.get("id")), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            return
        if "id" not in message:
            if method == "notifications/cancelled":
                params = message.get("params")
                task = self._tasks.get(params.get("requestId")) if isinstance(params, dict) else None
                if task is not None:
                    task.cancel()  # leaving the POST closes its stream: a 2026 upstream's cancel
            return  # notifications/initialized and the rest mean nothing to a 2026 upstream
        request_id = message["id"]
        task = asyncio.create_task(self._serve(message), name=f"bridge-{self._settings.name}")
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one request -------------------------------------------------------------------------

    async def _serve(self, message: JsonObject) -> None:
        request_id = message["id"]
        related = request_id if isinstance(request_id, int) else None
        try:
            if message.get("method") == "initialize":
                answer = await self._initialize(message)
            elif message.get("method") == "ping":
                answer = result_response(request_id, {})
            elif message.get("method") == "logging/setLevel":
                answer = self._set_level(message)
            else:
                answer = await self._rounds(message, related)
        except BridgeError as exc:
            answer = error_response(request_id, exc.code, str(exc))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._on_failure()
            problem = f"upstream unavailable: {exc or type(exc).__name__}"
            answer = error_response(request_id, UPSTREAM_UNAVAILABLE, problem)
        self._sink(answer, related)

    async def _initialize(self, message: JsonObject) -> JsonObject:
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        self._client_info = params.get("clientInfo")
        capabilities = params.get("capabilities")
        self._capabilities = capabilities if isinstance(capabilities, dict) else {}
        asked = params.get("protocolVersion")
        version = asked if asked in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        discover = {"jsonrpc": "2.0", "id": message["id"], "method": "server/discover", "params": {}}
        answer = await self._round(discover, None)
        result = answer.get("result")
        if not isinstance(result, dict):
            return answer
        return result_response(message["id"], initialize_result(result, version))

    def _set_level(self, message: JsonObject) -> JsonObject:
        """The session-wide level of the initialize era becomes every later request's opt-in."""
        params = message.get("params")
        level = params.get("level") if isinstance(params, dict) else None
        if not isinstance(level, str):
            return error_response(message["id"], INVALID_PARAMS, 'logging/setLevel needs "level", a string')
        self._log_level = level
        return result_response(message["id"], {})

    async def _rounds(self, message: JsonObject, related: int | None) -> JsonObject:
        body = message
        for _ in range(MAX_ROUNDS):
            answer = await self._round(body, related)
            result = answer.get("result")
            if not isinstance(result, dict) or result.get("resultType") != "input_required":
                return {**answer, "result": legacy_result(result)} if isinstance(result, dict) else answer
            responses = await self._ask_client(result.get("inputRequests"), related)
            params = dict(body.get("params") or {})
            params["inputResponses"] = responses
            params.pop("requestState", None)
            if isinstance(result.get("requestState"), str):
                params["requestState"] = result["requestState"]
            body = {**body, "params": params}
        raise BridgeError(
            UPSTREAM_UNAVAILABLE, f"the upstream asked for input more than {MAX_ROUNDS} times for one request"
        )

    async def _round(self, body: JsonObject, related: int | None) -> JsonObject:
        """One 2026-07-28 POST; what the upstream sends before its answer reaches the client."""
        meta = envelope(self._client_info, self._capabilities)
        if self._log_level is not None:
            meta[LOG_LEVEL_KEY] = self._log_level
        sent = with_envelope(body, meta)
        async with post(self._http, self._settings, sent, routing_headers(sent), self._max_bytes) as answer:
            if answer.is_stream:
                async for message in answer.messages():
                    if "method" in message:
                        self._sink(message, related)  # progress, logging: on the request's stream
                    elif message.get("id") == body.get("id"):
                        return message
            elif (response := await first_answer(answer, body.get("id"))) is not None:
                return response
        raise BridgeError(UPSTREAM_UNAVAILABLE, "upstream unavailable: it answered without a response")

    async def _ask_client(self, requests: object, related: int | None) -> JsonObject:
        """Each input request, asked of the client as a server→client request; the answers by key."""
        if not isinstance(requests, dict) or not requests:
            raise BridgeError(UPSTREAM_UNAVAILABLE, "the upstream asked for input but named none")
        for key, asked in requests.items():
            method = asked.get("method") if isinstance(asked, dict) else None
            needed = NEEDS.get(method) if isinstance(method, str) else None
            if needed is None:
                raise BridgeError(
                    INVALID_REQUEST,
                    f"the upstream asked for input {key!r} by {method!r}, which cannot be bridged",
                )
            if needed not in self._capabilities:
                raise BridgeError(
                    MISSING_REQUIRED_CLIENT_CAPABILITY,
                    f"the upstream needs {method} (input {key!r}) from this client, which did not declare"
                    f" the {needed!r} capability",
                )
        # All asked at once (the client may answer in any order), then awaited in turn.
        waiters = {key: self._ask(asked, related) for key, asked in requests.items()}
        responses: JsonObject = {}
        try:
            for key, (_, waiter) in waiters.items():
                reply = await waiter
                if not isinstance(reply.get("result"), dict):
                    error = reply.get("error")
                    detail = error.get("message") if isinstance(error, dict) else "no result"
                    raise BridgeError(INVALID_REQUEST, f"the client refused input {key!r}: {detail}")
                responses[key] = reply["result"]
        finally:
            for ask_id, _ in waiters.values():
                self._asked.pop(ask_id, None)
        return responses

    def _ask(self, asked: JsonObject, related: int | None) -> tuple[str, asyncio.Future[JsonObject]]:
        ask_id = f"approvals-bridge-{next(self._ids)}"
        waiter: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._asked[ask_id] = waiter
        request: JsonObject = {"jsonrpc": "2.0", "id": ask_id, "method": asked["method"]}
        if isinstance(asked.get("params"), dict):
            request["params"] = asked["params"]
        self._sink(request, related)
        return ask_id, waiter


def legacy_result(result: JsonObject) -> JsonObject:
    """A 2026-07-28 result as the initialize era has it: without the fields that era lacks (the
    server's info in `_meta` too: that era has it once, in the InitializeResult)."""
    legacy = {k: v for k, v in result.items() if k not in MODERN_ONLY_FIELDS}
    meta = legacy.get("_meta")
    if isinstance(meta, dict) and SERVER_INFO_KEY in meta:
        rest = {k: v for k, v in meta.items() if k != SERVER_INFO_KEY}
        if rest:
            legacy["_meta"] = rest
        else:
            del legacy["_meta"]
    return legacy


def initialize_result(discover: JsonObject, version: str) -> JsonObject:
    """The InitializeResult an initialize-era client gets, from the upstream's DiscoverResult."""
    given = discover.get("capabilities")
    capabilities: JsonObject = {}
    for name, value in (given if isinstance(given, dict) else {}).items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in UNBRIDGED_FIELDS}
        capabilities[name] = value
    meta = discover.get("_meta")
    info = meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None
    result: JsonObject = {
        "protocolVersion": version,
        "capabilities": capabilities,
        "serverInfo": info if isinstance(info, dict) else {"name": "upstream", "version": "unknown"},
    }
    if isinstance(discover.get("instructions"), str):
        result["instructions"] = discover["instructions"]
    return result
