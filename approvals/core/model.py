"""The approval domain's values and the rules of its life cycle — pure, no I/O.

::

    pending ──▶ approved ──▶ released ──▶ completed | failed
       │  ▲         │
       │  └─────────┤  (tool definition changed upstream: back for a new look)
       │            └──▶ expired   (lapsed while waiting for a rate-limit window)
       ├──▶ denied
       ├──▶ expired
       └──▶ cancelled

Every store refuses any other move with :func:`check_transition`, so the edges are written once,
here. Denied, expired, cancelled, completed and failed are final: no edge leaves them.

Also here: what the proxy hands the core (:class:`ToolCall`) and what it gets back
(:class:`Admission`, with a :class:`Hold` for a call that waits for a reviewer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, get_args

from approvals.jsonrpc import JsonObject

__all__ = [
    "FINAL",
    "FORWARD",
    "RESULT_DROPPED_NOTE",
    "STATUSES",
    "STORED_FIELDS",
    "TRANSITIONS",
    "Admission",
    "Approval",
    "AuditEvent",
    "Hold",
    "Status",
    "ToolCall",
    "canonical_json",
    "check_transition",
    "check_transition_fields",
    "check_update_fields",
    "new_approval_id",
    "sha256_of",
]

Status: TypeAlias = Literal[
    "pending", "approved", "denied", "expired", "cancelled", "released", "completed", "failed"
]
STATUSES: tuple[Status, ...] = get_args(Status)

FINAL: frozenset[Status] = frozenset({"denied", "expired", "cancelled", "completed", "failed"})

# The allowed edges, by source state. Final states have no entry, so nothing leaves them.
# pending → pending records a step on the way to a decision (a vote short of the quorum, an edit,
# an escalation), conditional on the record's version so two of them never overwrite each other.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    "pending": frozenset({"pending", "approved", "denied", "expired", "cancelled"}),
    "approved": frozenset({"released", "expired", "pending"}),
    "released": frozenset({"completed", "failed"}),
}


@dataclass(frozen=True, slots=True)
class Approval:
    """One request for a human decision on one tool call, and what became of it."""

    id: str  # uuid4 hex
    upstream: str
    tool: str
    arguments_json: str  # the arguments exactly as received (JSON text); release forwards these
    args_sha256: str  # sha256 of the canonical JSON of the arguments
    tool_json: str  # the tool definition as the upstream listed it (JSON text, "" if unknown)
    tool_sha256: str  # sha256 of the canonical JSON of that definition ("" if unknown)
    grant: str
    owner: str | None
    session_id: str
    rule: str
    explanation: str
    status: Status
    created_at: float
    expires_at: float
    decided_at: float | None = None
    decided_by: str | None = None
    # The channel the decision came through ("web", "slack", …). Not named `channel`: that is the
    # keyword transition() takes for the channel of each move, and fields are passed as keywords.
    decided_via: str | None = None
    # The reviewer's reason (deny), or the system's (expired, cancelled, interrupted, tool changed).
    reason: str | None = None
    released_at: float | None = None
    finished_at: float | None = None
    result_json: str | None = None  # the upstream's final JSON-RPC response, for the repeat call
    result_expires_at: float | None = None
    result_delivered: bool = False
    note: str | None = None
    version: int = 0  # incremented on every transition
    # A released call belongs to the process that claimed it until this lease runs out: only then
    # may another process (or a restart) conclude it was interrupted.
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    # How it must be reviewed (approvals.core.review.ReviewRule.to_json; "" = one reviewer, anyone),
    # kept from the policy at the request so later policy changes do not move the goalposts.
    review_json: str = ""
    # The approvals given so far (review.Vote, JSON); the call is approved once they meet the quorum.
    votes_json: str = ""
    # Arguments a reviewer changed before approving: released instead of `arguments_json`.
    edited_json: str | None = None
    edited_sha256: str | None = None
    edited_by: str | None = None
    escalated: int = 0  # escalation steps announced so far
    escalate_at: float | None = None  # when the next escalation step is due (None: no more steps)
    # The JSON fields parsed once, on first use, by whoever reads them first.
    _parsed: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments as received (the object release forwards)."""
        return self._json("arguments_json", self.arguments_json)  # type: ignore[no-any-return]

    @property
    def release_arguments(self) -> dict[str, Any]:
        """What release forwards: the reviewer's edit when there is one, else the call as received."""
        if self.edited_json is not None:
            return self._json("edited_json", self.edited_json)  # type: ignore[no-any-return]
        return self.arguments

    @property
    def release_sha256(self) -> str:
        """The hash of :attr:`release_arguments` (the arguments approvals are bound to)."""
        return self.edited_sha256 or self.args_sha256

    @property
    def tool_definition(self) -> dict[str, Any] | None:
        """The tool's definition as the upstream listed it at the request, or None if unknown."""
        return self._json("tool_json", self.tool_json) if self.tool_json else None

    @property
    def result(self) -> dict[str, Any] | None:
        """The kept outcome (a JSON-RPC response without its id), or None when none is kept."""
        return self._json("result_json", self.result_json) if self.result_json else None

    def _json(self, name: str, text: str) -> Any:
        if name not in self._parsed:
            self._parsed[name] = json.loads(text)
        return self._parsed[name]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One line of the append-only audit log."""

    seq: int
    at: float
    approval_id: str
    event: str  # "created", "approved", "denied", "released", ... or e.g. "viewed", "notify_failed"
    actor: str
    channel: str
    args_sha256: str
    detail: str | None
    # The hash chain (approvals.audit_chain): the hash of the event before this one, and this
    # event's own hash over that and its fields. Empty only on an event not yet written.
    prev_hash: str = ""
    hash: str = ""
    # The id of the HTTP request that caused it (X-Request-Id; approvals.request_context), the one
    # its log lines carry; None for what no request caused (expiry, start-up).
    request_id: str | None = None


# The note a store leaves on a record whose kept result it dropped after its keep window.
RESULT_DROPPED_NOTE = "result dropped after keep window"

# What a store keeps of an Approval, in declaration order (the parsing cache is not kept).
STORED_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Approval) if f.init)
APPROVAL_FIELDS: frozenset[str] = frozenset(STORED_FIELDS)

# Set by the store itself on every transition.
_STORE_MANAGED = frozenset({"id", "status", "version"})
# What was asked and by whom: a reviewer approved exactly these, so no transition may change them.
_REQUEST = frozenset(
    {"upstream", "tool", "arguments_json", "args_sha256", "grant", "owner", "created_at", "review_json"}
)
# Fields that say how the outcome was delivered, not what was decided: update_fields may touch them.
UPDATABLE_FIELDS: frozenset[str] = frozenset(
    {"note", "result_delivered", "result_json", "result_expires_at", "session_id"}
)


def check_transition(from_: Collection[Status], to: Status) -> None:
    """Raise ``ValueError`` unless every ``from_ → to`` pair is an allowed edge.

    An illegal pair is a programming error, refused before the store is touched; a legal pair that
    does not match the current state is the normal outcome of a race, reported by returning None.
    """
    if isinstance(from_, str):
        # A bare string is a Collection of its characters; "pending" would match nothing, silently.
        raise ValueError(f"from_ must be a collection of statuses, not the string {from_!r}")
    if not from_:
        raise ValueError("from_ must name at least one status")
    if to not in STATUSES:
        raise ValueError(f"unknown status {to!r}")
    for source in from_:
        if source not in STATUSES:
            raise ValueError(f"unknown status {source!r}")
        if to not in TRANSITIONS.get(source, frozenset()):
            raise ValueError(f"illegal transition {source} → {to}")


def check_transition_fields(fields: Mapping[str, object]) -> None:
    """Raise ``ValueError`` for a name that is not an Approval field a transition may set."""
    for name in fields:
        if name not in APPROVAL_FIELDS:
            raise ValueError(f"{name!r} is not a field of Approval")
        if name in _STORE_MANAGED or name in _REQUEST:
            raise ValueError(f"a transition may not set {name!r}")


def check_update_fields(fields: Mapping[str, object]) -> None:
    """Raise ``ValueError`` for a name that update_fields may not set (state lives in transitions)."""
    for name in fields:
        if name not in UPDATABLE_FIELDS:
            raise ValueError(f"update_fields may not set {name!r}; allowed: {sorted(UPDATABLE_FIELDS)}")


def canonical_json(value: object) -> str:
    """The one JSON text of ``value`` that hashes compare: sorted keys, no spaces, ASCII only.

    ASCII (``\\uXXXX`` escapes) so that any JSON value has one, even a string with a lone surrogate,
    which has no UTF-8 form and could otherwise be neither hashed nor stored.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(value: object) -> str:
    """The sha256 hex digest of :func:`canonical_json` of ``value``."""
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which strict UTF-8 cannot encode;
    # the encoding stays one-to-one, so two different values still hash differently.
    return hashlib.sha256(canonical_json(value).encode("utf-8", "surrogatepass")).hexdigest()


def new_approval_id() -> str:
    """A fresh, unguessable approval id (uuid4 hex)."""
    return uuid.uuid4().hex


# ---- what the proxy hands the core, and what it gets back -----------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A `tools/call` as the gate sees it: who asks, where, for what."""

    upstream: str
    grant: str
    session: str
    tool: str
    arguments: Mapping[str, object]


class Hold(Protocol):
    """A call waiting for a reviewer. The proxy keeps the client's request open on an SSE stream
    while it waits, for at most the configured hold time."""

    approval_id: str

    async def wait(self, timeout: float) -> JsonObject | None:
        """The call's outcome as a JSON-RPC response without its id (`result` or `error`), or None
        if it is not decided within `timeout` seconds."""
        ...

    def status(self, now: float) -> str:
        """One line for progress notifications: "Waiting for approval 7f3c… — expires in 9 min"."""
        ...

    def pending_result(self, now: float) -> JsonObject:
        """The tool result to answer with when the hold runs out before a decision."""
        ...

    def delivered(self) -> None:
        """The outcome reached the client; a kept result is not handed out again."""

    async def cancel(self, reason: str) -> None:
        """The client cancelled the request (or its session ended) while it was held."""

    def close(self) -> None:
        """The proxy is done with this hold (answered, or the client left): stop following."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The gate's answer: forward the call, answer the agent with `answer`, or `hold` it.

    `on_result` is told the upstream's final response (or a transport error in JSON-RPC form) of
    a forwarded call, so that counters can be rolled back when the upstream fails the call.
    """

    answer: JsonObject | None = None
    on_result: Callable[[JsonObject], Awaitable[None]] | None = None
    hold: Hold | None = None
    # Merged into a forwarded call's result `_meta` (a call a standing grant let through says so).
    meta: JsonObject | None = None


FORWARD = Admission()
