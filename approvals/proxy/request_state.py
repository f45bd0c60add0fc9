"""The gateway's `requestState` for multi-round-trip calls (2026-07-28 `InputRequiredResult`).

An upstream may answer a `tools/call` with `resultType: "input_required"`: it needs the client's
answers (elicitation, sampling, roots) and the client calls again with `inputResponses` and the
`requestState` it got. That retry is the same call continuing, not a new one: once the gate has
judged the first round (and, for a held call, a reviewer approved it and the gateway released it
with exactly these arguments), the retry must not be held or counted again.

So the upstream's state never reaches the client as it is. The gateway wraps it in its own,
signed (HMAC-SHA256) and bound to what was judged: grant, upstream, tool, the sha256 of the
canonical arguments, the approval id when the call was held, and an expiry. On the retry it is
checked and unwrapped: a state that is not the gateway's, was altered, has expired or belongs
to another grant, upstream or tool is refused (-32602); arguments that differ from the judged
ones make a new call, judged again.

The key is derived from the gateway's secret (`approvals.gateway_secret`: APPROVALS_SESSION_SECRET,
or the one kept in the shared database), which every replica has, with HMAC for this purpose alone,
so a value signed here can never pass for an inbox cookie. One process on SQLite without the
variable has a random key: a retry reaching it after a restart is refused, and the client starts
the call again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from approvals.core.model import sha256_of
from approvals.jsonrpc import JsonObject

PREFIX = "approvals1."
PURPOSE = b"approvals: MCP requestState v1"
MAX_AGE_SECONDS = 3600.0  # a retry comes when the user has answered: minutes, not days
INPUT_REQUIRED = "input_required"


@dataclass(frozen=True, slots=True)
class Judged:
    """What a first round was judged as: the retry continues it only if it is the same call."""

    grant: str
    upstream: str
    tool: str
    arguments_sha256: str
    approval_id: str | None = None

    @classmethod
    def of(
        cls, grant: str, upstream: str, tool: str, arguments: JsonObject, approval_id: str | None = None
    ) -> Judged:
        return cls(grant, upstream, tool, sha256_of(arguments), approval_id)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A checked retry: the upstream's own state (None if it gave none) and whether it is the
    judged call (`same_call`) or a new one with other arguments."""

    upstream_state: str | None
    same_call: bool
    approval_id: str | None


class StateError(ValueError):
    """A `requestState` the gateway cannot accept; the message says why (for a -32602)."""


class RequestStates:
    """Wraps upstream states for the client and checks them when the client sends them back."""

    def __init__(self, secret: str | None, clock: Callable[[], float] = time.time) -> None:
        root = secret.encode() if secret else secrets.token_bytes(32)
        self._key = hmac.new(root, PURPOSE, hashlib.sha256).digest()
        self._clock = clock

    def wrap(self, judged: Judged, upstream_state: object) -> str:
        """The state the client gets: the upstream's (a string or absent) bound to what was judged."""
        payload = {
            "g": judged.grant,
            "u": judged.upstream,
            "t": judged.tool,
            "h": judged.arguments_sha256,
            "a": judged.approval_id,
            "s": upstream_state if isinstance(upstream_state, str) else None,
            "e": int(self._clock() + MAX_AGE_SECONDS),
        }
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return f"{PREFIX}{_b64(raw)}.{_b64(self._sign(raw))}"

    def unwrap(
        self, state: object, grant: str, upstream: str, tool: str, arguments: JsonObject
    ) -> Continuation:
        """Check a retry's `requestState`. Raises StateError naming what is wrong."""
        if not isinstance(state, str):
            raise StateError("params.requestState must be a string")
        if not state.startswith(PREFIX):
            raise StateError("params.requestState was not issued by this gateway (send back the one you got)")
        body, _, signature = state[len(PREFIX) :].partition(".")
        try:
            raw, mac = _unb64(body), _unb64(signature)
        except (binascii.Error, ValueError):
            raise StateError("params.requestState is malformed") from None
        if not hmac.compare_digest(mac, self._sign(raw)):
            raise StateError("params.requestState has been altered or was signed by another gateway")
        payload = json.loads(raw)
        if not isinstance(payload, dict) or not isinstance(payload.get("e"), int):
            raise StateError("params.requestState is malformed")
        if payload["e"] < self._clock():
            raise StateError("params.requestState has expired: call the tool again without it")
        if (payload.get("g"), payload.get("u")) != (grant, upstream):
            raise StateError("params.requestState belongs to another client or upstream")
        if payload.get("t") != tool:
            raise StateError(f"params.requestState belongs to tool {payload.get('t')!r}, not {tool!r}")
        inner = payload.get("s")
        approval = payload.get("a")
        return Continuation(
            upstream_state=inner if isinstance(inner, str) else None,
            same_call=payload.get("h") == sha256_of(arguments),
            approval_id=approval if isinstance(approval, str) else None,
        )

    def _sign(self, raw: bytes) -> bytes:
        return hmac.new(self._key, raw, hashlib.sha256).digest()


def is_input_required(result: object) -> bool:
    return isinstance(result, dict) and result.get("resultType") == INPUT_REQUIRED


def wrap_answer(states: RequestStates, judged: Judged, answer: JsonObject) -> JsonObject:
    """A `tools/call` response with an InputRequiredResult's state wrapped; any other as it is."""
    result = answer.get("result")
    if not is_input_required(result):
        return answer
    assert isinstance(result, dict)
    wrapped = states.wrap(judged, result.get("requestState"))
    return {**answer, "result": {**result, "requestState": wrapped}}


def with_upstream_state(body: JsonObject, upstream_state: str | None) -> JsonObject:
    """The retry as the upstream gets it: its own `requestState` back in place of the gateway's."""
    params = body.get("params")
    if not isinstance(params, dict):
        return body
    rest = {k: v for k, v in params.items() if k != "requestState"}
    if upstream_state is not None:
        rest["requestState"] = upstream_state
    return {**body, "params": rest}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text:
        raise ValueError("empty")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
