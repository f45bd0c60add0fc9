"""The `approvals` command: serve, check, token.

Every failure a user can cause (bad config, bad policy, a port in use) ends in a message that says
what is wrong and where, and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from approvals.config import Principal, Settings, load_settings, sha256_hex
from approvals.errors import ConfigError
from approvals.gatekeeper import build_gate, check_policies
from approvals.web.app import create_app
from approvals.web.origin import LOOPBACK_NAMES

DEFAULT_CONFIG = Path("config/gateway.toml")
DEV_GRANT = "dev-agent"
SHUTDOWN_GRACE_SECONDS = 10.0

log = logging.getLogger("approvals")


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
    serve.add_argument("--port", type=int, help="listen port, 0 for any free one (overrides [server] port)")
    check = commands.add_parser(
        "check", help="validate the config and every policy file, listing every error"
    )
    check.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="gateway.toml (default: %(default)s)"
    )
    commands.add_parser("token", help="print a new random token and its sha256 (for token_sha256 = ...)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `approvals` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "token":
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {sha256_hex(token)}")
        return
    try:
        settings = load_settings(args.config)
        check_policies(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.command == "check":
        print(f"{args.config}: OK ({len(settings.upstreams)} upstream(s), {len(settings.grants)} grant(s))")
        return
    server = dataclasses.replace(
        settings.server,
        host=args.host if args.host is not None else settings.server.host,
        port=args.port if args.port is not None else settings.server.port,
    )
    settings = dataclasses.replace(settings, server=server)
    settings, dev_token = _with_dev_grant(settings)
    try:
        asyncio.run(_serve(settings, dev_token))
    except OSError as exc:
        print(f"error: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


def _token_file(settings: Settings) -> Path:
    return settings.store.path.parent / f"{DEV_GRANT}.token"


def _with_dev_grant(settings: Settings) -> tuple[Settings, str | None]:
    """With no [[grants]] configured, a development grant whose token is kept beside the store."""
    if settings.grants:
        return settings, None
    token_file = _token_file(settings)
    if token_file.is_file():
        token = token_file.read_text().strip()
    else:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
    grant = Principal(DEV_GRANT, sha256_hex(token), owner=None)
    return dataclasses.replace(settings, grants=(grant,)), token


async def _serve(settings: Settings, dev_token: str | None) -> None:
    app = create_app(settings, build_gate(settings))
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    _print_banner(settings, port, dev_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: no new connections; finishing calls in flight for up to %.0f s",
        SHUTDOWN_GRACE_SECONDS,
    )
    await runner.cleanup()


def _print_banner(settings: Settings, port: int, dev_token: str | None) -> None:
    base = settings.server.public_url
    public = urlsplit(base)
    if public.hostname in LOOPBACK_NAMES:  # local use: show the port actually bound (--port, or 0)
        base = f"{public.scheme}://{public.hostname}:{port}"
    lines = [f"approvals gateway listening on {settings.server.host}:{port}"]
    for name in settings.upstreams:
        lines.append(f"  MCP URL for upstream {name!r}: {base}/mcp/{name}")
    if dev_token is not None:
        servers = {
            f"approvals-{name}": {
                "type": "http",
                "url": f"{base}/mcp/{name}",
                "headers": {"Authorization": f"Bearer {dev_token}"},
            }
            for name in settings.upstreams
        }
        lines += [
            f"  development agent token ({DEV_GRANT}, kept in {_token_file(settings)}):",
            f"    {dev_token}",
            "  paste into your MCP client's config (Claude, Cursor, ...):",
            *("    " + line for line in json.dumps({"mcpServers": servers}, indent=2).splitlines()),
        ]
    print("\n".join(lines), flush=True)
