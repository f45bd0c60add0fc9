"""The bundled demo upstream: risky-looking tools that only ever do harmless local work.

`make run` puts this server behind the gateway (`python -m approvals.demo_server`, stdio) so
policies have something realistic to gate. Nothing leaves the machine:

- `generate_image` renders a tiny gradient PNG from a hash of the prompt;
- `send_email` appends the message to a JSONL outbox (`APPROVALS_DEMO_OUTBOX`, else
  `<tempdir>/approvals-demo-outbox.jsonl`);
- `delete_file` and `list_files` work only inside a sandbox directory (`APPROVALS_DEMO_SANDBOX`,
  else a fresh temp dir seeded with sample files and removed on exit);
- `get_time` reads the clock.
"""

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ImageContent, TextContent, ToolAnnotations
from pydantic import Field

SERVER_NAME = "approvals-demo"
OUTBOX_ENV = "APPROVALS_DEMO_OUTBOX"
SANDBOX_ENV = "APPROVALS_DEMO_SANDBOX"
IMAGE_SIDE = 64
SAMPLE_FILES = {
    "notes.txt": "Remember to review pending approvals.\n",
    "report.csv": "quarter,revenue\nQ1,100\nQ2,120\n",
    "drafts/todo.md": "- try deleting me through the gateway\n",
}

Size = Literal["256x256", "512x512", "1024x1024"]

try:
    _VERSION = version("approvals")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0+unknown"

mcp: MCPServer[Any] = MCPServer(
    SERVER_NAME,
    version=_VERSION,
    instructions=(
        "Demo upstream for the approvals gateway. Every tool looks risky but is harmless: images are "
        "tiny generated PNGs, email goes to a local outbox file, and deletions are confined to a "
        "sandbox directory. Use list_files to see what delete_file can remove."
    ),
)

_created_sandbox: Path | None = None


def sandbox_dir() -> Path:
    """The sandbox root (resolved), created and seeded with sample files on first use if missing."""
    global _created_sandbox
    configured = os.environ.get(SANDBOX_ENV)
    if configured:
        root = Path(configured)
        if not root.exists():
            _seed(root)
    else:
        if _created_sandbox is None:
            _created_sandbox = Path(tempfile.mkdtemp(prefix="approvals-demo-sandbox-"))
            _seed(_created_sandbox)
        root = _created_sandbox
    return root.resolve()


def _seed(root: Path) -> None:
    for name, text in SAMPLE_FILES.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def outbox_path() -> Path:
    """Where `send_email` queues messages."""
    return Path(os.environ.get(OUTBOX_ENV) or Path(tempfile.gettempdir()) / "approvals-demo-outbox.jsonl")


def render_png(prompt: str, side: int = IMAGE_SIDE) -> bytes:
    """A `side`x`side` RGB PNG: a diagonal gradient between two colours derived from the prompt."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    start, end = digest[0:3], digest[3:6]
    rows = bytearray()
    span = max(2 * (side - 1), 1)
    for y in range(side):
        rows.append(0)  # filter type: None
        for x in range(side):
            t = (x + y) / span
            rows.extend(round(a + (b - a) * t) for a, b in zip(start, end, strict=True))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


@mcp.tool(
    title="Generate image",
    description=(
        "Generate an image from a text prompt (shaped like a paid image-generation API call). "
        "Demo: returns a small 64x64 gradient PNG coloured from a hash of the prompt; "
        "no external service is contacted."
    ),
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True),
)
async def generate_image(
    prompt: Annotated[str, Field(description="What the image should show.", min_length=1, max_length=2000)],
    ctx: Context[Any, Any],
    size: Annotated[Size, Field(description="Requested output size in pixels.")] = "512x512",
) -> list[ImageContent | TextContent]:
    """Render a gradient preview PNG for the prompt, reporting progress as it goes."""
    steps = ("parsing prompt", "sampling", "upscaling", "encoding PNG")
    for done, message in enumerate(steps):
        await ctx.report_progress(done, len(steps), message)
    png = render_png(prompt)
    await ctx.report_progress(len(steps), len(steps), "done")
    image = ImageContent(type="image", data=base64.b64encode(png).decode("ascii"), mime_type="image/png")
    text = f"Generated a {IMAGE_SIDE}x{IMAGE_SIDE} preview for {prompt!r} (requested {size})."
    return [image, TextContent(type="text", text=text)]


@mcp.tool(
    title="Send email",
    description=(
        "Send an email to one recipient (shaped like a real outbound email). "
        "Demo: nothing is sent; the message is appended to a local outbox file."
    ),
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True),
)
def send_email(
    to: Annotated[str, Field(description="Recipient email address.", min_length=3, max_length=320)],
    subject: Annotated[str, Field(description="Subject line.", max_length=998)],
    body: Annotated[str, Field(description="Plain-text message body.")],
) -> str:
    """Append the message to the JSONL outbox instead of sending it."""
    local, _, domain = to.partition("@")
    if not local or "." not in domain or any(c.isspace() for c in to):
        raise ToolError(f"invalid recipient address: {to!r}")
    message_id = uuid.uuid4().hex[:12]
    record = {
        "id": message_id,
        "to": to,
        "subject": subject,
        "body": body,
        "queued_at": datetime.now(UTC).isoformat(),
    }
    path = outbox_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as outbox:
        outbox.write(json.dumps(record) + "\n")
    return f"queued message {message_id} to {to}"


@mcp.tool(
    title="Delete file",
    description=(
        "Permanently delete a file (shaped like a destructive filesystem call). "
        "Demo: only files inside the demo sandbox directory can be deleted; paths escaping it are refused."
    ),
    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
)
def delete_file(
    path: Annotated[str, Field(description="File to delete, relative to the sandbox directory.")],
) -> str:
    """Delete one file inside the sandbox; anything resolving outside it is refused."""
    root = sandbox_dir()
    try:
        target = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # embedded NUL byte, symlink loop, ...
        raise ToolError(f"invalid path: {path!r}") from exc
    if target == root or not target.is_relative_to(root):
        raise ToolError(f"refused: {path!r} is outside the sandbox")
    relative = target.relative_to(root).as_posix()
    if target.is_dir():
        raise ToolError(f"refused: {relative} is a directory")
    try:
        target.unlink()
    except FileNotFoundError:
        return f"{relative} did not exist; nothing deleted"
    return f"deleted {relative}"


@mcp.tool(
    title="List files",
    description="List every file in the demo sandbox directory (the files delete_file can remove).",
    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
)
def list_files() -> list[str]:
    """Sandbox-relative POSIX paths of all files, sorted."""
    root = sandbox_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@mcp.tool(
    title="Get time",
    description="Return the current time in an IANA time zone (default UTC), in ISO 8601 format.",
    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
)
def get_time(
    timezone: Annotated[str, Field(description="IANA time zone name, e.g. 'Europe/Paris'.")] = "UTC",
) -> str:
    """The current time in `timezone`; unknown zones are a tool error."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ToolError(f"unknown time zone: {timezone!r}") from exc
    return datetime.now(zone).isoformat()


def main() -> None:
    """Serve the demo tools over stdio; remove the temp sandbox (if one was made) on exit."""
    try:
        mcp.run("stdio")
    finally:
        if _created_sandbox is not None:
            shutil.rmtree(_created_sandbox, ignore_errors=True)


if __name__ == "__main__":
    main()
