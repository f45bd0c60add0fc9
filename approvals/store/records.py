"""What the store keeps about an approval, and the rules of its life cycle — pure values, no I/O.

::

    pending ──▶ approved ──▶ released ──▶ completed | failed
       │  ▲         │
       │  └─────────┤  (tool definition changed upstream: back for a new look)
       │            └──▶ expired   (lapsed while waiting for a rate-limit window)
       ├──▶ denied
       ├──▶ expired
       └──▶ cancelled

Every backend refuses any other move with :func:`check_transition`, so the edges are written once,
here. Denied, expired, cancelled, completed and failed are final: no edge leaves them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

__all__ = [
    "FINAL",
    "STATUSES",
    "TRANSITIONS",
    "Approval",
    "AuditEvent",
    "Status",
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
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    "pending": frozenset({"approved", "denied", "expired", "cancelled"}),
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


APPROVAL_FIELDS: frozenset[str] = frozenset(field.name for field in dataclasses.fields(Approval))

# Set by the store itself on every transition.
_STORE_MANAGED = frozenset({"id", "status", "version"})
# What was asked and by whom: a reviewer approved exactly these, so no transition may change them.
_REQUEST = frozenset({"upstream", "tool", "arguments_json", "args_sha256", "grant", "owner", "created_at"})
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
