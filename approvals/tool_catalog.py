"""Tool definitions as the upstreams list them, so an approval is bound to the definition it was
asked under, and a release can tell whether the tool changed since."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from approvals.arg_schema import ArgumentProblem, SchemaCache, ToolSchema
from approvals.core.model import canonical_json, sha256_of
from approvals.core.ports import UpstreamCaller
from approvals.jsonrpc import JsonObject

log = logging.getLogger(__name__)

LIST_TIMEOUT_SECONDS = 30.0
MAX_PAGES = 50


class ToolCatalog:
    """The latest definition of every tool seen, per upstream."""

    def __init__(self, upstreams: UpstreamCaller) -> None:
        self._upstreams = upstreams
        self._tools: dict[str, dict[str, JsonObject]] = {}
        # Listings are numbered in the order they start (a logical clock: wall clocks can tie).
        # Per upstream: the listing in flight, and the newest complete one, with their numbers.
        self._started = 0
        self._inflight: dict[str, tuple[int, asyncio.Future[tuple[dict[str, JsonObject], bool]]]] = {}
        self._latest: dict[str, tuple[int, dict[str, JsonObject]]] = {}
        self._schemas = SchemaCache()
        # Per tool: the definition object its schema was compiled from, so a call pays an identity
        # check, and a new listing (new objects) looks the schema up again by its hash.
        self._checks: dict[tuple[str, str], tuple[JsonObject, ToolSchema]] = {}

    def mark(self) -> int:
        """A point in time for `fetch(after=…)`: listings that start later have higher numbers."""
        return self._started

    def remember(self, upstream: str, tools: list[JsonObject]) -> None:
        """Note definitions from a tools/list answer passing through the gateway."""
        known = self._tools.setdefault(upstream, {})
        for tool in tools:
            if isinstance(tool.get("name"), str):
                known[tool["name"]] = tool

    def argument_problem(
        self, upstream: str, tool: str, arguments: Mapping[str, object]
    ) -> ArgumentProblem | None:
        """How `arguments` break the tool's inputSchema as last seen; None when they match, or when
        the tool has not been seen (a call never waits for a listing just to be checked)."""
        definition = self._tools.get(upstream, {}).get(tool)
        if definition is None:
            return None
        key = (upstream, tool)
        checked = self._checks.get(key)
        if checked is None or checked[0] is not definition:
            checked = self._checks[key] = (definition, self._schemas.compile(definition.get("inputSchema")))
        return checked[1].problem(arguments)

    async def definition(self, upstream: str, tool: str, prefer_session: str | None) -> JsonObject | None:
        """The tool's definition: as last seen, else asked of the upstream."""
        found = self._tools.get(upstream, {}).get(tool)
        if found is None:
            found = (await self.fetch(upstream, prefer_session)).get(tool)
        return found

    async def fetch(
        self, upstream: str, prefer_session: str | None, *, after: int | None = None
    ) -> dict[str, JsonObject]:
        """Every tool of the upstream now (following pagination); {} when it cannot be listed.

        With `after` (a `mark()`), any listing that *started* after that mark will do, so callers
        share one: a release checks the definition with a listing begun after its approval was
        decided — the upstream's state after the decision — and a burst of releases needs only
        a few listings instead of one each.
        """
        if after is not None:
            latest = self._latest.get(upstream)
            if latest is not None and latest[0] > after:
                return latest[1]
            inflight = self._inflight.get(upstream)
            if inflight is not None and inflight[0] > after:
                return (await asyncio.shield(inflight[1]))[0]
        self._started += 1
        started = self._started
        listing = asyncio.ensure_future(self._list(upstream, prefer_session))
        self._inflight[upstream] = (started, listing)
        try:
            tools, complete = await asyncio.shield(listing)
        finally:
            if self._inflight.get(upstream, (0, None))[1] is listing:
                del self._inflight[upstream]
        if complete:
            self._tools[upstream] = tools
            latest = self._latest.get(upstream)
            if latest is None or latest[0] <= started:
                self._latest[upstream] = (started, tools)
        return tools

    async def _list(self, upstream: str, prefer_session: str | None) -> tuple[dict[str, JsonObject], bool]:
        """(the tools, whether the listing is complete)."""
        tools: dict[str, JsonObject] = {}
        cursor: str | None = None
        try:
            async with asyncio.timeout(LIST_TIMEOUT_SECONDS):
                for _ in range(MAX_PAGES):
                    params: JsonObject = {"cursor": cursor} if cursor else {}
                    answer = await self._upstreams.call(
                        upstream, "tools/list", params, prefer_session=prefer_session
                    )
                    result = answer.get("result")
                    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                        log.warning("upstream %s: tools/list failed: %s", upstream, answer.get("error"))
                        return tools, False
                    tools.update(
                        {t["name"]: t for t in result["tools"] if isinstance(t, dict) and "name" in t}
                    )
                    cursor = result.get("nextCursor")
                    if not isinstance(cursor, str) or not cursor:
                        break
        except TimeoutError:
            log.warning("upstream %s: tools/list took longer than %.0f s", upstream, LIST_TIMEOUT_SECONDS)
            return tools, False
        return tools, True


def fingerprint(definition: JsonObject | None) -> tuple[str, str]:
    """(definition JSON, its canonical sha256), or ("", "") when the tool is unknown."""
    if definition is None:
        return "", ""
    return canonical_json(definition), sha256_of(definition)
