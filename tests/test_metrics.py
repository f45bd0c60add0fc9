"""/metrics: a scripted session through a real client and the demo upstream gives known counts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from approvals.core.ports import Change
from approvals.metrics import METRICS, OTHER_TOOL, Metrics
from tests.approvals_kit import Held, start_held
from tests.conftest import DEMO_COMMAND, WAIT, StartGateway, mcp_client
from tests.test_store_approvals import make_approval

METRICS_TOKEN = "metrics-token-0123456789abcdef"
EMAIL = {"to": "ops@example.com", "subject": "Numbers", "body": "Attached."}
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "send_email": {"action": "require_approval"},
        "get_time": {"limits": [{"counter": "time", "window": "minute", "max": 2, "scope": "grant"}]},
        "list_files": {},
    },
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(base: str, token: str | None = METRICS_TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics", headers=headers) as response:
        return response.status, await response.text()


async def _samples(base: str) -> Samples:
    status, text = await _scrape(base)
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Held:
    monkeypatch.setenv("APPROVALS_METRICS_TOKEN", METRICS_TOKEN)  # start_held passes the environment on
    return await start_held(start_gateway, tmp_path, POLICY)


async def test_scripted_session_gives_known_counts(held: Held) -> None:
    """Every outcome, the decisions, final states and gauges match what the script did."""
    base = held.gateway.base
    async with mcp_client(held.url()) as client:
        await client.list_tools()  # the upstream's names become labels
        for _ in range(2):
            assert not (await client.call_tool("list_files", {})).is_error
        assert (await client.call_tool("get_time", {"timezone": 5})).is_error  # invalid: not a string
        results = [await client.call_tool("get_time", {}) for _ in range(3)]
        assert [r.is_error for r in results] == [False, False, True]  # the third is over the limit
        assert (await client.call_tool("delete_file", {"path": "a"})).is_error  # default deny
        assert (await client.call_tool("no_such_tool", {})).is_error  # not listed: counted as "other"

        approved = asyncio.create_task(client.call_tool("send_email", EMAIL))
        pending = await held.recorder.status("pending")
        during = await _samples(base)
        assert _value(during, "approvals_pending", upstream="demo") == 1
        assert _value(during, "approvals_held_connections") == 1
        assert _value(during, "approvals_sessions") == 0  # a 2026-07-28 client opens no session
        assert _value(during, "approvals_upstream_processes") >= 1  # the grant's pooled demo server
        assert (await held.api("POST", f"/api/approvals/{pending.id}/approve", body={}))[0] == 200
        assert not (await asyncio.wait_for(approved, WAIT)).is_error

        denied = asyncio.create_task(client.call_tool("send_email", {**EMAIL, "subject": "other"}))
        second = await held.recorder.wait_for(lambda a: a.status == "pending" and a.id != pending.id)
        assert (await held.api("POST", f"/api/approvals/{second.id}/deny", body={"reason": "no"}))[0] == 200
        assert (await asyncio.wait_for(denied, WAIT)).is_error
        await held.recorder.status("denied", second.id)
        await held.recorder.status("completed", pending.id)

    after = await _samples(base)
    calls = {
        ("list_files", "allowed"): 2,
        ("get_time", "allowed"): 2,
        ("get_time", "rate_limited"): 1,
        ("get_time", "invalid"): 1,
        ("delete_file", "denied"): 1,
        (OTHER_TOOL, "denied"): 1,
        ("send_email", "held"): 2,
    }
    for (tool, outcome), count in calls.items():
        assert _value(after, "approvals_calls_total", upstream="demo", tool=tool, outcome=outcome) == count
    assert sum(v for (name, _), v in after.items() if name == "approvals_calls_total") == sum(calls.values())
    assert _value(after, "approvals_decisions_total", upstream="demo", decision="approved") == 1
    assert _value(after, "approvals_decisions_total", upstream="demo", decision="denied") == 1
    assert _value(after, "approvals_final_total", upstream="demo", state="completed") == 1
    assert _value(after, "approvals_final_total", upstream="demo", state="denied") == 1
    assert (
        _value(after, "approvals_request_to_decision_seconds_count", upstream="demo", decision="approved")
        == 1
    )
    assert _value(after, "approvals_decision_to_agent_seconds_count", upstream="demo") == 2
    # Forwarded: 2 list_files + 2 get_time; released: the approved send_email.
    assert _value(after, "approvals_upstream_call_seconds_count", upstream="demo") == 5
    assert _value(after, "approvals_upstream_errors_total", upstream="demo") == 0
    assert _value(after, "approvals_pending", upstream="demo") == 0
    assert _value(after, "approvals_held_connections") == 0
    # Two requests opened; each moved pending → approved|denied, and the approved one on to
    # released and completed: 2 + 2 + 2 transitions, each timed with its commit.
    assert _value(after, "approvals_store_write_seconds_count", operation="open an approval") == 2
    assert _value(after, "approvals_store_write_seconds_count", operation="transition") >= 4


async def test_metrics_need_the_token(held: Held) -> None:
    """No token or a wrong one: 401 naming the header; nothing about the gateway is shown."""
    for token in (None, "wrong-token-0123456789abcdef"):
        status, text = await _scrape(held.gateway.base, token)
        assert status == 401
        assert "approvals_calls" not in text
    assert (await _scrape(held.gateway.base))[0] == 200


async def test_metrics_are_off_without_a_token(start_gateway: StartGateway) -> None:
    """With no [metrics] token configured /metrics answers 404 and nothing is counted."""
    running = await start_gateway({"demo": {"command": DEMO_COMMAND}})
    assert METRICS not in running.app
    assert running.gatekeeper.metrics is None
    status, text = await _scrape(running.base)
    assert status == 404
    assert "off" in json.loads(text)["error"]


async def test_policy_reloads_are_counted(held: Held, tmp_path: Path) -> None:
    """A good reload and a refused one each show under their result."""
    policies = held.gate.policies
    (tmp_path / "policy.json").write_text(json.dumps({**POLICY, "default": "allow"}))
    await policies.reload_async()
    (tmp_path / "policy.json").write_text("{not json")
    await policies.reload_async()
    samples = await _samples(held.gateway.base)
    assert _value(samples, "approvals_policy_reloads_total", upstream="demo", result="ok") == 1
    assert _value(samples, "approvals_policy_reloads_total", upstream="demo", result="failed") == 1


def test_unknown_tool_names_do_not_create_series() -> None:
    """A client sending a thousand made-up names adds one "other" series, not a thousand."""
    metrics = Metrics("0" * 64)
    metrics.listed("demo", ["get_time"])
    for n in range(1000):
        metrics.count_call("demo", f"made_up_{n}", "denied", rule="default")
    metrics.count_call("demo", "get_time", "allowed", rule="default")
    metrics.count_call("demo", "exact_in_policy", "allowed", rule="exact_in_policy")
    tools = {
        s.labels["tool"]
        for family in metrics.registry.collect()
        if family.name == "approvals_calls"
        for s in family.samples
        if s.name == "approvals_calls_total"
    }
    assert tools == {OTHER_TOOL, "get_time", "exact_in_policy"}


def test_decision_to_agent_joins_in_either_order() -> None:
    """The agent may get its answer before or after this process hears of the decision."""
    now = [100.0]
    metrics = Metrics("0" * 64, clock=lambda: now[0])
    metrics.answered("early")  # delivered at 100, the decision (at 99) heard afterwards
    metrics.changed(_change("early", decided_at=99.0))
    metrics.changed(_change("late", decided_at=99.5))
    now[0] = 101.0
    metrics.answered("late")
    histogram = {
        s.name: s.value
        for family in metrics.registry.collect()
        if family.name == "approvals_decision_to_agent_seconds"
        for s in family.samples
    }
    assert histogram["approvals_decision_to_agent_seconds_count"] == 2
    assert histogram["approvals_decision_to_agent_seconds_sum"] == pytest.approx(1.0 + 1.5)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """A value equal to a bound falls in that bucket (le), and every bucket counts those below it."""
    metrics = Metrics("0" * 64)
    for seconds in (0.001, 0.002, 100.0):
        metrics.upstream_call("demo", seconds, failed=seconds > 1)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("upstream") == "demo"
    }
    assert samples[("approvals_upstream_call_seconds_bucket", "0.001")] == 1
    assert samples[("approvals_upstream_call_seconds_bucket", "0.0025")] == 2
    assert samples[("approvals_upstream_call_seconds_bucket", "60.0")] == 2
    assert samples[("approvals_upstream_call_seconds_bucket", "+Inf")] == 3
    assert samples[("approvals_upstream_call_seconds_count", None)] == 3
    assert samples[("approvals_upstream_call_seconds_sum", None)] == pytest.approx(100.003)
    assert samples[("approvals_upstream_errors_total", None)] == 1


def _change(approval_id: str, decided_at: float) -> Change:
    """A denial made by another process (so only decision → agent counts it here)."""
    approval = make_approval(
        id=approval_id, upstream="demo", status="denied", created_at=90.0, decided_at=decided_at
    )
    return Change(approval, "denied", here=False)
