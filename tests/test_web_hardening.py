"""Malformed HTTP on every route is a clear 4xx, never a 500 (issue 11, items 6 and 7).

Headers of raw bytes (latin-1, an unclosed `[`) go through a socket: aiohttp's client will not send them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from approvals.web.app import undecodable_input
from tests.approvals_kit import Held, start_held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, TOKEN_A, WAIT, StartGateway
from tests.inbox_kit import Reviewer, reviewer_client
from tests.test_inbox import add_approval

MULTIPART = b'--zz\r\nContent-Disposition: form-data; name="csrf"\r\n\r\nx\r\n--zz--\r\n'


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """The gateway holding send_email for approval (demo upstream), with the inbox and the API."""
    return await start_held(start_gateway, tmp_path)


@pytest.fixture
async def bob(held: Held) -> AsyncIterator[Reviewer]:
    """Bob, logged in to the inbox."""
    http, base = reviewer_client(held)
    async with http:
        reviewer = Reviewer(base, http)
        assert (await reviewer.login(BOB_TOKEN)).status == 303
        yield reviewer


async def raw(held: Held, request_line: str, headers: list[bytes], body: bytes = b"") -> tuple[int, bytes]:
    """Send one request of exactly these header bytes; the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", held.gateway.server.port)
    try:
        lines = [request_line.encode(), *headers, b"Content-Length: %d" % len(body), b"Connection: close"]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), content


async def still_pending(held: Held, approval_id: str) -> None:
    stored = await held.gateway.service.store.get_approval(approval_id)
    assert stored is not None
    assert stored.status == "pending"


HOST = b"Host: 127.0.0.1"
ROUTES = ["GET /healthz", "GET /api/approvals", "POST /mcp/demo", "GET /inbox", "GET /inbox/login"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Origin: http://[", 403),
        ("Origin: http://evil\uff0fexample.com".encode(), 403),  # a full-width solidus
        ("Origin: http://127.0.0.1\uff0f".encode(), 403),
        (b"Origin: http://127.0.0.1:99999", None),  # a bad port on an allowed name: the route decides
    ],
)
async def test_malformed_origin_is_refused_not_500(
    held: Held, route: str, header: bytes, status: int | None
) -> None:
    """An Origin urlsplit cannot parse names no host we serve: 403 on every route, never 500."""
    got, _ = await raw(held, f"{route} HTTP/1.1", [HOST, header])
    assert got == status if status is not None else got < 500


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("host", [b"Host: [", "Host: 127.0.0.1\uff0f".encode(), b"Host: [::1"])
async def test_malformed_host_is_misdirected_not_500(held: Held, route: str, host: bytes) -> None:
    """A Host urlsplit cannot parse is 421 on every route, never 500."""
    status, _ = await raw(held, f"{route} HTTP/1.1", [host])
    assert status == 421


@pytest.mark.parametrize("path", ["/api/approvals", "/mcp/demo"])
async def test_non_utf8_authorization_is_401(held: Held, path: str) -> None:
    """A bearer token of latin-1 bytes is no token: 401 on the API and on /mcp, never 500."""
    headers = [HOST, b"Authorization: Bearer caf\xe9-\xff", b"Content-Type: application/json"]
    status, _ = await raw(
        held, f"{'POST' if path.startswith('/mcp') else 'GET'} {path} HTTP/1.1", headers, b"{}"
    )
    assert status == 401


async def test_non_utf8_inbox_cookies_are_no_session(held: Held) -> None:
    """Latin-1 session or login cookies are forged cookies: login redirect, refusal, a fresh form."""
    session = b"Cookie: approvals_session=\xe9\xff.\xe9"
    assert (await raw(held, "GET /inbox HTTP/1.1", [HOST, session]))[0] == 303
    origin = b"Origin: http://127.0.0.1"
    form = b"Content-Type: application/x-www-form-urlencoded"
    assert (await raw(held, "POST /inbox/logout HTTP/1.1", [HOST, session, origin, form], b"csrf=x"))[
        0
    ] == 403
    login = b"Cookie: approvals_login=\xe9\xff"
    assert (await raw(held, "GET /inbox/login HTTP/1.1", [HOST, login]))[0] == 200
    status, _ = await raw(
        held, "POST /inbox/login HTTP/1.1", [HOST, login, origin, form], b"csrf=\xe9&token=x"
    )
    assert status == 400  # the form itself is not UTF-8


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/x-www-form-urlencoded; charset=bogus", b"csrf=x&token=y", 415),
        ("application/x-www-form-urlencoded; charset=latin-1", b"csrf=x&token=y", 415),
        ("multipart/form-data; boundary=zz", MULTIPART, 415),
        ("multipart/form-data; boundary=zz", b"no boundary here", 415),
        ("multipart/form-data", b"garbage", 415),
        ("application/x-www-form-urlencoded", b"csrf=%ff%fe&token=y", 400),
        ("application/x-www-form-urlencoded", b"csrf=\xff", 400),
        ("application/x-www-form-urlencoded", b"&".join(b"f%d=1" % i for i in range(500)), 400),
    ],
)
@pytest.mark.parametrize("path", ["/inbox/login", "/inbox/login/link"])
async def test_inbox_login_forms_refuse_other_encodings(
    held: Held, path: str, content_type: str, body: bytes, status: int
) -> None:
    """Login forms take URL-encoded UTF-8 only: other charsets and multipart are 415, bad bytes 400."""
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": content_type, "Origin": held.gateway.base}
        async with http.post(f"{held.gateway.base}{path}", data=body, headers=headers) as response:
            assert response.status == status


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/x-www-form-urlencoded; charset=bogus", b"csrf=x", 415),
        ("multipart/form-data; boundary=zz", MULTIPART, 415),
        ("text/plain", b"csrf=x", 415),
        ("application/x-www-form-urlencoded", b"csrf=\xe9", 400),
    ],
)
async def test_inbox_decision_forms_refuse_other_encodings(
    held: Held, bob: Reviewer, content_type: str, body: bytes, status: int
) -> None:
    """A logged-in reviewer's decision form in another encoding is a 4xx and decides nothing."""
    approval = await add_approval(held)
    headers = {"Content-Type": content_type, "Origin": bob.origin}
    url = f"{bob.base}/inbox/approvals/{approval.id}/approve"
    async with bob.http.post(url, data=body, headers=headers, allow_redirects=False) as response:
        assert response.status == status
    await still_pending(held, approval.id)


async def test_inbox_decision_form_still_works(held: Held, bob: Reviewer) -> None:
    """The browser's own URL-encoded form (with or without charset=UTF-8) still decides."""
    approval = await add_approval(held)
    token = await bob.csrf()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
    page = await bob.post(
        f"/inbox/approvals/{approval.id}/deny", {"csrf": token, "reason": "no"}, headers=headers
    )
    assert page.status == 303
    assert (await held.recorder.status("denied", approval.id)).reason == "no"


async def api_post(
    held: Held, path: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ALICE_TOKEN}", "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{held.gateway.base}{path}", data=body, headers=headers) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[1]", "application/json"),
        (b'"approve"', "application/json"),
        (b"1", "application/json"),
        (b"null", "application/json"),
        (b'{"reason": 5}', "application/json"),
        (b'{"reason": ["x"]}', "application/json"),
        (b'{"reason": {"a": 1}}', "application/json"),
        (b'{"reason": "x\\ud800y"}', "application/json"),
        (b'{"reason": "x", "n": 1e400}', "application/json"),
        (b"[" * 5_000 + b"]" * 5_000, "application/json"),
        (b'{"reason": "\xff"}', "application/json"),
        (MULTIPART, "multipart/form-data; boundary=zz"),
        (b"reason=x", "application/x-www-form-urlencoded; charset=bogus"),
    ],
)
async def test_api_decision_body_must_be_a_json_object(held: Held, body: bytes, content_type: str) -> None:
    """A decision body that is not a JSON object with a string reason is 400 and decides nothing."""
    approval = await add_approval(held)
    status, answer = await api_post(held, f"/api/approvals/{approval.id}/approve", body, content_type)
    assert status == 400, answer
    assert set(answer) == {"error"}
    await still_pending(held, approval.id)


async def test_api_decision_ignores_a_json_charset(held: Held) -> None:
    """JSON is UTF-8 whatever `charset` says (RFC 8259 defines none): a bogus one is not looked up."""
    approval = await add_approval(held)
    body = json.dumps({"reason": "fine"}).encode()
    status, answer = await api_post(
        held, f"/api/approvals/{approval.id}/deny", body, "application/json; charset=bogus"
    )
    assert (status, answer["status"], answer["reason"]) == (200, "denied", "fine")


async def test_undecodable_input_is_a_4xx_and_bugs_stay_500() -> None:
    """The last-defence middleware: a UnicodeError or unknown charset is 400/415, a KeyError is still 500."""

    async def unicode(request: web.Request) -> web.Response:
        "caf\udce9".encode()
        return web.Response()

    async def charset(request: web.Request) -> web.Response:
        await request.text()
        return web.Response()

    async def bug(request: web.Request) -> web.Response:
        known: dict[str, str] = {}
        return web.Response(text=known["missing"])

    app = web.Application(middlewares=[undecodable_input])
    app.router.add_get("/unicode", unicode)
    app.router.add_post("/charset", charset)
    app.router.add_get("/mcp/bug", bug)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/unicode")) as response:
                assert (response.status, set(await response.json())) == (400, {"error"})
            headers = {"Content-Type": "text/plain; charset=bogus"}
            async with http.post(server.make_url("/charset"), data=b"x", headers=headers) as response:
                assert response.status == 415
            async with http.get(server.make_url("/mcp/bug")) as response:
                assert response.status == 500
    finally:
        await server.close()


async def test_mcp_token_is_still_accepted(held: Held) -> None:
    """The header checks leave a valid grant token working on /mcp (the positive control)."""
    headers = [
        HOST,
        f"Authorization: Bearer {TOKEN_A}".encode(),
        b"Content-Type: application/json",
        b"Accept: application/json, text/event-stream",
        b"Origin: http://127.0.0.1:8080",
    ]
    body = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    body += b'"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}'
    status, content = await raw(held, "POST /mcp/demo HTTP/1.1", headers, body)
    assert status == 200, content


@pytest.mark.parametrize("path", ["/api/approvals/x/approve", "/inbox/login", "/slack/events"])
async def test_a_compressed_body_off_mcp_is_415(held: Held, path: str) -> None:
    """Only /mcp inflates bodies (within its limit): elsewhere a Content-Encoding is refused, not
    read as garbage and not inflated."""
    status, _ = await raw(
        held,
        f"POST {path} HTTP/1.1",
        [HOST, b"Content-Encoding: gzip", b"Content-Type: application/json"],
        gzip.compress(b'{"reason": "x"}'),
    )
    assert status == 415
