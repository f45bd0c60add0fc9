"""What 2026-07-28 results carry that the initialize era's do not: `resultType` always, and the
caching hints (`ttlMs`, `cacheScope`) on the results that may be cached."""

from __future__ import annotations

from approvals.jsonrpc import JsonObject

# Methods served by passing them to the upstream session (tools/call goes through the gate).
PASSTHROUGH = frozenset(
    {
        "tools/list",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "completion/complete",
    }
)
# Results that carry caching hints in 2026-07-28 (`CacheableResult`: `ttlMs`, `cacheScope`).
CACHEABLE = PASSTHROUGH - {"prompts/get", "completion/complete"} | {"server/discover"}


def complete(result: JsonObject, method: str) -> JsonObject:
    """An initialize-era result as 2026-07-28 has it: `resultType` always, caching hints where due."""
    extra: JsonObject = {"resultType": "complete"}
    if method in CACHEABLE:
        extra.update(ttlMs=0, cacheScope="private")
    return {**extra, **result}


def as_modern(answer: JsonObject, method: str) -> JsonObject:
    result = answer.get("result")
    return {**answer, "result": complete(result, method)} if isinstance(result, dict) else answer
