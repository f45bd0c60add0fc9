"""The id of the HTTP request the running code serves, in a context variable (no dependencies).

Set by the web side for each request (approvals.log_format.request_ids) and inherited by the tasks
it starts; read by the log formatter, and by the stores, which write it into each audit event the
request caused (`AuditEvent.request_id`), without importing the web side.
"""

from __future__ import annotations

import contextvars

__all__ = ["REQUEST_ID"]

# None outside any request (start-up, the expiry sweeper, another replica's change).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
