"""Policy and rate limits through the gateway, with real clients and real upstreams."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError

from approvals import arg_schema
from approvals.config import load_settings
from approvals.errors import ConfigError
from approvals.policy_files import check_policies
from approvals.tool_catalog import ToolCatalog
from tests.conftest import DEMO_COMMAND, TOKEN_B, StartGateway, mcp_client, settings_for
from tests.upstreams import MODELSCOPE_OFFLINE_ENV

CONFIG = Path(__file__).parent.parent / "config"
SEED_POLICY = {  # exactly as on the seed's product page
    "version": "1",
    "default": "deny",
    "tools": {
        "generate_image": {
            "limits": [{"counter": "generate_image_rate", "window": "minute", "max": 10, "scope": "grant"}]
        }
    },
}
NOW = 1_800_000_010.0  # 10 s into a UTC minute: a frozen clock keeps the window from rolling over


def _meta(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


async def _gateway_with_policy(
    start_gateway: StartGateway,
    tmp_path: Path,
    policy: dict[str, Any],
    command: list[str] = DEMO_COMMAND,
    **gatekeeper: Any,
) -> Any:
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    upstreams = {"up": {"command": command, "policy": "policy.json"}}
    gw = await start_gateway(upstreams, clock=lambda: NOW, **gatekeeper)
    return gw, gw.gatekeeper


async def test_seed_policy_caps_generate_image_per_grant_and_denies_the_rest(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The seed's policy.json: 10 generate_image a minute per client, anything else denied."""
    gw, _ = await _gateway_with_policy(start_gateway, tmp_path, SEED_POLICY)
    async with mcp_client(gw.url("up")) as a, mcp_client(gw.url("up"), TOKEN_B) as b:
        for _ in range(10):
            assert not (await a.call_tool("generate_image", {"prompt": "a cat"})).is_error
        refused = await a.call_tool("generate_image", {"prompt": "a cat"})
        assert refused.is_error
        text = refused.content[0].text  # type: ignore[union-attr]
        assert text == "Rate limit generate_image_rate reached: 10 per minute per client. Retry in 50 s."
        assert _meta(refused) == {
            "code": "rate_limited",
            "rule": "generate_image",
            "counter": "generate_image_rate",
            "retry_after": 50,
        }
        # Another grant has its own count.
        assert not (await b.call_tool("generate_image", {"prompt": "a dog"})).is_error
        denied = await a.call_tool("get_time", {})
        assert denied.is_error
        assert denied.content[0].text == 'Denied by policy: tool "get_time" is not allowed by policy'  # type: ignore[union-attr]
        assert _meta(denied)["code"] == "denied"


async def test_design_policy_features_apply_through_the_gateway(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """hide, globs, require, deny_if and a rule's reason, as the agent sees them."""
    policy = {
        "version": "1",
        "default": "deny",
        "hide": ["delete_*"],
        "tools": {
            "list_*": {},
            "get_time": {},
            "send_email": {
                "require": [{"path": "args.to", "op": "regex", "value": "@example\\.com$"}],
                "deny_if": [{"path": "args.subject", "op": "contains", "value": "password"}],
            },
            "generate_image": {"action": "deny", "reason": "Images cost money; ask a person."},
        },
    }
    gw, _ = await _gateway_with_policy(start_gateway, tmp_path, policy)
    async with mcp_client(gw.url("up")) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "delete_file" not in names
        assert {"list_files", "get_time", "send_email"} <= names
        hidden = await client.call_tool("delete_file", {"path": "notes.txt"})
        assert hidden.is_error
        assert _meta(hidden)["code"] == "hidden"
        assert not (await client.call_tool("list_files", {})).is_error
        ok = await client.call_tool("send_email", {"to": "a@example.com", "subject": "hi", "body": "x"})
        assert not ok.is_error
        outside = await client.call_tool("send_email", {"to": "a@evil.test", "subject": "hi", "body": "x"})
        assert _meta(outside)["code"] == "requirement_failed"
        leak = await client.call_tool(
            "send_email", {"to": "a@example.com", "subject": "my password", "body": "x"}
        )
        assert _meta(leak)["code"] == "deny_if"
        costly = await client.call_tool("generate_image", {"prompt": "x"})
        assert costly.content[0].text == "Denied by policy: Images cost money; ask a person."  # type: ignore[union-attr]


async def test_concurrent_calls_let_exactly_the_limit_through(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """40 concurrent calls against a limit of 7 from one client: exactly 7 reach the upstream."""
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {"get_time": {"limits": [{"counter": "t", "window": "hour", "max": 7, "scope": "global"}]}},
    }
    gw, _ = await _gateway_with_policy(start_gateway, tmp_path, policy)
    async with mcp_client(gw.url("up")) as a, mcp_client(gw.url("up"), TOKEN_B) as b:
        results = await asyncio.gather(*(c.call_tool("get_time", {}) for c in (a, b) * 20))
    assert sum(not r.is_error for r in results) == 7
    assert all(_meta(r)["code"] == "rate_limited" for r in results if r.is_error)


async def test_counters_survive_a_gateway_restart(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Calls counted by one gateway process still count in the next one on the same store."""
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {"get_time": {"limits": [{"counter": "t", "window": "day", "max": 3, "scope": "grant"}]}},
    }
    first, _ = await _gateway_with_policy(start_gateway, tmp_path, policy)
    async with mcp_client(first.url("up")) as client:
        for _ in range(3):
            assert not (await client.call_tool("get_time", {})).is_error
    await first.server.close()  # a clean stop flushes the counters
    second, _ = await _gateway_with_policy(start_gateway, tmp_path, policy)
    async with mcp_client(second.url("up")) as client:
        assert _meta(await client.call_tool("get_time", {}))["code"] == "rate_limited"


async def test_policy_edits_are_reloaded_and_bad_edits_keep_the_old_policy(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A valid edit takes effect without a restart; an invalid one is refused, shown on /healthz."""
    gw, gate = await _gateway_with_policy(
        start_gateway, tmp_path, {"version": "1", "default": "deny"}, watch_interval=0.02
    )
    policy_file = tmp_path / "policy.json"
    async with mcp_client(gw.url("up")) as client:
        assert (await client.call_tool("get_time", {})).is_error
        generation = gate.policies.generation
        policy_file.write_text(json.dumps({"version": "1", "default": "deny", "tools": {"get_time": {}}}))
        await asyncio.wait_for(gate.policies.wait_reloaded(generation), 10)
        assert not (await client.call_tool("get_time", {})).is_error

        generation = gate.policies.generation
        policy_file.write_text('{"version": "1", "default": "deny", "tools": {"get_time": {"limts": []}}}')
        await asyncio.wait_for(gate.policies.wait_reloaded(generation), 10)
        assert not (await client.call_tool("get_time", {})).is_error  # the old policy is still in force
        async with aiohttp.ClientSession() as http, http.get(f"{gw.base}/healthz") as response:
            health = await response.json()
        assert health["status"] == "degraded"
        assert any("tools.get_time.limts" in e for e in health["policy_errors"]["up"])


async def test_check_policies_reports_every_error_of_every_file(tmp_path: Path) -> None:
    """`approvals check` lists each policy problem with its file and path, all at once."""
    (tmp_path / "a.json").write_text('{"version": "1", "default": "maybe", "tools": {"x": {"limts": []}}}')
    (tmp_path / "b.json").write_text('{"version": "1", "tools": {"y": {"action": "deny"}, }')
    settings = settings_for(
        tmp_path, {"a": {"command": ["x"], "policy": "a.json"}, "b": {"command": ["x"], "policy": "b.json"}}
    )
    with pytest.raises(ConfigError) as caught:
        check_policies(settings)
    text = str(caught.value)
    assert "a.json: default" in text
    assert "a.json: tools.x.limts" in text
    assert "b.json" in text
    assert "line 1" in text


async def test_modelscope_example_offline(start_gateway: StartGateway, tmp_path: Path) -> None:
    """The shipped ModelScope example: tools listed, others denied, upstream errors passed on, not counted."""
    example = tmp_path / "examples"
    shutil.copytree(CONFIG / "examples", example)
    settings = load_settings(example / "modelscope.toml", env={})
    upstream = settings.upstreams["modelscope"]
    assert upstream.policy_path is not None
    policy = json.loads(upstream.policy_path.read_text())
    assert policy == SEED_POLICY
    env = {**MODELSCOPE_OFFLINE_ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    upstreams = {
        "modelscope": {"command": list(upstream.command), "policy": str(upstream.policy_path), "env": env}
    }
    gw = await start_gateway(upstreams, clock=lambda: NOW)
    async with mcp_client(gw.url("modelscope")) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "generate_image" in names
        other = sorted(names - {"generate_image"})[0]
        assert _meta(await client.call_tool(other, {}))["code"] == "denied"
        for _ in range(11):  # more than the limit: every failure is rolled back, none is rate-limited
            with pytest.raises(MCPError) as caught:
                await client.call_tool("generate_image", {"prompt": "a cat"})
            assert "token" in caught.value.error.message.lower()


async def test_arguments_that_break_a_listed_schema_are_refused_at_the_gate(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Once a tool's inputSchema is known, arguments that break it never reach the upstream: a
    tool error names the failing path, even under an allow rule."""
    policy = {"version": "1", "default": "deny", "tools": {"generate_image": {}}}
    gw, _ = await _gateway_with_policy(start_gateway, tmp_path, policy)
    async with mcp_client(gw.url("up")) as client:
        await client.list_tools()
        for arguments, path in (
            ({"prompt": 5}, "args.prompt"),
            ({"prompt": "a", "size": "huge"}, "args.size"),
        ):
            refused = await client.call_tool("generate_image", arguments)
            assert refused.is_error
            assert _meta(refused) == {"code": "invalid_arguments", "path": path}
        assert not (await client.call_tool("generate_image", {"prompt": "a cat"})).is_error


class _NoUpstream:
    """An UpstreamCaller for a catalog that must answer from what it was shown."""

    async def call(
        self, upstream: str, method: str, params: Any, *, prefer_session: str | None = None
    ) -> Any:
        raise AssertionError(f"unexpected {method} to {upstream}")


def _catalog_with(schema: object) -> ToolCatalog:
    catalog = ToolCatalog(_NoUpstream())
    catalog.remember("up", [{"name": "transfer", "inputSchema": schema}])
    return catalog


TRANSFER_SCHEMA = {
    "type": "object",
    "properties": {"amount": {"type": "integer"}, "to": {"type": "array", "items": {"type": "string"}}},
    "required": ["amount"],
}


@pytest.mark.parametrize(
    ("arguments", "path"),
    [
        ({"amount": "5000"}, "args.amount"),  # pydantic would coerce it; strict validation refuses
        ({"amount": 5, "to": '["bob"]'}, "args.to"),  # the SDK would decode it
        ({"amount": 5, "to": ["bob", 7]}, "args.to.1"),
        ({}, "args"),
    ],
)
def test_values_an_upstream_would_coerce_break_the_schema(arguments: dict[str, Any], path: str) -> None:
    """Strict JSON Schema validation refuses what pydantic's lax mode would coerce, at its path."""
    problem = _catalog_with(TRANSFER_SCHEMA).argument_problem("up", "transfer", arguments)
    assert problem is not None
    assert problem.path == path
    assert (
        _catalog_with(TRANSFER_SCHEMA).argument_problem("up", "transfer", {"amount": 5, "to": ["b"]}) is None
    )


def test_schemas_are_compiled_once_per_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-call path reuses the compiled validator: by definition object, then by schema hash."""
    compiled: list[str] = []
    real = arg_schema._compile

    def counting(schema: dict[str, Any], sha: str) -> arg_schema.Validator | None:
        compiled.append(sha)
        return real(schema, sha)

    monkeypatch.setattr(arg_schema, "_compile", counting)
    catalog = _catalog_with(TRANSFER_SCHEMA)
    for _ in range(3):
        assert catalog.argument_problem("up", "transfer", {"amount": 1}) is None
    catalog.remember("up", [{"name": "transfer", "inputSchema": json.loads(json.dumps(TRANSFER_SCHEMA))}])
    assert catalog.argument_problem("up", "transfer", {"amount": "1"}) is not None
    assert len(compiled) == 1


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objekt"},
        {"type": "object", "properties": {"a": {"pattern": "("}}},
        {"$ref": "http://127.0.0.1:9/schema.json"},
        {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
        "not a schema",
    ],
)
def test_an_unusable_schema_checks_nothing_and_is_logged_once(
    schema: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema that is itself invalid or cannot resolve never crashes a call: it is skipped, logged once."""
    catalog = _catalog_with(schema)
    for _ in range(3):
        assert catalog.argument_problem("up", "transfer", {"a": "x"}) is None
    assert len([r for r in caplog.records if "inputSchema" in r.getMessage()]) == (
        0 if isinstance(schema, str) else 1
    )
