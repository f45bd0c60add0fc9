"""Slack: each approval request is posted with Approve / Deny buttons, and a click decides it.

::

    setup(app, settings, service)
      ├─ SlackChannel      a Channel: posts on "created", edits the message on every "updated"
      ├─ bolt AsyncApp     ack within 3 s, the click and modal handlers
      └─ mode "http":   POST /slack/events: verified (401), parsed (400), then bolt
         mode "socket": Socket Mode over a WebSocket, for gateways without a public URL

A request is verified on its raw bytes before it is parsed (``slack_requests``). The clicking Slack
user must be a configured reviewer, and when ``[slack] team_id`` is set every workspace the payload
names must be that one; anyone else — and the owner of the requesting agent — gets an ephemeral
refusal and nothing is decided. A decision goes through ``ApprovalQueue.decide(channel="slack")``,
the compare-and-set the API uses, so a click that loses a race is told who won. Deny opens a modal
for the reason, which reaches the agent.

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
from approvals.channels import slack_blocks as blocks
from approvals.channels import slack_requests as requests
from approvals.channels.slack_api import Retry, SlackApi, SlackCallFailed
from approvals.config import Principal, Settings, SlackSettings
from approvals.core.model import Approval
from approvals.core.service import ApprovalService
from approvals.errors import DecisionRefused, StoreError
from approvals.keyed_lock import KeyedLock

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
        self, slack: SlackSettings, reviewers: tuple[Principal, ...], service: ApprovalService
    ) -> None:
        self.slack = slack
        self.service = service
        self.api = SlackApi(
            AsyncWebClient(token=slack.bot_token, base_url=_base_url(slack), retry_handlers=[])
        )
        self.reviewers = {p.slack_user_id: p for p in reviewers if p.slack_user_id}
        self._serial: KeyedLock[str] = KeyedLock()
        self._shown: dict[str, int] = {}  # approval id → version its message shows
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the message ----------------------------------------------------------------------------

    async def announce(self, approval: Approval, change: ChangeKind) -> None:
        """Post a new request; edit its message on any other change. Raises SlackCallFailed."""
        # One approval's announcements run in order, so an edit never overtakes its post and
        # an older state never overwrites a newer one.
        async with self._serial.hold(approval.id):
            if change == "created":
                await self._post(approval)
            await self._refresh(approval.id)

    async def _post(self, approval: Approval) -> None:
        store = self.service.store
        earlier = _ref(await store.message_ref(approval.id, CHANNEL))
        message = blocks.approval_message(approval, url=self.service.url_of(approval.id), now=self._now())
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
            old = blocks.superseded_message(approval, url=self.service.url_of(approval.id), now=self._now())
            await self.api.call("chat.update", **earlier, **old.as_kwargs())

    async def _refresh(self, approval_id: str) -> None:
        """Make the message show the record as it is now (it may have moved on since the announcement)."""
        store = self.service.store
        ref, approval = (
            _ref(await store.message_ref(approval_id, CHANNEL)),
            await store.get_approval(approval_id),
        )
        if ref is None or approval is None or self._shown.get(approval_id) == approval.version:
            return  # never posted (Slack was down: the inbox has it), or already showing this state
        message = blocks.approval_message(approval, url=self.service.url_of(approval_id), now=self._now())
        await self.api.call("chat.update", **ref, **message.as_kwargs())
        self._remember(approval_id, approval.version)

    def _remember(self, approval_id: str, version: int) -> None:
        # Bounded: forgetting an old entry costs at most one redundant chat.update.
        self._shown.pop(approval_id, None)
        self._shown[approval_id] = version
        if len(self._shown) > REMEMBER_SHOWN:
            del self._shown[next(iter(self._shown))]

    def _now(self) -> float:
        return self.service.clock()

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
        approval = await self.service.store.get_approval(click.approval_id)
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
            await self.service.decide(
                click.approval_id, reviewer, approve=approve, reason=reason, channel=CHANNEL
            )
        except StoreError:
            log.exception("Slack decision on approval %s not recorded", click.approval_id)
            await self._tell(click, blocks.not_recorded())
        except DecisionRefused as exc:
            # Slack's answer to each kind of refusal: an ephemeral message to the clicker.
            if exc.kind == "own_agent" and exc.approval is not None:
                await self._tell(click, blocks.own_agent(exc.approval))
            elif exc.kind in ("already_decided", "expired") and exc.approval is not None:
                await self._tell(click, blocks.already_decided(exc.approval))
            else:
                await self._tell(click, blocks.unknown_approval())
        # On success the decision is published on the change feed, and announce() edits the message.

    def _reviewer(self, body: Mapping[str, Any]) -> Principal | None:
        """The configured reviewer behind the clicking Slack user, or None."""
        if self.slack.team_id is not None and not _only_from(body, self.slack.team_id):
            return None
        user_id = _user_id(body)
        return self.reviewers.get(user_id) if user_id is not None else None

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


def _only_from(body: Mapping[str, Any], team_id: str) -> bool:
    """Whether every workspace the payload names — and at least one — is `team_id`, in at most one org.

    A Slack user id is unique only within its workspace (or Enterprise Grid org), so the clicking user
    counts as a reviewer only when the payload shows no other workspace anywhere: the message's
    (``team.id``), the user's own (``user.team_id``) and the modal's (``view.team_id``,
    ``view.app_installed_team_id``). Two Enterprise Grid orgs named (``enterprise.id``,
    ``user.enterprise_id``, ``team.enterprise_id``) are refused too. Fails closed.
    """
    team, user, view, org = (_object(body, key) for key in ("team", "user", "view", "enterprise"))
    teams = [team.get("id"), user.get("team_id"), view.get("team_id"), view.get("app_installed_team_id")]
    orgs = {org.get("id"), user.get("enterprise_id"), team.get("enterprise_id")} - {None}
    named = [t for t in teams if t is not None]
    return bool(named) and all(t == team_id for t in named) and len(orgs) <= 1


def _object(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


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
        # slack_events verifies on the raw bytes before anything is parsed; bolt's check decodes first.
        request_verification_enabled=False,
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
