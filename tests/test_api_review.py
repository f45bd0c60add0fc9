"""The JSON API's review workflows against a real gateway (the demo upstream, a real MCP client):
quorum and who may decide, edit before approve, approve (or deny) and remember, batch decisions,
standing grants, `why`, and a clear 400 for every malformed body."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.approvals_kit import Held
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, StartGateway, mcp_client
from tests.review_kit import CAROL_TOKEN, DAVE_TOKEN, EMAIL, start_review

SHORT_HOLD = {"hold_seconds": 0.2}  # the agent gets its "pending" answer at once; the API decides later
OPEN = [{"field": "to", "op": "prefix", "value": "ops-"}, {"field": "subject", "op": "any"},
        {"field": "body", "op": "any"}]  # fmt: skip


def meta(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True)["_meta"]["approvals"]  # type: ignore[no-any-return]


async def held_ids(held: Held, *subjects: str) -> list[str]:
    """Ids of held send_email calls by agent-a (owned by alice), one per subject, made at once."""
    async with mcp_client(held.url()) as client:
        answers = await asyncio.gather(
            *(client.call_tool("send_email", {**EMAIL, "subject": s}) for s in subjects)
        )
    return [meta(answer)["approval_id"] for answer in answers]


async def review(start_gateway: StartGateway, tmp_path: Path, approval: dict[str, Any] | None = None) -> Held:
    return await start_review(start_gateway, tmp_path, approval, approvals=SHORT_HOLD)


async def post(held: Held, path: str, body: Any = None, token: str = BOB_TOKEN) -> tuple[int, Any]:
    return await held.api("POST", path, token=token, body=body)


async def test_a_vote_short_of_the_quorum_is_200_pending_with_progress(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Quorum 2: the first approval is 200 with status pending and its progress; the same reviewer
    again is 409 already_voted; the owner is 403; a second reviewer completes it."""
    held = await review(start_gateway, tmp_path, {"quorum": 2})
    (approval_id,) = await held_ids(held, "q")
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", {"reason": "looks fine"})
    assert (status, body["status"]) == (200, "pending"), body
    assert body["review"]["progress"].startswith("1 of 2 approvals, waiting for")
    assert [v["by"] for v in body["review"]["votes"]] == ["bob"]
    assert body["review"]["rule"] == {"quorum": 2}
    assert (body["review"]["may_remember"], body["review"]["may_edit"]) == (False, True)
    status, body = await post(held, f"/api/approvals/{approval_id}/approve")
    assert (status, body["kind"]) == (409, "already_voted"), body
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", token=ALICE_TOKEN)
    assert (status, body["kind"]) == (403, "own_agent"), body
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", token=CAROL_TOKEN)
    assert (status, body["status"], body["decided_by"]) == (200, "approved", "carol"), body
    assert [v["by"] for v in body["review"]["votes"]] == ["bob", "carol"]
    status, listed = await held.api("GET", "/api/approvals?status=all&limit=10")
    assert status == 400  # "all" is the CLI's word, not a status: the API says so
    status, listed = await held.api("GET", "/api/approvals")
    assert status == 200
    assert all("review" in a and "why" not in a for a in listed["approvals"])


async def test_who_may_decide_and_through_which_channel(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Outside the rule's groups is 403 not_eligible and decides nothing; a member decides."""
    held = await review(start_gateway, tmp_path, {"reviewers": ["security"]})
    (approval_id,) = await held_ids(held, "g")
    status, body = await post(held, f"/api/approvals/{approval_id}/deny", {"reason": "no"})
    assert (status, body["kind"]) == (403, "not_eligible"), body
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", token=DAVE_TOKEN)
    assert (status, body["status"], body["decided_by"]) == (200, "approved", "dave"), body


async def test_a_rule_for_the_inbox_only_refuses_the_api(start_gateway: StartGateway, tmp_path: Path) -> None:
    """`via: ["inbox"]`: a decision through the API is 403 step_up and the request stays pending."""
    held = await review(start_gateway, tmp_path, {"via": ["inbox"]})
    (approval_id,) = await held_ids(held, "s")
    status, body = await post(held, f"/api/approvals/{approval_id}/approve")
    assert (status, body["kind"]) == (403, "step_up"), body
    status, body = await held.api("GET", f"/api/approvals/{approval_id}")
    assert (status, body["status"]) == (200, "pending")


async def test_edit_before_approve(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Approve with `arguments`: the record shows both versions and the upstream gets the edit;
    arguments the tool's schema refuses are 400 edit_refused; not an object is 400."""
    held = await review(start_gateway, tmp_path)
    bad, good = await held_ids(held, "bad", "good")
    status, body = await post(held, f"/api/approvals/{bad}/approve", {"arguments": {**EMAIL, "to": 5}})
    assert (status, body["kind"]) == (400, "edit_refused"), body
    status, body = await post(held, f"/api/approvals/{bad}/approve", {"arguments": ["x"]})
    assert status == 400
    assert body["error"].startswith("arguments: must be a JSON object"), body
    edited = {**EMAIL, "subject": "edited"}
    status, body = await post(held, f"/api/approvals/{good}/approve", {"arguments": edited})
    assert (status, body["status"]) == (200, "approved"), body
    assert (body["edited_arguments"], body["edited_by"]) == (edited, "bob")
    assert body["arguments"]["subject"] == "good"  # the call as the agent asked, kept beside the edit
    done = await held.recorder.wait_for(lambda a: a.id == good and a.status == "completed")
    assert done.edited_json is not None
    assert [m["subject"] for m in held.sent()] == ["edited"]


async def test_a_rule_without_edit_forbids_it(start_gateway: StartGateway, tmp_path: Path) -> None:
    """`edit: false`: approving with arguments is 403 edit_refused (no body would do), nothing decided."""
    held = await review(start_gateway, tmp_path, {"edit": False})
    (approval_id,) = await held_ids(held, "e")
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", {"arguments": EMAIL})
    assert (status, body["kind"]) == (403, "edit_refused"), body
    _, record = await held.api("GET", f"/api/approvals/{approval_id}")
    assert (record["status"], record["review"]["may_edit"]) == ("pending", False)


async def test_approve_and_remember(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Approve with `remember`: the answer carries the standing grant, and a later matching call is
    let through without a reviewer; constraints that do not hold for this call are 400."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "r")
    wrong = [{"field": "to", "op": "prefix", "value": "sales-"}, *OPEN[1:]]
    path = f"/api/approvals/{approval_id}/approve"
    status, body = await post(held, path, {"remember": {"for": "1h", "constraints": wrong}})
    assert (status, body["kind"]) == (400, "remember_refused"), body
    status, body = await post(held, path, {"remember": {"for": "1h", "max_uses": 2, "constraints": OPEN}})
    assert (status, body["status"]) == (200, "approved"), body
    grant = body["standing_grant"]
    assert (grant["effect"], grant["state"], grant["max_uses"], grant["uses"]) == ("allow", "active", 2, 0)
    assert grant["described"] == ['to starts with "ops-"', "subject: any value", "body: any value"]
    assert grant["constraints"] == OPEN
    assert grant["id"].startswith("sg_")
    async with mcp_client(held.url()) as client:
        later = await client.call_tool("send_email", {**EMAIL, "to": "ops-2@example.com", "subject": "x"})
    assert not later.is_error
    assert meta(later)["standing_grant"] == grant["id"]
    status, shown = await held.api("GET", f"/api/standing-grants/{grant['id']}")
    assert (status, shown["uses"]) == (200, 1)


MALFORMED_REMEMBER: list[tuple[Any, str]] = [
    ("1h", "remember: must be an object"),
    ({}, "remember.for: required"),
    ({"for": "soon"}, "remember.for: must be a duration"),
    ({"for": "30s"}, "remember.for: must be from 1 min to 7 d"),
    ({"for": "8d"}, "remember.for: must be from 1 min to 7 d"),
    ({"for": "1h", "max_uses": 0}, "remember.max_uses"),
    ({"for": "1h", "max_uses": True}, "remember.max_uses"),
    ({"for": "1h", "until": 5}, 'remember has unknown field(s) "until"'),
    ({"for": "1h", "constraints": {}}, "remember.constraints: must be a list"),
    ({"for": "1h", "constraints": [{"field": "to", "op": "like"}]}, "remember.constraints[0].op"),
    ({"for": "1h", "constraints": [{"field": "n", "op": "range", "value": [5, 1]}]},
     "remember.constraints[0].value"),
]  # fmt: skip


async def test_a_malformed_remember_is_400_naming_where(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Each malformed `remember` is a 400 whose message starts with where the problem is; none decides."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "m")
    for remember, where in MALFORMED_REMEMBER:
        status, body = await post(held, f"/api/approvals/{approval_id}/approve", {"remember": remember})
        assert status == 400, (remember, body)
        assert body["error"].startswith(where), (remember, body)
    _, record = await held.api("GET", f"/api/approvals/{approval_id}")
    assert record["status"] == "pending"


async def test_a_malformed_or_stale_seen_sha256_decides_nothing(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """`seen_sha256` that is not 64 lowercase hex digits is a 400 naming it; one of other arguments
    is 409 `changed`; the record's own `release_sha256` approves."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "s")
    path = f"/api/approvals/{approval_id}/approve"
    for garbage in (123, "", "zz", "A" * 64, "0" * 63, ["0" * 64], {"x": 1}, True):
        status, body = await post(held, path, {"seen_sha256": garbage})
        assert status == 400, (garbage, body)
        assert body["error"].startswith("seen_sha256: "), body
    status, body = await post(held, path, {"seen_sha256": "0" * 64})
    assert (status, body["kind"]) == (409, "changed")
    _, record = await held.api("GET", f"/api/approvals/{approval_id}")
    assert record["status"] == "pending"
    status, body = await post(held, path, {"seen_sha256": record["release_sha256"]})
    assert (status, body["status"]) == (200, "approved")


async def test_remember_where_the_rule_forbids_it_is_403(start_gateway: StartGateway, tmp_path: Path) -> None:
    """`remember: false`, or a quorum (one reviewer must not stand in for several later): 403."""
    held = await review(start_gateway, tmp_path, {"remember": False})
    (approval_id,) = await held_ids(held, "f")
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", {"remember": {"for": "1h"}})
    assert (status, body["kind"]) == (403, "remember_refused"), body
    status, body = await held.api("GET", "/api/standing-grants?active=0")
    assert (status, body["standing_grants"]) == (200, [])


async def test_deny_and_remember_needs_a_reason(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Deny with `remember` and no reason is 400; with one, a deny grant refuses the next such call."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "d")
    path = f"/api/approvals/{approval_id}/deny"
    status, body = await post(held, path, {"remember": {"for": "8h"}})
    assert status == 400
    assert body["error"].startswith("reason: required"), body
    status, body = await post(held, path, {"reason": "not to ops", "remember": {"for": "8h"}})
    assert (status, body["status"], body["standing_grant"]["effect"]) == (200, "denied", "deny"), body
    async with mcp_client(held.url()) as client:
        again = await client.call_tool("send_email", {**EMAIL, "subject": "d"})
    assert again.is_error
    assert held.sent() == []


@pytest.mark.parametrize(
    ("verb", "body", "fragment"),
    [
        ("approve", {"reason": "ok", "reasn": "typo", "x": 1}, '"reasn", "x"'),
        ("deny", {"reason": "no", "arguments": {}}, "only an approval may change the arguments"),
        ("deny", {"reason": 5}, "reason must be a string"),
    ],
)
async def test_unknown_or_misplaced_fields_are_400(
    start_gateway: StartGateway, tmp_path: Path, verb: str, body: Any, fragment: str
) -> None:
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "u")
    status, answer = await post(held, f"/api/approvals/{approval_id}/{verb}", body)
    assert status == 400, answer
    assert fragment in answer["error"], answer


async def test_batch_decides_each_on_its_own(start_gateway: StartGateway, tmp_path: Path) -> None:
    """One request for several ids: each is decided or refused on its own, in order, with the status
    the single endpoint would have answered; one decided elsewhere meanwhile is reported, not overwritten."""
    held = await review(start_gateway, tmp_path)
    first, second, third = await held_ids(held, "b1", "b2", "b3")
    assert (await post(held, f"/api/approvals/{second}/deny", {"reason": "elsewhere"}))[0] == 200
    unknown = "0" * 32
    status, body = await post(held, "/api/approvals/approve", {"ids": [first, second, unknown, third]})
    assert status == 200, body
    results = body["results"]
    assert [r["id"] for r in results] == [first, second, unknown, third]
    assert [r["ok"] for r in results] == [True, False, False, True]
    assert (results[0]["status"], results[0]["approval"]["decided_by"]) == ("approved", "bob")
    assert (results[1]["kind"], results[1]["http_status"]) == ("already_decided", 409)
    assert (results[2]["kind"], results[2]["http_status"]) == ("unknown", 404)
    _, denied = await held.api("GET", f"/api/approvals/{second}")
    assert (denied["status"], denied["reason"]) == ("denied", "elsewhere")
    status, body = await post(held, "/api/approvals/deny", {"ids": [first], "reason": "late"})
    assert (status, body["results"][0]["http_status"]) == (200, 409)


MALFORMED_BATCHES: list[tuple[Any, str]] = [
    (None, "the body must be a JSON object"),
    ({}, "ids: must be a non-empty list"),
    ({"ids": []}, "ids: must be a non-empty list"),
    ({"ids": "abc"}, "ids: must be a non-empty list"),
    ({"ids": ["a"] * 201}, "at most 200"),
    ({"ids": ["a", 5]}, "ids[1]"),
    ({"ids": ["a", "a"]}, "ids[1]: a is listed twice"),
    ({"ids": ["a"], "why": "x"}, '"why"'),
    ({"ids": ["a"], "reason": ["x"]}, "reason must be a string"),
]


async def test_a_malformed_batch_is_400(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Each malformed batch body is a 400 naming what is wrong (and where), for approve and deny alike."""
    held = await review(start_gateway, tmp_path)
    for verb in ("approve", "deny"):
        for body, fragment in MALFORMED_BATCHES:
            status, answer = await post(held, f"/api/approvals/{verb}", body)
            assert status == 400, (body, answer)
            assert fragment in answer["error"], (body, answer)


async def test_standing_grants_are_listed_shown_exported_and_revoked_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """List (active, or all), show, export as a policy rule, revoke (200), revoke again (409), and an
    unknown id (404)."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "sg")
    remember = {"for": "1h", "constraints": OPEN}
    status, body = await post(held, f"/api/approvals/{approval_id}/approve", {"remember": remember})
    assert status == 200, body
    grant_id = body["standing_grant"]["id"]
    status, listed = await held.api("GET", "/api/standing-grants?active=1&agent=agent-a")
    assert (status, [g["id"] for g in listed["standing_grants"]]) == (200, [grant_id])
    status, listed = await held.api("GET", "/api/standing-grants?agent=agent-b")
    assert (status, listed["standing_grants"]) == (200, [])
    status, rule = await held.api("GET", f"/api/standing-grants/{grant_id}/policy")
    assert status == 200
    assert rule["tools"]["send_email"]["action"] == "allow"
    assert rule["notes"]
    status, revoked = await post(held, f"/api/standing-grants/{grant_id}/revoke", token=CAROL_TOKEN)
    assert (status, revoked["state"], revoked["revoked_by"]) == (200, "revoked", "carol"), revoked
    status, again = await post(held, f"/api/standing-grants/{grant_id}/revoke")
    assert (status, again["standing_grant"]["revoked_by"]) == (409, "carol"), again
    status, listed = await held.api("GET", "/api/standing-grants?active=1")
    assert (status, listed["standing_grants"]) == (200, [])
    status, listed = await held.api("GET", "/api/standing-grants")
    assert [g["state"] for g in listed["standing_grants"]] == ["revoked"]
    for method, path in [
        ("GET", "/api/standing-grants/sg_nope"),
        ("GET", "/api/standing-grants/sg_nope/policy"),
        ("POST", "/api/standing-grants/sg_nope/revoke"),
    ]:
        assert (await held.api(method, path))[0] == 404
    assert (await held.api("GET", "/api/standing-grants?active=maybe"))[0] == 400
    assert (await held.api("GET", "/api/standing-grants?limit=0"))[0] == 400
    assert (await held.api("GET", "/api/standing-grants", token="not-a-token-0123456789abcdef"))[0] == 401


async def test_one_approval_shows_why_it_was_held(start_gateway: StartGateway, tmp_path: Path) -> None:
    """GET one approval adds `why`: the rule and its explanation, the tool's hints, the recent tally."""
    held = await review(start_gateway, tmp_path)
    (approval_id,) = await held_ids(held, "w")
    status, body = await held.api("GET", f"/api/approvals/{approval_id}")
    assert status == 200
    why = body["why"]
    assert why["rule"] == "send_email"
    assert why["explanation"]
    assert why["annotations"]["openWorldHint"] is True
    assert (why["previous_approval"], why["diff"]) == (None, [])
    assert body["review"] == {
        "rule": {}, "votes": [], "progress": "", "escalated_to": [], "may_remember": True, "may_edit": True,
    }  # fmt: skip
