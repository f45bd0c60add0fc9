"""The Slack Web API calls of the Slack channel, each retried with backoff — and bounded.

A call that fails for a reason that may pass (HTTP 5xx, a temporary Slack error, a timeout, a
dropped connection, or 429 rate limiting, whose Retry-After is honoured up to a cap) is tried again
after a growing wait, at most :attr:`Retry.tries` times in all. A permanent error (``invalid_auth``,
``channel_not_found``…) fails at once. Either way the caller gets :class:`SlackCallFailed`, and every
retry is logged. Nothing here decides anything: a failed post only means Slack did not hear of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from approvals.errors import ApprovalsError

__all__ = ["TRANSIENT_ERRORS", "Retry", "SlackApi", "SlackCallFailed"]

log = logging.getLogger(__name__)

# Errors Slack documents as temporary; anything else (invalid_auth, channel_not_found…) will not
# fix itself on a retry, so it fails at once and is logged.
TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}
)


@dataclass(frozen=True, slots=True)
class Retry:
    """How hard to try one Slack call: bounded, so a Slack outage never piles up work."""

    tries: int = 4
    timeout: float = 10.0  # per try
    backoff: float = 0.5  # first wait; doubled after each failure
    max_wait: float = 30.0  # cap on any wait, Retry-After included

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """How long to wait after failed try number `attempt` (Retry-After when Slack gave one)."""
        if retry_after is None or not math.isfinite(retry_after):
            retry_after = self.backoff * 2 ** (attempt - 1)
        return min(max(retry_after, 0.0), self.max_wait)


class SlackCallFailed(ApprovalsError):
    """A Slack Web API call failed for good (after its retries, or at once for a permanent error)."""


class SlackApi:
    """The Slack Web API calls the channel makes, each retried by `retry`, never raising raw errors."""

    def __init__(
        self,
        client: AsyncWebClient,
        retry: Retry = Retry(),  # frozen, so one shared default is safe
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.retry = retry
        self.sleep = sleep  # tests record the waits instead of taking them

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """The JSON answer of a successful call; raises SlackCallFailed."""
        retry = self.retry
        for attempt in range(1, retry.tries + 1):
            try:
                async with asyncio.timeout(retry.timeout):
                    response = await self.client.api_call(method, json=params)
                data = response.data
                return dict(data) if isinstance(data, dict) else {}
            except SlackApiError as exc:
                status, error = exc.response.status_code, _error_code(exc.response.data)
                problem = f"HTTP {status}, {error or 'no error code'}"
                if status != 429 and status < 500 and error not in TRANSIENT_ERRORS:
                    raise SlackCallFailed(f"{method}: {problem}") from exc
                wait = retry.wait(attempt, _retry_after(exc.response.headers) if status == 429 else None)
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem, wait = f"{type(exc).__name__} {exc}".strip(), retry.wait(attempt)
            if attempt == retry.tries:
                raise SlackCallFailed(f"{method}: {problem} (gave up after {attempt} tries)")
            log.warning(
                "Slack %s failed (%s); try %d of %d in %.1f s",
                method,
                problem,
                attempt + 1,
                retry.tries,
                wait,
            )
            await self.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises on its last try


def _error_code(data: object) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None
