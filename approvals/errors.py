"""The gateway's exception tree. Every error the package raises on purpose is one of these.

    ApprovalsError
    ├── ConfigError        config file or policy invalid; carries every issue with its path
    ├── ProtocolError      a client sent something MCP / JSON-RPC does not allow; carries the
    │   │                  JSON-RPC error code and the HTTP status to answer with
    │   ├── EnvelopeError  (approvals.jsonrpc) not one well-formed JSON-RPC message
    │   └── JsonInputError (approvals.jsonrpc) JSON past the gateway's bounds (depth, numbers)
    ├── UpstreamError      the upstream MCP server could not be reached, died or answered badly
    │   ├── HttpError      (approvals.proxy.http1) also a ConnectionError
    │   └── TooLarge       (approvals.proxy.sse) an answer or event past max_body_bytes
    ├── PolicyError        (approvals.policy) a policy file is invalid; carries every issue
    ├── StoreError         the database failed; nothing was decided or released (the SQLite
    │                      thread's own ThreadClosedError is an sqlite3 error it is made from)
    ├── SlackRequestError  (approvals.channels.slack_requests) a request Slack did not sign, or junk
    ├── SlackCallFailed    (approvals.channels.slack_api) a Slack Web API call failed for good
    ├── ReviewError        (approvals.review_client) the CLI's call to a gateway failed
    └── DecisionRefused    a reviewer's decision that cannot be taken; carries a kind (unknown,
                           own agent, not a reviewer, already decided, expired), never a status

Errors are turned into HTTP responses and JSON-RPC errors in one place,
`approvals.proxy.handlers`; the CLI turns `ConfigError` into its printed list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from approvals.core.model import Approval


class ApprovalsError(Exception):
    """Root of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a config or policy file: where it is and what is expected there."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ApprovalsError):
    """The configuration is invalid. `issues` lists every problem found, not just the first."""

    def __init__(self, source: str, issues: Iterable[Issue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{source}: {len(self.issues)} error(s)\n{lines}")


class ProtocolError(ApprovalsError):
    """A request breaks the MCP / JSON-RPC rules. Answered with `code` at HTTP `status`."""

    def __init__(
        self, code: int, message: str, *, status: int = 400, request_id: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id  # the request's own id, when it could be read


class UpstreamError(ApprovalsError):
    """The upstream MCP server is unreachable, died, or broke the protocol."""


class StoreError(ApprovalsError):
    """The backing database failed or is unusable; the operation did not happen."""


RefusalKind = Literal[
    "unknown",
    "own_agent",
    "not_reviewer",
    "already_decided",
    "expired",
    "not_eligible",  # outside the groups that may decide this call (approvals.core.review)
    "step_up",  # the rule accepts decisions only through other channels (e.g. the inbox)
    "already_voted",  # this reviewer's approval is counted already; the quorum needs another
    "edit_refused",  # the rule forbids editing, or the edit is not valid for the tool
    "remember_refused",  # the rule forbids standing grants, or the grant asked for is not valid
    "changed",  # the arguments were edited since the reviewer looked (they approve what they saw)
]


class DecisionRefused(ApprovalsError):
    """A decision that cannot be taken, and why (`kind`); `approval` is the record as it stands.

    Each edge maps the kind to its own answer in one place: the API to an HTTP status, Slack to
    an ephemeral message, the CLI to its exit code."""

    def __init__(self, kind: RefusalKind, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.approval = approval
