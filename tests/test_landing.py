"""The landing page at `/`: links to the inbox, health and docs, the MCP URLs, the inbox's headers."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser

from approvals.config import Settings, UpstreamSettings, sha256_hex
from approvals.web import landing
from approvals.web.app import create_app
from approvals.web.inbox_views import CSP
from tests.conftest import DEMO_COMMAND, TOKEN_A, WAIT, settings_for
from tests.test_inbox_browser import browser, watch

__all__ = ["browser"]  # the fixture, imported to be used here

AGENT_TOKEN = "agent-from-env-token-0123456789abcdef"
UPSTREAM_TOKEN = "upstream-header-token-0123456789"
Serve = Callable[[Settings], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(settings)`: the gateway's app with the landing routes, on port 0; its base URL.

    The landing page is judged with the settings given to its `add_routes` (the app is built from
    the same ones, less any upstream a config could not name)."""
    servers: list[TestServer] = []

    async def start(settings: Settings) -> str:
        buildable = {n: u for n, u in settings.upstreams.items() if re.fullmatch(r"[\w.-]+", n)}
        app = await create_app(dataclasses.replace(settings, upstreams=buildable))
        landing.add_routes(app, settings)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def _get(url: str) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
        http.get(url) as response,
    ):
        return response.status, dict(response.headers), await response.text()


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    upstreams = {
        "demo": {"command": DEMO_COMMAND},
        "files.v2": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer ${UP_TOKEN}"}},
    }
    env = {"UP_TOKEN": UPSTREAM_TOKEN, "AGENT_TOKEN": AGENT_TOKEN}
    return settings_for(tmp_path, upstreams, env, **extra)


async def test_the_page_links_the_inbox_health_docs_and_each_mcp_url(tmp_path: Path, serve: Serve) -> None:
    """200 HTML with the links a visitor needs, one MCP URL per upstream under the public URL."""
    base = await serve(_settings(tmp_path))
    status, headers, page = await _get(base + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    hrefs = set(re.findall(r'href="([^"]*)"', page))
    assert {"/inbox", "/healthz", landing.DOCS_PATH} <= hrefs
    assert "/metrics" not in hrefs  # off: no [metrics] token
    assert "<code>http://127.0.0.1:8080/mcp/demo</code>" in page
    assert "<code>http://127.0.0.1:8080/mcp/files.v2</code>" in page
    # The README is the documentation here (the package names no documentation URL).
    status, headers, docs = await _get(base + landing.DOCS_PATH)
    assert (status, headers["Content-Type"]) == (200, "text/plain; charset=utf-8")
    assert docs.startswith("# approvals")
    assert "Content-Security-Policy" in headers
    # /healthz stays the machine's.
    status, headers, _ = await _get(base + "/healthz")
    assert (status, headers["Content-Type"]) == (200, "application/json; charset=utf-8")


async def test_the_metrics_link_shows_when_metrics_are_on(tmp_path: Path, serve: Serve) -> None:
    """With a [metrics] token the page links /metrics (which then asks for that token)."""
    env = {"METRICS_TOKEN": "metrics-token-0123456789abcdef0123"}
    base = await serve(
        settings_for(
            tmp_path, {"demo": {"command": DEMO_COMMAND}}, env, metrics={"token_env": "METRICS_TOKEN"}
        )
    )
    _, _, page = await _get(base + "/")
    assert 'href="/metrics"' in page
    assert env["METRICS_TOKEN"] not in page


async def test_the_page_has_the_inbox_security_headers_and_no_outside_script(
    tmp_path: Path, serve: Serve
) -> None:
    """The inbox's CSP and framing headers; every script and stylesheet comes from this gateway."""
    base = await serve(_settings(tmp_path))
    _, headers, page = await _get(base + "/")
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    sources = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]*)"', page)
    assert sources
    assert all(s.startswith("/inbox/static/") for s in sources), sources
    assert "<script>" not in page  # no inline script: the CSP would refuse it anyway
    assert " style=" not in page


async def test_no_token_or_token_hash_is_on_the_page(tmp_path: Path, serve: Serve) -> None:
    """Grant tokens (from env or as hashes) and upstream header secrets never appear."""
    grants = [
        {"name": "agent-env", "token_env": "AGENT_TOKEN"},
        {"name": "agent-hash", "token_sha256": sha256_hex(TOKEN_A)},
    ]
    base = await serve(_settings(tmp_path, grants=grants))
    _, _, page = await _get(base + "/")
    for secret in (AGENT_TOKEN, sha256_hex(AGENT_TOKEN), TOKEN_A, sha256_hex(TOKEN_A), UPSTREAM_TOKEN):
        assert secret not in page
    assert "Bearer &lt;grant token&gt;" in page


async def test_upstream_names_are_escaped_in_the_page_and_quoted_in_urls(
    tmp_path: Path, serve: Serve
) -> None:
    """Markup in a name (which the config would refuse anyway) is shown as text, never run."""
    settings = _settings(tmp_path)
    name = '<script>alert("x")</script>&'
    odd = UpstreamSettings(name=name, policy_path=None, url="http://127.0.0.1:9/mcp")
    base = await serve(dataclasses.replace(settings, upstreams={**settings.upstreams, name: odd}))
    _, _, page = await _get(base + "/")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in page
    assert "/mcp/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E%26</code>" in page


async def test_chromium_shows_the_page_without_a_csp_violation_and_its_inbox_link_works(
    tmp_path: Path, serve: Serve, browser: Browser
) -> None:
    """In a real browser: the stylesheet and script load under the CSP, no script error, and the
    inbox link leads to the inbox's login."""
    base = await serve(_settings(tmp_path))
    tab = await watch(browser, base)
    try:
        await tab.page.goto(base + "/")
        assert await tab.page.title() == "approvals · MCP approval gateway"
        loaded = {r.url.removeprefix(base): r.status for r in tab.responses}
        assert loaded["/inbox/static/inbox.css"] == 200
        assert loaded["/inbox/static/inbox.js"] == 200
        await tab.page.get_by_role("link", name="Web inbox").click()
        await tab.page.wait_for_url(f"{base}/inbox/login*")
        tab.assert_clean()
    finally:
        await tab.context.close()
