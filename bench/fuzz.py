"""`make fuzz`: malformed requests against a real gateway; any HTTP 500 or a dead gateway fails.

Starts `approvals serve` on 127.0.0.1 port 0 from a throwaway config: the bundled demo upstream
behind a policy that holds send_email, denies delete_file and rate-limits get_time; Slack in HTTP
mode with a signing secret; a grant and two reviewers. It opens MCP sessions, makes an approval
pending and logs a reviewer in to the inbox, then sends N requests over raw sockets (so bytes an
HTTP client refuses to send are sent), each a valid request of one route changed in one way: a
header, the framing, the body, a field's type or value, the method or the path. The seed fixes the
requests. It prints requests per route and kind, status counts, every (route, kind) that gave a
500, a leaked traceback, a timeout or a dropped connection with one reproducer, the exceptions in
the gateway's log, and the gateway's RSS at the end. Exit status 1 on any 500 or leaked traceback,
or when the gateway died. `PYTHONPATH=/other/checkout` fuzzes another tree's gateway.

    python bench/fuzz.py --requests 20000 --seed 11
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import copy
import functools
import gzip
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlencode

GRANT, ALICE, BOB = (f"fuzz-{who}-token-0123456789abcdef0123" for who in ("grant", "alice", "bob"))
SIGNING_SECRET = "fuzz-signing-secret-0123456789abcdef"
HEADER_TIMEOUT, BODY_TIMEOUT, START_TIMEOUT = 10.0, 2.0, 60.0
TRACEBACK = b"Traceback (most recent call last)"
FAILURES = ("500", "traceback", "timeout", "dropped", "error")
POLICY = """{"version": "1", "default": "deny", "hide": ["delete_account"], "tools": {"list_*": {},
  "get_time": {"limits": [{"counter": "time", "window": "minute", "max": 5, "scope": "session"}]},
  "generate_image": {"deny_if": [{"path": "args.size", "op": "eq", "value": "1024x1024"}],
    "approval_if": [{"path": "args.count", "op": "gt", "value": 100}]},
  "send_email": {"action": "require_approval", "approval": {"timeout": "10m"}},
  "delete_file": {"action": "deny", "reason": "fuzz: never"}},
  "all_tools": {"limits": [{"counter": "units", "window": "hour", "max": 1000000000,
    "increment_from": "args.count"}]}}"""
CONFIG = f"""
grants = [{{name = "fuzz-agent", token_env = "FUZZ_GRANT", owner = "bob"}}]
reviewers = [{{name = "alice", token_env = "FUZZ_ALICE", slack_user_id = "U0ALICE"}},
             {{name = "bob", token_env = "FUZZ_BOB", slack_user_id = "U0BOB"}}]
server = {{host = "127.0.0.1", public_url = "http://127.0.0.1:8080"}}
store = {{path = "approvals.db"}}
approvals = {{hold_seconds = 1}}
slack = {{channel = "C0FUZZ", mode = "http", api_url = "http://127.0.0.1:9/api/", team_id = "T0FUZZ"}}
[upstreams.demo]
command = [{json.dumps(sys.executable)}, "-m", "approvals.demo_server"]
policy = "policy.json"
"""
Headers = list[tuple[bytes, bytes]]


# ---- raw HTTP -----------------------------------------------------------------------------------


@dataclass
class Req:
    """One request as bytes on the wire; `doc` (JSON, or form fields) is encoded into `body`."""

    route: str
    method: bytes
    target: bytes
    headers: Headers
    doc: Any = None
    form: bool = False  # doc is form fields, not JSON
    payload: bool = False  # the JSON goes in a `payload=` form field (Slack's interactivity)
    signed: bool = False  # Slack-signed once the body is final
    raws: dict[str, bytes] = field(default_factory=dict)  # placeholder string → raw JSON text
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    length: bool = True  # send a Content-Length that matches the body
    kind: str = "valid"

    def set(self, name: str, value: bytes | str | None) -> None:
        key = name.lower().encode()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != key]
        if value is not None:
            self.headers.append((name.encode(), value.encode() if isinstance(value, str) else value))

    def render(self) -> None:
        if self.form and isinstance(self.doc, dict):
            self.body = urlencode(self.doc).encode()
        elif self.doc is not None:
            text = json.dumps(self.doc).encode()
            for key, raw in self.raws.items():
                text = text.replace(json.dumps(key).encode(), raw)
            self.body = b"payload=" + quote_from_bytes(text, safe=b"").encode() if self.payload else text

    def raw(self) -> bytes:
        headers = self.headers + ([(b"Content-Length", b"%d" % len(self.body))] if self.length else [])
        head = [b" ".join((self.method, self.target, self.version))] + [k + b": " + v for k, v in headers]
        return b"\r\n".join(head) + b"\r\n\r\n" + self.body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    cookies: list[str]
    body: bytes


async def exchange(port: int, raw: bytes, full: bool = False) -> Reply:
    """Send `raw`; read the answer's head and a bounded body (an SSE body only when `full`)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), HEADER_TIMEOUT)
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):  # it may answer (413) before reading it all
            await writer.drain()
        async with asyncio.timeout(HEADER_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            while head[9:10] == b"1":  # 100 Continue (to an Expect header): the answer follows
                head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        pairs = [(k.strip().lower(), v.strip()) for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)]
        headers, body, length = dict(pairs), b"", -1
        with contextlib.suppress(ValueError):
            length = int(headers.get("content-length", -1))
        if full or "text/event-stream" not in headers.get("content-type", ""):
            with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                async with asyncio.timeout(HEADER_TIMEOUT if full else BODY_TIMEOUT):
                    if 0 <= length < 1 << 20:  # an answer on a kept-alive connection ends there
                        body = await reader.readexactly(length)
                    while length < 0 and len(body) < 1 << 20 and (chunk := await reader.read(65536)):
                        body += chunk
        cookies = [v.split(";")[0] for k, v in pairs if k == "set-cookie"]
        return Reply(int(lines[0].split()[1]), headers, cookies, body)
    finally:
        writer.close()


# ---- the gateway and the state valid requests refer to --------------------------------------------


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    port: int
    log: Path

    def memory(self) -> str:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", status, re.MULTILINE))
        return f"RSS {int(kib['VmRSS']) / 1024:.0f} MiB (peak {int(kib['VmHWM']) / 1024:.0f} MiB)"


async def start_gateway(workdir: Path) -> Gateway:
    (workdir / "policy.json").write_text(POLICY)
    (workdir / "gateway.toml").write_text(CONFIG)
    env = {**os.environ, "FUZZ_GRANT": GRANT, "FUZZ_ALICE": ALICE, "FUZZ_BOB": BOB}
    env |= {"SLACK_BOT_TOKEN": "xoxb-fuzz", "SLACK_SIGNING_SECRET": SIGNING_SECRET}
    env |= {"APPROVALS_DEMO_OUTBOX": str(workdir / "outbox"), "APPROVALS_DEMO_SANDBOX": str(workdir / "box")}
    log, config = workdir / "gateway.log", str(workdir / "gateway.toml")
    command = [sys.executable, "-m", "approvals", "serve", "--config", config, "--port", "0"]
    with log.open("wb") as stderr:
        pipe = asyncio.subprocess.PIPE
        process = await asyncio.create_subprocess_exec(
            *command, stdout=pipe, stderr=stderr, env=env, cwd=workdir
        )
    assert process.stdout is not None
    async with asyncio.timeout(START_TIMEOUT):
        while not (line := await process.stdout.readline()).startswith(b"approvals gateway listening"):
            if not line:
                raise RuntimeError(f"the gateway exited before it listened; see {log}")
    asyncio.get_running_loop().create_task(process.stdout.read())  # a full pipe must never block it
    return Gateway(process, int(line.rsplit(b":", 1)[1]), log)


@dataclass
class Context:
    """Live values valid requests carry: sessions, an approval id, an inbox login."""

    port: int
    session: str = ""
    victim: str = ""  # the session DELETE may end
    approval: str = "0" * 32
    login: Headers = field(default_factory=list)  # the login form's cookie; `login_csrf` goes with it
    login_csrf: str = ""
    inbox: Headers = field(default_factory=list)  # a reviewer's session cookie; `csrf` goes with it
    csrf: str = ""
    inits_left: int = 0  # initialize requests with a valid grant (each starts an upstream process)

    @property
    def origin(self) -> bytes:
        return b"http://127.0.0.1:%d" % self.port


def http(ctx: Context, route: str, target: str, headers: Headers, doc: Any = None, form: bool = False) -> Req:
    method, _, _ = route.partition(" ")
    base = [(b"Host", b"127.0.0.1:%d" % ctx.port), (b"Connection", b"close")]
    req = Req(route, method.encode(), target.encode(), base + headers, doc, form)
    req.render()
    return req


def mcp_headers(token: str, session: str | None) -> Headers:
    headers = [(b"Authorization", f"Bearer {token}".encode()), (b"Content-Type", b"application/json")]
    headers += [(b"Accept", b"application/json, text/event-stream"), (b"MCP-Protocol-Version", b"2025-06-18")]
    return headers + ([(b"Mcp-Session-Id", session.encode())] if session else [])


def form_headers(cookie: Headers, origin: bytes) -> Headers:
    return [*cookie, (b"Origin", origin), (b"Content-Type", b"application/x-www-form-urlencoded")]


def csrf_of(page: bytes) -> str:
    found = re.search(rb'name="csrf" value="([^"]*)"', page)
    if found is None:
        raise RuntimeError(f"no CSRF token in {page[:300]!r}")
    return found.group(1).decode()


async def ask(ctx: Context, route: str, target: str, headers: Headers, doc: Any = None) -> Reply:
    req = http(ctx, route, target, headers, doc, form=route.startswith("POST /inbox"))
    return await exchange(ctx.port, req.raw(), full=True)


async def prepare(ctx: Context) -> None:
    """Two MCP sessions, one pending approval, a reviewer logged in to the inbox."""
    sessions = []
    for _ in range(2):
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}
        reply = await ask(ctx, "POST /mcp", "/mcp/demo", mcp_headers(GRANT, None), init)
        sessions.append(reply.headers["mcp-session-id"])
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await ask(ctx, "POST /mcp", "/mcp/demo", mcp_headers(GRANT, sessions[-1]), note)
    ctx.session, ctx.victim = sessions
    call = {"name": "send_email", "arguments": EMAIL}  # held for a second, then left pending
    held = await ask(
        ctx, "POST /mcp", "/mcp/demo", mcp_headers(GRANT, ctx.session), {**MESSAGE, "params": call}
    )
    reviewer = [(b"Authorization", f"Bearer {ALICE}".encode())]
    pending = json.loads((await ask(ctx, "GET /api", "/api/approvals?status=pending", reviewer)).body)
    if not pending["approvals"]:
        raise RuntimeError(f"send_email was not held: {held.body[:500]!r}")
    ctx.approval = pending["approvals"][0]["id"]
    reply = await ask(ctx, "GET /inbox/login", "/inbox/login", [])
    ctx.login, ctx.login_csrf = [(b"Cookie", reply.cookies[0].encode())], csrf_of(reply.body)
    login = {"csrf": ctx.login_csrf, "token": ALICE}
    reply = await ask(ctx, "POST /inbox/login", "/inbox/login", form_headers(ctx.login, ctx.origin), login)
    ctx.inbox = [(b"Cookie", next(c for c in reply.cookies if c.startswith("approvals_session=")).encode())]
    page = await ask(ctx, "GET /inbox/approvals", f"/inbox/approvals/{ctx.approval}", ctx.inbox)
    ctx.csrf = csrf_of(page.body)


# ---- valid requests, by route ---------------------------------------------------------------------

INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "1"}}
MESSAGE = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
EMAIL: dict[str, Any] = {"to": "x@elsewhere.org", "subject": "s", "body": "b", "count": 1}
Call = tuple[str, dict[str, Any]]
CALLS: list[Call] = [("list_files", {}), ("get_time", {"timezone": "UTC"}), ("send_email", EMAIL)]
CALLS += [("delete_file", {"path": "notes.txt"}), ("generate_image", {"prompt": "p"})]
PARAMS = [{"name": n, "arguments": {**a, "count": 1}, "_meta": {"progressToken": 7}} for n, a in CALLS]
TOOL_CALLS: list[dict[str, Any]] = [{"method": "tools/call", "params": params} for params in PARAMS]
MESSAGES: list[dict[str, Any]] = [{"method": "tools/list", "params": {}}, {"method": "ping"}, {"result": {}}]
MESSAGES += [{"method": "resources/list"}, {"method": "notifications/cancelled", "params": {"requestId": 3}}]
GETS = ["/api/approvals?status=pending&limit=5", "/api/approvals/{id}", "/api/audit", "/inbox"]
GETS += ["/inbox/events", "/inbox/history", "/inbox/history.csv", "/inbox/history.json", "/inbox/login"]
GETS += ["/inbox/approvals/{id}", "/inbox/login/link?t=x", "/", "/healthz", "/metrics", "/static/inbox.css"]
GETS += ["/mcp/nope", "/api/x", "/inbox/stats", "/inbox/stats?days=30", "/docs"]
GETS += ["/inbox/pending/events", "/inbox/grants", "/inbox/grants/sg_x/export", "/api/standing-grants"]
GETS += ["/api/standing-grants?active=1", "/api/standing-grants/sg_x", "/api/standing-grants/sg_x/policy"]
GETS += ["/inbox/approvals/{id}?edit=1", "/inbox/approvals/{id}?remember=approve", "/inbox?tool=x&agent=y"]


def mcp(ctx: Context, rng: random.Random) -> Req:
    message = rng.choice(TOOL_CALLS if rng.random() < 0.6 else MESSAGES)
    doc = {"jsonrpc": "2.0", "id": rng.randrange(10**6), **copy.deepcopy(message)}
    if rng.random() < 0.1:  # each initialize with a valid grant starts a process: a few, then refused
        ctx.inits_left -= 1
        token = GRANT if ctx.inits_left >= 0 else "not-a-grant-token-0123456789abcdef"
        doc = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": copy.deepcopy(INIT)}
        return http(ctx, "POST /mcp/demo initialize", "/mcp/demo", mcp_headers(token, None), doc)
    if doc.get("method", "").startswith("notifications/"):
        del doc["id"]
    method = rng.choices(["POST", "GET", "DELETE"], [8, 1, 1])[0]
    # Only the spare session may be ended: the other serves the rest of the run.
    headers = mcp_headers(GRANT, ctx.victim if method == "DELETE" else ctx.session)
    return http(ctx, f"{method} /mcp/demo", "/mcp/demo", headers, doc if method == "POST" else None)


def get(ctx: Context, rng: random.Random) -> Req:
    path = rng.choice(GETS)
    auth = [(b"Authorization", f"Bearer {ALICE}".encode())] if path.startswith("/api") else ctx.inbox
    return http(ctx, f"GET {path.split('?')[0]}", path.replace("{id}", ctx.approval), auth)


def decide(ctx: Context, rng: random.Random) -> Req:
    path = f"/api/approvals/{{id}}/{rng.choice(['approve', 'deny'])}"
    doc: dict[str, Any] = {"reason": "fuzz"}
    extras: list[dict[str, Any]] = [  # the review workflows' fields: an edit, a grant, a stale view
        {"arguments": {"x": 1}},
        {"remember": {"for": "1h", "max_uses": 2}},
        {"seen_sha256": "0" * 64},
    ]
    if rng.random() < 0.5:
        doc |= rng.choice(extras)
    if rng.random() < 0.2:  # several ids at once
        path = f"/api/approvals/{rng.choice(['approve', 'deny'])}"
        doc = {"ids": [ctx.approval, "x"], "reason": "fuzz"}
    if rng.random() < 0.1:
        path, doc = "/api/standing-grants/sg_x/revoke", {}
    headers = [(b"Authorization", f"Bearer {ALICE}".encode()), (b"Content-Type", b"application/json")]
    return http(ctx, f"POST {path.split('/{')[0]}", path.replace("{id}", ctx.approval), headers, doc)


def form(ctx: Context, rng: random.Random) -> Req:
    path = rng.choice(["/inbox/login", "/inbox/login/link", "/inbox/approvals/{id}/approve"])
    path = rng.choice([path, "/inbox/approvals/{id}/deny", "/inbox/logout", "/inbox/batch"])
    path = rng.choice([path, path, "/inbox/grants/sg_x/revoke"])
    if path.startswith("/inbox/login"):
        doc = {"csrf": ctx.login_csrf, "token": rng.choice([ALICE, GRANT, "wrong"]), "link": "x.y"}
        headers = form_headers(ctx.login, ctx.origin)
    else:  # a logout with the right token would end the session every inbox request uses
        doc = {"csrf": ctx.csrf if path != "/inbox/logout" else "wrong", "reason": "fuzz"}
        if rng.random() < 0.5:  # a batch, an edit, a remember step: what the review forms carry
            extra = [{"ids": ctx.approval, "action": "approve"}, {"arguments": '{"x": 1}'}]
            extra.append({"remember": "preview", "remember_for": "3600", "c0_op": "prefix"})
            doc |= rng.choice(extra)
        headers = form_headers(ctx.inbox, ctx.origin)
    return http(ctx, f"POST {path}", path.replace("{id}", ctx.approval), headers, doc, form=True)


def slack(ctx: Context, rng: random.Random) -> Req:
    user = {"id": rng.choice(["U0ALICE", "U0BOB", "U0NOBODY"]), "team_id": "T0FUZZ"}
    action = {"action_id": rng.choice(["approvals_approve", "approvals_deny"]), "value": ctx.approval}
    doc: dict[str, Any] = {"type": "block_actions", "team": {"id": "T0FUZZ"}, "user": user}
    doc |= {"channel": {"id": "C0FUZZ"}}
    doc |= {"actions": [action], "message": {"ts": "1.2"}, "trigger_id": "t"}
    kind, payload = b"application/x-www-form-urlencoded", rng.random() < 0.8
    if not payload:  # the Events API's URL check comes as JSON
        doc, kind = {"type": "url_verification", "challenge": "c", "token": "t"}, b"application/json"
    req = http(ctx, "POST /slack/events", "/slack/events", [(b"Content-Type", kind)])
    req.doc, req.payload, req.signed = doc, payload, True
    return req


def sign(req: Req, stamp: int = 0) -> None:
    stamp = stamp or int(time.time())
    digest = hmac.new(SIGNING_SECRET.encode(), b"v0:%d:%s" % (stamp, req.body), hashlib.sha256)
    req.set("X-Slack-Request-Timestamp", str(stamp))
    req.set("X-Slack-Signature", "v0=" + digest.hexdigest())


Build = Callable[[Context, random.Random], Req]
ROUTES: dict[Build, int] = {mcp: 40, get: 22, decide: 6, form: 16, slack: 16}  # weights


# ---- mutations ------------------------------------------------------------------------------------

ODD: dict[str, Any] = {"null": None, "list": [], "obj": {}, "empty": "", "str": "x", "neg": -1, "float": 1.5}
ODD |= {"true": True, "2^64": 2**64, "obj1": {"a": 1}, "nested": [[{"a": [1]}]]}
RAW = {"1e400": b"1e400", "-1e400": b"-1e400", "1e-400": b"1e-400", "nan": b"NaN", "inf": b"Infinity"}
RAW |= {"10^400": b"1" + b"0" * 400, "10^5000": b"1" + b"0" * 5000, "-0": b"-0", "bytes": b'"\xff\xfe"'}
RAW |= {"surrogate": rb'"\ud800"', "nul": rb'"a\u0000b"', "rlo": rb'"\u202e"', "badesc": rb'"\x"'}
RAW |= {"ctrl": b'"a\x01b"', "long": b'"' + b"x" * 100_000 + b'"'}
RAW |= {f"deep{d}": b"[" * d + b"]" * d for d in (64, 600, 1000, 5000, 100_000)}
RAW |= {f"deepobj{d}": b'{"a":' * d + b"1" + b"}" * d for d in (600, 1000)}
FORM_VALUES = {"empty": "", "huge": "x" * 100_000, "nul": "a\x00b", "unicode": "é\u202e", "drop": None}
ROOTS: dict[str, Any] = {"array": [], "string": "x", "null": None, "number": 1, "true": True, "obj": {}}
# Where MCP calls broke before (issue 11), changed more often, in the ways that broke them.
HOT = {"params.arguments", "params._meta.progressToken", "params.arguments.count", "params.name", "id"}
HOT_ODD, HOT_RAW = (
    ["null", "list", "obj1", "str", "true", "nested"],
    ["1e400", "10^400", "10^5000", "deep1000"],
)


def places(doc: Any, label: str = "") -> list[tuple[str, Any, Any]]:
    """Every (path, container, key) in a JSON document; list indices are written []."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    found = []
    for key, value in items:
        path = f"{label}.{key}" if isinstance(key, str) else f"{label}[]"
        found += [(path.lstrip("."), doc, key), *places(value, path)]
    return found


def mutate_doc(req: Req, rng: random.Random) -> str:
    spots = places(req.doc)
    hot = [spot for spot in spots if spot[0] in HOT]
    if not spots or rng.random() < 0.08:
        name = rng.choice([*ROOTS, "batch"])
        req.doc = [req.doc, req.doc] if name == "batch" else copy.deepcopy(ROOTS[name])
        return f"root {name}"
    is_hot = bool(hot) and rng.random() < 0.5
    path, parent, key = rng.choice(hot if is_hot else spots)
    if req.form:
        name = rng.choice(list(FORM_VALUES))
        parent[key] = FORM_VALUES[name]
        if name == "drop":
            del parent[key]
        return f"field {name}@{path}"
    how = rng.choice(["type", "value"] if is_hot else ["drop", "type", "value", "value", "extra"])
    name = rng.choice(HOT_ODD if is_hot else list(ODD))
    if how == "drop" and isinstance(parent, dict):
        del parent[key]
        return f"drop @{path}"
    if how == "extra" and isinstance(parent[key], dict):
        parent[key]["zz"] = copy.deepcopy(ODD[name])
    elif how == "type":
        parent[key] = copy.deepcopy(ODD[name])
    else:
        how, name = "value", rng.choice(HOT_RAW if is_hot else list(RAW))
        parent[key] = f"\x00raw{len(req.raws)}"
        req.raws[parent[key]] = RAW[name]
    return f"{how} {name}@{path}"


BOUNDARY = b"multipart/form-data; boundary=b0"
PART = b'--b0\r\nContent-Disposition: form-data; name="csrf"; filename="x"\r\n\r\n%s\r\n--b0--\r\n'
BODIES: dict[str, Callable[[bytes, random.Random], tuple[bytes | None, bytes]]] = {
    "truncated": lambda b, r: (None, b[: r.randrange(len(b))] if b else b"{"),
    "empty": lambda b, r: (None, b""),
    "whitespace": lambda b, r: (None, b" \r\n\t"),
    "bom": lambda b, r: (None, b"\xef\xbb\xbf" + b),
    "utf16": lambda b, r: (None, b.decode("latin-1").encode("utf-16")),
    "bytes": lambda b, r: (None, b[: len(b) // 2] + b"\xff\xfe\x80" + b[len(b) // 2 :]),
    "garbage": lambda b, r: (None, r.randbytes(r.randrange(1, 300))),
    "trailing": lambda b, r: (None, b + b"}]x"),
    "dupkey": lambda b, r: (None, b'{"id":{},"id":1,' + b[1:] if b[:1] == b"{" else b + b"&" + b),
    "oversize": lambda b, r: (None, b + b" " * (5 << 20)),
    "pct": lambda b, r: (None, b"csrf=%ff%fe&token=%zz&reason=%&payload=%7B%ff"),
    "oddform": lambda b, r: (None, b"=&&=x&a&" + b + b"&reason=1&reason=2"),
    "multipart": lambda b, r: (BOUNDARY, PART % b),
    "multipart-noboundary": lambda b, r: (b"multipart/form-data", PART % b),
    "multipart-broken": lambda b, r: (BOUNDARY, (PART % b)[:-9]),
}
BOMB = gzip.compress(b"[" + b" " * (16 << 20) + b"]")  # 16 MiB once inflated
ENCODINGS: dict[str, Callable[[bytes], tuple[bytes, bytes]]] = {
    "gzip": lambda b: (b"gzip", gzip.compress(b)),
    "gzip-truncated": lambda b: (b"gzip", gzip.compress(b)[:12]),
    "gzip-junk": lambda b: (b"gzip", b),
    "deflate-junk": lambda b: (b"deflate", b),
    "deflate-raw": lambda b: (b"deflate", zlib.compress(b)[2:]),
    "br-junk": lambda b: (b"br", b),
    "double": lambda b: (b"gzip, gzip", gzip.compress(gzip.compress(b))),
    "bomb": lambda b: (b"gzip", BOMB),
    "unknown": lambda b: (b"x-fuzz", b),
}
# Header → "label=value|…" with \x escapes ("none" removes the header). The long ones are built below.
HEADER_SPECS = {
    "Host": r"bracket=[|v6open=[::1|fullwidth=127.0.0.1\xef\xbc\x8fx|bytes=\xff\xfe|empty=|none|evil=evil.ex",
    "Origin": r"bracket=http://[|fullwidth=http://127.0.0.1\xef\xbc\x8f|null=null|evil=http://evil.ex|none"
    r"|bytes=http://\xff\xfe|port=http://127.0.0.1:abc|scheme=://|v6=http://[::1]:0|self=http://127.0.0.1",
    "Authorization": r"bytes=Bearer \xff\xfe|bare=Bearer|basic=Basic Zm9vOmJhcg==|none"
    r"|utf8=Bearer t\xc3\xb6k",
    "Cookie": r"bytes=approvals_session=\xff\xfe|junk=approvals_session=a.b.c|quote=a=\""
    r"|login=approvals_login=\xff",
    "Content-Type": r"charset=application/json; charset=bogus|utf16=application/json; charset=utf-16|none"
    r"|form-bytes=application/x-www-form-urlencoded; charset=\xff|text=text/plain|bytes=\xff\xfe/\x80"
    r"|form-bogus=application/x-www-form-urlencoded; charset=bogus",
    "Accept": r"sse=text/event-stream|json=application/json|empty=|bytes=\xff",
    "MCP-Protocol-Version": r"bogus=bogus|bytes=\xff\xfe|future=2099-01-01|empty=",
    "Mcp-Session-Id": r"other=x|bytes=\xff\xfe|empty=|none",
    "X-Slack-Signature": r"none|utf8=v0=\xc3\xa9\xc3\xa9|bytes=v0=\xff\xfe|v1=v1=abc|empty=|short=v0=00",
    "X-Slack-Request-Timestamp": r"none|abc=abc|exp=1e10|neg=-1|empty=|long=99999999999999999999999|float=1.5"
    r"|bytes=\xff|stale=1000000000",
    "X-Forwarded-Proto": r"https=https|bytes=\xff",
    "Expect": r"continue=100-continue|junk=fuzz",
    "Connection": r"keepalive=keep-alive|upgrade=Upgrade, close",
    "Transfer-Encoding": r"gzip=gzip|bogus=bogus",
}
HEADERS: dict[str, dict[str, bytes | None]] = {
    name: {
        x.split("=", 1)[0]: codecs.escape_decode(x.split("=", 1)[1])[0] if "=" in x else None
        for x in spec.split("|")
    }
    for name, spec in HEADER_SPECS.items()
}
HEADERS["Authorization"]["huge"] = b"Bearer " + b"x" * 7000
HEADERS["Cookie"]["many"] = b"; ".join(b"c%d=1" % i for i in range(300))
HEADERS["Host"]["long"] = b"a" * 8000
LINES = {
    "nocolon": b"NoColonHere",
    "space": b"Bad Name: x",
    "fold": b"X-A: a\r\n folded",
    "nul": b"X: a\x00b",
}
LINES |= {"long": b"X-Long: " + b"a" * 10_000, "bytes": b"\xff\xfe: v", "noname": b": v"}
LINES |= {"many": b"\r\n".join(b"X-%d: v" % i for i in range(200))}
TARGETS: dict[str, Callable[[bytes], bytes]] = {
    "star": lambda t: b"*",
    "absolute": lambda t: b"http://127.0.0.1" + t,
    "nul": lambda t: t + b"%00",
    "pct-ff": lambda t: t + b"/%ff",
    "raw-bytes": lambda t: b"/\xff\xfe" + t,
    "slashes": lambda t: b"/" + t,
    "dots": lambda t: b"/mcp/../api/audit",
    "long": lambda t: b"/" + b"a" * 9000,
    "encoded": lambda t: t.replace(b"/", b"/%2e%2e/", 1),
}
QUERIES = {"bad-pct": b"?%zz=%", "limits": b"?status=bogus&limit=-1&offset=x", "1e400": b"?limit=1e400"}
QUERIES |= {
    "huge": b"?limit=" + b"9" * 50,
    "bytes": b"?status=%ff&decision=\xff",
    "dup": b"?status=a&status=b",
}
QUERIES |= {"many": b"?" + b"&".join(b"a%d=1" % i for i in range(2000)), "empty": b"?&&=&"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "BREW", "post"]


def mutate_body(req: Req, rng: random.Random) -> str:
    name = rng.choice(list(BODIES))
    kind, req.body = BODIES[name](req.body, rng)
    if kind is not None:
        req.set("Content-Type", kind)
    return f"body {name}"


def mutate_head(req: Req, rng: random.Random) -> str:
    name = rng.choice(list(HEADERS))
    label = rng.choice(list(HEADERS[name]))
    value = HEADERS[name][label]
    if name == "Cookie" and value is not None:  # one more cookie header beside the session's
        req.headers.append((b"Cookie", value))
    else:
        req.set(name, value)
    return f"header.{name} {label}"


def mutate_frame(req: Req, rng: random.Random) -> str:
    how = rng.choice(["encoding", "length", "chunked", "version", "method", "target", "line", "query"])
    label = ""
    if how == "encoding":
        label = rng.choice(list(ENCODINGS))
        coding, req.body = ENCODINGS[label](req.body)
        req.set("Content-Encoding", coding)
    elif how == "length":
        label, req.length = rng.choice(["abc", "-1", "short", "twice"]), False
        short = b"%d" % (len(req.body) // 2)
        values = {"abc": [b"abc"], "-1": [b"-1"], "short": [short], "twice": [short, b"%d" % len(req.body)]}
        req.headers += [(b"Content-Length", value) for value in values[label]]
    elif how == "chunked":
        label = rng.choice(["ok", "bad", "with-length"])
        chunked = (b"%x\r\n%s\r\n" % (len(req.body), req.body) if req.body else b"") + b"0\r\n\r\n"
        req.body, req.length = (b"zz\r\n" + req.body if label == "bad" else chunked), label == "with-length"
        req.set("Transfer-Encoding", "chunked")
    elif how == "version":
        label = rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/0.9"])
        req.version = label.encode()
    elif how == "method":
        label = rng.choice(METHODS)
        req.method = label.encode()
    elif how == "target":
        label = rng.choice(list(TARGETS))
        req.target = TARGETS[label](req.target)
    elif how == "line":
        label = rng.choice(list(LINES))
        req.headers.append((LINES[label], b""))  # written "<line>: "; the odd line is what counts
    else:
        label = rng.choice(list(QUERIES))
        req.target = req.target.split(b"?")[0] + QUERIES[label]
    return f"{how} {label}"


def mutate_slack(req: Req, rng: random.Random) -> str:
    """Unsigned junk, or a correct signature with an old timestamp."""
    if rng.random() < 0.5:
        req.body = rng.choice([b"payload=%7B", b"{", b"payload=" + rng.randbytes(40), b"x" * 1000])
        return "slack unsigned-junk"
    sign(req, int(time.time()) - 3600)
    return "slack stale"


def sweep(ctx: Context) -> Iterator[Req]:
    """Every value that broke an MCP call before (issue 11) at every place it broke one, first."""
    for path, name in itertools.product(sorted(HOT), HOT_ODD + HOT_RAW):
        doc = {"jsonrpc": "2.0", "id": 1, **copy.deepcopy(TOOL_CALLS[0])}  # list_files: allowed
        *above, last = path.split(".")
        parent = functools.reduce(lambda node, key: node[key], above, doc)
        parent[last] = copy.deepcopy(ODD.get(name, f"\x00raw{name}"))
        req = http(ctx, "POST /mcp/demo", "/mcp/demo", mcp_headers(GRANT, ctx.session))
        req.doc, req.raws, req.kind = doc, {f"\x00raw{name}": RAW.get(name, b"")}, f"sweep {name}@{path}"
        req.render()
        yield req


def make_case(ctx: Context, rng: random.Random) -> Req:
    """One request: valid for its route, then changed in one way (or, rarely, not at all)."""
    req = rng.choices(list(ROUTES), list(ROUTES.values()))[0](ctx, rng)
    stage = rng.choices(["valid", "head", "frame", "doc", "body", "slack"], [2, 30, 24, 30, 14, 4])[0]
    if (stage == "doc" and req.doc is None) or (stage == "slack" and not req.signed):
        stage = "head"
    if stage == "doc":
        req.kind = mutate_doc(req, rng)
    req.render()
    if stage == "body":
        req.kind = mutate_body(req, rng)
    if req.signed:
        sign(req)
    if stage in ("head", "frame", "slack"):
        req.kind = {"head": mutate_head, "frame": mutate_frame, "slack": mutate_slack}[stage](req, rng)
    return req


# ---- the run and its report -----------------------------------------------------------------------


@dataclass
class Tally:
    routes: dict[str, Counter[str]] = field(default_factory=dict)  # route → outcome class → count
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: dict[tuple[str, str, str], tuple[int, bytes]] = field(default_factory=dict)  # → count, raw

    def add(self, req: Req, outcome: str, raw: bytes) -> None:
        self.kinds[req.kind.split(" ")[0]] += 1
        self.statuses[outcome] += 1
        self.routes.setdefault(req.route, Counter())[outcome[0] + "xx" if outcome.isdigit() else outcome] += 1
        if outcome.startswith(FAILURES):
            count, first = self.failures.get((req.kind, req.route, outcome), (0, raw))
            self.failures[(req.kind, req.route, outcome)] = (count + 1, first)


async def send(port: int, req: Req, tally: Tally) -> None:
    raw = req.raw()
    try:
        reply = await exchange(port, raw)
        outcome = "traceback" if TRACEBACK in reply.body else str(reply.status)
    except TimeoutError:
        outcome = "timeout"
    except (asyncio.IncompleteReadError, ConnectionError):
        outcome = "dropped"
    except (OSError, ValueError, IndexError) as exc:  # an answer too odd to parse
        outcome = f"error {type(exc).__name__}"
    tally.add(req, outcome, raw)


async def fuzz(args: argparse.Namespace, workdir: Path) -> tuple[Tally, str]:
    """Run the requests against a fresh gateway; the tally, and the gateway's state at the end."""
    gateway = await start_gateway(workdir)
    try:
        ctx = Context(gateway.port, inits_left=max(4, args.requests // 500))
        await prepare(ctx)
        rng, tally, deadline = random.Random(args.seed), Tally(), time.monotonic() + args.seconds
        randomly = (make_case(ctx, rng) for _ in itertools.count())
        cases = itertools.islice(itertools.chain(sweep(ctx), randomly), args.requests)

        async def worker() -> None:
            for req in cases:  # one shared generator: the requests come in the seed's order
                if time.monotonic() > deadline:
                    return
                await send(gateway.port, req, tally)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        if gateway.process.returncode is not None:
            return tally, f"gateway EXITED with status {gateway.process.returncode}"
        return tally, f"gateway alive, {gateway.memory()}"
    finally:
        if gateway.process.returncode is None:
            gateway.process.terminate()
        await gateway.process.wait()


def logged_exceptions(log: Path) -> Counter[str]:
    """The last line of every traceback in the gateway's log."""
    found: Counter[str] = Counter()
    inside = False
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line and not line.startswith((" ", "During handling", "The above")):
            found[line[:150]] += 1
            inside = False
    return found


def report(tally: Tally, gateway: str, log: Path, seconds: float) -> str:
    total = sum(tally.statuses.values())
    lines = [f"{total:,} requests in {seconds:.0f} s ({total / max(seconds, 1e-9):,.0f}/s)", ""]
    lines.append(f"{'route':<44}{'requests':>9}  outcomes")
    for route, outcomes in sorted(tally.routes.items()):
        shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        lines.append(f"{route:<44}{sum(outcomes.values()):>9}  {shown}")
    lines += ["", "kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items()))]
    lines += ["statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.statuses.items())), ""]
    lines.append(f"{len(tally.failures)} (kind, route) with a 500, traceback, timeout or dropped connection:")
    for (kind, route, outcome), (count, raw) in sorted(tally.failures.items()):
        lines.append(f"  {outcome:>9} x{count:<4} [{kind}]  {route}")
        lines.append(f"            {raw[:300]!r}{'...' if len(raw) > 300 else ''}")
    logged = logged_exceptions(log)
    lines += ["", f"exceptions in the gateway's log ({sum(logged.values())}):"]
    lines += [f"  x{count:<5} {line}" for line, count in logged.most_common(40)]
    return "\n".join([*lines, "", gateway])


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fuzz a real approvals gateway (see bench/fuzz.py).")
    parser.add_argument("--requests", type=int, default=20_000, help="malformed requests (default 20,000)")
    parser.add_argument("--seconds", type=float, default=900.0, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=11, help="the seed that fixes the requests")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (log, database)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    workdir, started = Path(tempfile.mkdtemp(prefix="approvals-fuzz-")), time.monotonic()
    try:
        tally, gateway = asyncio.run(fuzz(args, workdir))
        print(report(tally, gateway, workdir / "gateway.log", time.monotonic() - started))
    finally:
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = tally.statuses["500"] + tally.statuses["traceback"] > 0 or "EXITED" in gateway
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
