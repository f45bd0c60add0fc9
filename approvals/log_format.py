"""Log lines as JSON objects or text, each with the id of the HTTP request it was written for.

    request ──request_ids middleware──▶ REQUEST_ID (a contextvar) ──▶ every log line of the request
       ▲                                                        └──▶ X-Request-Id on the response
       └── X-Request-Id of the caller's own, when it is sane; else one made here

The id is a context variable, so tasks started while a request is handled (a held call's
producer, a release) carry it too. `[server] log_format` picks the form: "json" (one object a line:
time, level, logger, message, request_id, and the traceback as `exc_info`), or "text"; unset, text
on a terminal and JSON otherwise (a service manager or a container collects the lines).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import IO

from aiohttp import web
from aiohttp.typedefs import Handler

from approvals.request_context import REQUEST_ID

__all__ = [
    "REQUEST_ID",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "configure_logging",
    "echo_request_id",
    "request_id_of",
    "request_ids",
]

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's id is taken as given only when it cannot break a log line or a header: a proxy's
# UUID or trace id passes; anything longer or with other characters is replaced.
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_REQUEST_ID_KEY = web.RequestKey("request_id", str)
# One line per request at DEBUG (method, path, status, time; never the query, headers or body).
access_log = logging.getLogger("approvals.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# Made ids: a random prefix per process and a counter, unique across replicas and cheaper than
# a random id per request (this runs on every call).
_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(1)


def _new_id() -> str:
    return f"{_PREFIX}-{next(_COUNTER):x}"


def request_id_of(request: web.Request) -> str | None:
    """The id the middleware gave `request` (None before it ran)."""
    return request.get(_REQUEST_ID_KEY)


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request its id, for every log line written while it is handled and its answer."""
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given is not None and _SANE_ID.fullmatch(given) else _new_id()
    request[_REQUEST_ID_KEY] = request_id
    token = REQUEST_ID.set(request_id)
    started, status = time.perf_counter(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if access_log.isEnabledFor(logging.DEBUG):  # a cheap check on every call when off
            elapsed = (time.perf_counter() - started) * 1000
            access_log.debug("%s %s %d %.1f ms", request.method, request.path[:200], status, elapsed)
        REQUEST_ID.reset(token)


async def echo_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the header goes on every answer, streams included (their headers
    are sent before the handler returns, so the middleware cannot add it afterwards)."""
    request_id = request.get(_REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


class _WithRequestId(logging.Filter):
    """Put the current request id on every record (text lines show "-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id when in a
    request, and exc_info (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id and request_id != "-":
            line["request_id"] = request_id
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(
    log_format: str | None, stream: IO[str] | None = None, level: int = logging.INFO
) -> str:
    """Send the root logger's lines to `stream` (stderr) in `log_format`; the format chosen.

    None picks text when the stream is a terminal and JSON otherwise.
    """
    stream = sys.stderr if stream is None else stream
    chosen = log_format or ("text" if stream.isatty() else "json")
    handler = logging.StreamHandler(stream)
    handler.addFilter(_WithRequestId())
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return chosen
