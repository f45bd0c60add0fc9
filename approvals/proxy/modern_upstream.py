"""HTTP upstreams of MCP 2026-07-28: which protocol eras an upstream speaks, and one request to it.

An upstream may speak the initialize era (a session opened by `initialize`), 2026-07-28 (every
request stands alone, with its `_meta` envelope), or both. The gateway asks each HTTP upstream
once — `server/discover` with the 2026 envelope, then `initialize` (whose session it ends at once)
— and keeps the answer for `ERA_TTL_SECONDS`, or until a request shows it wrong (`forget`). A
stdio upstream is taken to be of the initialize era without asking: 2026-07-28 defines no stdio
serving without a handshake that the gateway could tell apart, and every stdio server people run
today (mcp-server-time and the like) is of that era.

`post` sends one 2026-07-28 request and reads its answer, JSON or SSE, message by message. The
headers are the upstream's own (`[upstreams.X] headers`, its credentials) plus the protocol's
routing headers: never anything of the client's but what the protocol asks to mirror.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from approvals.config import Settings, UpstreamSettings
from approvals.jsonrpc import JsonObject, decode_bytes, decode_text, encode
from approvals.proxy.sse import TooLarge, read_events

log = logging.getLogger(__name__)

MODERN_VERSION = "2026-07-28"
MODERN_VERSIONS = (MODERN_VERSION,)  # the stateless revisions the gateway serves
GATEWAY_INFO = {"name": "approvals-gateway", "version": "1"}
ERA_TTL_SECONDS = 300.0  # how long what an upstream said about its eras is believed
PROBE_TIMEOUT_SECONDS = 10.0

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"

VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
PARAM_HEADER_PREFIX = "mcp-param-"
# The body field each method mirrors in `Mcp-Name`.
NAMED_BY = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    # The tasks extension names the task (io.modelcontextprotocol/tasks, "Request headers").
    "tasks/get": "taskId",
    "tasks/update": "taskId",
    "tasks/cancel": "taskId",
}
ACCEPT = "application/json, text/event-stream"

_HEADER_SAFE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


@dataclass(frozen=True, slots=True)
class Eras:
    """What an upstream speaks: 2026-07-28 (`modern`), the initialize era (`legacy`), or both."""

    modern: bool
    legacy: bool


LEGACY_ONLY = Eras(modern=False, legacy=True)


def envelope(client_info: object, capabilities: object) -> JsonObject:
    """The `_meta` a 2026-07-28 request carries: version, client info and capabilities."""
    meta: JsonObject = {
        PROTOCOL_VERSION_KEY: MODERN_VERSION,
        CLIENT_CAPABILITIES_KEY: capabilities if isinstance(capabilities, dict) else {},
    }
    if isinstance(client_info, dict):
        meta[CLIENT_INFO_KEY] = client_info
    return meta


def with_envelope(body: JsonObject, meta: JsonObject) -> JsonObject:
    """`body` (a request or notification) with `meta` merged into its `params._meta`: a request's
    envelope, a listen notification's subscription id. What `_meta` had is kept."""
    params = body.get("params")
    params = dict(params) if isinstance(params, dict) else {}
    given = params.get("_meta")
    params["_meta"] = {**(given if isinstance(given, dict) else {}), **meta}
    return {**body, "params": params}


def encode_header_value(value: str) -> str:
    """A header value as 2026-07-28 sends it: verbatim if plain printable ASCII, else `=?base64?…?=`."""
    if _HEADER_SAFE.fullmatch(value) and not _SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode()).decode('ascii')}?="


def routing_headers(body: JsonObject) -> dict[str, str]:
    """The headers that mirror a request's body: version, method and the name it acts on."""
    method = str(body.get("method", ""))
    headers = {VERSION_HEADER: MODERN_VERSION, METHOD_HEADER: method}
    params = body.get("params")
    field = NAMED_BY.get(method)
    named = params.get(field) if isinstance(params, dict) and field is not None else None
    if isinstance(named, str):
        headers[NAME_HEADER] = encode_header_value(named)
    return headers


def mirrored_headers(client: Mapping[str, str], arguments: JsonObject | None = None) -> dict[str, str] | str:
    """The client's headers that a passed-through request keeps, or what is wrong with them.

    Kept: the protocol's routing headers, and for a `tools/call` (`arguments` given) its
    `Mcp-Param-*` headers — tool arguments a server asked to see in headers — each only if its
    value is one of the judged arguments' values: an upstream that read a header instead of the
    body must still run what the policy saw. Nothing else: not the client's Authorization (the
    grant token is the gateway's secret), not cookies.
    """
    kept: dict[str, str] = {}
    judged = _scalars(arguments) if arguments is not None else frozenset()
    for name, value in client.items():
        lowered = name.lower()
        if lowered in _MIRRORED:
            kept[name] = value
        elif lowered.startswith(PARAM_HEADER_PREFIX) and arguments is not None:
            if decode_header_value(value) not in judged:
                return f"the {name} header does not match any argument of the call's params.arguments"
            kept[name] = value
    return kept


def _scalars(value: object) -> frozenset[str]:
    """Every scalar in `value` as a header would render it (`true`/`false`, numbers both ways)."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            found.add("true" if item else "false")
        elif isinstance(item, str):
            found.add(item)
        elif isinstance(item, int | float):
            found.add(str(item))
            if isinstance(item, float) and item.is_integer():
                found.add(str(int(item)))  # 1.0 as a JavaScript client writes it
    return frozenset(found)


def decode_header_value(value: str | None) -> str | None:
    """A header value as sent: `=?base64?…?=` wraps what a header cannot carry (None if malformed)."""
    if value is None:
        return None
    match = _SENTINEL.fullmatch(value)
    if match is None:
        return value
    try:
        return base64.b64decode(match["payload"], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


_MIRRORED = frozenset({VERSION_HEADER.lower(), METHOD_HEADER.lower(), NAME_HEADER.lower()})


class Answer:
    """An upstream's HTTP answer to one POST: its status and the JSON-RPC messages in it, in order."""

    def __init__(self, response: aiohttp.ClientResponse, max_bytes: int) -> None:
        self.status = response.status
        self.content_type = response.content_type
        self._response = response
        self._max_bytes = max_bytes

    @property
    def session_id(self) -> str | None:
        return self._response.headers.get("Mcp-Session-Id")

    @property
    def is_stream(self) -> bool:
        return self.content_type == "text/event-stream"

    async def messages(self) -> AsyncIterator[JsonObject]:
        """Each JSON-RPC message (an SSE stream's events, or the one JSON body); nothing for a 202.

        Raises TooLarge past `[server] max_body_bytes`, ValueError for what is not JSON.
        """
        if self.is_stream:
            async for event in read_events(self._response.content, self._max_bytes):
                message = decode_text(event.data)
                if isinstance(message, dict):
                    yield message
            return
        if self.content_type != "application/json":
            return
        if (self._response.content_length or 0) > self._max_bytes:
            raise TooLarge(f"the upstream's answer is over the limit of {self._max_bytes} bytes")
        body = await self._response.content.read(self._max_bytes + 1)
        if len(body) > self._max_bytes:
            raise TooLarge(f"the upstream's answer is over the limit of {self._max_bytes} bytes")
        message = decode_bytes(body) if body else None
        if isinstance(message, dict):
            yield message


@contextlib.asynccontextmanager
async def post(
    http: aiohttp.ClientSession,
    upstream: UpstreamSettings,
    body: JsonObject,
    headers: Mapping[str, str],
    max_bytes: int,
) -> AsyncIterator[Answer]:
    """POST one message to an HTTP upstream; the answer is read inside the block and closed after it.

    Leaving the block early (the client went away) closes the upstream's stream with it.
    Raises aiohttp.ClientError (and TimeoutError) when the upstream cannot be reached.
    """
    sent = {**upstream.headers, **headers, "Accept": ACCEPT, "Content-Type": "application/json"}
    async with http.post(upstream.url, data=encode(body), headers=sent, allow_redirects=True) as response:
        yield Answer(response, max_bytes)


async def first_answer(answer: Answer, request_id: object) -> JsonObject | None:
    """The response to `request_id` in an answer (what comes before it is skipped), or None."""
    async for message in answer.messages():
        if "method" not in message and message.get("id") == request_id:
            return message
    return None


class UpstreamEras:
    """What each upstream speaks, asked once and believed for `ERA_TTL_SECONDS` or until forgotten."""

    def __init__(
        self,
        settings: Settings,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._known: dict[str, tuple[Eras, float]] = {}
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def known(self, upstream: str) -> Eras | None:
        """What is believed now about `upstream`, without asking it."""
        if self._settings.upstreams[upstream].is_stdio:
            return LEGACY_ONLY
        entry = self._known.get(upstream)
        if entry is None or self._clock() - entry[1] >= ERA_TTL_SECONDS:
            return None
        return entry[0]

    async def of(self, upstream: str) -> Eras:
        """What `upstream` speaks, asking it when nothing recent is known.

        An upstream that cannot be reached is taken as initialize-era and asked again next time,
        so that the error a client gets is the one it got before this module existed.
        """
        if (eras := self.known(upstream)) is not None:
            return eras
        async with self._locks[upstream]:
            if (eras := self.known(upstream)) is not None:
                return eras
            settings = self._settings.upstreams[upstream]
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                    modern = await self._speaks_modern(settings)
                    legacy = await self._speaks_legacy(settings) if modern else True
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("upstream %s: could not learn its protocol eras: %s", upstream, exc)
                return LEGACY_ONLY
            eras = Eras(modern=modern, legacy=legacy)
            log.info("upstream %s speaks: 2026-07-28 %s, initialize era %s", upstream, modern, legacy)
            self._known[upstream] = (eras, self._clock())
            return eras

    def forget(self, upstream: str) -> None:
        """A request failed in a way that may mean the upstream changed: ask again next time."""
        self._known.pop(upstream, None)

    async def _speaks_modern(self, settings: UpstreamSettings) -> bool:
        body: JsonObject = {
            "jsonrpc": "2.0",
            "id": "approvals-era-probe",
            "method": "server/discover",
            "params": {"_meta": envelope(GATEWAY_INFO, {})},
        }
        limit = self._settings.server.max_body_bytes
        async with post(self._http(), settings, body, routing_headers(body), limit) as answer:
            if answer.status != 200:
                return False
            response = await first_answer(answer, body["id"])
        result = response.get("result") if response is not None else None
        versions = result.get("supportedVersions") if isinstance(result, dict) else None
        return isinstance(versions, list) and MODERN_VERSION in versions

    async def _speaks_legacy(self, settings: UpstreamSettings) -> bool:
        """Whether `initialize` opens a session; the session it opens is ended at once."""
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": GATEWAY_INFO,
        }
        body: JsonObject = {
            "jsonrpc": "2.0",
            "id": "approvals-era-probe",
            "method": "initialize",
            "params": init,
        }
        limit = self._settings.server.max_body_bytes
        http = self._http()
        async with post(http, settings, body, {}, limit) as answer:
            session_id = answer.session_id
            response = await first_answer(answer, body["id"]) if answer.status == 200 else None
        if session_id:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                headers = {**settings.headers, "Mcp-Session-Id": session_id}
                async with http.delete(settings.url, headers=headers):
                    pass
        result = response.get("result") if response is not None else None
        return isinstance(result, dict) and isinstance(result.get("protocolVersion"), str)
