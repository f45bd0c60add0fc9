"""What the three stores share for review workflows (quorum steps, escalation, standing grants) —
pure, no I/O.

- :func:`check_step`: a ``pending → pending`` step (a vote short of the quorum, an edit, an
  escalation) is only ever made conditional on the record's version, so two steps taken at once
  never overwrite each other; one asked for without a version is a programming error.
- the row form of :class:`~approvals.core.standing.StandingGrant` (its columns, in declaration
  order; ``grant`` is ``grant_name`` because GRANT is reserved in PostgreSQL);
- :func:`check_new_standing`: what a new grant must look like before any store takes it;
- the ``detail`` of the "granted", "used" and "revoked" audit events, the same in every store.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

from approvals.core.model import Status, canonical_json
from approvals.core.standing import ID_PREFIX, StandingGrant, constraints_from_json

__all__ = [
    "STANDING_COLUMN",
    "STANDING_FIELDS",
    "STANDING_REAL_FIELDS",
    "STANDING_SELECT",
    "check_new_standing",
    "check_step",
    "granted_detail",
    "revoked_detail",
    "standing_from_values",
    "used_detail",
]

STANDING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StandingGrant) if f.init)
STANDING_COLUMN: Mapping[str, str] = {
    name: "grant_name" if name == "grant" else name for name in STANDING_FIELDS
}
STANDING_SELECT = ", ".join(STANDING_COLUMN[name] for name in STANDING_FIELDS)
# SQLite hands a whole-number REAL back from UPDATE … RETURNING as an int: made floats on the way out.
STANDING_REAL_FIELDS = frozenset({"created_at", "expires_at", "revoked_at"})


def check_step(from_: Collection[Status], to: Status, version: int | None) -> None:
    """Raise ``ValueError`` for a ``pending → pending`` step asked for without ``version``."""
    if to == "pending" and "pending" in from_ and version is None:
        raise ValueError("a pending → pending step must give version= (so no step overwrites another)")


def check_new_standing(grant: StandingGrant) -> None:
    """Raise ``ValueError`` unless ``grant`` is a well-formed new grant (unused, not revoked)."""
    if not grant.id.startswith(ID_PREFIX) or len(grant.id) <= len(ID_PREFIX):
        raise ValueError(f"a standing grant's id starts with {ID_PREFIX!r}, not {grant.id!r}")
    if grant.effect not in ("allow", "deny"):
        raise ValueError(f"a standing grant's effect is allow or deny, not {grant.effect!r}")
    if grant.uses != 0 or grant.revoked_at is not None or grant.revoked_by is not None:
        raise ValueError("a new standing grant must be unused and not revoked")
    if grant.max_uses is not None and grant.max_uses < 1:
        raise ValueError(f"max_uses must be at least 1 (or None), not {grant.max_uses}")
    if not grant.expires_at > grant.created_at:
        raise ValueError("a standing grant must expire after it is created")
    constraints_from_json(grant.constraints_json)  # raises ValueError: what is stored must read back


def standing_from_values(values: dict[str, Any]) -> StandingGrant:
    """A grant from its column values by field name (types as a database hands them back)."""
    for name in STANDING_REAL_FIELDS:
        if values[name] is not None:
            values[name] = float(values[name])
    return StandingGrant(**values)


def granted_detail(grant: StandingGrant) -> str:
    """The "granted" event's detail: what the grant allows (or denies), until when, how often."""
    return canonical_json(
        {
            "effect": grant.effect,
            "upstream": grant.upstream,
            "tool": grant.tool,
            "grant": grant.grant,
            "constraints": json.loads(grant.constraints_json),
            "expires_at": grant.expires_at,
            "max_uses": grant.max_uses,
            "source_approval": grant.source_approval,
        }
    )


def used_detail(grant: StandingGrant) -> str:
    """The "used" event's detail: which use this was (the grant as it is after it)."""
    return canonical_json({"uses": grant.uses, "max_uses": grant.max_uses})


def revoked_detail(grant: StandingGrant) -> str:
    """The "revoked" event's detail: how many uses it had had."""
    return canonical_json({"uses": grant.uses, "max_uses": grant.max_uses})
