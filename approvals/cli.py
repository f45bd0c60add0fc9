"""The `approvals` command: serve, check, token, and the reviewer's list, approve, deny, standing.

Every failure a user can cause (bad config, bad policy, a port in use) ends in a message that says
what is wrong and where, and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from approvals import cli_audit, cli_policy, cli_review, supervisor
from approvals.config import (
    MAX_WORKERS,
    MIN_TOKEN_LENGTH,
    SESSION_SECRET_ENV,
    Principal,
    Settings,
    load_settings,
    reviewer_environment,
    served_url,
    sha256_hex,
)
from approvals.errors import ApprovalsError, ConfigError, StoreError
from approvals.gatekeeper import check_policies
from approvals.gateway_secret import gateway_secret
from approvals.log_format import configure_logging
from approvals.store.postgres import PostgresStore
from approvals.web.app import create_app
from approvals.web.inbox_auth import LINK_SECONDS, InboxAuth
from approvals.web.keys import GATEKEEPER
from approvals.web.origin import LOOPBACK_NAMES

DEFAULT_CONFIG = Path("config/gateway.toml")
DEV_GRANT = "dev-agent"
DEV_REVIEWER = "dev-reviewer"
SHUTDOWN_GRACE_SECONDS = 10.0
DEFAULT_INTERNAL_URL = "http://127.0.0.1:0"  # a worker's address for the others, by default
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"
EXIT_BROKEN_PIPE = 141  # the shell's code for "killed by SIGPIPE", as `yes | head` leaves it

log = logging.getLogger("approvals")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 65535, not {text!r}")
    return port


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to {MAX_WORKERS}, not {text!r}")
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="approvals", description="Human-in-the-loop approval gateway for MCP."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="gateway.toml (default: %(default)s)"
    )
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=_port, help="listen port, 0 for any free one (overrides [server] port)")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="processes sharing the port, to use more cores (overrides [server] workers; more than 1"
        " needs a PostgreSQL store)",
    )
    # Given by the supervisor of --workers to each worker: its end of their socket pair.
    serve.add_argument("--worker-channel", type=int, help=argparse.SUPPRESS)
    check = commands.add_parser(
        "check", help="validate the config and every policy file, listing every error"
    )
    check.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="gateway.toml (default: %(default)s)"
    )
    commands.add_parser("token", help="print a new random token and its sha256 (for token_sha256 = ...)")
    link = commands.add_parser(
        "login-link",
        help="print a one-time inbox login link (signed with the gateway's secret: APPROVALS_SESSION_SECRET,"
        " or the one kept in its PostgreSQL database)",
    )
    link.add_argument("reviewer", help="the name of a [[reviewers]] entry")
    link.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="gateway.toml (default: %(default)s)"
    )
    link.add_argument(
        "--url",
        help="the gateway's URL for the link (default: public_url if the config sets it, else"
        " $APPROVALS_URL, else the config's host and port)",
    )
    cli_review.add_parsers(commands)  # list, approve, deny, standing
    cli_audit.add_parser(commands)
    cli_policy.add_parser(commands)
    return parser


T = TypeVar("T")


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the gateway on uvloop where it is installed (a dependency off Windows), else on asyncio.

    The gateway's work on an allowed call is mostly moving bytes between two sockets; uvloop does
    the event loop and the transports in C, which took the gateway's CPU per allowed call from
    0.13-0.16 ms to 0.095 ms in `make bench`. Nothing in the gateway depends on which loop runs it.
    """
    try:
        import uvloop  # optional: there is none for Windows
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `approvals` console script."""
    args = _parser().parse_args(argv)
    if args.command != "serve":  # serve configures its own, as [server] log_format says
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        _serve_command(args)
        return
    try:
        _one_shot(args)
        sys.stdout.flush()  # now, so a reader that left is noticed here and not at exit
    except BrokenPipeError:  # `approvals list | head`: the reader has all it wanted
        # Python's recipe: point stdout at /dev/null so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def _one_shot(args: argparse.Namespace) -> None:
    """Every command but serve: print something (to a pipe, perhaps) and end."""
    if args.command == "token":
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {sha256_hex(token)}")
    elif args.command in cli_review.COMMANDS:
        cli_review.run(args)
    elif args.command == "audit":
        if status := cli_audit.run(args):
            sys.exit(status)
    elif args.command == "policy":
        if status := cli_policy.run(args):
            sys.exit(status)
    elif args.command == "check":
        settings = _checked_settings(args.config)
        print(f"{args.config}: OK ({len(settings.upstreams)} upstream(s), {len(settings.grants)} grant(s))")
    else:
        _login_link(_checked_settings(args.config), args.reviewer, args.url)


def _checked_settings(path: Path) -> Settings:
    """The config and its policy files, or exit 1 listing every error in them."""
    try:
        settings = load_settings(path)
        check_policies(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    return settings


def _serve_command(args: argparse.Namespace) -> None:
    settings = _checked_settings(args.config)
    configure_logging(settings.server.log_format)
    server = dataclasses.replace(
        settings.server,
        host=args.host if args.host is not None else settings.server.host,
        port=args.port if args.port is not None else settings.server.port,
    )
    settings = dataclasses.replace(settings, server=server)
    try:
        settings, dev_tokens = _with_dev_credentials(settings)
    except OSError as exc:
        print(
            f"error: cannot keep a development token in {settings.store.path.parent}: {_reason(exc)}",
            file=sys.stderr,
        )
        sys.exit(1)
    workers = args.workers if args.workers is not None else settings.server.workers
    try:
        if args.worker_channel is not None:
            sys.exit(_run_loop(_serve(settings, dev_tokens, args.worker_channel)))
        if workers > 1:
            sys.exit(_supervise(settings, args.config, workers, dev_tokens))
        sys.exit(_run_loop(_serve(settings, dev_tokens)))
    except KeyboardInterrupt:  # Ctrl-C before the gateway was listening
        sys.exit(EXIT_INTERRUPTED)


def _supervise(settings: Settings, config: Path, workers: int, dev_tokens: dict[str, str]) -> int:
    """Run `workers` processes of `approvals serve` on one port (see approvals.supervisor)."""

    def command(port: int, channel: int) -> list[str]:
        return [
            sys.executable, "-m", "approvals", "serve", "--config", str(config.resolve()),
            "--host", settings.server.host, "--port", str(port), "--worker-channel", str(channel),
        ]  # fmt: skip

    def on_ready(port: int) -> None:
        _print_banner(_as_served(settings, port), port, dev_tokens, workers)

    return supervisor.serve_workers(settings, workers, command, on_ready)


def _login_link(settings: Settings, name: str, url: str | None) -> None:
    """Print a link that logs `name` in to the inbox once, within ten minutes.

    The link is signed with the gateway's secret: APPROVALS_SESSION_SECRET, or on PostgreSQL the one
    the replicas keep in the database, so the running gateway must have the same one.
    """
    secret = settings.inbox.session_secret
    if secret is None and settings.store.url is not None:
        try:
            secret = asyncio.run(_stored_secret(settings))
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    if secret is None:
        print(
            f"error: login links need {SESSION_SECRET_ENV} set to the same value as the running gateway's",
            file=sys.stderr,
        )
        sys.exit(1)
    if not settings.reviewers:  # the development reviewer of `approvals serve`
        settings, _ = _with_dev_credentials(settings)
    reviewer = next((r for r in settings.reviewers if r.name == name), None)
    if reviewer is None:
        known = ", ".join(r.name for r in settings.reviewers)
        print(f"error: no reviewer named {name!r} (reviewers: {known})", file=sys.stderr)
        sys.exit(1)
    auth = InboxAuth(settings.reviewers, secret, settings.inbox.session_hours)
    token = auth.mint_link(reviewer, time.time())
    base, source = _link_base(settings, url)
    print(f"{base}/inbox/login/link?t={token}")
    minutes = LINK_SECONDS / 60
    print(f"(for {reviewer.name}; it works once, for the next {minutes:.0f} minutes)", file=sys.stderr)
    if source:
        print(f"(the link uses {base}, {source}; --url names another)", file=sys.stderr)


async def _stored_secret(settings: Settings) -> str | None:
    """The secret the replicas keep in the database (made there if none has started yet)."""
    assert settings.store.url is not None
    store = await PostgresStore.open(settings.store.url)
    try:
        return await gateway_secret(settings, store)
    finally:
        await store.close()


def _link_base(settings: Settings, url: str | None) -> tuple[str, str]:
    """The gateway's URL for a login link, and where it came from (empty when the user chose it).

    Without an explicit public_url the gateway links to the address it serves, which --port (or
    port 0) may have changed: this command cannot see that, so it says which one it guessed.
    """
    if url:
        return url.rstrip("/"), ""
    if settings.server.public_url_explicit:
        return settings.server.public_url, ""
    env_url, _ = reviewer_environment()
    if env_url:
        return env_url.rstrip("/"), "from APPROVALS_URL"
    return settings.server.public_url, f"the address {settings.source.name} listens on"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _token_file(settings: Settings, name: str) -> Path:
    return settings.store.path.parent / f"{name}.token"


def _kept_token(path: Path) -> str:
    """The token kept in `path`, made (owner-only) when missing, emptied or cut short."""
    token = path.read_text().strip() if path.is_file() else ""
    if len(token) < MIN_TOKEN_LENGTH:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        # Created owner-only from the start, so the token is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
    return token


def _with_dev_credentials(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """A development grant when no [[grants]] are configured, and a development reviewer when no
    [[reviewers]] are, each with its token kept beside the store.

    The development agent has no owner, so the development reviewer may approve its calls.
    """
    tokens: dict[str, str] = {}
    if not settings.grants:
        tokens[DEV_GRANT] = _kept_token(_token_file(settings, DEV_GRANT))
        grant = Principal(DEV_GRANT, sha256_hex(tokens[DEV_GRANT]), owner=None)
        settings = dataclasses.replace(settings, grants=(grant,))
    if not settings.reviewers:
        tokens[DEV_REVIEWER] = _kept_token(_token_file(settings, DEV_REVIEWER))
        reviewer = Principal(DEV_REVIEWER, sha256_hex(tokens[DEV_REVIEWER]))
        settings = dataclasses.replace(settings, reviewers=(reviewer,))
    return settings, tokens


async def _serve(settings: Settings, dev_tokens: dict[str, str], worker_channel: int | None = None) -> int:
    """Serve until SIGINT or SIGTERM; the exit status (1 when the address cannot be listened on).

    As a worker of `--workers` (`worker_channel` given): the port is shared with the other
    workers, the internal address is 127.0.0.1:0 unless configured, and readiness is told to the
    supervisor instead of printing the banner.
    """
    # Handlers first: once the banner is out a supervisor may signal at any moment, and the
    # default action would kill the gateway without stopping its stdio upstreams.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Listen before building the app: links in agents' results and Slack messages are made from
    # the settings the app gets, so they must already name the port actually served.
    ready = supervisor.watch_supervisor(worker_channel, stop.set) if worker_channel is not None else None
    if ready is not None and settings.server.internal_url is None:
        settings = _with_internal_url(settings, DEFAULT_INTERNAL_URL)
    try:
        sockets = _listen(settings.server.host, settings.server.port, reuse_port=ready is not None)
    except OSError as exc:
        where = f"{settings.server.host}:{settings.server.port}"
        print(f"error: cannot listen on {where}: {_reason(exc)}", file=sys.stderr)
        return 1
    port = sockets[0].getsockname()[1]
    settings = _as_served(settings, port)
    if settings.server.internal_url is not None:
        internal = urlsplit(settings.server.internal_url)
        assert internal.hostname is not None  # checked by config
        assert internal.port is not None
        try:
            sockets += (inner := _listen(internal.hostname, internal.port))
        except OSError as exc:
            print(
                f"error: cannot listen on internal_url {settings.server.internal_url}: {_reason(exc)}",
                file=sys.stderr,
            )
            return 1
        settings = _with_internal_url(settings, served_url(internal.hostname, inner[0].getsockname()[1]))
    try:
        app = await create_app(settings)
    except ApprovalsError as exc:  # the database cannot be reached, a policy is invalid
        print(f"error: {exc}", file=sys.stderr)
        return 1
    policies = app[GATEKEEPER].policies
    # SIGHUP: re-read every policy file now (edits are also picked up within a second on their own).
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(policies.reload_async()))
    # aiohttp gives in-flight requests `shutdown_timeout` to finish, then as long again once
    # cancelled: half each keeps the whole shutdown within the grace the log line promises.
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS / 2, access_log=None
    )
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    if ready is not None:
        ready()
    else:
        _print_banner(settings, port, dev_tokens)
    await stop.wait()
    log.info(
        "shutting down: no new connections; finishing calls in flight for up to %.0f s",
        SHUTDOWN_GRACE_SECONDS,
    )
    await runner.cleanup()
    return 0


def _listen(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address `host` names, all on one port (the first one's, for 0),
    as aiohttp's own TCPSite would open them (SO_REUSEADDR; IPv6 sockets IPv6-only); with
    `reuse_port`, shared with the other workers of `--workers` (SO_REUSEPORT)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):  # once each
            bound = (address[0], port, *address[2:])
            sockets.append(socket.create_server(bound, family=family, reuse_port=reuse_port))
            port = sockets[0].getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _as_served(settings: Settings, port: int) -> Settings:
    """`settings` with the port served, and with links to it unless the config names a public_url."""
    server = settings.server
    public_url = server.public_url if server.public_url_explicit else served_url(server.host, port)
    return dataclasses.replace(settings, server=dataclasses.replace(server, port=port, public_url=public_url))


def _with_internal_url(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, internal_url=url))


def _print_banner(settings: Settings, port: int, dev_tokens: dict[str, str], workers: int = 1) -> None:
    base = public_url = settings.server.public_url
    public = urlsplit(public_url)
    if public.hostname in LOOPBACK_NAMES:  # local use: show the port actually bound (--port, or 0)
        host = f"[{public.hostname}]" if ":" in public.hostname else public.hostname
        base = f"{public.scheme}://{host}:{port}"
    lines = [f"approvals gateway listening on {settings.server.host}:{port}"]
    if workers > 1:
        lines.append(f"  {workers} worker processes share this port (one PostgreSQL store)")
    elif settings.server.internal_url is not None:
        lines.append(f"  other replicas forward this one's sessions to {settings.server.internal_url}")
    if public_url != served_url(settings.server.host, port):
        lines.append(
            f"  links in agents' results, Slack messages and login links use public_url {public_url}"
            " (set in the config or APPROVALS_PUBLIC_URL), not this address"
        )
    for name in settings.upstreams:
        lines.append(f"  MCP URL for upstream {name!r}: {base}/mcp/{name}")
    lines.append(f"  web inbox for reviewers: {base}/inbox")
    if DEV_REVIEWER in dev_tokens:
        lines += [
            f"  development reviewer token ({DEV_REVIEWER}, kept in {_token_file(settings, DEV_REVIEWER)}):",
            f"    export APPROVALS_URL={base} APPROVALS_TOKEN={dev_tokens[DEV_REVIEWER]}",
            "    approvals list; approvals approve ID; approvals deny ID --reason '...'",
        ]
    if DEV_GRANT in dev_tokens:
        servers = {
            f"approvals-{name}": {
                "type": "http",
                "url": f"{base}/mcp/{name}",
                "headers": {"Authorization": f"Bearer {dev_tokens[DEV_GRANT]}"},
            }
            for name in settings.upstreams
        }
        lines += [
            f"  development agent token ({DEV_GRANT}, kept in {_token_file(settings, DEV_GRANT)}):",
            f"    {dev_tokens[DEV_GRANT]}",
            "  paste into your MCP client's config (Claude, Cursor, ...):",
            *("    " + line for line in json.dumps({"mcpServers": servers}, indent=2).splitlines()),
        ]
    print("\n".join(lines), flush=True)
