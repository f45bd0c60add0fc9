"""Connections to upstream MCP servers: one `Upstream` per client session, carrying raw JSON.

Both transports push every message they receive into a `Sink` together with the id of the request
it belongs to when the transport knows it (a Streamable HTTP POST answers on its own stream;
stdio has one pipe, so the session works the relation out itself). When the connection ends for
good, `on_close` is called once with the reason; the session fails what is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

import aiohttp

from approvals.config import UpstreamSettings
from approvals.jsonrpc import UPSTREAM_UNAVAILABLE, JsonObject, decode_bytes, encode, error_response
from approvals.proxy.http1 import Pool
from approvals.proxy.http_upstream import HttpUpstream

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
                    message = decode_bytes(line)
                except ValueError as exc:
                    log.warning(
                        "upstream %s wrote a line that is not JSON the gateway accepts (%s): %.200r",
                        self._settings.name,
                        exc,
                        line,
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


def connect(
    settings: UpstreamSettings, http: aiohttp.ClientSession, pool: Pool, sink: Sink, on_close: OnClose
) -> Upstream:
    """The transport the upstream's settings call for."""
    if settings.is_stdio:
        return StdioUpstream(settings, sink, on_close)
    return HttpUpstream(settings, http, pool, sink, on_close)
