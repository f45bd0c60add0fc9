"""The review workflows' guards against being talked past: a reviewer approves only what they were
shown, a standing grant lasts only while its maker could still take the decision, an edit is judged
by the policy as it is now, and a stored rule that cannot be read lets nobody decide. Service-level,
memory store, injected clock (the rig of tests/review_kit.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from approvals.core.model import sha256_of
from approvals.core.review import ReviewRule, Vote, judge_decision, quorum_met
from approvals.core.standing import RememberRequest
from approvals.errors import DecisionRefused
from approvals.jsonrpc import JsonObject
from tests.conftest import WAIT
from tests.review_kit import Rig, review_rig, send_policy

ARGS: JsonObject = {"to": "ops-1@example.com", "subject": "numbers", "body": "Attached."}
EDITED: JsonObject = {**ARGS, "to": "ops-2@example.com"}


async def refusal(rig: Rig, approval_id: str, name: str, **options: Any) -> DecisionRefused:
    with pytest.raises(DecisionRefused) as caught:
        await rig.service.decide(
            approval_id, rig.reviewer(name), approve=True, reason=None, channel="api", **options
        )
    return caught.value


async def test_a_batch_never_approves_a_call_someone_else_edited(tmp_path: Path) -> None:
    """Quorum 2: carol edits (her approval counts for the edit); bob's batch, which shows list rows,
    does not complete the quorum for arguments he was not shown — with their hash it does."""
    async with review_rig("memory", tmp_path, send_policy({"quorum": 2})) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        await rig.service.decide(
            aid, rig.reviewer("carol"), approve=True, reason=None, channel="web", arguments=EDITED
        )
        [(_, outcome)] = await rig.service.decide_many(
            [aid], rig.reviewer("bob"), approve=True, reason=None, channel="web"
        )
        assert isinstance(outcome, DecisionRefused)
        assert outcome.kind == "changed"
        assert sha256_of(EDITED) in str(outcome)  # the hash to check, for the API and the CLI
        assert (await rig.service.get(aid)).status == "pending"  # type: ignore[union-attr]
        [(_, done)] = await rig.service.decide_many(
            [aid],
            rig.reviewer("bob"),
            approve=True,
            reason=None,
            channel="web",
            seen={aid: sha256_of(EDITED)},
        )
        assert not isinstance(done, DecisionRefused)
        assert done.status == "approved"
        await hold.wait(WAIT)
        await rig.service.settled()
        assert rig.sent_arguments() == [EDITED]


async def test_an_approval_naming_other_arguments_is_refused(tmp_path: Path) -> None:
    async with review_rig("memory", tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        stale = await refusal(rig, hold.approval_id, "bob", seen_sha256=sha256_of(EDITED))
        assert stale.kind == "changed"
        assert "these are not the arguments you were shown" in str(stale)
        assert rig.sent_arguments() == []


@pytest.mark.parametrize(
    "stricter",
    [
        {"reviewers": ["security"]},  # carol (payments) may no longer decide these
        {"via": ["inbox"]},  # the grant was made through the API
    ],
)
async def test_a_grant_stops_when_its_maker_could_no_longer_decide(
    tmp_path: Path, stricter: dict[str, Any]
) -> None:
    async with review_rig("memory", tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        _, grant = await rig.service.decide_and_remember(
            hold.approval_id, rig.reviewer("carol"), approve=True, reason=None, channel="api",
            remember=RememberRequest(3600.0),
        )  # fmt: skip
        assert grant is not None
        await hold.wait(WAIT)
        hold.delivered()
        await rig.service.settled()
        assert (await rig.admit(ARGS)).meta["approvals"]["standing_grant"] == grant.id
        rig.policy = send_policy(stricter)
        assert (await rig.admit(ARGS)).hold is not None  # asked again, not let through


async def test_a_grant_of_a_reviewer_no_longer_configured_stops(tmp_path: Path) -> None:
    async with review_rig("memory", tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        await rig.service.decide_and_remember(
            hold.approval_id, rig.reviewer("carol"), approve=True, reason=None, channel="api",
            remember=RememberRequest(3600.0),
        )  # fmt: skip
        await hold.wait(WAIT)
        hold.delivered()
        await rig.service.settled()
        others = tuple(r for r in rig.settings.reviewers if r.name != "carol")
        rig.service.settings = dataclasses.replace(rig.settings, reviewers=others)
        assert (await rig.admit(ARGS)).hold is not None


async def test_an_edit_under_a_rule_that_changed_since_the_request_is_refused(tmp_path: Path) -> None:
    async with review_rig("memory", tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        now = send_policy({"quorum": 2})  # the policy as reloaded since the request
        rig.service._judge = lambda _upstream, tool, arguments: now.evaluate(tool, arguments)
        refused = await refusal(rig, hold.approval_id, "bob", arguments=EDITED)
        assert refused.kind == "edit_refused"
        assert "must be asked for anew" in str(refused)


async def test_an_unreadable_stored_rule_lets_nobody_decide(tmp_path: Path) -> None:
    async with review_rig("memory", tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        approval = await rig.service.get(hold.approval_id)
        assert approval is not None
        broken = dataclasses.replace(approval, review_json="{not json")
        rig.store._approvals[approval.id] = broken  # type: ignore[attr-defined]  # a corrupt row
        assert rig.service.refusal_for(broken, rig.reviewer("bob"), "api") is not None
        assert (await refusal(rig, approval.id, "bob")).kind == "not_eligible"
        assert rig.service.review_state(broken).may_remember is False
        assert rig.sent_arguments() == []


def test_a_large_quorum_from_many_groups_is_judged_at_once() -> None:
    """Twenty approvals over ten groups: matched, not tried in every order (19!/9! of them, which
    would outlast the test's timeout)."""
    groups = tuple(f"g{i}" for i in range(10))
    rule = ReviewRule(quorum=20, from_groups=groups)
    votes = [Vote(f"r{i}", 0.0, "api", "sha", (groups[i % 10], groups[(i + 1) % 10])) for i in range(19)]
    refused = judge_decision(
        rule, votes, escalated=0, reviewer="r19", groups=("g0",), channel="api", approve=True
    )
    assert refused is None
    assert not quorum_met(rule, votes)
    assert quorum_met(rule, [*votes, Vote("r19", 0.0, "api", "sha", ("g0",))])
    # One reviewer in every group fills only one of them.
    assert not quorum_met(
        ReviewRule(quorum=2, from_groups=("a", "b")), [Vote("x", 0, "api", "s", ("a", "b"))]
    )
