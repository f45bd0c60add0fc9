"""Tool definitions as the upstreams list them, so an approval is bound to the definition it was
asked under, and a release can tell whether the tool changed since."""

from __future__ import annotations

import asyncio
import logging

from approvals.jsonrpc import JsonObject
from approvals.proxy.gate import UpstreamCaller
from approvals.store.records import canonical_json, sha256_of

log = logging.getLogger(__name__)

LIST_TIMEOUT_SECONDS = 30.0
MAX_PAGES = 50


class ToolCatalog:
    """The latest definition of every tool seen, per upstream."""

    def __init__(self, upstreams: UpstreamCaller) -> None:
        self._upstreams = upstreams
        self._tools: dict[str, dict[str, JsonObject]] = {}

    def remember(self, upstream: str, tools: list[JsonObject]) -> None:
        """Note definitions from a tools/list answer passing through the gateway."""
        known = self._tools.setdefault(upstream, {})
        for tool in tools:
            if isinstance(tool.get("name"), str):
                known[tool["name"]] = tool

    async def definition(self, upstream: str, tool: str, prefer_session: str | None) -> JsonObject | None:
        """The tool's definition: as last seen, else asked of the upstream."""
        found = self._tools.get(upstream, {}).get(tool)
        if found is None:
            found = (await self.fetch(upstream, prefer_session)).get(tool)
        return found

    async def fetch(self, upstream: str, prefer_session: str | None) -> dict[str, JsonObject]:
        """Every tool of the upstream now (following pagination); {} when it cannot be listed."""
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
                        return tools
                    tools.update(
                        {t["name"]: t for t in result["tools"] if isinstance(t, dict) and "name" in t}
                    )
                    cursor = result.get("nextCursor")
                    if not isinstance(cursor, str) or not cursor:
                        break
        except TimeoutError:
            log.warning("upstream %s: tools/list took longer than %.0f s", upstream, LIST_TIMEOUT_SECONDS)
            return tools
        self._tools[upstream] = tools
        return tools


def fingerprint(definition: JsonObject | None) -> tuple[str, str]:
    """(definition JSON, its canonical sha256), or ("", "") when the tool is unknown."""
    if definition is None:
        return "", ""
    return canonical_json(definition), sha256_of(definition)
