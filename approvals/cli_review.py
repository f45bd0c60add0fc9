"""The reviewer's commands against a running gateway's JSON API (`--url`, token from APPROVALS_TOKEN).

    approvals list [--status S]
    approvals approve ID [ID …] [--reason R] [--arguments JSON | --arguments-file F] [--seen SHA256]
                     [--remember 1h [--max-uses N] [--constraint FIELD=OP:VALUE …]]
    approvals deny ID [ID …] --reason R [--remember 8h [--max-uses N] [--constraint …]]
    approvals standing list [--all] [--agent NAME] | show ID | revoke ID | export ID

Several ids are decided each on its own (the batch endpoint), one line per id, exit 1 if any was
refused; `--arguments` and `--remember` go with one id. Constraints of a standing grant, each on
one top-level argument: `to=prefix:ops-`, `amount=range:0..500` (either side may be left out),
`region=in:["eu","us"]` (a JSON list), `x=eq:<json>`, `cc=any`; without any, the grant matches
the approved call's arguments exactly. Bad options exit 2 naming the option, as argparse does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from approvals import review_client
from approvals.config import reviewer_environment
from approvals.core import render
from approvals.core.deciding import MAX_USES_LIMIT, REMEMBER_MAX_SECONDS, REMEMBER_MIN_SECONDS
from approvals.core.model import STATUSES
from approvals.core.standing import CONSTRAINT_OPS, parse_constraints
from approvals.durations import parse_duration
from approvals.review_client import AmbiguousId, ReviewError, call, now, table, utc

__all__ = ["COMMANDS", "DEFAULT_URL", "add_parsers", "parse_constraint", "run"]

COMMANDS = ("list", "approve", "deny", "standing")
DEFAULT_URL = "http://127.0.0.1:8080"
STANDING_PREFIX = "sg_"
STANDING_ID_LENGTH = len(STANDING_PREFIX) + 32
MATCHES_WIDTH = 60
URL_HELP = f"the gateway's URL (default: $APPROVALS_URL or {DEFAULT_URL}); token from $APPROVALS_TOKEN"


# ---- options -----------------------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            'must be a JSON object of arguments, e.g. \'{"to": "ops@example.com"}\''
        )
    return value


def _remember_for(text: str) -> str:
    span = f"from {render.duration(REMEMBER_MIN_SECONDS)} to {render.duration(REMEMBER_MAX_SECONDS)}"
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'must be a duration like "1h" or "8h" ({span}), not {text!r}'
        ) from None
    if not REMEMBER_MIN_SECONDS <= seconds <= REMEMBER_MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be {span}, not {text!r}")
    return text


def _max_uses(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_USES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_USES_LIMIT}, not {text!r}")
    return count


def _number(text: str, whole: str) -> float | int | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{whole!r}: {text!r} is not a number (range:MIN..MAX, e.g. 0..500)")
    return value


def parse_constraint(text: str) -> dict[str, Any]:
    """`--constraint FIELD=OP:VALUE` as the API's constraint object; ArgumentTypeError saying what
    is wrong (argparse prints it after the option's name and exits 2)."""
    name, equals, rest = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: must be FIELD=OP:VALUE, e.g. to=prefix:ops- or cc=any")
    op, colon, raw = rest.partition(":")
    if op not in CONSTRAINT_OPS:
        raise argparse.ArgumentTypeError(f"{text!r}: OP must be one of {', '.join(CONSTRAINT_OPS)}")
    item: dict[str, Any] = {"field": name, "op": op}
    if op == "any":
        if colon:
            raise argparse.ArgumentTypeError(f"{text!r}: any takes no value ({name}=any)")
    elif not colon:
        raise argparse.ArgumentTypeError(f"{text!r}: {op} needs a value ({name}={op}:VALUE)")
    elif op == "prefix":
        item["value"] = raw
    elif op == "range":
        low, dots, high = raw.partition("..")
        if not dots:
            raise argparse.ArgumentTypeError(f"{text!r}: a range is MIN..MAX, e.g. {name}=range:0..500")
        item["value"] = [_number(low, text), _number(high, text)]
    else:
        try:
            item["value"] = json.loads(raw)
        except ValueError:
            example = f'{name}=in:["a","b"]' if op == "in" else f"{name}=eq:'\"text\"'"
            raise argparse.ArgumentTypeError(f"{text!r}: {op}'s value must be JSON, e.g. {example}") from None
    problem = parse_constraints([item], "")
    if isinstance(problem, str):  # "[0].value: must be a non-empty string" → "value: …"
        raise argparse.ArgumentTypeError(f"{text!r}: {problem.removeprefix('[0].')}")
    return item


def add_parsers(commands: Any) -> None:
    """Add list, approve, deny and standing to the `approvals` command's subparsers."""
    listing = commands.add_parser("list", help="list approvals of a running gateway")
    listing.add_argument(
        "--status",
        default="pending",
        choices=(*STATUSES, "all"),
        metavar="STATUS",
        help="pending (default), approved, denied, …, or all",
    )
    approve = commands.add_parser("approve", help="approve pending calls (several ids: each on its own)")
    approve.add_argument("ids", nargs="+", metavar="ID", help="an approval id, or its first characters")
    approve.add_argument("--reason", help="why (shown in the audit log)")
    edit = approve.add_mutually_exclusive_group()
    edit.add_argument(
        "--arguments",
        type=_json_object,
        metavar="JSON",
        help="approve the call with these arguments (one id)",
    )
    edit.add_argument("--arguments-file", type=Path, metavar="FILE", help="the same, read from a file")
    approve.add_argument(
        "--seen",
        type=_sha256,
        metavar="SHA256",
        help="the hash of the arguments you checked (release_sha256): needed to approve a call another"
        " reviewer edited, which is refused otherwise with the hash to check (one id)",
    )
    deny = commands.add_parser("deny", help="deny pending calls; the reason reaches the agent")
    deny.add_argument("ids", nargs="+", metavar="ID", help="an approval id, or its first characters")
    deny.add_argument("--reason", required=True, help="why (the agent is told)")
    for decision in (approve, deny):
        decision.add_argument(
            "--remember", type=_remember_for, metavar="DURATION",
            help="also decide later calls like this one the same way for this long (1h, 8h, 24h; one id)",
        )  # fmt: skip
        decision.add_argument(
            "--max-uses", type=_max_uses, metavar="N", help="with --remember: at most N calls"
        )
        decision.add_argument(
            "--constraint", type=parse_constraint, action="append", default=[], metavar="FIELD=OP:VALUE",
            help="with --remember: which later calls match, e.g. to=prefix:ops-, amount=range:0..500,"
            ' region=in:["eu","us"], x=eq:<json>, cc=any (default: the same arguments exactly)',
        )  # fmt: skip
        decision.set_defaults(usage_error=decision.error)
    standing = commands.add_parser(
        "standing", help="standing grants (decisions remembered): list, show, revoke, export"
    )
    actions = standing.add_subparsers(dest="standing_command", required=True, metavar="ACTION")
    shown = actions.add_parser("list", help="the active standing grants, newest first")
    shown.add_argument("--all", action="store_true", help="also revoked, expired and used up ones")
    shown.add_argument("--agent", help="only this agent's (a [[grants]] name)")
    parsers = [listing, approve, deny, shown]
    for action, text in (
        ("show", "everything about one standing grant"),
        ("revoke", "revoke a standing grant at once"),
        ("export", "print the policy.json rule a standing grant amounts to"),
    ):
        one = actions.add_parser(action, help=text)
        one.add_argument("id", metavar="ID", help="a standing grant id (sg_…), or its first characters")
        parsers.append(one)
    for parser in parsers:
        parser.add_argument("--url", help=URL_HELP)


# ---- running -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """Run a parsed reviewer command; exits 1 when the gateway refused, 2 on a usage error."""
    url_env, token = reviewer_environment()
    url = args.url or url_env or DEFAULT_URL
    decision = _decision_options(args) if args.command in ("approve", "deny") else {}
    if not token:
        review_client.fail("set APPROVALS_TOKEN to your reviewer token")
    assert token is not None
    try:
        if args.command == "list":
            status = None if args.status == "all" else args.status
            print(asyncio.run(review_client.list_approvals(url, token, status)))
        elif args.command == "standing":
            print(asyncio.run(_standing(url, token, args)))
        elif exit_status := asyncio.run(_decide(url, token, args, decision)):
            sys.exit(exit_status)
    except ReviewError as exc:
        review_client.fail(str(exc), exc.exit_status)


def _sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hex digits (a release_sha256), not {text!r}")
    return text


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    args.usage_error(message)  # argparse's: usage, the message, exit 2
    raise AssertionError("unreachable")


def _decision_options(args: argparse.Namespace) -> dict[str, Any]:
    """`arguments` and `remember` of the request, checked against each other and the ids."""
    several = len(args.ids) > 1
    out: dict[str, Any] = {}
    if getattr(args, "seen", None) is not None:
        if several:
            _usage_error(args, f"--seen goes with one id (got {len(args.ids)})")
        out["seen_sha256"] = args.seen
    arguments_file = getattr(args, "arguments_file", None)
    if getattr(args, "arguments", None) is not None or arguments_file is not None:
        option = "--arguments" if arguments_file is None else "--arguments-file"
        if several:
            _usage_error(args, f"{option} goes with one id (got {len(args.ids)})")
        out["arguments"] = args.arguments if arguments_file is None else _read_arguments(args, arguments_file)
    if args.remember is None:
        if args.max_uses is not None or args.constraint:
            _usage_error(args, "--max-uses and --constraint go with --remember")
        return out
    if several:
        _usage_error(args, f"--remember goes with one id (got {len(args.ids)})")
    problem = parse_constraints(args.constraint)  # each is valid alone; together, a field named twice?
    if isinstance(problem, str):
        _usage_error(args, f"argument --constraint: {problem.split('.field: ', 1)[-1]}")
    remember: dict[str, Any] = {"for": args.remember}
    if args.max_uses is not None:
        remember["max_uses"] = args.max_uses
    if args.constraint:
        remember["constraints"] = args.constraint
    out["remember"] = remember
    return out


def _read_arguments(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _usage_error(args, f"argument --arguments-file: cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        _usage_error(args, f"argument --arguments-file: cannot read {path}: not UTF-8 ({exc.reason})")
    try:
        return _json_object(text)
    except argparse.ArgumentTypeError as exc:
        _usage_error(args, f"argument --arguments-file: {path}: {exc}")


async def _decide(url: str, token: str, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Decide the ids; the exit status (1 when any was refused)."""
    approve = args.command == "approve"
    ids = await review_client.resolve_ids(url, token, args.ids)
    if len(ids) == 1:
        print(await review_client.decide(url, token, ids[0], approve, args.reason, **options))
        return 0
    refused = 0
    for ok, line in await review_client.decide_many(url, token, ids, approve, args.reason):
        if ok:
            print(line, flush=True)
        else:
            refused += 1
            print(f"error: {line}", file=sys.stderr, flush=True)
    return review_client.EXIT_FAILED if refused else 0


# ---- standing grants ---------------------------------------------------------------------------


async def _standing(url: str, token: str, args: argparse.Namespace) -> str:
    if args.standing_command == "list":
        params = {"active": "0" if args.all else "1"}
        if args.agent:
            params["agent"] = args.agent
        grants = await _all_standing(url, token, params)
        return standing_table(grants, now(), args.all)
    grant_id = quote(await resolve_standing_id(url, token, args.id), safe="")
    if args.standing_command == "show":
        return standing_text(await call(url, token, "GET", f"/api/standing-grants/{grant_id}"), now())
    if args.standing_command == "revoke":
        revoked = await call(url, token, "POST", f"/api/standing-grants/{grant_id}/revoke")
        return render.visible(f"{revoked['id']}: revoked by {revoked['revoked_by']}")
    rule = await call(url, token, "GET", f"/api/standing-grants/{grant_id}/policy")
    return json.dumps(rule, indent=2)  # ASCII: hidden characters in values stay \u-escaped


async def _all_standing(url: str, token: str, params: dict[str, str]) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for offset in range(0, review_client.MAX_SCANNED, review_client.PAGE):
        page_params = {**params, "limit": str(review_client.PAGE), "offset": str(offset)}
        page = (await call(url, token, "GET", "/api/standing-grants", params=page_params))["standing_grants"]
        found |= {g["id"]: g for g in page}
        if len(page) < review_client.PAGE:
            break
    return list(found.values())


async def resolve_standing_id(url: str, token: str, given: str) -> str:
    """The whole id of the one standing grant whose id starts with `given` (`sg_` may be left out)."""
    lowered = given.lower()
    prefix = lowered if lowered.startswith(STANDING_PREFIX) else STANDING_PREFIX + lowered
    if len(prefix) >= STANDING_ID_LENGTH:
        return prefix  # a whole id, or not an id at all: the gateway says which
    if prefix == STANDING_PREFIX:
        raise ReviewError(
            "give a standing grant id (or its first characters, as `approvals standing list` shows)"
        )
    listed = await _all_standing(url, token, {"active": "0"})
    matches = [g for g in listed if str(g["id"]).lower().startswith(prefix)]
    if not matches:
        raise ReviewError(
            f"no standing grant has an id starting with {given!r} (see `approvals standing list --all`)"
        )
    if len(matches) > 1:
        shown = ", ".join(
            f"{g['id']} ({g['state']}, {g['tool']})" for g in matches[: review_client.MAX_CANDIDATES]
        )
        raise AmbiguousId(
            f"{given!r} is the start of {len(matches)} standing grant ids: {shown}; give more of the id"
        )
    whole: str = matches[0]["id"]
    return whole


def _uses(grant: dict[str, Any]) -> str:
    return f"{grant['uses']}/{grant['max_uses']}" if grant.get("max_uses") is not None else str(grant["uses"])


def standing_table(grants: list[dict[str, Any]], at: float, every: bool) -> str:
    """Standing grants as a fixed-width table, one line each (what they match shortened)."""
    if not grants:
        return "no standing grants" if every else "no active standing grants (--all lists every one)"
    rows: list[tuple[str, ...]] = [
        ("ID", "EFFECT", "AGENT", "UPSTREAM", "TOOL", "STATE", "USES", "EXPIRES IN", "BY", "MATCHES")
    ]
    for g in grants:
        expires = render.span(g["expires_at"] - at) if g["state"] == "active" else "-"
        matches = "; ".join(g["described"]) or "calls without arguments"
        if len(matches) > MATCHES_WIDTH:
            matches = matches[: MATCHES_WIDTH - 1] + "…"
        cells = (g["id"], g["effect"], g["grant"], g["upstream"], g["tool"], g["state"], _uses(g), expires,
                 g["created_by"], matches)  # fmt: skip
        rows.append(tuple(render.visible(c) for c in cells))
    return table(rows)


def standing_text(grant: dict[str, Any], at: float) -> str:
    """One standing grant, a field a line."""
    created = f"{utc(grant['created_at'])} by {grant['created_by']} via {grant['created_via']}"
    if grant.get("source_approval"):
        created += f" (approval {grant['source_approval']})"
    expires = utc(grant["expires_at"])
    if grant["state"] == "active":
        expires += f" ({render.expires_in(grant['expires_at'], at)})"
    effect = "allow matching calls" if grant["effect"] == "allow" else "deny matching calls"
    uses = (
        f"{grant['uses']} of {grant['max_uses']}" if grant.get("max_uses") is not None else str(grant["uses"])
    )
    lines = [
        ("id", grant["id"]),
        ("effect", effect),
        ("agent", grant["grant"]),
        ("tool", f"{grant['upstream']} / {grant['tool']}"),
        ("state", grant["state"]),
        ("uses", uses),
        ("created", created),
        ("expires", expires),
    ]
    if grant.get("revoked_at") is not None:
        lines.append(("revoked", f"{utc(grant['revoked_at'])} by {grant.get('revoked_by')}"))
    if grant.get("reason"):
        lines.append(("reason", render.one_line(grant["reason"])))
    lines.append(("rule", grant["rule"]))
    described = grant["described"] or ["calls without arguments"]
    lines += [("matches" if i == 0 else "", text) for i, text in enumerate(described)]
    return "\n".join(render.visible(f"{f'{name}:' if name else '':<10}{value}") for name, value in lines)
