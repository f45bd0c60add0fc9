"""An MCP server (the SDK's MCPServer, which serves both protocol eras) with the fixtures the official
conformance suite's server scenarios call: ``test_*`` tools, ``test://`` resources and prompts.

    python tests/conformance_upstream.py            # Streamable HTTP on 127.0.0.1, prints "LISTENING <port>"
    python tests/conformance_upstream.py --stdio    # stdio

The fixtures follow the suite's scenario descriptions: content types, errors, progress, logging,
resources, prompts, completion, server-to-client sampling and elicitation (initialize era) and the
basic 2026-07-28 input-required (multi-round-trip) tools. Scenarios without a fixture here fail
directly as well, so they are not compared.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Message, UserMessage
from mcp.types import (
    AudioContent,
    CallToolResult,
    Completion,
    EmbeddedResource,
    ImageContent,
    SamplingMessage,
    TextContent,
    TextResourceContents,
)
from mcp_types import (
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    InputRequest,
    InputRequiredResult,
    ListRootsRequest,
    ListRootsResult,
)
from pydantic import BaseModel

# A 1x1 red PNG and a 44-byte silent WAV header: the smallest valid payloads of each kind.
RED_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
SILENT_WAV = base64.b64encode(
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00\x02\x00\x10\x00"
    b"data\x00\x00\x00\x00"
).decode()

server: MCPServer[Any] = MCPServer("conformance-upstream")


def _image() -> ImageContent:
    return ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png")


def _embedded(uri: str, text: str) -> EmbeddedResource:
    resource = TextResourceContents(uri=uri, mime_type="text/plain", text=text)
    return EmbeddedResource(type="resource", resource=resource)


@server.tool()
async def test_simple_text() -> str:
    """Return a text content block."""
    return "This is a simple text response for testing."


@server.tool()
async def test_image_content() -> list[ImageContent]:
    """Return an image content block."""
    return [_image()]


@server.tool()
async def test_audio_content() -> list[AudioContent]:
    """Return an audio content block."""
    return [AudioContent(type="audio", data=SILENT_WAV, mime_type="audio/wav")]


@server.tool()
async def test_embedded_resource() -> list[EmbeddedResource]:
    """Return an embedded text resource."""
    return [_embedded("test://embedded-resource", "This is an embedded resource content.")]


@server.tool()
async def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Return text, image and resource blocks together."""
    text = TextContent(type="text", text="Multiple content types test:")
    return [text, _image(), _embedded("test://mixed-content-resource", json.dumps({"test": "data"}))]


@server.tool()
async def test_error_handling() -> str:
    """Fail, so the result is an isError tool result."""
    raise RuntimeError("This tool intentionally returns an error for testing")


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Report progress 0, 50 and 100 of 100 (when the caller gave a progress token)."""
    for progress in (0, 50, 100):
        await ctx.report_progress(progress, 100)
    return "Progress test completed"


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Send three info log notifications."""
    for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(message)
    return "Logging test completed"


class UserInfo(BaseModel):
    username: str
    email: str


def _ask(text: str) -> SamplingMessage:
    return SamplingMessage(role="user", content=TextContent(type="text", text=text))


@server.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Ask the client's LLM (a server-to-client sampling/createMessage request, initialize era)."""
    result = await ctx.session.create_message(messages=[_ask(prompt)], max_tokens=100)
    text = result.content.text if isinstance(result.content, TextContent) else ""
    return f"LLM response: {text}"


@server.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Ask the user (a server-to-client elicitation/create request, initialize era)."""
    result = await ctx.elicit(message, UserInfo)
    return f"User response: {result.action}"


# The 2026-07-28 multi-round-trip fixtures: round 1 answers an InputRequiredResult naming what the
# server needs; the client retries with `inputResponses` under the same keys.
def _input_required(key: str, request: InputRequest) -> InputRequiredResult:
    return InputRequiredResult(result_type="input_required", input_requests={key: request})


def _text(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)])


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@server.tool()
async def test_input_required_result_elicitation(ctx: Context) -> CallToolResult | InputRequiredResult:
    """Ask for the user's name through an InputRequiredResult."""
    answer = (ctx.input_responses or {}).get("user_name")
    if isinstance(answer, ElicitResult):
        return _text(f"Hello, {(answer.content or {}).get('name')}!")
    params = ElicitRequestFormParams(message="What is your name?", requested_schema=NAME_SCHEMA)
    return _input_required("user_name", ElicitRequest(params=params))


@server.tool()
async def test_input_required_result_sampling(ctx: Context) -> CallToolResult | InputRequiredResult:
    """Ask the client's LLM through an InputRequiredResult."""
    answer = (ctx.input_responses or {}).get("capital_question")
    if isinstance(answer, CreateMessageResult):
        text = answer.content.text if isinstance(answer.content, TextContent) else ""
        return _text(f"The model said: {text}")
    params = CreateMessageRequestParams(messages=[_ask("What is the capital of France?")], max_tokens=100)
    return _input_required("capital_question", CreateMessageRequest(params=params))


@server.tool()
async def test_input_required_result_list_roots(ctx: Context) -> CallToolResult | InputRequiredResult:
    """Ask for the client's roots through an InputRequiredResult."""
    answer = (ctx.input_responses or {}).get("client_roots")
    if isinstance(answer, ListRootsResult):
        return _text("Roots: " + ", ".join(str(root.uri) for root in answer.roots))
    return _input_required("client_roots", ListRootsRequest())


async def _announce(ctx: Context, publish: str) -> None:
    """A list change, announced in both eras: to `subscriptions/listen` streams (2026-07-28) and on
    an initialize-era session's stream (which a 2026-07-28 request has none of)."""
    await getattr(ctx, publish)()
    with contextlib.suppress(Exception):
        session_send = (
            "send_tool_list_changed" if publish == "notify_tools_changed" else "send_prompt_list_changed"
        )
        await getattr(ctx.session, session_send)()


@server.tool()
async def test_trigger_tool_change(ctx: Context) -> str:
    """Announce that the tool list changed (the suite's listen-stream hook)."""
    await _announce(ctx, "notify_tools_changed")
    return "tools changed"


@server.tool()
async def test_trigger_prompt_change(ctx: Context) -> str:
    """Announce that the prompt list changed (the suite's listen-stream hook)."""
    await _announce(ctx, "notify_prompts_changed")
    return "prompts changed"


@server.resource("test://static-text", mime_type="text/plain")
def static_text() -> str:
    """A static text resource."""
    return "This is the content of the static text resource."


@server.resource("test://static-binary", mime_type="image/png")
def static_binary() -> bytes:
    """A static binary resource."""
    return base64.b64decode(RED_PIXEL_PNG)


@server.resource("test://template/{id}/data", mime_type="application/json")
def template_data(id: str) -> str:
    """A templated resource that echoes its id."""
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@server.prompt()
def test_simple_prompt() -> str:
    """A prompt without arguments."""
    return "This is a simple prompt for testing."


@server.prompt()
def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
    """A prompt that substitutes its two arguments."""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@server.prompt()
def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
    """A prompt that embeds a resource."""
    return [
        UserMessage(_embedded(resourceUri, "Embedded resource content for testing.")),
        UserMessage("Please process the embedded resource above."),
    ]


@server.prompt()
def test_prompt_with_image() -> list[Message]:
    """A prompt with an image."""
    return [UserMessage(_image()), UserMessage("Please analyze the image above.")]


@server.completion()
async def complete(ref: Any, argument: Any, context: Any) -> Completion:
    """Minimal completion: the capability and a well-formed answer are what the suite checks."""
    return Completion(values=[], total=0, has_more=False)


async def _serve_http() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    if "--stdio" in sys.argv:
        server.run("stdio")
    else:
        asyncio.run(_serve_http())
