"""`approvals list | approve | deny | standing`: a reviewer's calls to a running gateway's JSON API.

Ids may be given as a unique prefix (the `8ae0cd12…` of the agent's progress messages): the prefix
is matched against every approval the API lists, so one that could name two approvals never
decides either. Several ids are resolved together (one scan) before anything is decided.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from approvals.core import render
from approvals.core.why import diff_arguments
from approvals.errors import ApprovalsError

TIMEOUT = aiohttp.ClientTimeout(total=30)
ID_LENGTH = 32  # an approval id is a uuid4 in hex: anything this long is taken as a whole id
PAGE = 500  # the API's largest page
MAX_SCANNED = 100_000  # approvals read to prove a prefix unique before asking for the whole id
MAX_CANDIDATES = 10  # ids listed when a prefix is ambiguous
MAX_BATCH = 200  # ids the API decides in one request
ARGUMENTS_WIDTH = 60  # the table's last column: a preview, as in the inbox's list
EXIT_FAILED = 1
EXIT_AMBIGUOUS = 2  # a usage error, as argparse's: the command was not specific enough


class ReviewError(ApprovalsError):
    """The gateway refused or could not be reached; the message says which and why."""

    exit_status = EXIT_FAILED


class AmbiguousId(ReviewError):
    """An id prefix that matches more than one approval."""

    exit_status = EXIT_AMBIGUOUS


async def call(
    url: str, token: str, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> Any:
    """One request to the API: its JSON answer, or ReviewError saying why there is none."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        return await request(http, url, token, method, path, body, params)


async def request(
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


def now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def utc(ts: float) -> str:
    """2026-11-02 14:03:05 UTC"""
    return f"{datetime.datetime.fromtimestamp(ts, datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first one the header) as fixed-width columns; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def render_table(approvals: list[dict[str, Any]], now: float) -> str:
    """The approvals as a fixed-width table, one line each (arguments shortened)."""
    if not approvals:
        return "no approvals"
    rows: list[tuple[str, ...]] = [
        ("ID", "STATUS", "UPSTREAM", "TOOL", "AGENT", "AGE", "EXPIRES IN", "APPROVALS", "ARGUMENTS")
    ]
    for a in approvals:
        expires = render.span(a["expires_at"] - now) if a["status"] in ("pending", "approved") else "-"
        cells = (a["id"], a["status"], a["upstream"], a["tool"], a["grant"])
        # Untrusted text (tool names and arguments come from agents) could carry a right-to-left
        # override that makes `invoice_\u202egnp.exe` read `invoice_exe.png`: shown as markers.
        # What a release would send: a reviewer's edit, marked, when there is one.
        edited = "edited_arguments" in a
        shown = a["edited_arguments"] if edited else a["arguments"]
        summary = ("(edited) " if edited else "") + render.summary(shown, ARGUMENTS_WIDTH)
        age = render.span(now - a["created_at"])
        rows.append((*map(render.visible, cells), age, expires, quorum_cell(a.get("review")), summary))
    return table(rows)


def quorum_cell(review: dict[str, Any] | None) -> str:
    """ "1/2": approvals counted of those needed, for a rule that needs more than one ("-" otherwise)."""
    if not review:
        return "-"
    rule = review.get("rule") or {}
    needed = max(int(rule.get("quorum", 1)), len(rule.get("from", ())))
    return f"{len(review.get('votes', ()))}/{needed}" if needed > 1 else "-"


async def list_approvals(url: str, token: str, status: str | None) -> str:
    data = await call(url, token, "GET", "/api/approvals", params={"status": status} if status else None)
    return render_table(data["approvals"], now())


async def resolve_id(url: str, token: str, given: str) -> str:
    """The whole id of the one approval whose id starts with `given` (ids are shown shortened)."""
    (whole,) = await resolve_ids(url, token, [given])
    return whole


async def resolve_ids(url: str, token: str, given: Sequence[str]) -> list[str]:
    """The whole ids of the approvals `given` names (whole ids or unique prefixes), in order and
    each once; ReviewError (AmbiguousId) for the first that names none (several)."""
    prefixes = {g.lower() for g in given if len(g) < ID_LENGTH}
    if "" in prefixes:
        raise ReviewError("give an approval id (or its first characters, as `approvals list` shows)")
    listed = await _approvals_starting_with(url, token, prefixes) if prefixes else []
    resolved: list[str] = []
    for one in given:
        whole = one if len(one) >= ID_LENGTH else _one_match(one, listed)
        if whole not in resolved:
            resolved.append(whole)
    return resolved


def _one_match(given: str, listed: list[dict[str, Any]]) -> str:
    matches = [a for a in listed if str(a["id"]).lower().startswith(given.lower())]
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


async def _approvals_starting_with(url: str, token: str, prefixes: set[str]) -> list[dict[str, Any]]:
    """Every approval (of any status) whose id starts with one of `prefixes`, newest first."""
    found: dict[str, dict[str, Any]] = {}  # by id: a page boundary that shifts may show one twice
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for offset in range(0, MAX_SCANNED, PAGE):
            params = {"limit": str(PAGE), "offset": str(offset)}
            page = (await request(http, url, token, "GET", "/api/approvals", params=params))["approvals"]
            found |= {a["id"]: a for a in page if str(a["id"]).lower().startswith(tuple(prefixes))}
            if len(page) < PAGE:
                return list(found.values())
    raise ReviewError(
        f"there are more than {MAX_SCANNED} approvals, too many to be sure a prefix names only one;"
        " give the whole id"
    )


async def decide(
    url: str,
    token: str,
    approval_id: str,
    approve: bool,
    reason: str | None,
    *,
    arguments: dict[str, Any] | None = None,
    remember: dict[str, Any] | None = None,
    seen_sha256: str | None = None,
) -> str:
    """Decide one approval; what to print (the outcome, the edit, the standing grant saved)."""
    verb = "approve" if approve else "deny"
    # Quoted whole: an id like "X/deny?" must not turn an approve into another request.
    path = f"/api/approvals/{quote(approval_id, safe='')}/{verb}"
    body: dict[str, Any] = {"reason": reason}
    if arguments is not None:
        body["arguments"] = arguments
    if remember is not None:
        body["remember"] = remember
    if seen_sha256 is not None:
        body["seen_sha256"] = seen_sha256
    return outcome_text(await call(url, token, "POST", path, body), reason)


async def decide_many(
    url: str, token: str, approval_ids: Sequence[str], approve: bool, reason: str | None
) -> list[tuple[bool, str]]:
    """Decide each approval on its own (the batch endpoint, 200 at a time): per id, whether it was
    decided and the line to print."""
    verb = "approve" if approve else "deny"
    out: list[tuple[bool, str]] = []
    for start in range(0, len(approval_ids), MAX_BATCH):
        ids = list(approval_ids[start : start + MAX_BATCH])
        data = await call(url, token, "POST", f"/api/approvals/{verb}", {"ids": ids, "reason": reason})
        for result in data["results"]:
            if result["ok"]:
                out.append((True, outcome_text(result["approval"], reason)))
            else:
                line = f"{result['id']}: {result['http_status']}: {result['error']}"
                out.append((False, render.visible(render.one_line(line))))
    return out


def outcome_text(record: dict[str, Any], reason: str | None) -> str:
    """ "ID: approved by bob (ok)", or while the quorum needs more "ID: approved (1 of 2 approvals,
    waiting for someone in security)"; then the edit and the standing grant, when there are."""
    if record["status"] == "pending":  # the approval was counted; the call waits for more
        progress = (record.get("review") or {}).get("progress") or "waiting for more approvals"
        lines = [f"{record['id']}: approved ({progress})"]
    else:
        decided = f"{record['id']}: {render.decided(record['status'])} by {record['decided_by']}"
        lines = [decided + (f" ({reason})" if reason else "")]
    if "edited_arguments" in record:
        changes = diff_arguments(record["arguments"], record["edited_arguments"])
        shown = "; ".join(f"{c.path}: {c.before or '(none)'} → {c.after or '(none)'}" for c in changes)
        lines.append(f"  arguments changed by {record.get('edited_by')}: {shown or 'no difference'}")
    if grant := record.get("standing_grant"):
        lines.append(remembered_text(grant))
    return "\n".join(render.visible(line) for line in lines)


def remembered_text(grant: dict[str, Any]) -> str:
    """ "remembered as sg_… until 2026-11-02 15:03:05 UTC (at most 50 uses)", and what it matches."""
    text = f"remembered as {grant['id']} until {utc(grant['expires_at'])}"
    if grant.get("max_uses") is not None:
        text += f" (at most {grant['max_uses']} uses)"
    if grant.get("effect") == "deny":
        text += ": matching calls are denied"
    described = grant.get("described") or []
    return text + (f"\n  for calls where {'; '.join(described)}" if described else "")


def fail(message: str, status: int = EXIT_FAILED) -> None:
    # The gateway's messages can quote what an agent sent: hidden characters are shown as markers.
    print(f"error: {render.visible(message)}", file=sys.stderr)
    sys.exit(status)
