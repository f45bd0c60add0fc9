"""Rows of the PostgreSQL store and the records they hold: the approvals columns (in
:class:`~approvals.core.model.Approval`'s field order; ``grant`` is ``grant_name``, GRANT being
reserved) and the audit columns. Shared by :mod:`approvals.store.postgres` and
:mod:`approvals.store.postgres_review`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from approvals.core.model import STATUSES, STORED_FIELDS, Approval, AuditEvent
from approvals.errors import StoreError

__all__ = ["AUDIT_COLUMNS", "COLUMN", "SELECT", "approval_of_row", "audit_event_of_row"]

COLUMN: Mapping[str, str] = {name: "grant_name" if name == "grant" else name for name in STORED_FIELDS}
SELECT = ", ".join(COLUMN[name] for name in STORED_FIELDS)
AUDIT_COLUMNS = (
    "seq, at, approval_id, event, actor, channel, args_sha256, detail, prev_hash, hash, request_id"
)


def approval_of_row(row: Any) -> Approval:
    """The record of a row selected with :data:`SELECT`."""
    values = {name: row[COLUMN[name]] for name in STORED_FIELDS}
    if values["status"] not in STATUSES:
        # Failing closed: a state this code does not know is never acted on.
        raise StoreError(f"approval {values['id']!r} has unknown status {values['status']!r}")
    return Approval(**values)


def audit_event_of_row(row: Any) -> AuditEvent:
    """The event of a row selected with :data:`AUDIT_COLUMNS`."""
    return AuditEvent(
        int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]), str(row[6]), row[7],
        prev_hash=str(row[8]), hash=str(row[9]), request_id=row[10],
    )  # fmt: skip
