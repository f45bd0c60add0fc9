"""`approvals audit verify | export`: check the audit log's hash chain, and copy the log out.

    approvals audit verify [--config gateway.toml]
        exit 0  "chain intact: N events"
        exit 1  the first broken link: "audit chain broken at seq 17: edited: …"
        exit 2  the log could not be read (bad config, no database, database down)

    approvals audit export [--config …] [--since 7d | 2026-01-31T00:00:00Z | seq:N] [--format jsonl]
        one JSON object a line, oldest first, each as GET /api/audit shows it (with its hashes)

Both read the store the config names (the SQLite file, or PostgreSQL at ``[store] url``), directly:
the gateway need not be running, and the reader needs the database, not a reviewer token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from approvals.audit_chain import event_record, read_log, verify_log
from approvals.config import Settings, load_settings
from approvals.durations import parse_duration
from approvals.errors import ApprovalsError
from approvals.store.reading import existing_store

__all__ = [
    "EXIT_BROKEN",
    "EXIT_TROUBLE",
    "Since",
    "add_parser",
    "export",
    "main",
    "parse_since",
    "run",
    "verify",
]

DEFAULT_CONFIG = Path("config/gateway.toml")  # as `approvals serve` has it
EXIT_BROKEN = 1  # the chain does not hold
EXIT_TROUBLE = 2  # the log could not be checked at all


@dataclass(frozen=True, slots=True)
class Since:
    """Where an export starts: at a seq (inclusive), or at a time (events stamped then or later)."""

    seq: int = 1
    at: float | None = None


def parse_since(text: str, now: float) -> Since:
    """``seq:N``, an ISO 8601 time (UTC unless it names a zone), or a duration back from ``now``
    with its unit (``7d``, ``12h``, ``30m``); ValueError saying which forms are accepted."""
    hint = 'must be "seq:N", an ISO time like 2026-01-31T00:00:00Z, or a duration like 7d, 12h or 30m'
    text = text.strip()
    if text.startswith("seq:"):
        number = text.removeprefix("seq:")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{hint}: seq must be a whole number from 1 (got {text!r})")
        return Since(seq=int(number))
    if text[-1:] in ("s", "m", "h", "d") and text[:-1].replace(".", "", 1).isdigit():
        return Since(at=now - parse_duration(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{hint} (got {text!r})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Since(at=moment.timestamp())


def add_parser(subparsers: Any) -> None:
    """Add `audit verify` and `audit export` to the `approvals` command's subparsers."""
    audit = subparsers.add_parser("audit", help="verify the audit log's hash chain, or export the log")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    config_help = "gateway.toml (default: %(default)s)"
    check = actions.add_parser("verify", help="check the hash chain; name the first broken link")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    out = actions.add_parser("export", help="print audit events as JSON lines, oldest first")
    out.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    out.add_argument(
        "--since",
        help='"seq:N" (from seq N), an ISO time, or a duration back from now such as 7d (default: all)',
    )
    out.add_argument("--format", choices=("jsonl",), default="jsonl", help="jsonl (the only one for now)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the parsed `audit` command; its exit status."""
    out = out or sys.stdout
    try:
        settings = load_settings(args.config)
        if args.audit_command == "verify":
            return asyncio.run(verify(settings, out))
        since = parse_since(args.since, time.time()) if args.since else Since()
        return asyncio.run(export(settings, since, out))
    except ValueError as exc:  # --since
        print(f"error: --since {exc}", file=sys.stderr)
    except ApprovalsError as exc:  # the config, or the store
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_TROUBLE


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """`approvals audit …` on its own, parsed as the `approvals` command parses it (for tests)."""
    parser = argparse.ArgumentParser(prog="approvals")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv), out)


async def verify(settings: Settings, out: TextIO) -> int:
    """Print whether the chain holds; 0 when it does, EXIT_BROKEN naming the first broken link."""
    async with existing_store(settings, "audit log") as log:
        count, broken = await verify_log(log)
    if broken is not None:
        print(f"audit chain broken at {broken} ({count} events before it hold)", file=out)
        return EXIT_BROKEN
    print(f"chain intact: {count} events", file=out)
    return 0


async def export(settings: Settings, since: Since, out: TextIO) -> int:
    """Print the events from ``since`` on, one JSON object a line; 0."""
    async with existing_store(settings, "audit log") as log:
        async for event in read_log(log, after_seq=since.seq - 1):
            if since.at is None or event.at >= since.at:
                out.write(json.dumps(event_record(event), separators=(",", ":")) + "\n")
    out.flush()
    return 0
