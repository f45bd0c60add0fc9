"""Slack: each approval request is posted with its controls, and a click decides it.

::

    setup(app, settings, service)
      ├─ SlackChannel      a Channel: its SlackMessages post on "created" (to the channels of the
      │                    groups that may decide), edit every message on "updated", post escalations
      ├─ bolt AsyncApp     ack within 3 s, the click, select and modal handlers
      └─ mode "http":   POST /slack/events: verified (401), parsed (400), then bolt
         mode "socket": Socket Mode over a WebSocket, for gateways without a public URL

The controls of a pending request (action ids):

    approvals_approve        Approve: a vote; the call is approved once the rule's quorum is met
    approvals_deny           Deny: a modal (approvals_deny_reason) asks the reason, which reaches the agent
    approvals_remember       Approve & remember… (select: 1 h / 8 h / 24 h): approve, and save a standing
                             grant for exactly these arguments — only where the rule allows one
    approvals_edit_in_inbox  a link to the inbox's editor (Slack cannot edit arguments)
    approvals_open_inbox     for a rule whose ``via`` leaves Slack out: the only control, a link

A request is verified on its raw bytes before it is parsed (``slack_requests``). The clicking Slack
user must be a configured reviewer, and when ``[slack] team_id`` is set every workspace the payload
names must be that one. A decision goes through ``ApprovalService.decide_and_remember(channel=
"slack")``, the compare-and-set the API uses, which judges who may decide (groups, quorum, step-up);
whatever it refuses gets an ephemeral answer naming why (``slack_answers``) and decides nothing. An
approval short of the quorum is confirmed to the clicker ("Counted: 1 of 2 approvals, …").

Whichever channel decides, the service announces it and every message is edited to show who
decided, when and why. Where each message is (channel and ts) is kept in the store, so a restarted
gateway still edits old messages. Slack calls are retried with backoff (:class:`Retry`) and never
decide anything: a message that cannot be posted leaves the request pending in the inbox and the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from approvals.channels import ChangeKind
from approvals.channels import slack_answers as answers
from approvals.channels import slack_blocks as blocks
from approvals.channels import slack_requests as requests
from approvals.channels import slack_review as review
from approvals.channels.slack_api import Retry, SlackApi, SlackCallFailed
from approvals.channels.slack_messages import SlackMessages
from approvals.config import Principal, Settings, SlackSettings
from approvals.core.deciding import RememberRequest
from approvals.core.model import Approval
from approvals.core.review import Refusal, judge_decision
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused, RefusalKind, StoreError

__all__ = ["SLACK_CHANNEL", "Retry", "SlackApi", "SlackCallFailed", "SlackChannel", "setup"]

log = logging.getLogger(__name__)

CHANNEL = "slack"  # the channel name in the audit log and decided_via

DEFAULT_API_URL = "https://slack.com/api/"


class SlackChannel:
    """Posts approval requests to Slack, keeps their messages up to date, decides on clicks."""

    name = CHANNEL

    def __init__(
        self, slack: SlackSettings, reviewers: tuple[Principal, ...], service: ApprovalService
    ) -> None:
        self.slack = slack
        self.service = service
        self.api = SlackApi(
            AsyncWebClient(token=slack.bot_token, base_url=_base_url(slack), retry_handlers=[])
        )
        self.reviewers = {p.slack_user_id: p for p in reviewers if p.slack_user_id}
        self.everyone = reviewers  # named in a refusal as who may decide, Slack users or not
        self.messages = SlackMessages(slack, service, self.api)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the messages ---------------------------------------------------------------------------

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
        """Post a new request; edit its messages on any other change. Raises SlackCallFailed."""
        if change == "created":
            await self.messages.created(approval)
        else:
            await self.messages.updated(approval.id)

    # ---- clicks ---------------------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a click's work after its ack, as a task this channel cancels on shutdown."""
        task = asyncio.create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def approve_clicked(self, body: Mapping[str, Any]) -> None:
        click, reviewer = requests.click_of(body), self._reviewer(body)
        if click is None:
            return
        approval_id, seen = review.read_approve_value(click.approval_id)
        click = requests.Click(click.user, click.channel, approval_id)
        if reviewer is None:
            await self._tell(click, answers.not_a_reviewer())
            return
        await self._decide(click, reviewer, approve=True, reason=None, seen_sha256=seen)

    async def remember_clicked(self, body: Mapping[str, Any]) -> None:
        """Approve and remember for the time picked: a standing grant for exactly these arguments."""
        click, reviewer = requests.click_of(body), self._reviewer(body)
        if click is None:
            return
        choice = review.read_remember_choice(click.approval_id)
        if choice is None:  # only the offered durations; a forged value decides nothing
            log.warning("ignoring a Slack remember choice that was never offered")
            return
        approval_id, seen, seconds = choice
        click = requests.Click(click.user, click.channel, approval_id)
        if reviewer is None:
            await self._tell(click, answers.not_a_reviewer())
            return
        # Exactly the approved call, no use limit: widening is the inbox's (it shows the grant first).
        remember = RememberRequest(seconds, max_uses=None, constraints=None)
        await self._decide(click, reviewer, approve=True, reason=None, remember=remember, seen_sha256=seen)

    async def deny_clicked(self, body: Mapping[str, Any]) -> None:
        """Open the modal that asks for a reason — only for a reviewer who may decide it, while pending."""
        click, reviewer = requests.click_of(body), self._reviewer(body)
        if click is None:
            return
        if reviewer is None:
            await self._tell(click, answers.not_a_reviewer())
            return
        approval = await self.service.store.get_approval(click.approval_id)
        if approval is None:
            await self._tell(click, answers.unknown_approval())
        elif approval.owner == reviewer.name:
            await self._tell(click, answers.own_agent(approval))
        elif approval.status != "pending":
            await self._tell(click, blocks.already_decided(approval))
        elif (refused := self._judge_deny(approval, reviewer)) is not None:
            # Asked before the modal, so nobody types a reason the service would then refuse.
            await self._tell(click, await self._refusal(refused.kind, refused.message, approval))
        else:
            view = blocks.deny_modal(approval, channel=click.channel)
            await self.api.call("views.open", trigger_id=str(body.get("trigger_id", "")), view=view)

    def _judge_deny(self, approval: Approval, reviewer: Principal) -> Refusal | None:
        """The service's own rule (core.review.judge_decision) on a deny by this reviewer from Slack."""
        state = self.service.review_state(approval)
        return judge_decision(
            state.rule, state.votes, escalated=approval.escalated, reviewer=reviewer.name,
            groups=reviewer.groups, channel=CHANNEL, approve=False,
        )  # fmt: skip

    async def deny_submitted(self, body: Mapping[str, Any]) -> None:
        view = body.get("view")
        submitted = blocks.read_deny_submission(view) if isinstance(view, Mapping) else None
        user = requests.user_id(body)
        if submitted is None or user is None:
            log.warning("ignoring a malformed deny submission")
            return
        approval_id, channel, reason = submitted
        click, reviewer = requests.Click(user, channel, approval_id), self._reviewer(body)
        if reviewer is None:
            await self._tell(click, answers.not_a_reviewer())
            return
        await self._decide(click, reviewer, approve=False, reason=reason or None)

    async def _decide(
        self,
        click: requests.Click,
        reviewer: Principal,
        *,
        approve: bool,
        reason: str | None,
        remember: RememberRequest | None = None,
        seen_sha256: str | None = None,
    ) -> None:
        try:
            decided, grant = await self.service.decide_and_remember(
                click.approval_id, reviewer, approve=approve, reason=reason, channel=CHANNEL,
                remember=remember, seen_sha256=seen_sha256,
            )  # fmt: skip
        except StoreError:
            log.exception("Slack decision on approval %s not recorded", click.approval_id)
            await self._tell(click, answers.not_recorded())
            return
        except DecisionRefused as exc:
            await self._tell(click, await self._refusal(exc.kind, str(exc), exc.approval, click.approval_id))
            return
        # The decision is published on the change feed, and announce() edits the messages; the
        # clicker is told only what the message cannot say to them alone.
        if decided.status == "pending":  # counted; the quorum needs more
            await self._tell(click, answers.counted(self.service.review_state(decided).progress))
        if grant is not None:
            # The grant is saved after the decision's change was announced: show it now.
            await self.messages.updated(decided.id, force=True)
            grants_url = f"{self.service.settings.server.public_url}/inbox/grants"
            await self._tell(click, answers.remembered(grant, grants_url=grants_url))

    async def _refusal(
        self, kind: RefusalKind, message: str, approval: Approval | None, approval_id: str | None = None
    ) -> str:
        """The ephemeral answer to a refused decision, with who may decide and the quorum's progress."""
        if approval is None and approval_id is not None and kind in ("not_eligible", "already_voted"):
            approval = await self.service.store.get_approval(approval_id)
        progress = ""
        deciders: tuple[str, ...] = ()
        if approval is not None and approval.status == "pending":
            state = self.service.review_state(approval)
            progress = state.progress
            deciders = tuple(
                p.name
                for p in self.everyone
                if p.name != approval.owner
                and judge_decision(
                    state.rule, state.votes, escalated=approval.escalated, reviewer=p.name,
                    groups=p.groups, channel=CHANNEL, approve=True,
                ) is None
            )  # fmt: skip
        url = self.service.url_of(approval.id if approval is not None else approval_id or "")
        return answers.refusal(kind, message, approval, answers.Refusing(url, progress, deciders))

    def _reviewer(self, body: Mapping[str, Any]) -> Principal | None:
        """The configured reviewer behind the clicking Slack user, or None."""
        if self.slack.team_id is not None and not requests.only_from(body, self.slack.team_id):
            return None
        user_id = requests.user_id(body)
        return self.reviewers.get(user_id) if user_id is not None else None

    async def _tell(self, click: requests.Click, text: str) -> None:
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
            socket = _SocketHandler(app[BOLT], self.slack.app_token, web_client=self.api.client)
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
        # slack_events verifies on the raw bytes before anything is parsed; bolt's check decodes first.
        request_verification_enabled=False,
        authorize=authorize,
        process_before_response=False,  # ack first; Slack wants an answer within 3 s
        logger=logging.getLogger(f"{__name__}.bolt"),
    )

    async def on_approve(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel.spawn(channel.approve_clicked(body))

    async def on_remember(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel.spawn(channel.remember_clicked(body))

    async def on_deny(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel.spawn(channel.deny_clicked(body))

    async def on_deny_submitted(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()  # closes the modal; a refusal comes as an ephemeral message
        channel.spawn(channel.deny_submitted(body))

    async def on_link(ack: AsyncAck) -> None:
        await ack()  # the browser opens the link; Slack still wants its click acknowledged

    bolt.action(blocks.ACTION_APPROVE)(on_approve)
    bolt.action(review.ACTION_REMEMBER)(on_remember)
    bolt.action(blocks.ACTION_DENY)(on_deny)
    bolt.view(blocks.DENY_VIEW)(on_deny_submitted)
    for action_id in review.LINK_ACTIONS:
        bolt.action(action_id)(on_link)
    return bolt


SLACK_CHANNEL = web.AppKey("slack_channel", SlackChannel)
BOLT = web.AppKey("slack_bolt", AsyncApp)


async def slack_events(request: web.Request) -> web.Response:
    """POST /slack/events: verified on the raw bytes first (401), then parsed (400), then bolt."""
    channel = request.app[SLACK_CHANNEL]
    try:
        body = await requests.read_body(request)
        requests.verify(channel.slack.signing_secret, request.headers, body, now=channel.service.clock())
        payload = requests.parse(body, request.content_type)
    except requests.SlackRequestError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    # Bolt gets the checked fields only (it reads the raw form, so they are encoded again).
    bolt_request = AsyncBoltRequest(
        body=urlencode({"payload": json.dumps(payload)}),
        query=request.query_string,
        headers=dict(request.headers),
    )
    return await to_aiohttp_response(await request.app[BOLT].async_dispatch(bolt_request))


class _SocketHandler(AsyncSocketModeHandler):
    """Socket Mode with the payload check of the HTTP route: a malformed envelope is acked and dropped."""

    async def handle(self, client: SocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        try:
            req.payload = requests.interaction(req.payload)
        except requests.SlackRequestError as exc:
            # Acked, or Slack would deliver it again; there is no one to answer but the log.
            log.warning("ignoring a malformed Socket Mode envelope %s: %s", req.envelope_id, exc.message)
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
            return
        await super().handle(client, req)


def setup(app: web.Application, settings: Settings, service: ApprovalService) -> SlackChannel:
    """Mount POST /slack/events or Socket Mode; the channel is returned, to be told of changes."""
    assert settings.slack is not None, "setup() is for a gateway with [slack]"
    channel = SlackChannel(settings.slack, settings.reviewers, service)
    app[SLACK_CHANNEL] = channel
    app[BOLT] = build_bolt(channel)
    if settings.slack.mode == "http":
        # Socket Mode needs no public route, so none is mounted there.
        app.router.add_post("/slack/events", slack_events)
    app.cleanup_ctx.append(channel.lifetime)
    return channel
