"""`approvals list | approve | deny`: a reviewer's commands against a running gateway's JSON API.

Ids may be given as a unique prefix (the `8ae0cd12…` of the agent's progress messages): the prefix
is matched against every approval the API lists, so one that could name two approvals never
decides either.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any
from urllib.parse import quote

import aiohttp

from approvals.core import render
from approvals.errors import ApprovalsError

TIMEOUT = aiohttp.ClientTimeout(total=30)
ID_LENGTH = 32  # an approval id is a uuid4 in hex: anything this long is taken as a whole id
PAGE = 500  # the API's largest page
MAX_SCANNED = 100_000  # approvals read to prove a prefix unique before asking for the whole id
MAX_CANDIDATES = 10  # ids listed when a prefix is ambiguous
ARGUMENTS_WIDTH = 60  # the table's last column: a preview, as in the inbox's list
EXIT_FAILED = 1
EXIT_AMBIGUOUS = 2  # a usage error, as argparse's: the command was not specific enough


class ReviewError(ApprovalsError):
    """The gateway refused or could not be reached; the message says which and why."""

    exit_status = EXIT_FAILED


class AmbiguousId(ReviewError):
    """An id prefix that matches more than one approval."""

    exit_status = EXIT_AMBIGUOUS


async def _call(
    url: str, token: str, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> Any:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        return await _request(http, url, token, method, path, body, params)


async def _request(
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    target = f"{url.rstrip('/')}{path}"
    try:
        async with http.request(method, target, json=body, headers=headers, params=params) as response:
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


def render_table(approvals: list[dict[str, Any]], now: float) -> str:
    """The approvals as a fixed-width table, one line each (arguments shortened)."""
    if not approvals:
        return "no approvals"
    rows: list[tuple[str, ...]] = [
        ("ID", "STATUS", "UPSTREAM", "TOOL", "AGENT", "AGE", "EXPIRES IN", "ARGUMENTS")
    ]
    for a in approvals:
        expires = render.span(a["expires_at"] - now) if a["status"] in ("pending", "approved") else "-"
        cells = (a["id"], a["status"], a["upstream"], a["tool"], a["grant"])
        # Untrusted text (tool names and arguments come from agents) could carry a right-to-left
        # override that makes `invoice_\u202egnp.exe` read `invoice_exe.png`: shown as markers.
        summary = render.summary(a["arguments"], ARGUMENTS_WIDTH)
        rows.append((*map(render.visible, cells), render.span(now - a["created_at"]), expires, summary))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


async def list_approvals(url: str, token: str, status: str | None) -> str:
    data = await _call(url, token, "GET", "/api/approvals", params={"status": status} if status else None)
    return render_table(data["approvals"], datetime.datetime.now(datetime.UTC).timestamp())


async def resolve_id(url: str, token: str, given: str) -> str:
    """The whole id of the one approval whose id starts with `given` (ids are shown shortened)."""
    if len(given) >= ID_LENGTH:
        return given  # a whole id, or not an id at all: the gateway says which
    prefix = given.lower()
    if not prefix:
        raise ReviewError("give an approval id (or its first characters, as `approvals list` shows)")
    matches = await _ids_starting_with(url, token, prefix)
    if not matches:
        raise ReviewError(
            f"no approval has an id starting with {given!r} (see `approvals list --status all`)"
        )
    if len(matches) > 1:
        shown = [f"{a['id']} ({a['status']}, {a['tool']})" for a in matches[:MAX_CANDIDATES]]
        more = f" and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
        raise AmbiguousId(
            f"{given!r} is the start of {len(matches)} approval ids: {', '.join(shown)}{more};"
            " give more of the id"
        )
    whole: str = matches[0]["id"]
    return whole


async def _ids_starting_with(url: str, token: str, prefix: str) -> list[dict[str, Any]]:
    """Every approval (of any status) whose id starts with `prefix`, newest first."""
    found: dict[str, dict[str, Any]] = {}  # by id: a page boundary that shifts may show one twice
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for offset in range(0, MAX_SCANNED, PAGE):
            params = {"limit": str(PAGE), "offset": str(offset)}
            page = (await _request(http, url, token, "GET", "/api/approvals", params=params))["approvals"]
            found |= {a["id"]: a for a in page if str(a["id"]).lower().startswith(prefix)}
            if len(page) < PAGE:
                return list(found.values())
    raise ReviewError(
        f"there are more than {MAX_SCANNED} approvals, too many to be sure {prefix!r} names only one;"
        " give the whole id"
    )


async def decide(url: str, token: str, approval_id: str, approve: bool, reason: str | None) -> str:
    verb = "approve" if approve else "deny"
    # Quoted whole: an id like "X/deny?" must not turn an approve into another request.
    path = f"/api/approvals/{quote(approval_id, safe='')}/{verb}"
    data = await _call(url, token, "POST", path, {"reason": reason})
    decided = f"{data['id']}: {render.decided(data['status'])} by {data['decided_by']}"
    return render.visible(decided + (f" ({reason})" if reason else ""))


def fail(message: str, status: int = EXIT_FAILED) -> None:
    # The gateway's messages can quote what an agent sent: hidden characters are shown as markers.
    print(f"error: {render.visible(message)}", file=sys.stderr)
    sys.exit(status)
