"""2026-07-28 clients in front of 2026-07-28 upstreams: eras learned, requests passed through as they
are (input-required results, subscriptions/listen), the upstream's credentials and never the client's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp import types

from approvals.proxy.keys import GATEWAY
from approvals.proxy.modern_upstream import Eras
from tests.conftest import DEMO_COMMAND, WAIT, StartGateway, mcp_client
from tests.modern_kit import (
    ASK_NAME,
    MODERN,
    call,
    modern_headers,
    modern_request,
    post,
    start_policed,
)
from tests.modern_upstream import start_modern_only, start_one_era
from tests.upstreams import start_everything

ALLOW_ALL = {"version": "1", "default": "allow"}


async def test_eras_are_learned_per_upstream(start_gateway: StartGateway, dual_url: str) -> None:
    """Each upstream is asked once what it speaks; a stdio upstream is initialize-era without asking."""
    async with start_modern_only() as modern_url, start_everything() as everything_url:
        gw = await start_gateway(
            {
                "dual": {"url": dual_url},
                "modern": {"url": modern_url},
                "everything": {"url": everything_url},
                "demo": {"command": DEMO_COMMAND},
            }
        )
        eras = gw.app[GATEWAY].eras
        assert await eras.of("dual") == Eras(modern=True, legacy=True)
        assert await eras.of("modern") == Eras(modern=True, legacy=False)
        assert await eras.of("everything") == Eras(modern=False, legacy=True)
        assert eras.known("demo") == Eras(modern=False, legacy=True)


async def test_unreachable_upstream_is_asked_again(start_gateway: StartGateway) -> None:
    """An upstream that cannot be reached is not remembered as anything: the next request asks again."""
    gw = await start_gateway({"gone": {"url": "http://127.0.0.1:9/mcp"}})
    eras = gw.app[GATEWAY].eras
    assert await eras.of("gone") == Eras(modern=False, legacy=True)
    assert eras.known("gone") is None


async def test_pinned_client_completes_an_input_required_call(
    start_gateway: StartGateway, dual_url: str
) -> None:
    """mcp.Client at 2026-07-28: the upstream's InputRequiredResult reaches it and its retry completes."""
    gw = await start_gateway({"up": {"url": dual_url}})
    asked: list[str] = []

    async def elicit(context: Any, params: Any) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with mcp_client(gw.url("up"), mode=MODERN, elicitation_callback=elicit) as client:
        result = await asyncio.wait_for(client.call_tool(ASK_NAME, {}), WAIT)
    assert asked == ["What is your name?"]
    assert result.content[0].text == "Hello, Ada!"  # type: ignore[union-attr]
    assert gw.app[GATEWAY].pool._sessions == {}  # passed through: no upstream session was opened


async def test_discover_is_the_upstreams_own(
    start_gateway: StartGateway, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """server/discover comes from the upstream itself: its subscription capabilities are kept."""
    gw = await start_gateway({"up": {"url": dual_url}})
    status, answer = await post(http, gw.url("up"), modern_request("server/discover"))
    assert status == 200
    result = answer["result"]
    assert result["supportedVersions"] == [MODERN]
    assert result["capabilities"]["tools"] == {"listChanged": True}
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "conformance-upstream"


async def test_upstream_errors_keep_their_status(
    start_gateway: StartGateway, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """An upstream's error is passed on as it is, HTTP status included (a missing resource)."""
    gw = await start_gateway({"up": {"url": dual_url}})
    body = modern_request("resources/read", {"uri": "test://no-such-resource"})
    through = await post(http, gw.url("up"), body)
    direct = await post(http, dual_url, body)
    assert through == direct
    assert through[1]["id"] == 7
    assert through[1]["error"]["code"] == -32602


async def test_policy_still_filters_and_judges(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """Passed through, tools/list is still filtered by the policy and a denied call stays denied."""
    policy = {
        "version": "1",
        "default": "allow",
        "hide": ["test_audio_content"],
        "tools": {"test_simple_text": {"action": "deny", "reason": "not today"}},
    }
    policed = await start_policed(start_gateway, tmp_path, dual_url, policy)
    _, listed = await post(http, policed.url, modern_request("tools/list"))
    names = {tool["name"] for tool in listed["result"]["tools"]}
    assert "test_audio_content" not in names
    assert "test_image_content" in names
    _, denied = await post(http, policed.url, call("test_simple_text"))
    assert denied["result"]["isError"] is True
    assert "not today" in json.dumps(denied["result"])


async def test_client_credentials_never_reach_the_upstream(
    start_gateway: StartGateway, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The upstream gets its own configured headers, never the client's Authorization or cookies; an
    Mcp-Param header is passed on only when it mirrors a judged argument."""
    seen: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        body = await request.json()
        result: dict[str, Any] = {"resultType": "complete", "content": [{"type": "text", "text": "ok"}]}
        if body["method"] == "server/discover":
            result = {"resultType": "complete", "supportedVersions": [MODERN], "capabilities": {"tools": {}}}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})

    app = web.Application()
    app.router.add_post("/mcp", upstream)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url("/mcp"))
        gw = await start_gateway({"up": {"url": url, "headers": {"Authorization": "Bearer upstream-secret"}}})
        body = call("anything", {"region": "eu"})
        headers = {**modern_headers(body), "Cookie": "session=client", "Mcp-Param-Region": "eu"}
        async with http.post(gw.url("up"), data=json.dumps(body), headers=headers) as response:
            assert response.status == 200
        calls = len(seen)
        headers["Mcp-Param-Region"] = "us"  # not what the policy judged: refused, never sent
        async with http.post(gw.url("up"), data=json.dumps(body), headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == -32020
        assert len(seen) == calls
    finally:
        await server.close()
    forwarded = seen[-1]
    assert forwarded["Authorization"] == "Bearer upstream-secret"
    assert "Cookie" not in forwarded
    assert forwarded["Mcp-Param-Region"] == "eu"
    assert (forwarded["Mcp-Method"], forwarded["Mcp-Name"]) == ("tools/call", "anything")


async def _listen(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """Open subscriptions/listen; the response (still open) and its first message."""
    body = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}})
    response = await http.post(url, data=json.dumps(body), headers=modern_headers(body))
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    async with asyncio.timeout(WAIT):
        while True:
            line = (await response.content.readline()).decode().strip()
            if line.startswith("data:"):
                return response, json.loads(line[5:])


async def test_listen_is_passed_through_and_bounded_per_grant(
    start_gateway: StartGateway, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """subscriptions/listen streams from the upstream (acknowledged first); a grant gets at most its
    bound, and a stream the client closes gives its slot back."""
    gw = await start_gateway({"up": {"url": dual_url}})
    listens = gw.app[GATEWAY].listens
    listens.per_grant = 1
    listens.keepalive_seconds = 0.05  # how soon a closed client is noticed
    first, ack = await _listen(http, gw.url("up"))
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    body = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}})
    async with http.post(gw.url("up"), data=json.dumps(body), headers=modern_headers(body)) as refused:
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == -32600
    first.close()
    await asyncio.wait_for(listens.wait_until("agent-a", 0), WAIT)
    second, ack = await _listen(http, gw.url("up"))
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    second.close()


async def _next_message(response: aiohttp.ClientResponse) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            line = (await response.content.readline()).decode().strip()
            if line.startswith("data:"):
                return json.loads(line[5:])  # type: ignore[no-any-return]


async def test_listen_is_bridged_from_an_initialize_era_upstream(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """In front of an initialize-era upstream, a listen stream gets the pooled session's list changes:
    acknowledged with what the upstream announces, filtered as asked, tagged with the subscription id."""
    async with start_one_era("legacy") as legacy_url:
        gw = await start_gateway({"up": {"url": legacy_url}})
        _, discovered = await post(http, gw.url("up"), modern_request("server/discover"))
        assert discovered["result"]["capabilities"]["prompts"] == {"listChanged": True}
        body = modern_request("subscriptions/listen", {"notifications": {"promptsListChanged": True}}, 41)
        async with http.post(gw.url("up"), data=json.dumps(body), headers=modern_headers(body)) as stream:
            ack = await _next_message(stream)
            assert ack["method"] == "notifications/subscriptions/acknowledged"
            assert ack["params"]["notifications"] == {"promptsListChanged": True}
            assert ack["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": 41}
            _, done = await post(http, gw.url("up"), call("test_trigger_tool_change"))  # not asked for
            assert not done["result"].get("isError")
            await post(http, gw.url("up"), call("test_trigger_prompt_change"))
            changed = await _next_message(stream)
    assert changed["method"] == "notifications/prompts/list_changed"
    assert changed["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": 41}


async def test_held_call_to_a_2026_only_upstream_is_released_and_answered(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A 2026 client's held call to a 2026-only upstream: approved, released as a 2026 request, answered."""
    policy = {
        "version": "1",
        "default": "allow",
        "tools": {"test_simple_text": {"action": "require_approval"}},
    }
    async with start_modern_only() as modern_url:
        policed = await start_policed(
            start_gateway, tmp_path, modern_url, policy, approvals={"hold_seconds": 10}
        )
        async with mcp_client(policed.url, mode=MODERN) as client:
            running = asyncio.create_task(client.call_tool("test_simple_text", {}))
            pending = await policed.recorder.status("pending")
            await policed.decide(pending.id, "approve")
            result = await asyncio.wait_for(running, WAIT)
    assert not result.is_error
    assert result.content[0].text == "This is a simple text response for testing."  # type: ignore[union-attr]


async def test_listen_without_a_filter_is_invalid_params(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """A listen request whose params.notifications is not an object is refused with 400 and -32602."""
    async with start_one_era("legacy") as legacy_url:
        gw = await start_gateway({"up": {"url": legacy_url}})
        status, refused = await post(http, gw.url("up"), modern_request("subscriptions/listen", {}))
    assert (status, refused["error"]["code"], refused["id"]) == (400, -32602, 7)
