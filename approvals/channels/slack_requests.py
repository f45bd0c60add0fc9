"""Slack's requests to the gateway, checked before bolt sees them.

::

    POST /slack/events
      read_body   at most MAX_BODY_BYTES, never inflated          413
      verify      v0 HMAC-SHA256 of the raw bytes, 300 s window   401
      parse       form body with one `payload` JSON object         400 / 415
      interaction only the fields the handlers use, checked        400

Verifying comes first, on the bytes as received: nothing from an unsigned request is decoded or
parsed. Bolt's own verification is off (it decodes the body first, and its clock cannot be
injected). ``interaction`` also guards Socket Mode, whose payloads skip the signature (the WebSocket
is opened with the app token) but reach the same handlers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from approvals.errors import ApprovalsError
from approvals.jsonrpc import decode_text

__all__ = [
    "MAX_BODY_BYTES",
    "SIGNATURE_WINDOW",
    "Click",
    "SlackRequestError",
    "click_of",
    "interaction",
    "only_from",
    "parse",
    "read_body",
    "user_id",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_WINDOW = 300  # seconds either side of now, as Slack's docs say: older requests may be replays
# Interactivity payloads carry the clicked message, whose blocks are at most ~150 KB; escaped
# into a form field that can triple. Anything bigger is not Slack.
MAX_BODY_BYTES = 1024 * 1024
HANDLED = ("block_actions", "view_submission")  # the button clicks and the deny modal


class SlackRequestError(ApprovalsError):
    """A request to /slack/events the gateway will not act on: answered with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: web.Request) -> bytes:
    """The raw body as sent, bounded (web.app refuses a Content-Encoding here: nothing is inflated)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise SlackRequestError(413, f"body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():  # chunked bodies have no length to check up front
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise SlackRequestError(413, f"body over {MAX_BODY_BYTES} bytes")
    return bytes(body)


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
    """Raise SlackRequestError(401) unless `body` is signed with `secret` within the window."""
    stamp = headers.get("X-Slack-Request-Timestamp", "")
    given = headers.get("X-Slack-Signature", "")
    # isdigit() alone would take other scripts' digits, which int() reads but Slack never sends.
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise SlackRequestError(401, "X-Slack-Request-Timestamp is missing or not a Unix time")
    if abs(now - int(stamp)) > SIGNATURE_WINDOW:
        raise SlackRequestError(401, f"X-Slack-Request-Timestamp is more than {SIGNATURE_WINDOW} s from now")
    if not given.isascii():
        raise SlackRequestError(401, "X-Slack-Signature does not match the body")
    digest = hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    if not hmac.compare_digest(f"v0={digest.hexdigest()}".encode(), given.encode()):
        raise SlackRequestError(401, "X-Slack-Signature does not match the body")


def parse(body: bytes, content_type: str) -> dict[str, Any]:
    """The checked interaction of a verified request: form-encoded `payload=<JSON object>`."""
    if content_type != "application/x-www-form-urlencoded":
        raise SlackRequestError(415, "expected an application/x-www-form-urlencoded body")
    try:
        fields = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=20)
        [payload] = fields["payload"]
    except (UnicodeDecodeError, ValueError, KeyError):
        # ValueError also covers a malformed form and more than one `payload` field.
        raise SlackRequestError(400, "expected a UTF-8 form with one field `payload`") from None
    try:
        parsed = decode_text(payload)  # the gateway's JSON bounds: depth, finite numbers
    except ValueError as exc:
        raise SlackRequestError(400, f"`payload` is not JSON the gateway accepts: {exc}") from None
    return interaction(parsed)


def interaction(payload: object) -> dict[str, Any]:
    """The parts of a click or modal submission the handlers use, checked; all else is dropped.

    Bolt reads many optional fields while it builds a request's context and trips (a 500, or an
    exception in the socket handler) on shapes Slack never sends. It is handed only these fields,
    each of the type Slack documents. A wrong type in a kept field is refused, not dropped, so
    that no team id is lost before the workspace check.
    """
    if not isinstance(payload, dict):
        raise SlackRequestError(400, "`payload` is not a JSON object")
    kind = payload.get("type")
    if kind not in HANDLED:
        raise _bad(f"type must be one of {', '.join(HANDLED)} (got {_shown(kind)})")
    checked: dict[str, Any] = {"type": kind, "user": _strings(payload, "user", USER, required="id")}
    for key, names in (("team", TEAM), ("enterprise", ENTERPRISE), ("channel", CHANNEL)):
        if (found := _strings(payload, key, names)) is not None:
            checked[key] = found
    checked |= _picked(payload, "", TOP)
    if kind == "block_actions":
        actions = payload.get("actions")
        if not (isinstance(actions, list) and actions):
            raise _bad("actions must be a non-empty list")
        named = {f"actions[{i}]": action for i, action in enumerate(actions)}
        checked["actions"] = [_action(named, key) for key in named]
    else:
        view = _strings(payload, "view", VIEW, required="callback_id", also=("state",))
        if view is None or view.get("type") != "modal":  # bolt takes other views for workflow steps
            raise _bad('view.type must be "modal"')
        checked["view"] = view
    return checked


# The string fields kept from each part of a payload.
USER = ("id", "team_id", "enterprise_id", "username", "name")
TEAM = ("id", "enterprise_id", "domain")
ENTERPRISE = ("id", "name")
CHANNEL = ("id", "name")
TOP = ("trigger_id", "api_app_id")
ACTION = ("action_id", "block_id", "value", "type", "action_ts")
VIEW = ("id", "type", "callback_id", "private_metadata", "team_id", "app_installed_team_id")


def _strings(
    payload: Mapping[str, Any],
    key: str,
    names: tuple[str, ...],
    *,
    required: str | None = None,
    also: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """payload[key] as an object of its string fields `names` (and `also`, as they are); None if absent."""
    value = payload.get(key)
    if value is None and required is None:
        return None
    if not isinstance(value, dict):
        raise _bad(f"{key} must be an object")
    kept = _picked(value, f"{key}.", names) | {name: value[name] for name in also if name in value}
    if required is not None and required not in kept:
        raise _bad(f"{key}.{required} must be a string")
    return kept


def _action(named: Mapping[str, Any], key: str) -> dict[str, Any]:
    """One action: its string fields, and the value of a select's chosen option (approve & remember)."""
    action = _strings(named, key, ACTION, required="action_id")
    chosen = named[key].get("selected_option")
    if chosen is not None:
        where = f"{key}.selected_option"
        option = _strings({where: chosen}, where, ("value",), required="value")
        assert option is not None  # required: refused when absent
        assert action is not None
        action["selected_option"] = {"value": option["value"]}
    assert action is not None
    return action


def _picked(value: Mapping[str, Any], prefix: str, names: tuple[str, ...]) -> dict[str, str]:
    kept = {name: value[name] for name in names if value.get(name) is not None}
    for name, item in kept.items():
        if not isinstance(item, str):
            raise _bad(f"{prefix}{name} must be a string")
    return kept


def _bad(problem: str) -> SlackRequestError:
    return SlackRequestError(400, f"`payload`: {problem}")


def _shown(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:39] + "…")
    return "null" if value is None else f"a JSON {_JSON_TYPES.get(type(value), 'value')}"


_JSON_TYPES = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}


# ---- reading a checked interaction ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Click:
    """Who clicked, where, on which approval — read from a Slack payload (for a select: the option's
    value, which names the approval and the choice)."""

    user: str
    channel: str
    approval_id: str


def user_id(body: Mapping[str, Any]) -> str | None:
    user = body.get("user")
    found = user.get("id") if isinstance(user, Mapping) else None
    return found if isinstance(found, str) else None


def only_from(body: Mapping[str, Any], team_id: str) -> bool:
    """Whether every workspace the payload names — and at least one — is `team_id`, in at most one org.

    A Slack user id is unique only within its workspace (or Enterprise Grid org), so the clicking user
    counts as a reviewer only when the payload shows no other workspace anywhere: the message's
    (``team.id``), the user's own (``user.team_id``) and the modal's (``view.team_id``,
    ``view.app_installed_team_id``). Two Enterprise Grid orgs named (``enterprise.id``,
    ``user.enterprise_id``, ``team.enterprise_id``) are refused too. Fails closed.
    """
    team, user, view, org = (_object_at(body, key) for key in ("team", "user", "view", "enterprise"))
    teams = [team.get("id"), user.get("team_id"), view.get("team_id"), view.get("app_installed_team_id")]
    orgs = {org.get("id"), user.get("enterprise_id"), team.get("enterprise_id")} - {None}
    named = [t for t in teams if t is not None]
    return bool(named) and all(t == team_id for t in named) and len(orgs) <= 1


def _object_at(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


def click_of(body: Mapping[str, Any]) -> Click | None:
    """The clicking user, the channel of the message and the value of a button (the approval id)
    or of a select's chosen option, or None."""
    actions, channel, user = body.get("actions"), body.get("channel"), user_id(body)
    action = actions[0] if isinstance(actions, list) and actions else None
    value = action.get("value") if isinstance(action, Mapping) else None
    chosen = action.get("selected_option") if isinstance(action, Mapping) else None
    if value is None and isinstance(chosen, Mapping):
        value = chosen.get("value")
    channel_id = channel.get("id") if isinstance(channel, Mapping) else None
    if not (isinstance(value, str) and isinstance(channel_id, str) and user is not None):
        log.warning("ignoring a malformed Slack click")
        return None
    return Click(user, channel_id, value)
