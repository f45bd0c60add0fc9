"""`approvals policy replay`: what a candidate policy would have done with the calls the gateway held.

    approvals policy replay --policy candidate.json [--since 7d] [--config gateway.toml]
                            [--upstream NAME] [--format text|json]
        exit 0  per tool: how many recorded calls the candidate allows, holds, denies, rate-limits
                (and refuses as invalid); the held calls it would let through unasked, with what
                the reviewers decided then
        exit 2  the candidate is invalid (each problem with its path), the config or --since is
                bad, or the history cannot be read

It reads the store the config names (the SQLite file, or PostgreSQL at ``[store] url``) directly,
as `approvals audit` does, and judges with :mod:`approvals.replay`: nothing is sent upstream and
nothing is written. Only held calls are recorded, and every report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from approvals.cli_audit import parse_since
from approvals.config import Settings, load_settings
from approvals.core import render
from approvals.core.model import Approval
from approvals.errors import ApprovalsError
from approvals.policy_files import read_policy
from approvals.replay import NOT_RECORDED, OUTCOMES, Replay, arguments_of, replay
from approvals.store.reading import existing_store
from approvals.web.inbox_format import iso, iso_machine

__all__ = [
    "EXIT_TROUBLE",
    "add_parser",
    "main",
    "read_history",
    "report_json",
    "report_text",
    "run",
]

DEFAULT_CONFIG = Path("config/gateway.toml")  # as `approvals serve` has it
DEFAULT_SINCE = "7d"
EXIT_TROUBLE = 2  # nothing was replayed: the candidate, the config or the history is at fault
PAGE = 500  # records read per query, newest first, until one is older than --since
ARGUMENTS_WIDTH = 60
MAX_LISTED = 50  # flips listed in the text report; the JSON has them all
_LIST_ORDER = {"denied": 0, "approved": 2}  # then expired, cancelled, pending (1)
WRAP = 100  # the prose lines; tables are as wide as they need
_HEADINGS = {"allowed": "ALLOWED", "held": "HELD", "denied": "DENIED", "rate_limited": "RATE-LIMITED"}


def add_parser(subparsers: Any) -> None:
    """Add `policy replay` to the `approvals` command's subparsers."""
    policy = subparsers.add_parser("policy", help="replay the held calls under a candidate policy")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    again = actions.add_parser(
        "replay", help="judge the recorded (held) calls under a candidate policy; print what changes"
    )
    again.add_argument("--policy", type=Path, required=True, help="the candidate policy.json")
    again.add_argument(
        "--since",
        default=DEFAULT_SINCE,
        help="a duration back from now (7d, 12h, 30m) or an ISO time (default: %(default)s)",
    )
    again.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="gateway.toml (default: %(default)s)"
    )
    again.add_argument("--upstream", help="only this upstream's calls (default: every upstream's)")
    again.add_argument("--format", choices=("text", "json"), default="text", help="default: %(default)s")


def run(args: argparse.Namespace, out: TextIO | None = None, clock: Callable[[], float] = time.time) -> int:
    """Run the parsed `policy replay` command; its exit status."""
    out = out or sys.stdout
    now = clock()
    try:
        since = parse_since(args.since, now)
        if since.at is None:
            raise ValueError(f"must be a duration like 7d or an ISO time (got {args.since!r})")
    except ValueError as exc:
        print(f"error: --since {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    try:
        candidate = read_policy(args.policy)  # first: a typo in the candidate needs no database
        settings = load_settings(args.config)
        if args.upstream is not None and args.upstream not in settings.upstreams:
            known = ", ".join(sorted(settings.upstreams)) or "none"
            print(
                f"error: --upstream {args.upstream!r} is not an upstream of {args.config} (known: {known})",
                file=sys.stderr,
            )
            return EXIT_TROUBLE
        records = asyncio.run(read_history(settings, since.at, args.upstream))
    except ApprovalsError as exc:  # the candidate (with every problem's path), the config, the store
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    result = replay(records, candidate)
    header = {
        "policy": str(args.policy),
        "upstream": args.upstream,
        "since": iso_machine(since.at),
        "until": iso_machine(now),
    }
    out.write(report_json(result, header) if args.format == "json" else report_text(result, header))
    out.flush()
    return 0


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, clock: Callable[[], float] = time.time
) -> int:
    """`approvals policy …` on its own, parsed as the `approvals` command parses it (for tests)."""
    parser = argparse.ArgumentParser(prog="approvals")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv), out, clock)


async def read_history(settings: Settings, since: float, upstream: str | None) -> list[Approval]:
    """Every record created at ``since`` or later (of one upstream, or all), in any state."""
    found: dict[str, Approval] = {}  # by id: a record created while paging shifts a page by one
    async with existing_store(settings, "history") as store:
        offset = 0
        while page := await store.list_approvals(upstream=upstream, limit=PAGE, offset=offset):
            found |= {a.id: a for a in page if a.created_at >= since}
            if page[-1].created_at < since or len(page) < PAGE:
                break  # newest first: the rest are older still
            offset += PAGE
    return list(found.values())


# ---- the report ------------------------------------------------------------------------------------


def report_json(result: Replay, header: dict[str, Any]) -> str:
    """The replay for machines: the header, counts in total and per tool, and every flip."""
    body = {
        **header,
        "note": NOT_RECORDED,
        "calls": len(result.judged),
        "totals": result.totals(),
        "tools": [
            {"upstream": t.upstream, "tool": t.tool, "calls": t.calls, **t.counts} for t in result.by_tool()
        ],
        "flips": [
            {
                "id": item.approval.id,
                "upstream": item.approval.upstream,
                "tool": item.approval.tool,
                "grant": item.approval.grant,
                "created_at": iso_machine(item.approval.created_at),
                "arguments": render.summary(arguments_of(item.approval) or {}),
                "args_sha256": item.approval.args_sha256,
                "rule_then": item.approval.rule,
                "rule_now": item.rule,
                "then": item.then,
                "decided_by": item.approval.decided_by,
            }
            for item in result.flips()
        ],
        "flip_verdicts": [
            {"upstream": upstream, "tool": tool, "would_pass": sum(tally.values()), "then": tally}
            for upstream, tool, tally in result.flip_verdicts()
        ],
    }
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def report_text(result: Replay, header: dict[str, Any]) -> str:
    """The replay for people: a table per tool, then the calls that would no longer be asked about."""
    where = f"upstream {render.visible(header['upstream'])}" if header["upstream"] else "every upstream"
    lines = [
        f"Replayed {len(result.judged)} held call(s) of {where} from {header['since']} to {header['until']}"
        f" under {render.visible(header['policy'])}.",
        *textwrap.wrap(NOT_RECORDED, WRAP),
        "",
    ]
    if not result.judged:
        return "\n".join([*lines, "No held calls in that time: nothing to replay."]) + "\n"
    totals = result.totals()
    shown = [o for o in OUTCOMES if o != "invalid" or totals["invalid"]]  # invalid: rare, shown when seen
    rows = [["UPSTREAM", "TOOL", "CALLS", *(_HEADINGS.get(o, o.upper()) for o in shown)]]
    for counted in result.by_tool():
        counts = [str(counted.counts[o]) for o in shown]
        names = [render.visible(counted.upstream), render.visible(counted.tool)]
        rows.append([*names, str(counted.calls), *counts])
    rows.append(["total", "", str(len(result.judged)), *(str(totals[o]) for o in shown)])
    lines += _table(rows)
    flips = result.flips()
    lines += ["", f"Held then, allowed without review under the candidate: {len(flips)}"]
    for upstream, name, tally in result.flip_verdicts():
        lines.append(f"  {render.visible(upstream)}/{render.visible(name)}: {_verdict_line(tally)}")
    if flips:
        # What a reviewer refused then and would now pass unasked matters most: listed first.
        listed = sorted(flips, key=lambda item: _LIST_ORDER.get(item.then, 1))[:MAX_LISTED]
        rows = [["ID", "CREATED", "TOOL", "AGENT", "THEN", "ARGUMENTS"]]
        for item in listed:
            a = item.approval
            then = item.then + (f" by {render.visible(a.decided_by)}" if a.decided_by else "")
            rows.append(
                [
                    a.id[:12],
                    iso(a.created_at),
                    f"{render.visible(a.upstream)}/{render.visible(a.tool)}",
                    render.visible(a.grant),
                    then,
                    render.summary(arguments_of(a) or {}, ARGUMENTS_WIDTH),
                ]
            )
        lines += ["", *_table(rows)]
        if len(flips) > MAX_LISTED:
            lines.append(f"… and {len(flips) - MAX_LISTED} more (--format json lists every one)")
    return "\n".join(lines) + "\n"


def _verdict_line(tally: dict[str, int]) -> str:
    """ "reviewers approved 12 of 14 that would now pass unasked (1 denied, 1 expired)"."""
    total = sum(tally.values())
    others = ", ".join(f"{n} {verdict}" for verdict, n in sorted(tally.items()) if verdict != "approved")
    line = f"reviewers approved {tally.get('approved', 0)} of {total} that would now pass unasked"
    return line + (f" ({others})" if others else "")


def _table(rows: list[list[str]]) -> list[str]:
    """Fixed-width columns, the last one left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]).rstrip()
        for row in rows
    ]
