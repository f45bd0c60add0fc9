"""Review workflows in the approval service itself, over each store, on an injected clock:
quorum, eligibility and step-up, edit before approve, standing grants, escalation and timeouts,
and batch decisions. The end-to-end versions (a real MCP client, the API, the demo upstream) are in
test_review_workflows.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from approvals.core.deciding import RememberRequest
from approvals.core.model import Approval, sha256_of
from approvals.core.standing import Constraint
from approvals.errors import DecisionRefused, RefusalKind
from approvals.jsonrpc import JsonObject
from tests.conftest import WAIT
from tests.review_kit import Rig, StoreKind, review_rig, send_policy, store_kinds

ARGS: JsonObject = {"to": "ops-1@example.com", "subject": "numbers", "body": "Attached."}
HOUR = 3600.0


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str | None:
    """The per-run PostgreSQL database when the test runs on the postgres store."""
    kind = request.node.callspec.params.get("kind")
    return request.getfixturevalue("postgres_url") if kind == "postgres" else None


async def refused(
    rig: Rig, approval_id: str, name: str, *, approve: bool = True, channel: str = "api", **options: Any
) -> DecisionRefused:
    """The refusal of this decision (the test fails if it is taken)."""
    with pytest.raises(DecisionRefused) as caught:
        await rig.service.decide(
            approval_id, rig.reviewer(name), approve=approve, reason=None, channel=channel, **options
        )
    return caught.value


async def decide(
    rig: Rig, approval_id: str, name: str, *, approve: bool = True, channel: str = "api", **options: Any
) -> Approval:
    reason = None if approve else f"{name} says no"
    return await rig.service.decide(
        approval_id, rig.reviewer(name), approve=approve, reason=reason, channel=channel, **options
    )


async def record(rig: Rig, approval_id: str) -> Approval:
    found = await rig.service.get(approval_id)
    assert found is not None
    return found


async def outcome_meta(rig: Rig, hold: Any) -> dict[str, Any]:
    outcome = await hold.wait(WAIT)
    assert outcome is not None
    return outcome["result"]["_meta"]["approvals"]  # type: ignore[no-any-return]


# ---- quorum -----------------------------------------------------------------------------------


@store_kinds("memory", "sqlite", "postgres")
async def test_a_quorum_of_two_releases_once_on_the_second_distinct_approval(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """The owner cannot count, a second vote by one reviewer is refused, the second reviewer releases."""
    async with review_rig(kind, tmp_path, send_policy({"quorum": 2}), url=url) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        assert (await refused(rig, aid, "alice")).kind == "own_agent"
        first = await decide(rig, aid, "bob")
        assert first.status == "pending"
        state = rig.service.review_state(first)
        assert [v.by for v in state.votes] == ["bob"]
        assert state.progress == "1 of 2 approvals, waiting for another reviewer"
        # The held call's answer while it waits says how far the review got.
        pending = hold.pending_result(rig.now[0])["_meta"]["approvals"]
        assert (pending["code"], pending["progress"]) == ("approval_pending", state.progress)
        assert "1 of 2 approvals" in hold.status(rig.now[0])
        assert (await refused(rig, aid, "bob")).kind == "already_voted"
        second = await decide(rig, aid, "carol")
        assert (second.status, second.decided_by) == ("approved", "carol")
        outcome = await hold.wait(WAIT)
        assert outcome is not None
        assert "result" in outcome
        await rig.service.settled()
        assert rig.sent_arguments() == [ARGS]
        events = [e.event for e in await rig.audit(aid)]
        assert events == ["created", "voted", "approved", "released", "completed"]
        assert (await refused(rig, aid, "dave")).kind == "already_decided"


@store_kinds("memory", "sqlite", "postgres")
async def test_two_approvals_arriving_together_release_the_call_once(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """Under a quorum of 2, bob and carol at once (from nothing, and after dave's vote): one release each."""
    async with review_rig(kind, tmp_path, send_policy({"quorum": 2}), url=url) as rig:
        for n in range(8):
            hold = await rig.held({**ARGS, "n": n})
            aid = hold.approval_id
            if n % 2:
                await decide(rig, aid, "dave")
            results = await asyncio.gather(
                *(rig.service.decide(aid, rig.reviewer(r), approve=True, reason=None, channel="api")
                  for r in ("bob", "carol")),
                return_exceptions=True,
            )  # fmt: skip
            won = [r for r in results if isinstance(r, Approval) and r.status == "approved"]
            assert len(won) == 1, results
            for other in results:
                if isinstance(other, DecisionRefused):
                    # Only when dave's vote and the other one already made the quorum.
                    assert n % 2, other
                    assert other.kind == "already_decided", other
                else:
                    assert isinstance(other, Approval)
            await hold.wait(WAIT)
        await rig.service.settled()
        assert sorted(s.arguments["n"] for s in rig.upstream.sent) == list(range(8))


@store_kinds()
async def test_one_denial_after_an_approval_denies_at_once(kind: StoreKind, tmp_path: Path) -> None:
    """An approval short of the quorum, then a denial: denied by the denier, the agent told, never sent."""
    async with review_rig(kind, tmp_path, send_policy({"quorum": 2})) as rig:
        hold = await rig.held(ARGS)
        await decide(rig, hold.approval_id, "bob")
        denied = await decide(rig, hold.approval_id, "carol", approve=False)
        assert (denied.status, denied.decided_by, denied.reason) == ("denied", "carol", "carol says no")
        meta = await outcome_meta(rig, hold)
        assert (meta["code"], meta["decided_by"]) == ("denied_by_reviewer", "carol")
        assert rig.upstream.sent == []


@store_kinds()
async def test_a_denial_without_a_reason_does_not_carry_an_earlier_voter_s_reason(
    kind: StoreKind, tmp_path: Path
) -> None:
    """Quorum 2: bob approves saying "fine by me", carol denies giving no reason: the record and the
    agent must not show bob's words as carol's reason for the denial."""
    async with review_rig(kind, tmp_path, send_policy({"quorum": 2})) as rig:
        hold = await rig.held(ARGS)
        await rig.service.decide(
            hold.approval_id, rig.reviewer("bob"), approve=True, reason="fine by me", channel="api"
        )
        denied = await rig.service.decide(
            hold.approval_id, rig.reviewer("carol"), approve=False, reason=None, channel="api"
        )
        assert (denied.status, denied.decided_by) == ("denied", "carol")
        assert denied.reason is None, denied.reason
        outcome = await hold.wait(WAIT)
        assert outcome is not None
        assert "fine by me" not in outcome["result"]["content"][0]["text"]


@store_kinds()
async def test_quorum_from_groups_needs_one_approval_from_each(kind: StoreKind, tmp_path: Path) -> None:
    """from [payments, security]: a second payments reviewer is refused; security completes it."""
    async with review_rig(kind, tmp_path, send_policy({"from": ["payments", "security"]})) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        voted = await decide(rig, aid, "bob")
        assert rig.service.review_state(voted).progress == "1 of 2 approvals, waiting for someone in security"
        second = await refused(rig, aid, "carol")
        assert second.kind == "not_eligible"
        assert "waiting for someone in security" in str(second)
        assert rig.service.refusal_for(voted, rig.reviewer("carol"), "api") == str(second)
        assert rig.service.refusal_for(voted, rig.reviewer("dave"), "api") is None
        assert (await refused(rig, aid, "erin")).kind == "not_eligible"  # oncall is neither group
        done = await decide(rig, aid, "dave")
        assert done.status == "approved"
        await hold.wait(WAIT)
        assert rig.sent_arguments() == [ARGS]


@store_kinds()
async def test_only_the_rule_s_reviewers_may_decide(kind: StoreKind, tmp_path: Path) -> None:
    """reviewers [security]: a payments reviewer is refused approving and denying; dave decides."""
    async with review_rig(kind, tmp_path, send_policy({"reviewers": ["security"]})) as rig:
        hold = await rig.held(ARGS)
        for approve in (True, False):
            no = await refused(rig, hold.approval_id, "bob", approve=approve)
            assert (no.kind, str(no)) == ("not_eligible", "only security may decide this call")
        assert (await decide(rig, hold.approval_id, "dave", approve=False)).status == "denied"


@store_kinds()
async def test_a_step_up_rule_takes_decisions_only_through_the_inbox(kind: StoreKind, tmp_path: Path) -> None:
    """via [inbox]: the API and Slack are refused (step_up), the inbox's "web" channel decides."""
    async with review_rig(kind, tmp_path, send_policy({"via": ["inbox"]})) as rig:
        hold = await rig.held(ARGS)
        for channel in ("api", "slack"):
            assert (await refused(rig, hold.approval_id, "bob", channel=channel)).kind == "step_up"
            assert (
                await refused(rig, hold.approval_id, "bob", approve=False, channel=channel)
            ).kind == "step_up"
        done = await decide(rig, hold.approval_id, "bob", channel="web")
        assert (done.status, done.decided_via) == ("approved", "web")


# ---- edit before approve ----------------------------------------------------------------------


@store_kinds()
async def test_an_edited_call_is_released_with_the_edited_arguments_once(
    kind: StoreKind, tmp_path: Path
) -> None:
    """The upstream gets exactly the edit; the agent is told with the diff; the audit keeps both hashes."""
    edited = {**ARGS, "to": "team@example.com"}
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        done = await decide(rig, hold.approval_id, "bob", arguments=edited)
        assert (done.status, done.edited_by) == ("approved", "bob")
        assert (done.release_arguments, done.release_sha256) == (edited, sha256_of(edited))
        assert done.arguments == ARGS  # what was asked stays as asked
        outcome = await hold.wait(WAIT)
        assert outcome is not None
        result = outcome["result"]
        assert result["content"][0]["text"] == f"sent {json.dumps(edited, sort_keys=True)}"
        assert "bob changed the arguments before approving" in result["content"][-1]["text"]
        meta = result["_meta"]["approvals"]
        assert meta["code"] == "edited_by_reviewer"
        assert (meta["original_arguments"], meta["released_arguments"]) == (ARGS, edited)
        assert meta["changes"] == [
            {"path": "to", "before": '"ops-1@example.com"', "after": '"team@example.com"'}
        ]
        await rig.service.settled()
        assert rig.sent_arguments() == [edited]
        events = await rig.audit(hold.approval_id)
        assert [e.event for e in events] == ["created", "approved", "edited", "released", "completed"]
        detail = json.loads(next(e for e in events if e.event == "edited").detail or "{}")
        assert (detail["from_sha256"], detail["to_sha256"]) == (sha256_of(ARGS), sha256_of(edited))


@store_kinds()
async def test_edits_the_schema_the_policy_or_the_rule_refuses_are_refused(
    kind: StoreKind, tmp_path: Path
) -> None:
    """inputSchema (naming the path), deny_if, a denial with arguments, and edit: false: nothing decided."""
    deny_if = [{"path": "args.to", "op": "contains", "value": "@evil.example"}]
    async with review_rig(kind, tmp_path, send_policy(deny_if=deny_if)) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        schema = await refused(rig, aid, "bob", arguments={**ARGS, "to": "x"})
        assert schema.kind == "edit_refused"
        assert str(schema).startswith("args.to: ")
        wrong_type = await refused(rig, aid, "bob", arguments={**ARGS, "n": "seven"})
        assert (wrong_type.kind, str(wrong_type).split(":")[0]) == ("edit_refused", "args.n")
        policy = await refused(rig, aid, "bob", arguments={**ARGS, "to": "boss@evil.example"})
        assert policy.kind == "edit_refused"
        assert "the policy denies the edited call" in str(policy)
        denial = await refused(rig, aid, "bob", approve=False, arguments={**ARGS, "to": "team@example.com"})
        assert denial.kind == "edit_refused"
        assert (await record(rig, aid)).status == "pending"
        assert (await record(rig, aid)).edited_json is None
    async with review_rig(kind, tmp_path / "no-edit", send_policy({"edit": False})) as rig:
        hold = await rig.held(ARGS)
        forbidden = await refused(rig, hold.approval_id, "bob", arguments={**ARGS, "to": "team@example.com"})
        assert forbidden.kind == "edit_refused"
        assert "edit: false" in str(forbidden)
        assert (await decide(rig, hold.approval_id, "bob")).status == "approved"


@store_kinds()
async def test_without_a_policy_to_judge_edits_they_are_refused(kind: StoreKind, tmp_path: Path) -> None:
    """A service opened without judge= never releases an edited call it could not judge."""
    async with review_rig(kind, tmp_path, send_policy(), judge=False) as rig:
        hold = await rig.held(ARGS)
        no = await refused(rig, hold.approval_id, "bob", arguments={**ARGS, "to": "team@example.com"})
        assert no.kind == "edit_refused"


@store_kinds()
async def test_an_edit_leaves_earlier_votes_behind(kind: StoreKind, tmp_path: Path) -> None:
    """Quorum 2: bob approves, carol edits and approves (1 of 2 for the edit); bob's approval of the
    edit must name the edited arguments' hash (he approves what he saw), then it is released edited."""
    edited = {**ARGS, "body": "Attached, with the appendix."}
    async with review_rig(kind, tmp_path, send_policy({"quorum": 2})) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        await decide(rig, aid, "bob")
        after_edit = await decide(rig, aid, "carol", arguments=edited)
        assert after_edit.status == "pending"
        state = rig.service.review_state(after_edit)
        assert [v.by for v in state.votes] == ["carol"]  # bob approved other arguments
        assert state.progress.startswith("1 of 2 approvals")
        assert (await refused(rig, aid, "carol")).kind == "already_voted"  # the editor saw her edit
        assert (await refused(rig, aid, "bob")).kind == "changed"  # naming nothing he saw
        assert (await refused(rig, aid, "bob", seen_sha256=sha256_of(ARGS))).kind == "changed"  # stale
        assert (await record(rig, aid)).status == "pending"
        done = await decide(rig, aid, "bob", seen_sha256=sha256_of(edited))
        assert done.status == "approved"
        assert {v.by for v in rig.service.review_state(done).votes} == {"bob", "carol"}
        await hold.wait(WAIT)
        await rig.service.settled()
        assert rig.sent_arguments() == [edited]


# ---- standing grants --------------------------------------------------------------------------


async def approve_and_remember(
    rig: Rig, arguments: JsonObject, remember: RememberRequest, grant: str = "agent-a", approve: bool = True
) -> tuple[Approval, Any]:
    hold = await rig.held(arguments, grant)
    decided, standing = await rig.service.decide_and_remember(
        hold.approval_id, rig.reviewer("carol"), approve=approve,
        reason=None if approve else "no more of these", channel="api", remember=remember,
    )  # fmt: skip
    assert standing is not None
    await hold.wait(WAIT)
    hold.delivered()  # the agent has the outcome: a repeat call is a new one, which the grant answers
    await rig.service.settled()
    return decided, standing


def code_of(admission: Any) -> str:
    """What an admission did: "held", or the code of its answer or of its forwarded call's meta."""
    if admission.hold is not None:
        return "held"
    if admission.answer is not None:
        return admission.answer["_meta"]["approvals"]["code"]  # type: ignore[no-any-return]
    return admission.meta["approvals"]["code"]  # type: ignore[no-any-return]


@store_kinds("memory", "sqlite", "postgres")
async def test_a_remembered_grant_allows_max_uses_calls_then_holds_again(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """max_uses 3, exact: three identical calls pass without a reviewer, marked with the grant; the
    4th is held."""
    async with review_rig(kind, tmp_path, send_policy(), url=url) as rig:
        _, grant = await approve_and_remember(rig, ARGS, RememberRequest(HOUR, 3))
        assert (grant.effect, grant.grant, grant.max_uses, grant.expires_at) == (
            "allow",
            "agent-a",
            3,
            rig.now[0] + HOUR,
        )
        metas = []
        for _ in range(3):
            admission = await rig.admit(ARGS)
            assert code_of(admission) == "allowed_by_standing_grant"
            metas.append(admission.meta["approvals"])
        assert [(m["standing_grant"], m["uses"], m["max_uses"]) for m in metas] == [
            (grant.id, n, 3) for n in (1, 2, 3)
        ]
        assert code_of(await rig.admit(ARGS)) == "held"
        assert code_of(await rig.admit({**ARGS, "subject": "other"})) == "held"  # exact: other values held
        events = [e.event for e in await rig.audit(grant.id)]
        assert events == ["granted", "used", "used", "used"]
        stored = await rig.service.get_standing(grant.id)
        assert stored is not None
        assert (stored.uses, stored.state(rig.now[0])) == (3, "used_up")


@store_kinds("memory", "sqlite", "postgres")
async def test_a_grant_s_last_uses_go_to_that_many_calls_racing_for_them(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """Ten identical calls at once on a grant with 3 uses: 3 allowed, the rest held on one request."""
    async with review_rig(kind, tmp_path, send_policy(), url=url) as rig:
        _, grant = await approve_and_remember(rig, ARGS, RememberRequest(HOUR, 3))
        admissions = await asyncio.gather(*(rig.admit(ARGS) for _ in range(10)))
        codes = [code_of(a) for a in admissions]
        assert codes.count("allowed_by_standing_grant") == 3, codes
        assert codes.count("held") == 7
        assert len({a.hold.approval_id for a in admissions if a.hold is not None}) == 1
        stored = await rig.service.get_standing(grant.id)
        assert stored is not None
        assert stored.uses == 3


@store_kinds()
async def test_the_repeat_call_collecting_a_remembered_approval_gets_the_kept_result(
    kind: StoreKind, tmp_path: Path
) -> None:
    """The hold ran out; the reviewer approves with remember; the agent calls again with the same
    arguments to collect the outcome: it receives the kept result — the call is not sent twice, and
    the grant's first use is not spent on it."""
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        hold.close()  # the hold ran out: the agent got the pending answer and will call again
        rig.holds.remove(hold)
        _, grant = await rig.service.decide_and_remember(
            hold.approval_id, rig.reviewer("bob"), approve=True, reason=None, channel="api",
            remember=RememberRequest(HOUR, 3),
        )  # fmt: skip
        assert grant is not None
        await rig.service.settled()
        assert rig.sent_arguments() == [ARGS]
        again = await rig.admit(ARGS)
        assert again.hold is not None, code_of(again)
        assert again.hold.approval_id == hold.approval_id
        outcome = await again.hold.wait(WAIT)
        assert outcome is not None
        assert outcome["result"]["content"][0]["text"].startswith("sent ")
        await rig.service.settled()
        assert rig.sent_arguments() == [ARGS]  # once


@store_kinds()
async def test_a_widened_grant_matches_by_its_constraints(kind: StoreKind, tmp_path: Path) -> None:
    """to starts with "ops-", subject one of two values, body any: matching calls pass, others are held."""
    constraints = (
        Constraint("to", "prefix", "ops-"),
        Constraint("subject", "in", ("numbers", "figures")),
        Constraint("body", "any"),
    )
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        await approve_and_remember(rig, ARGS, RememberRequest(HOUR, None, constraints))
        passing = [
            {**ARGS, "to": "ops-2@example.com", "body": "anything"},
            {"to": "ops-9@example.com", "subject": "figures"},  # body left out: "any" allows that
        ]
        for arguments in passing:
            assert code_of(await rig.admit(arguments)) == "allowed_by_standing_grant", arguments
        held = [
            {**ARGS, "to": "ceo@example.com"},
            {**ARGS, "subject": "salaries"},
            {**ARGS, "n": 1},  # an argument the grant does not name
            {"subject": "numbers", "body": "x", "to": "opsx@example.com"},
        ]
        for arguments in held:
            assert code_of(await rig.admit(arguments)) == "held", arguments


@store_kinds()
async def test_a_revoked_grant_stops_at_once(kind: StoreKind, tmp_path: Path) -> None:
    """Revoked after one use: the next call is held; revoking twice is already_decided, an unknown id
    unknown."""
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        _, grant = await approve_and_remember(rig, ARGS, RememberRequest(HOUR, 5))
        assert code_of(await rig.admit(ARGS)) == "allowed_by_standing_grant"
        revoked = await rig.service.revoke_standing(grant.id, rig.reviewer("dave"), "api")
        assert (revoked.revoked_by, revoked.uses, revoked.state(rig.now[0])) == ("dave", 1, "revoked")
        assert code_of(await rig.admit(ARGS)) == "held"
        with pytest.raises(DecisionRefused) as again:
            await rig.service.revoke_standing(grant.id, rig.reviewer("bob"), "api")
        assert again.value.kind == "already_decided"
        with pytest.raises(DecisionRefused) as unknown:
            await rig.service.revoke_standing("sg_" + "0" * 32, rig.reviewer("bob"), "api")
        assert unknown.value.kind == "unknown"
        assert [e.event for e in await rig.audit(grant.id)] == ["granted", "used", "revoked"]
        assert await rig.service.list_standing(active=True) == []


@store_kinds()
async def test_a_grant_expires_on_the_clock(kind: StoreKind, tmp_path: Path) -> None:
    """A one-hour grant: used at +59 min 59 s, held at +1 h."""
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        _, grant = await approve_and_remember(rig, ARGS, RememberRequest(HOUR))
        rig.now[0] += HOUR - 1
        assert code_of(await rig.admit(ARGS)) == "allowed_by_standing_grant"
        rig.now[0] += 1
        assert code_of(await rig.admit(ARGS)) == "held"
        assert [g.id for g in await rig.service.list_standing()] == [grant.id]
        assert await rig.service.list_standing(active=True) == []


@store_kinds()
async def test_a_grant_is_for_one_agent_only(kind: StoreKind, tmp_path: Path) -> None:
    """agent-a's grant does not let agent-b's identical call through."""
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        await approve_and_remember(rig, ARGS, RememberRequest(HOUR))
        assert code_of(await rig.admit(ARGS, grant="agent-b")) == "held"
        assert code_of(await rig.admit(ARGS, grant="agent-a")) == "allowed_by_standing_grant"


@store_kinds()
async def test_remember_is_refused_where_the_rule_or_the_call_does_not_allow_it(
    kind: StoreKind, tmp_path: Path
) -> None:
    """remember: false, a quorum, constraints that miss an argument or do not hold, a bad duration or
    count: remember_refused, and nothing is decided."""
    async with review_rig(kind, tmp_path / "no", send_policy({"remember": False})) as rig:
        hold = await rig.held(ARGS)
        no = await refused(rig, hold.approval_id, "bob", remember=RememberRequest(HOUR))
        assert (no.kind, "remember: false" in str(no)) == ("remember_refused", True)
        assert (await record(rig, hold.approval_id)).status == "pending"
        assert await rig.service.list_standing() == []
    async with review_rig(kind, tmp_path / "quorum", send_policy({"quorum": 2})) as rig:
        hold = await rig.held(ARGS)
        assert (await refused(rig, hold.approval_id, "bob", remember=RememberRequest(HOUR))).kind == (
            "remember_refused"
        )
        assert (await record(rig, hold.approval_id)).votes_json in ("", "[]")
    async with review_rig(kind, tmp_path / "shape", send_policy()) as rig:
        hold = await rig.held(ARGS)
        bad = [
            RememberRequest(HOUR, None, (Constraint("to", "eq", ARGS["to"]),)),  # subject, body unnamed
            RememberRequest(
                HOUR,
                None,
                (Constraint("to", "prefix", "dev-"), Constraint("subject", "any"), Constraint("body", "any")),
            ),
            RememberRequest(1.0),
            RememberRequest(30 * 86400.0),
            RememberRequest(HOUR, 0),
        ]
        for remember in bad:
            assert (await refused(rig, hold.approval_id, "bob", remember=remember)).kind == "remember_refused"
        assert (await record(rig, hold.approval_id)).status == "pending"
        assert await rig.service.list_standing() == []


@store_kinds()
async def test_a_grant_stops_applying_when_the_rule_forbids_remembering(
    kind: StoreKind, tmp_path: Path
) -> None:
    """A policy made stricter (remember: false, or a quorum) takes effect on existing grants at once."""
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        await approve_and_remember(rig, ARGS, RememberRequest(HOUR))
        for stricter in (send_policy({"remember": False}), send_policy({"quorum": 2})):
            rig.policy = stricter
            assert code_of(await rig.admit(ARGS)) == "held"


@store_kinds()
async def test_deny_and_remember_refuses_matching_calls_with_the_grant_s_id(
    kind: StoreKind, tmp_path: Path
) -> None:
    """A remembered denial (any subject) answers matching calls at once, naming the grant and the
    reason; the identical call gets the kept denial of its own request; others are held."""
    any_subject = (
        Constraint("to", "eq", ARGS["to"]),
        Constraint("subject", "any"),
        Constraint("body", "any"),
    )
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        remember = RememberRequest(HOUR, None, any_subject)
        decided, grant = await approve_and_remember(rig, ARGS, remember, approve=False)
        assert (decided.status, grant.effect) == ("denied", "deny")
        admission = await rig.admit({**ARGS, "subject": "again"})
        assert admission.answer is not None
        meta = admission.answer["_meta"]["approvals"]
        assert (meta["code"], meta["standing_grant"], meta["reason"]) == (
            "denied_by_standing_grant", grant.id, "no more of these",
        )  # fmt: skip
        assert "no more of these" in admission.answer["content"][0]["text"]
        repeat = await rig.admit(ARGS)  # collecting the outcome of the request it made
        assert repeat.hold is not None
        assert repeat.hold.approval_id == decided.id
        assert (await outcome_meta(rig, repeat.hold))["code"] == "denied_by_reviewer"
        assert code_of(await rig.admit({**ARGS, "to": "dev-1@example.com"})) == "held"
        assert [e.event for e in await rig.audit(grant.id)] == ["granted", "used"]
        assert rig.upstream.sent == []


@store_kinds()
async def test_an_edited_approval_remembers_the_edited_arguments(kind: StoreKind, tmp_path: Path) -> None:
    """Edit and remember (exact): later calls with the edited arguments pass, the original ones are held."""
    edited = {**ARGS, "to": "team@example.com"}
    async with review_rig(kind, tmp_path, send_policy()) as rig:
        hold = await rig.held(ARGS)
        _, grant = await rig.service.decide_and_remember(
            hold.approval_id, rig.reviewer("bob"), approve=True, reason=None, channel="api",
            arguments=edited, remember=RememberRequest(HOUR),
        )  # fmt: skip
        assert grant is not None
        assert code_of(await rig.admit(edited)) == "allowed_by_standing_grant"
        assert code_of(await rig.admit(ARGS)) == "held"


@store_kinds()
async def test_rate_limits_still_apply_to_calls_a_grant_allows(kind: StoreKind, tmp_path: Path) -> None:
    """At most 2 a minute: the held call and one granted call; the third is rate limited, its use
    not spent."""
    limits = [{"counter": "sends", "window": "minute", "max": 2, "scope": "grant"}]
    async with review_rig(kind, tmp_path, send_policy(limits=limits)) as rig:
        _, grant = await approve_and_remember(rig, ARGS, RememberRequest(HOUR, 10))
        assert code_of(await rig.admit(ARGS)) == "allowed_by_standing_grant"
        assert code_of(await rig.admit(ARGS)) == "rate_limited"
        stored = await rig.service.get_standing(grant.id)
        assert stored is not None
        assert stored.uses == 1
        rig.now[0] += 60  # the next minute has room again
        assert code_of(await rig.admit(ARGS)) == "allowed_by_standing_grant"


# ---- escalation and timeouts -------------------------------------------------------------------

ESCALATING = {
    "timeout": "30m",
    "reviewers": ["payments"],
    "escalate": [{"after": "10m", "to": ["oncall"]}],
    "on_timeout": "deny",
}


@store_kinds()
async def test_escalation_lets_the_next_group_decide_after_its_time(kind: StoreKind, tmp_path: Path) -> None:
    """oncall is refused before 10 min; at 10 min one "escalated" step (audited, published); then
    oncall decides."""
    async with review_rig(kind, tmp_path, send_policy(ESCALATING)) as rig:
        hold = await rig.held(ARGS)
        aid = hold.approval_id
        before = await refused(rig, aid, "erin")
        assert (before.kind, str(before)) == ("not_eligible", "only payments may decide this call")
        rig.now[0] += 599
        await rig.service.escalate_due()
        assert (await record(rig, aid)).escalated == 0
        rig.now[0] += 1
        await rig.service.escalate_due()
        await rig.service.escalate_due()  # nothing more is due: no second step
        escalated = await record(rig, aid)
        assert escalated.escalated == 1
        assert rig.service.review_state(escalated).escalated_to == ("oncall",)
        assert [e.event for e in await rig.audit(aid)] == ["created", "escalated"]
        change = await rig.changes.wait_for(lambda c: c.event == "escalated")
        assert (change.approval.id, change.approval.escalated) == (aid, 1)
        assert rig.service.refusal_for(escalated, rig.reviewer("erin"), "web") is None
        assert (await decide(rig, aid, "erin")).status == "approved"
        await hold.wait(WAIT)
        assert rig.sent_arguments() == [ARGS]


@store_kinds()
async def test_two_escalation_steps_are_announced_in_order(kind: StoreKind, tmp_path: Path) -> None:
    """Steps at 10 and 20 min: each announced once, in order, even when the clock jumps past both."""
    rule = {
        "timeout": "30m",
        "reviewers": ["payments"],
        "escalate": [{"after": "10m", "to": ["oncall"]}, {"after": "20m", "to": ["security"]}],
    }
    async with review_rig(kind, tmp_path, send_policy(rule)) as rig:
        hold = await rig.held(ARGS)
        rig.now[0] += 25 * 60
        for _ in range(4):
            await rig.service.escalate_due()
        escalated = await record(rig, hold.approval_id)
        assert escalated.escalated == 2
        assert rig.service.review_state(escalated).escalated_to == ("oncall", "security")
        assert [e.event for e in await rig.audit(hold.approval_id)].count("escalated") == 2
        assert (await decide(rig, hold.approval_id, "dave")).status == "approved"


@store_kinds()
async def test_on_timeout_deny_denies_and_tells_the_agent_no_one_decided(
    kind: StoreKind, tmp_path: Path
) -> None:
    """At 30 min, undecided: denied (not expired), by nobody; the agent gets denied_on_timeout."""
    async with review_rig(kind, tmp_path, send_policy(ESCALATING)) as rig:
        hold = await rig.held(ARGS)
        rig.now[0] += 1800
        await rig.service.expire_due()
        denied = await record(rig, hold.approval_id)
        assert (denied.status, denied.decided_by) == ("denied", None)
        outcome = await hold.wait(WAIT)
        assert outcome is not None
        assert outcome["result"]["_meta"]["approvals"]["code"] == "denied_on_timeout"
        assert "in time" in outcome["result"]["content"][0]["text"]
        assert (await refused(rig, hold.approval_id, "bob")).kind == "already_decided"


@store_kinds()
async def test_a_decision_after_the_timeout_is_refused_and_times_the_call_out(
    kind: StoreKind, tmp_path: Path
) -> None:
    """Deciding past the timeout, before the expiry pass: refused; the record is then denied or expired."""
    for on_timeout, status, kind_refused in (
        ("deny", "denied", "already_decided"),
        ("expire", "expired", "expired"),
    ):
        policy = send_policy({"timeout": "5m", "on_timeout": on_timeout})
        async with review_rig(kind, tmp_path / on_timeout, policy) as rig:
            hold = await rig.held(ARGS)
            rig.now[0] += 300
            assert (await refused(rig, hold.approval_id, "bob")).kind == kind_refused
            assert (await record(rig, hold.approval_id)).status == status


@store_kinds()
async def test_without_on_timeout_an_undecided_call_expires(kind: StoreKind, tmp_path: Path) -> None:
    """The default: expired at the timeout, and the agent told so."""
    async with review_rig(kind, tmp_path, send_policy({"timeout": "30m"})) as rig:
        hold = await rig.held(ARGS)
        rig.now[0] += 1800
        await rig.service.expire_due()
        assert (await record(rig, hold.approval_id)).status == "expired"
        assert (await outcome_meta(rig, hold))["code"] == "approval_expired"


# ---- batch ------------------------------------------------------------------------------------


@store_kinds("memory", "sqlite", "postgres")
async def test_a_batch_of_fifty_with_five_decided_elsewhere_decides_forty_five(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """decide_many over 50 held calls, 5 of them denied by carol after bob picked them: 45 approved
    by bob, 5 reported already_decided and left as carol decided them."""
    async with review_rig(kind, tmp_path, send_policy(), url=url) as rig:
        ids = [(await rig.held({**ARGS, "n": n})).approval_id for n in range(50)]
        elsewhere = set(ids[3::10])
        for aid in elsewhere:
            await decide(rig, aid, "carol", approve=False)
        outcomes = await rig.service.decide_many(
            ids, rig.reviewer("bob"), approve=True, reason="batch", channel="api"
        )
        assert [aid for aid, _ in outcomes] == ids
        refusals: dict[str, RefusalKind] = {
            aid: o.kind for aid, o in outcomes if isinstance(o, DecisionRefused)
        }
        assert refusals == dict.fromkeys(elsewhere, "already_decided")
        for aid, outcome in outcomes:
            if aid not in elsewhere:
                assert isinstance(outcome, Approval)
                assert (outcome.status, outcome.decided_by, outcome.reason) == ("approved", "bob", "batch")
        for aid in elsewhere:
            kept = await record(rig, aid)
            assert (kept.status, kept.decided_by) == ("denied", "carol")
        await rig.service.settled()
        assert sorted(s.arguments["n"] for s in rig.upstream.sent) == [
            n for n, aid in enumerate(ids) if aid not in elsewhere
        ]


@store_kinds("memory", "sqlite", "postgres")
async def test_a_batch_racing_other_decisions_overwrites_none(
    kind: StoreKind, tmp_path: Path, url: str | None
) -> None:
    """decide_many of 50 while carol denies 5 of them at the same moment: each call decided once,
    by whoever came first, and the loser of each race told already_decided."""
    async with review_rig(kind, tmp_path, send_policy(), url=url) as rig:
        ids = [(await rig.held({**ARGS, "n": n})).approval_id for n in range(50)]
        elsewhere = ids[::10]
        batch = asyncio.create_task(
            rig.service.decide_many(ids, rig.reviewer("bob"), approve=True, reason=None, channel="api")
        )
        raced = await asyncio.gather(
            *(decide(rig, aid, "carol", approve=False) for aid in elsewhere), return_exceptions=True
        )
        outcomes = dict(await batch)
        for aid, carol in zip(elsewhere, raced, strict=True):
            bob = outcomes[aid]
            kept = await record(rig, aid)
            if isinstance(carol, Approval):
                assert isinstance(bob, DecisionRefused)
                assert bob.kind == "already_decided"
                assert (kept.status, kept.decided_by) == ("denied", "carol")
            else:
                assert isinstance(carol, DecisionRefused)
                assert carol.kind == "already_decided"
                assert isinstance(bob, Approval)
                assert kept.decided_by == "bob"
        won = [o for o in outcomes.values() if isinstance(o, Approval)]
        assert len(won) + sum(isinstance(c, Approval) for c in raced) == 50
        await rig.service.settled()
        assert len(rig.upstream.sent) == len(won)
