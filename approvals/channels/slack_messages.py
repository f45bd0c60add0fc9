"""Where an approval's Slack messages go, and keeping every one of them up to date.

::

    created  ─▶ post to the channels of the groups that may decide it (else [slack] channel)
    any change ─▶ edit every message of it: outcome, quorum progress, who approved
    escalated  ─▶ post to the channels of the groups escalated to (else [slack] channel)

Each message's place (channel, ts) is kept in the store under a key per Slack channel, so any
process — and a restarted gateway — edits them all: ``"slack"`` for the first channel (as before
groups), ``"slack:C…"`` for the others, ``"slack:escalated:N:C…"`` for escalation step N. The keys
are derived again from the approval's own review rule (kept with it) and ``[slack] group_channels``;
a channel removed from the config is no longer edited.

An escalation is posted when a refresh finds the record escalated further than its posts — on the
"escalated" change itself, or on the next change when Slack was down then — and only while it is
pending. A failed post or edit raises SlackCallFailed after the others were tried; the caller
(``approvals.channels.Channels``) logs and audits it. Nothing here decides anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from approvals.channels import slack_blocks as blocks
from approvals.channels import slack_review as review
from approvals.channels.slack_api import SlackApi, SlackCallFailed
from approvals.config import SlackSettings
from approvals.core.model import Approval
from approvals.core.review import ReviewRule
from approvals.core.service import ApprovalService
from approvals.core.standing import StandingGrant
from approvals.errors import StoreError
from approvals.keyed_lock import KeyedLock

__all__ = ["KEY", "Place", "SlackMessages", "targets"]

log = logging.getLogger(__name__)

KEY = "slack"  # the message ref of the first channel (and the audit log's channel name)
REMEMBER_SHOWN = 10_000  # approvals whose shown version is remembered, to skip redundant edits
GRANTS_LOOKED_AT = 50  # an agent's newest standing grants searched for the one an approval saved
_APPROVED = frozenset({"approved", "released", "completed", "failed"})


@dataclass(frozen=True, slots=True)
class Place:
    """One posted message of an approval: its store key, where it is, and which post it was."""

    key: str
    channel: str
    ts: str
    escalation: int = 0  # > 0: the post of that escalation step

    def ref_json(self) -> str:
        return json.dumps({"channel": self.channel, "ts": self.ts, "escalation": self.escalation})

    @property
    def address(self) -> dict[str, str]:
        return {"channel": self.channel, "ts": self.ts}


def targets(slack: SlackSettings, groups: tuple[str, ...]) -> list[str]:
    """The Slack channels for these groups: each group's own, else ``[slack] channel``; in order, once."""
    found = [slack.group_channels.get(group, slack.channel) for group in groups] or [slack.channel]
    return list(dict.fromkeys(found))


def _initial_groups(rule: ReviewRule) -> tuple[str, ...]:
    return (*rule.reviewers, *rule.from_groups)


def _keys(rule: ReviewRule, escalated: int, slack: SlackSettings) -> list[tuple[str, str, int]]:
    """(store key, channel, escalation step) of every message the approval may have."""
    first, *others = targets(slack, _initial_groups(rule))
    keys = [(KEY, first, 0), *((f"{KEY}:{channel}", channel, 0) for channel in others)]
    for step in range(1, min(escalated, len(rule.escalate)) + 1):
        for channel in targets(slack, rule.escalate[step - 1].to):
            keys.append((f"{KEY}:escalated:{step}:{channel}", channel, step))
    return keys


def _place(key: str, ref_json: str | None) -> Place | None:
    if ref_json is None:
        return None
    ref = json.loads(ref_json)
    return Place(key, str(ref["channel"]), str(ref["ts"]), int(ref.get("escalation", 0)))


class SlackMessages:
    """Posts an approval's messages and edits them on every change (one approval at a time, in order)."""

    def __init__(self, slack: SlackSettings, service: ApprovalService, api: SlackApi) -> None:
        self.slack = slack
        self.service = service
        self.api = api
        self._serial: KeyedLock[str] = KeyedLock()
        self._shown: dict[str, int] = {}  # approval id → version its messages show

    async def created(self, approval: Approval) -> None:
        """Post a new request (or one back for a new look) to its channels, then bring all up to date."""
        # One approval's announcements run in order, so an edit never overtakes its post and
        # an older state never overwrites a newer one.
        async with self._serial.hold(approval.id):
            await self._post(approval)
            await self._refresh(approval.id)

    async def updated(self, approval_id: str, *, force: bool = False) -> None:
        """Make every message show the record as it is now; post escalations not posted yet."""
        async with self._serial.hold(approval_id):
            if force:
                self._shown.pop(approval_id, None)
            await self._refresh(approval_id)

    async def _post(self, approval: Approval) -> None:
        store, rule = self.service.store, self._rule(approval)
        shown = await self._review(approval)
        url = self.service.url_of(approval.id)
        message = review.request_message(approval, shown, url=url, now=self.service.clock())
        failed: SlackCallFailed | None = None
        for key, channel, _ in _keys(rule, 0, self.slack):
            earlier = _place(key, await store.message_ref(approval.id, key))
            try:
                # A timeout may hide a post that did happen: the retry then posts twice. A duplicate
                # message beats a missing one; the ref points at the last, which is kept up to date.
                posted = await self._send(channel, message)
                place = Place(key, str(posted.get("channel") or channel), str(posted.get("ts")))
                await store.save_message_ref(approval.id, key, place.ref_json())
                if earlier is not None:  # it came back for review: the old message says where it went
                    old = blocks.superseded_message(approval, url=url, now=self.service.clock())
                    await self.api.call("chat.update", **earlier.address, **old.as_kwargs())
            except SlackCallFailed as exc:  # the other channels still get it
                failed = failed or exc
        if failed is not None:
            raise failed
        self._remember(approval.id, approval.version)

    async def _refresh(self, approval_id: str) -> None:
        store = self.service.store
        approval = await store.get_approval(approval_id)
        if approval is None or self._shown.get(approval_id) == approval.version:
            return  # unknown here, or already showing this state
        rule = self._rule(approval)
        keys = _keys(rule, approval.escalated, self.slack)
        places = [_place(key, await store.message_ref(approval_id, key)) for key, _, _ in keys]
        if not any(places) and approval.status != "pending":
            return  # never posted (Slack was down: the inbox has it), and nothing left to ask
        shown = await self._review(approval)
        url, now = self.service.url_of(approval_id), self.service.clock()
        failed: SlackCallFailed | None = None
        for (key, channel, step), place in zip(keys, places, strict=True):
            message = review.request_message(approval, shown, url=url, now=now, escalation=step)
            try:
                if place is not None:
                    await self.api.call("chat.update", **place.address, **message.as_kwargs())
                elif step and approval.status == "pending":  # escalated, and not posted there yet
                    posted = await self._send(channel, message)
                    made = Place(key, str(posted.get("channel") or channel), str(posted.get("ts")), step)
                    await store.save_message_ref(approval_id, key, made.ref_json())
            except SlackCallFailed as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        self._remember(approval_id, approval.version)

    async def _send(self, channel: str, message: blocks.Message) -> dict[str, object]:
        return await self.api.call(
            "chat.postMessage", channel=channel, unfurl_links=False, unfurl_media=False, **message.as_kwargs()
        )

    def _rule(self, approval: Approval) -> ReviewRule:
        return self.service.review_state(approval).rule

    async def _review(self, approval: Approval) -> review.Review:
        """What the message shows beyond the record: review state, why, the grant it saved."""
        state = self.service.review_state(approval)
        try:
            why = await self.service.why(approval)
        except StoreError:  # the request still goes out; its next update may have it
            log.exception("could not read why approval %s is risky", approval.id)
            why = None
        grant = await self._remembered(approval) if approval.status in _APPROVED else None
        return review.Review(state, why, grant)

    async def _remembered(self, approval: Approval) -> StandingGrant | None:
        """The standing grant saved with this approval, if any (whichever channel saved it)."""
        try:
            grants = await self.service.list_standing(grant=approval.grant, limit=GRANTS_LOOKED_AT)
        except StoreError:
            log.exception("could not read the standing grants of %s", approval.grant)
            return None
        return next((g for g in grants if g.source_approval == approval.id and g.effect == "allow"), None)

    def _remember(self, approval_id: str, version: int) -> None:
        # Bounded: forgetting an old entry costs at most one redundant chat.update.
        self._shown.pop(approval_id, None)
        self._shown[approval_id] = version
        if len(self._shown) > REMEMBER_SHOWN:
            del self._shown[next(iter(self._shown))]
