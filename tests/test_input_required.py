"""Multi-round-trip calls (2026-07-28 InputRequiredResult) through the gateway: the retry continues the
judged call, never judged, held or counted twice; a state the gateway did not issue is refused."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.config import sha256_hex
from approvals.proxy.request_state import Judged, RequestStates, StateError
from tests.conftest import WAIT, StartGateway
from tests.modern_kit import ASK_NAME, NAME_ANSWER, call, post, start_policed

HELD = {"version": "1", "default": "allow", "tools": {ASK_NAME: {"action": "require_approval"}}}
ONCE_A_MINUTE = {
    "version": "1",
    "default": "allow",
    "tools": {ASK_NAME: {"limits": [{"counter": "ask", "window": "minute", "max": 1, "scope": "grant"}]}},
}


def _state(answer: dict[str, Any]) -> str:
    result = answer["result"]
    assert result["resultType"] == "input_required", answer
    state = result["requestState"]
    assert isinstance(state, str)
    return state


# ---- the state itself (pure) -------------------------------------------------------------------


def test_state_round_trips_and_binds_what_was_judged() -> None:
    """A wrapped state gives back the upstream's; it names the approval; other arguments are a new call."""
    states = RequestStates("s" * 32, clock=lambda: 1000.0)
    judged = Judged.of("agent-a", "up", "tool", {"a": 1}, "appr-1")
    wrapped = states.wrap(judged, "upstream-state")
    same = states.unwrap(wrapped, "agent-a", "up", "tool", {"a": 1})
    assert (same.upstream_state, same.same_call, same.approval_id) == ("upstream-state", True, "appr-1")
    assert not states.unwrap(wrapped, "agent-a", "up", "tool", {"a": 2}).same_call


@pytest.mark.parametrize(
    ("grant", "upstream", "tool", "why"),
    [
        ("agent-b", "up", "tool", "another client"),
        ("agent-a", "other", "tool", "another client or upstream"),
        ("agent-a", "up", "other_tool", "belongs to tool"),
    ],
)
def test_state_of_another_call_is_refused(grant: str, upstream: str, tool: str, why: str) -> None:
    """A state is good only for the grant, upstream and tool it was issued for."""
    states = RequestStates("s" * 32)
    wrapped = states.wrap(Judged.of("agent-a", "up", "tool", {}), None)
    with pytest.raises(StateError, match=why):
        states.unwrap(wrapped, grant, upstream, tool, {})


def test_altered_foreign_and_expired_states_are_refused() -> None:
    """Altered, signed with another secret, not the gateway's at all, or expired: all refused."""
    now = [1000.0]
    states = RequestStates("s" * 32, clock=lambda: now[0])
    wrapped = states.wrap(Judged.of("agent-a", "up", "tool", {}), "x")
    head, _, mac = wrapped.rpartition(".")
    for bad in (
        head[:-2] + "AA." + mac,
        RequestStates("t" * 32).wrap(Judged.of("agent-a", "up", "tool", {}), "x"),
    ):
        with pytest.raises(StateError, match="altered"):
            states.unwrap(bad, "agent-a", "up", "tool", {})
    with pytest.raises(StateError, match="not issued by this gateway"):
        states.unwrap("the-upstreams-own-state", "agent-a", "up", "tool", {})
    now[0] += 7200
    with pytest.raises(StateError, match="expired"):
        states.unwrap(wrapped, "agent-a", "up", "tool", {})


def test_replicas_sharing_the_secret_accept_each_others_states() -> None:
    """The key comes from the shared secret: any replica checks a state another one issued."""
    judged = Judged.of("agent-a", "up", "tool", {})
    wrapped = RequestStates("s" * 32).wrap(judged, "x")
    assert RequestStates("s" * 32).unwrap(wrapped, "agent-a", "up", "tool", {}).upstream_state == "x"


# ---- through the gateway -----------------------------------------------------------------------


async def test_retry_is_not_counted_again(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """With a limit of one call a minute, the first round and its retry both pass: the retry is the
    same call; a fresh call after it is refused by the limit."""
    policed = await start_policed(start_gateway, tmp_path, dual_url, ONCE_A_MINUTE)
    status, first = await post(http, policed.url, call(ASK_NAME))
    assert status == 200
    state = _state(first)
    assert state.startswith("approvals1.")  # the upstream's state is never handed out as it is
    _, done = await post(http, policed.url, call(ASK_NAME, inputResponses=NAME_ANSWER, requestState=state))
    assert done["result"]["content"][0]["text"] == "Hello, Ada!"
    _, again = await post(http, policed.url, call(ASK_NAME))
    assert again["result"]["isError"] is True  # a new call: counted, and over the limit


async def test_a_retry_may_reach_another_replica_without_a_configured_secret(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession, postgres_url: str
) -> None:
    """Two replicas on one PostgreSQL database and no APPROVALS_SESSION_SECRET: the state issued by
    one is honoured by the other (the key is derived from the secret kept in the database), and
    the retry there is not counted again under a limit of one call a minute."""
    (tmp_path / "policy.json").write_text(json.dumps(ONCE_A_MINUTE))
    upstreams = {"up": {"url": dual_url, "policy": "policy.json"}}
    grant = f"agent-{uuid.uuid4().hex[:8]}"  # the database is shared by the whole test run
    token = f"token-{uuid.uuid4().hex}"
    options: dict[str, Any] = {
        "store": {"url": postgres_url},
        "grants": [{"name": grant, "token_sha256": sha256_hex(token), "owner": "alice"}],
    }
    a, b = await start_gateway(upstreams, **options), await start_gateway(upstreams, **options)
    status, first = await post(http, a.url("up"), call(ASK_NAME), token=token)
    assert status == 200
    retry = call(ASK_NAME, inputResponses=NAME_ANSWER, requestState=_state(first))
    _, done = await post(http, b.url("up"), retry, token=token)
    assert done["result"]["content"][0]["text"] == "Hello, Ada!", done


async def test_tampered_or_foreign_state_is_refused(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """A retry with an altered state, or one for another tool, gets 400 and -32602; nothing runs."""
    policed = await start_policed(start_gateway, tmp_path, dual_url, {"version": "1", "default": "allow"})
    _, first = await post(http, policed.url, call(ASK_NAME))
    state = _state(first)
    tampered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    for bad, tool in ((tampered, ASK_NAME), (state, "test_simple_text"), ("raw-upstream-state", ASK_NAME)):
        status, refused = await post(
            http, policed.url, call(tool, inputResponses=NAME_ANSWER, requestState=bad)
        )
        assert (status, refused["error"]["code"]) == (400, -32602), refused
        assert refused["id"] == 7


async def test_held_call_released_with_input_required_continues_without_a_second_approval(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """A held call is approved and released as a 2026 request; its InputRequiredResult reaches the agent,
    whose retry completes the call without being held again."""
    policed = await start_policed(start_gateway, tmp_path, dual_url, HELD, approvals={"hold_seconds": 10})
    first = asyncio.create_task(post(http, policed.url, call(ASK_NAME)))
    pending = await policed.recorder.status("pending")
    await policed.decide(pending.id, "approve")
    _, answer = await asyncio.wait_for(first, WAIT)
    state = _state(answer)
    status, done = await asyncio.wait_for(
        post(http, policed.url, call(ASK_NAME, inputResponses=NAME_ANSWER, requestState=state)), WAIT
    )
    assert status == 200
    assert done["result"]["content"][0]["text"] == "Hello, Ada!"
    created = {a.id for _, a in policed.recorder.seen if a.status == "pending"}
    assert created == {pending.id}  # one approval for both rounds


async def test_retry_with_other_arguments_is_judged_again(
    start_gateway: StartGateway, tmp_path: Path, dual_url: str, http: aiohttp.ClientSession
) -> None:
    """A retry whose arguments differ from the approved ones is a new call: held for a new approval."""
    policed = await start_policed(start_gateway, tmp_path, dual_url, HELD, approvals={"hold_seconds": 10})
    first = asyncio.create_task(post(http, policed.url, call(ASK_NAME)))
    pending = await policed.recorder.status("pending")
    await policed.decide(pending.id, "approve")
    _, answer = await asyncio.wait_for(first, WAIT)
    changed = call(ASK_NAME, {"extra": 1}, inputResponses=NAME_ANSWER, requestState=_state(answer))
    retry = asyncio.create_task(post(http, policed.url, changed))
    second = await policed.recorder.wait_for(lambda a: a.status == "pending" and a.id != pending.id)
    assert second.arguments == {"extra": 1}
    await policed.decide(second.id, "deny")
    _, denied = await asyncio.wait_for(retry, WAIT)
    assert denied["result"]["isError"] is True
