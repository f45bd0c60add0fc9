"""Connections to upstream MCP servers: one `Upstream` per client session, carrying raw JSON.

Both transports push every message they receive into a `Sink` together with the id of the request
it belongs to when the transport knows it (a Streamable HTTP POST answers on its own stream;
stdio has one pipe, so the session works the relation out itself). When the connection ends for
good, `on_close` is called once with the reason; the session fails what is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

import aiohttp

from approvals.config import UpstreamSettings
from approvals.jsonrpc import UPSTREAM_UNAVAILABLE, JsonObject, encode, error_response
from approvals.proxy.sse import read_events

log = logging.getLogger(__name__)

Sink = Callable[[JsonObject, "int | None"], None]
OnClose = Callable[[str], None]

STDIO_LINE_LIMIT = 64 * 1024 * 1024
STOP_GRACE_SECONDS = 3.0


class Upstream(Protocol):
    """One upstream MCP session."""

    async def start(self) -> None: ...

    def send(self, message: JsonObject) -> None:
        """Queue one message for the upstream; answers and failures arrive through the sink."""

    async def close(self) -> None: ...


class StdioUpstream:
    """A child process speaking newline-delimited JSON-RPC on stdin/stdout."""

    def __init__(self, settings: UpstreamSettings, sink: Sink, on_close: OnClose) -> None:
        self._settings = settings
        self._sink = sink
        self._on_close = on_close
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._settings.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._settings.cwd,
                env=dict(self._settings.env) if self._settings.env is not None else None,
                limit=STDIO_LINE_LIMIT,
                start_new_session=True,  # its own process group, so stopping it stops its children
            )
        except OSError as exc:
            raise ConnectionError(
                f"cannot start {self._settings.command[0]!r}: {exc.strerror or exc}"
            ) from None
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"stdio-out-{self._settings.name}"),
            asyncio.create_task(self._read_stderr(), name=f"stdio-err-{self._settings.name}"),
        ]

    def send(self, message: JsonObject) -> None:
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            self._fail(message, "the upstream process is not running")
            return
        process.stdin.write(encode(message) + b"\n")

    def _fail(self, message: JsonObject, reason: str) -> None:
        if "method" in message and "id" in message:
            self._sink(
                error_response(message["id"], UPSTREAM_UNAVAILABLE, f"upstream unavailable: {reason}"), None
            )

    async def _read_stdout(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        reason = "the upstream process closed its output"
        try:
            async for line in self._process.stdout:
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning(
                        "upstream %s wrote a line that is not JSON: %.200r", self._settings.name, line
                    )
                    continue
                if isinstance(message, dict):
                    self._sink(message, None)
            code = await self._process.wait()
            reason = f"the upstream process exited with code {code}"
        except ValueError:
            reason = f"the upstream wrote a line over {STDIO_LINE_LIMIT} bytes"
        finally:
            if not self._closing:
                log.warning("upstream %s: %s", self._settings.name, reason)
                self._on_close(reason)

    async def _read_stderr(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        # Drain always: a child blocked on a full stderr pipe would look like a hang.
        async for line in self._process.stderr:
            log.info("upstream %s: %s", self._settings.name, line.decode(errors="replace").rstrip())

    async def close(self) -> None:
        self._closing = True
        process = self._process
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class HttpUpstream:
    """A Streamable HTTP upstream session: a POST per message, plus the GET stream for the rest."""

    def __init__(
        self, settings: UpstreamSettings, http: aiohttp.ClientSession, sink: Sink, on_close: OnClose
    ) -> None:
        self._settings = settings
        self._http = http
        self._sink = sink
        self._on_close = on_close
        self._session_id: str | None = None
        self._version: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._requests: dict[object, asyncio.Task[None]] = {}  # request id → its POST, for cancellation
        self._get_task: asyncio.Task[None] | None = None
        # Notifications and responses are POSTed one after another, and a request only after
        # those sent before it, so the upstream sees them in the order the client sent them.
        self._last_ordered: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Nothing to do: the upstream session begins with the client's `initialize`."""

    def _headers(self, *, accept: str) -> dict[str, str]:
        headers = {**self._settings.headers, "Accept": accept}
        if self._session_id:
            headers["Mcp-Session-Id"] = self._session_id
        if self._version:
            headers["MCP-Protocol-Version"] = self._version
        return headers

    def send(self, message: JsonObject) -> None:
        task = asyncio.create_task(self._post(message, self._last_ordered))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if "method" in message and "id" in message:
            request_id = message["id"]
            self._requests[request_id] = task
            task.add_done_callback(lambda _: self._requests.pop(request_id, None))
        else:
            self._last_ordered = task
        if message.get("method") == "notifications/cancelled":
            # Some servers keep a cancelled request's stream open for ever; nobody waits for it now.
            params = message.get("params")
            cancelled = self._requests.get(params.get("requestId")) if isinstance(params, dict) else None
            if cancelled is not None:
                task.add_done_callback(lambda _: cancelled.cancel())
        if message.get("method") == "notifications/initialized" and self._get_task is None:
            self._get_task = asyncio.create_task(self._listen())

    async def _post(self, message: JsonObject, after: asyncio.Task[None] | None) -> None:
        request_id = message.get("id") if "method" in message else None
        answered = False
        if after is not None and not after.done():
            await asyncio.wait([after])
        try:
            headers = self._headers(accept="application/json, text/event-stream")
            headers["Content-Type"] = "application/json"
            async with self._http.post(self._settings.url, data=encode(message), headers=headers) as response:
                if message.get("method") == "initialize" and "Mcp-Session-Id" in response.headers:
                    self._session_id = response.headers["Mcp-Session-Id"]
                if response.status == 202 or request_id is None:
                    if response.status >= 400:
                        log.warning(
                            "upstream %s refused a message: HTTP %d", self._settings.name, response.status
                        )
                    return
                content_type = response.headers.get("Content-Type", "")
                if response.status >= 400 and not content_type.startswith("application/json"):
                    raise ConnectionError(f"HTTP {response.status}")
                if content_type.startswith("text/event-stream"):
                    async for event in read_events(response.content):
                        answered = self._deliver(event.data, request_id) or answered
                else:
                    answered = self._deliver(await response.text(), request_id)
                if not answered:
                    raise ConnectionError("the upstream ended its answer without a response")
        except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError) as exc:
            if request_id is not None and not answered:
                detail = str(exc) or type(exc).__name__
                self._sink(
                    error_response(request_id, UPSTREAM_UNAVAILABLE, f"upstream unavailable: {detail}"), None
                )

    def _deliver(self, data: str, request_id: object) -> bool:
        """Pass one received message on; True when it is the answer to `request_id`."""
        message = json.loads(data)
        if not isinstance(message, dict):
            return False
        is_answer = "method" not in message and message.get("id") == request_id
        if is_answer and isinstance(result := message.get("result"), dict) and "protocolVersion" in result:
            self._version = str(result["protocolVersion"])
        self._sink(message, request_id if isinstance(request_id, int) else None)
        return is_answer

    async def _listen(self) -> None:
        """The upstream's GET stream: its requests and notifications that belong to no request."""
        try:
            async with self._http.get(
                self._settings.url, headers=self._headers(accept="text/event-stream")
            ) as resp:
                if resp.status != 200:
                    return  # 405: this server has no standalone stream, which the spec allows
                async for event in read_events(resp.content):
                    message = json.loads(event.data)
                    if isinstance(message, dict):
                        self._sink(message, None)
        except (aiohttp.ClientError, ValueError) as exc:
            log.info("upstream %s: GET stream ended: %s", self._settings.name, exc)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._get_task] if self._get_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session_id:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.delete(
                    self._settings.url, headers=self._headers(accept="application/json")
                ):
                    pass


def connect(
    settings: UpstreamSettings, http: aiohttp.ClientSession, sink: Sink, on_close: OnClose
) -> Upstream:
    """The transport the upstream's settings call for."""
    if settings.is_stdio:
        return StdioUpstream(settings, sink, on_close)
    return HttpUpstream(settings, http, sink, on_close)
