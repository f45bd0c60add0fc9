"""Slack: each approval request is posted with Approve / Deny buttons, and a click decides it.

::

    setup(app, settings, gatekeeper)
      ├─ SlackChannel      a Channel: posts on "created", edits the message on every "updated"
      ├─ bolt AsyncApp     signature check (401), ack within 3 s, the click and modal handlers
      └─ mode "http":   POST /slack/events (events and interactivity on one route)
         mode "socket": Socket Mode over a WebSocket, for gateways without a public URL

A click is acknowledged at once and worked on in a task of this channel. The clicking Slack user
(and workspace, when ``[slack] team_id`` is set) must be a configured reviewer; anyone else — and
the owner of the requesting agent — gets an ephemeral refusal and nothing is decided. A decision
goes through ``ApprovalQueue.decide(channel="slack")``, the compare-and-set the API uses, so a
click that loses a race is told who won. Deny opens a modal for the reason, which reaches the agent.

Whichever channel decides, the queue announces it and the message is edited to show who decided,
when and why. Where each message is (channel and ts) is kept in the store, so a restarted gateway
still edits old messages. Slack calls are retried with backoff (:class:`Retry`) and never decide
anything: a message that cannot be posted leaves the request pending in the inbox and the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.web.async_client import AsyncWebClient

from approvals.channels import Change
from approvals.channels import slack_blocks as blocks
from approvals.channels.slack_api import Retry, SlackApi, SlackCallFailed
from approvals.config import Principal, Settings, SlackSettings
from approvals.gatekeeper import Gatekeeper
from approvals.queue import ApprovalQueue, DecisionError, KeyedLock
from approvals.store import StoreError
from approvals.store.records import Approval

__all__ = ["SLACK_CHANNEL", "Retry", "SlackApi", "SlackCallFailed", "SlackChannel", "setup"]

log = logging.getLogger(__name__)

CHANNEL = "slack"  # the channel name in the audit log, decided_via and the message refs
DEFAULT_API_URL = "https://slack.com/api/"
REMEMBER_SHOWN = 10_000  # approvals whose shown version is remembered, to skip redundant edits


@dataclass(frozen=True, slots=True)
class _Click:
    """Who clicked, where, on which approval — read from a Slack payload."""

    user: str
    channel: str
    approval_id: str


class SlackChannel:
    """Posts approval requests to Slack, keeps their messages up to date, decides on clicks."""

    name = CHANNEL

    def __init__(
        self, slack: SlackSettings, reviewers: tuple[Principal, ...], gatekeeper: Gatekeeper
    ) -> None:
        self.slack = slack
        self.gatekeeper = gatekeeper
        self.api = SlackApi(
            AsyncWebClient(token=slack.bot_token, base_url=_base_url(slack), retry_handlers=[])
        )
        self.reviewers = {p.slack_user_id: p for p in reviewers if p.slack_user_id}
        self._serial: KeyedLock[str] = KeyedLock()
        self._shown: dict[str, int] = {}  # approval id → version its message shows
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queue(self) -> ApprovalQueue:
        queue = self.gatekeeper.queue
        if queue is None:
            raise RuntimeError("the approval queue is not running")
        return queue

    # ---- the message ----------------------------------------------------------------------------

    async def announce(self, approval: Approval, change: Change) -> None:
        """Post a new request; edit its message on any other change. Raises SlackCallFailed."""
        # One approval's announcements run in order, so an edit never overtakes its post and
        # an older state never overwrites a newer one.
        async with self._serial.hold(approval.id):
            if change == "created":
                await self._post(approval)
            await self._refresh(approval.id)

    async def _post(self, approval: Approval) -> None:
        store = self.queue.store
        earlier = _ref(await store.message_ref(approval.id, CHANNEL))
        message = blocks.approval_message(approval, url=self.queue.url_of(approval.id), now=self._now())
        # A timeout may hide a post that did happen: the retry then posts twice. A duplicate
        # message beats a missing one; the ref points at the last, which is kept up to date.
        posted = await self.api.call(
            "chat.postMessage",
            channel=self.slack.channel,
            unfurl_links=False,
            unfurl_media=False,
            **message.as_kwargs(),
        )
        ref = {"channel": str(posted.get("channel") or self.slack.channel), "ts": str(posted.get("ts"))}
        await store.save_message_ref(approval.id, CHANNEL, json.dumps(ref))
        self._remember(approval.id, approval.version)
        if earlier is not None:  # it came back for review: the old message says where it went
            old = blocks.superseded_message(approval, url=self.queue.url_of(approval.id), now=self._now())
            await self.api.call("chat.update", **earlier, **old.as_kwargs())

    async def _refresh(self, approval_id: str) -> None:
        """Make the message show the record as it is now (it may have moved on since the announcement)."""
        store = self.queue.store
        ref, approval = (
            _ref(await store.message_ref(approval_id, CHANNEL)),
            await store.get_approval(approval_id),
        )
        if ref is None or approval is None or self._shown.get(approval_id) == approval.version:
            return  # never posted (Slack was down: the inbox has it), or already showing this state
        message = blocks.approval_message(approval, url=self.queue.url_of(approval_id), now=self._now())
        await self.api.call("chat.update", **ref, **message.as_kwargs())
        self._remember(approval_id, approval.version)

    def _remember(self, approval_id: str, version: int) -> None:
        # Bounded: forgetting an old entry costs at most one redundant chat.update.
        self._shown.pop(approval_id, None)
        self._shown[approval_id] = version
        if len(self._shown) > REMEMBER_SHOWN:
            del self._shown[next(iter(self._shown))]

    def _now(self) -> float:
        return self.gatekeeper.clock()

    # ---- clicks ---------------------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a click's work after its ack, as a task this channel cancels on shutdown."""
        task = asyncio.create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def approve_clicked(self, body: Mapping[str, Any]) -> None:
        click, reviewer = _click(body), self._reviewer(body)
        if click is None:
            return
        if reviewer is None:
            await self._tell(click, blocks.not_a_reviewer())
            return
        await self._decide(click, reviewer, approve=True, reason=None)

    async def deny_clicked(self, body: Mapping[str, Any]) -> None:
        """Open the modal that asks for a reason — only for a reviewer who may decide it, while pending."""
        click, reviewer = _click(body), self._reviewer(body)
        if click is None:
            return
        if reviewer is None:
            await self._tell(click, blocks.not_a_reviewer())
            return
        approval = await self.queue.store.get_approval(click.approval_id)
        if approval is None:
            await self._tell(click, blocks.unknown_approval())
        elif approval.owner == reviewer.name:
            await self._tell(click, blocks.own_agent(approval))
        elif approval.status != "pending":
            await self._tell(click, blocks.already_decided(approval))
        else:
            view = blocks.deny_modal(approval, channel=click.channel)
            await self.api.call("views.open", trigger_id=str(body.get("trigger_id", "")), view=view)

    async def deny_submitted(self, body: Mapping[str, Any]) -> None:
        view = body.get("view")
        submitted = blocks.read_deny_submission(view) if isinstance(view, Mapping) else None
        user = _user_id(body)
        if submitted is None or user is None:
            log.warning("ignoring a malformed deny submission")
            return
        approval_id, channel, reason = submitted
        click, reviewer = _Click(user, channel, approval_id), self._reviewer(body)
        if reviewer is None:
            await self._tell(click, blocks.not_a_reviewer())
            return
        await self._decide(click, reviewer, approve=False, reason=reason or None)

    async def _decide(self, click: _Click, reviewer: Principal, *, approve: bool, reason: str | None) -> None:
        try:
            await self.queue.decide(
                click.approval_id, reviewer, approve=approve, reason=reason, channel=CHANNEL
            )
        except StoreError:
            log.exception("Slack decision on approval %s not recorded", click.approval_id)
            await self._tell(click, blocks.not_recorded())
        except DecisionError as exc:
            if exc.status == 403 and exc.approval is not None:
                await self._tell(click, blocks.own_agent(exc.approval))
            elif exc.status == 409 and exc.approval is not None:
                await self._tell(click, blocks.already_decided(exc.approval))
            else:
                await self._tell(click, blocks.unknown_approval())
        # On success the queue announces the decision, and announce() edits the message.

    def _reviewer(self, body: Mapping[str, Any]) -> Principal | None:
        """The configured reviewer behind the clicking Slack user, or None."""
        user = body.get("user")
        user = user if isinstance(user, Mapping) else {}
        if self.slack.team_id is not None:
            team = body.get("team")
            team_id = team.get("id") if isinstance(team, Mapping) else None
            if (team_id or user.get("team_id")) != self.slack.team_id:
                return None
        user_id = user.get("id")
        return self.reviewers.get(user_id) if isinstance(user_id, str) else None

    async def _tell(self, click: _Click, text: str) -> None:
        """An ephemeral answer to the clicking user only; a failure to tell is logged, nothing more."""
        try:
            await self.api.call("chat.postEphemeral", channel=click.channel, user=click.user, text=text)
        except SlackCallFailed:
            log.exception("could not tell Slack user %s about approval %s", click.user, click.approval_id)

    # ---- lifetime -------------------------------------------------------------------------------

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: Socket Mode connected in the background (if so configured); tasks stopped after."""
        socket: AsyncSocketModeHandler | None = None
        connecting: asyncio.Task[None] | None = None
        if self.slack.mode == "socket":
            socket = AsyncSocketModeHandler(app[BOLT], self.slack.app_token, web_client=self.api.client)
            # In the background: the gateway serves the API and the inbox while Slack is unreachable.
            connecting = asyncio.create_task(_logged(socket.connect_async()))  # type: ignore[no-untyped-call]
        yield
        if connecting is not None:
            connecting.cancel()
        if socket is not None:
            await socket.close_async()  # type: ignore[no-untyped-call]
        tasks = [*self._tasks, *([connecting] if connecting else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _base_url(slack: SlackSettings) -> str:
    return slack.api_url or DEFAULT_API_URL


def _ref(ref_json: str | None) -> dict[str, str] | None:
    """The channel and ts of a posted message, from the store."""
    if ref_json is None:
        return None
    ref = json.loads(ref_json)
    return {"channel": str(ref["channel"]), "ts": str(ref["ts"])}


def _user_id(body: Mapping[str, Any]) -> str | None:
    user = body.get("user")
    user_id = user.get("id") if isinstance(user, Mapping) else None
    return user_id if isinstance(user_id, str) else None


def _click(body: Mapping[str, Any]) -> _Click | None:
    """The clicking user, the channel of the message and the approval id of a button, or None."""
    actions, channel, user = body.get("actions"), body.get("channel"), _user_id(body)
    action = actions[0] if isinstance(actions, list) and actions else None
    approval_id = action.get("value") if isinstance(action, Mapping) else None
    channel_id = channel.get("id") if isinstance(channel, Mapping) else None
    if not (isinstance(approval_id, str) and isinstance(channel_id, str) and user is not None):
        log.warning("ignoring a malformed Slack click")
        return None
    return _Click(user, channel_id, approval_id)


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception:  # the top of a task: nothing above it would see the error
        log.exception("Slack work failed")


# ---- the bolt app and its mounting ----------------------------------------------------------------


def build_bolt(channel: SlackChannel) -> AsyncApp:
    """The bolt app: request verification, authorize without auth.test, and the three handlers."""
    slack = channel.slack

    async def authorize(
        enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> AuthorizeResult:
        # One workspace, one bot token from the environment: no installation store, no auth.test.
        return AuthorizeResult(
            enterprise_id=enterprise_id, team_id=team_id, user_id=user_id, bot_token=slack.bot_token
        )

    bolt = AsyncApp(
        # A client without a token: bolt's own calls get the token from authorize; ours use channel.api.
        client=AsyncWebClient(base_url=_base_url(slack), retry_handlers=[]),
        signing_secret=slack.signing_secret,
        authorize=authorize,
        process_before_response=False,  # ack first; Slack wants an answer within 3 s
        logger=logging.getLogger(f"{__name__}.bolt"),
    )

    async def on_approve(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel.spawn(channel.approve_clicked(body))

    async def on_deny(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel.spawn(channel.deny_clicked(body))

    async def on_deny_submitted(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()  # closes the modal; a refusal comes as an ephemeral message
        channel.spawn(channel.deny_submitted(body))

    bolt.action(blocks.ACTION_APPROVE)(on_approve)
    bolt.action(blocks.ACTION_DENY)(on_deny)
    bolt.view(blocks.DENY_VIEW)(on_deny_submitted)
    return bolt


SLACK_CHANNEL = web.AppKey("slack_channel", SlackChannel)
BOLT = web.AppKey("slack_bolt", AsyncApp)


async def slack_events(request: web.Request) -> web.Response:
    """POST /slack/events: a forged or stale signature is 401 and reaches no handler."""
    response = await request.app[BOLT].async_dispatch(await to_bolt_request(request))
    return await to_aiohttp_response(response)


def setup(app: web.Application, settings: Settings, gatekeeper: Gatekeeper) -> None:
    """Register the Slack channel on the gatekeeper, and mount POST /slack/events or Socket Mode."""
    if settings.slack is None:
        return
    channel = SlackChannel(settings.slack, settings.reviewers, gatekeeper)
    gatekeeper.channel_list.append(channel)
    app[SLACK_CHANNEL] = channel
    app[BOLT] = build_bolt(channel)
    if settings.slack.mode == "http":
        # Socket Mode needs no public route, so none is mounted there.
        app.router.add_post("/slack/events", slack_events)
    app.cleanup_ctx.append(channel.lifetime)
