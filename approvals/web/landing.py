"""The landing page at `/`: what this gateway is, and where its parts are.

    GET /       the inbox, /healthz, /metrics (when on), the documentation, and the MCP URL of
                every configured upstream (never a token: those are each agent's own)
    GET /docs   the README, as plain text, when the package names no documentation URL

People who open the gateway's address in a browser land here instead of on a 404. The page is the
inbox's kind (the same templates, stylesheet and security headers: a strict Content-Security-Policy,
no inline or outside scripts) and needs no login: everything on it is what any agent of this
gateway must know anyway (the upstream names are also in /healthz).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from urllib.parse import quote

import jinja2
from aiohttp import web

from approvals.config import Settings
from approvals.web import inbox
from approvals.web.inbox_views import security_headers

__all__ = ["DOCS_PATH", "Docs", "Landing", "add_routes", "package_docs"]

DOCS_PATH = "/docs"
# Project-URL labels (pyproject [project.urls]) that lead to documentation, the best first.
_DOC_LABELS = ("documentation", "docs", "homepage", "repository", "source")
_PACKAGE = "approvals"


@dataclass(frozen=True, slots=True)
class Docs:
    """Where the documentation is: a URL the package names, else the README it carries (or neither)."""

    url: str | None
    readme: str | None


@dataclass(frozen=True, slots=True)
class Landing:
    """What the landing page shows, fixed at start (the config does not change while serving)."""

    settings: Settings
    docs: Docs
    version: str
    templates: jinja2.Environment

    def upstreams(self) -> list[dict[str, str]]:
        """Each upstream's name and proxy URL, by name (names are quoted: the config restricts them,
        but a URL is built only from quoted parts)."""
        base = self.settings.server.public_url.rstrip("/")
        names = sorted(self.settings.upstreams)
        return [{"name": name, "url": f"{base}/mcp/{quote(name, safe='')}"} for name in names]


LANDING = web.AppKey("landing", Landing)


def package_docs(package: str = _PACKAGE) -> tuple[Docs, str]:
    """(where the installed package's documentation is, its version), from its metadata."""
    try:
        meta = importlib.metadata.metadata(package)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return Docs(None, None), "(not installed)"
    urls: dict[str, str] = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if url.strip().startswith(("https://", "http://")):
            urls.setdefault(label.strip().lower(), url.strip())
    url = next((urls[label] for label in _DOC_LABELS if label in urls), None)
    readme = meta.get_payload() if url is None else None  # type: ignore[attr-defined]
    return Docs(url, readme if isinstance(readme, str) and readme.strip() else None), meta["Version"]


def add_routes(app: web.Application, settings: Settings) -> None:
    """Serve `/` (and `/docs` when the documentation is the README carried in the package)."""
    docs, version = package_docs()
    if docs.url is None and docs.readme is not None:
        docs = Docs(DOCS_PATH, docs.readme)
        app.router.add_get(DOCS_PATH, readme)
    app[LANDING] = Landing(settings, docs, version, inbox.templates())
    app.router.add_get("/", landing)


async def landing(request: web.Request) -> web.Response:
    """The page; a link to /metrics only when metrics are on (a token is configured)."""
    page = request.app[LANDING]
    metrics = page.settings.metrics.token_sha256 is not None
    html = page.templates.get_template("landing.html").render(
        reviewer=None,
        csrf="",
        path=request.path,
        upstreams=page.upstreams(),
        docs_url=page.docs.url,
        metrics=metrics,
        version=page.version,
    )
    return web.Response(
        body=html.encode("utf-8", "backslashreplace"),
        content_type="text/html",
        charset="utf-8",
        headers=security_headers(request),
    )


async def readme(request: web.Request) -> web.Response:
    """The README the package was built with, as text (no markdown renderer: nothing to run)."""
    text = request.app[LANDING].docs.readme or ""
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers=security_headers(request)
    )
