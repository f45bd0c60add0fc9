"""A policy written from the seed page's own words works as they say (issue 11, item 20).

The page (PolicyLayer's, for ModelScope's `generate_image`) shows a policy.json and its FAQ says:
"Add a rate_limit block to the generate_image rule … setting max: 10 and window: 60 limits the
tool to 10 calls per minute. Rate limits are tracked per agent session and reset automatically."
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import DEMO_COMMAND, StartGateway, mcp_client
from tests.test_cli import GOOD_CONFIG, run_cli

# Verbatim from the page, indentation and all.
SEED_POLICY_JSON = """{
  "version": "1",
  "default": "deny",
  "tools": {
    "generate_image": {
      "limits": [
        {
          "counter": "generate_image_rate",
          "window": "minute",
          "max": 10,
          "scope": "grant"
        }
      ]
    }
  }
}"""
# The FAQ's words as a policy: the rate_limit block with max 10 and window 60.
FAQ_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"generate_image": {"rate_limit": {"max": 10, "window": 60}}},
}
MINUTE = 1_800_000_000.0  # a whole UTC minute
NOW = MINUTE + 10.0


def _meta(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


async def _check(tmp_path: Path, policy_text: str) -> tuple[int, str]:
    """`approvals check` on a gateway.toml whose upstream uses `policy_text`: (status, stderr)."""
    (tmp_path / "gateway.toml").write_text(GOOD_CONFIG)
    (tmp_path / "policy.json").write_text(policy_text)
    status, _, err = await run_cli(tmp_path, "check", "--config", "gateway.toml")
    return status, err


async def _serve(start_gateway: StartGateway, tmp_path: Path, policy_text: str, clock: list[float]) -> str:
    """A gateway in front of the demo upstream under `policy_text`, on a clock the test moves."""
    (tmp_path / "policy.json").write_text(policy_text)
    upstreams = {"up": {"command": DEMO_COMMAND, "policy": "policy.json"}}
    return (await start_gateway(upstreams, clock=lambda: clock[0])).url("up")


async def _images(client: Any, calls: int) -> list[Any]:
    return [await client.call_tool("generate_image", {"prompt": "a cat"}) for _ in range(calls)]


async def test_seed_policy_passes_check_and_caps_generate_image_at_10_a_minute(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The page's policy.json as printed: `approvals check` accepts it; 10 calls a minute, then refused."""
    status, err = await _check(tmp_path, SEED_POLICY_JSON)
    assert status == 0, err
    clock = [NOW]
    url = await _serve(start_gateway, tmp_path, SEED_POLICY_JSON, clock)
    async with mcp_client(url) as client:
        assert [r.is_error for r in await _images(client, 11)] == [False] * 10 + [True]
        clock[0] = MINUTE + 60.0
        assert not (await _images(client, 1))[0].is_error
        assert _meta(await client.call_tool("get_time", {}))["code"] == "denied"


async def test_faq_rate_limit_block_passes_check_and_caps_each_session_at_10_a_minute(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The FAQ's `rate_limit` with max 10, window 60: 10 calls a minute per agent session, reset
    automatically when the minute is over."""
    status, err = await _check(tmp_path, json.dumps(FAQ_POLICY))
    assert status == 0, err
    clock = [NOW]
    url = await _serve(start_gateway, tmp_path, json.dumps(FAQ_POLICY), clock)
    # One grant, two sessions (initialize era: a stateless client's calls count as one session per grant).
    async with mcp_client(url, mode="legacy") as first, mcp_client(url, mode="legacy") as second:
        results = await _images(first, 11)
        assert [r.is_error for r in results] == [False] * 10 + [True]
        assert _meta(results[-1]) == {
            "code": "rate_limited",
            "rule": "generate_image",
            "counter": "generate_image",
            "retry_after": 50,
        }
        assert "10 per minute per session" in results[-1].content[0].text
        assert [r.is_error for r in await _images(second, 10)] == [False] * 10  # its own count
        clock[0] = MINUTE + 60.0
        assert not (await _images(first, 1))[0].is_error


async def test_check_explains_bad_windows_and_rate_limit_fields(tmp_path: Path) -> None:
    """`approvals check` names each bad window (0, -1, 1.5, "fortnight") and unknown rate_limit field."""
    policy = {
        "version": "1",
        "tools": {
            "a": {"rate_limit": {"max": 10, "window": 0}},
            "b": {"rate_limit": {"max": 10, "window": -1}},
            "c": {"rate_limit": {"max": 10, "window": 1.5}},
            "d": {"limits": [{"counter": "d", "window": "fortnight", "max": 1}]},
            "e": {"rate_limit": {"max": 10, "window": 60, "scope": "grant"}},
            "f": {"rate_limit": {"window": 60}},
            "g": {"rate_limit": 10},
        },
    }
    status, err = await _check(tmp_path, json.dumps(policy))
    assert status == 1
    for path in (
        "tools.a.rate_limit.window",
        "tools.b.rate_limit.window",
        "tools.c.rate_limit.window",
        "tools.d.limits[0].window",
        "tools.e.rate_limit.scope",
        "tools.f.rate_limit.max",
        "tools.g.rate_limit",
    ):
        assert f"{path}: " in err, path
    assert "whole number of seconds from 1 to 86400" in err
    assert "Traceback" not in err
