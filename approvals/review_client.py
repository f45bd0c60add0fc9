"""`approvals list | approve | deny`: a reviewer's commands against a running gateway's JSON API."""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any
from urllib.parse import quote

import aiohttp

from approvals.durations import format_duration

TIMEOUT = aiohttp.ClientTimeout(total=30)


class ReviewError(Exception):
    """The gateway refused or could not be reached; the message says which and why."""


async def _call(
    url: str, token: str, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    target = f"{url.rstrip('/')}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.request(method, target, json=body, headers=headers, params=params) as response,
        ):
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = {"error": (await response.text())[:200]}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ReviewError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None
    if response.status >= 400:
        message = str(data.get("error", "")) if isinstance(data, dict) else str(data)
        prefix = f"{response.status}: "
        raise ReviewError(message if message.startswith(prefix) else prefix + (message or "HTTP error"))
    return data


def _age(seconds: float) -> str:
    return format_duration(max(seconds, 0))


def render_table(approvals: list[dict[str, Any]], now: float) -> str:
    """The approvals as a fixed-width table, one line each (arguments shortened)."""
    if not approvals:
        return "no approvals"
    rows = [("ID", "STATUS", "UPSTREAM", "TOOL", "AGENT", "AGE", "EXPIRES IN", "ARGUMENTS")]
    for a in approvals:
        args = json.dumps(a["arguments"], ensure_ascii=False)
        expires = _age(a["expires_at"] - now) if a["status"] in ("pending", "approved") else "-"
        rows.append(
            (
                a["id"],
                a["status"],
                a["upstream"],
                a["tool"],
                a["grant"],
                _age(now - a["created_at"]),
                expires,
                args if len(args) <= 60 else args[:57] + "...",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


async def list_approvals(url: str, token: str, status: str | None) -> str:
    data = await _call(url, token, "GET", "/api/approvals", params={"status": status} if status else None)
    return render_table(data["approvals"], datetime.datetime.now(datetime.UTC).timestamp())


async def decide(url: str, token: str, approval_id: str, approve: bool, reason: str | None) -> str:
    verb = "approve" if approve else "deny"
    # Quoted whole: an id like "X/deny?" must not turn an approve into another request.
    path = f"/api/approvals/{quote(approval_id, safe='')}/{verb}"
    data = await _call(url, token, "POST", path, {"reason": reason})
    return f"{data['id']}: {data['status']} by {data['decided_by']}" + (f" ({reason})" if reason else "")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
