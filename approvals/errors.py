"""The gateway's exception tree. Every error the package raises on purpose is one of these.

    ApprovalsError
    ├── ConfigError        config file or policy invalid; carries every issue with its path
    ├── ProtocolError      a client sent something MCP / JSON-RPC does not allow; carries the
    │                      JSON-RPC error code and the HTTP status to answer with
    ├── UpstreamError      the upstream MCP server could not be reached, died or answered badly
    ├── PolicyError        (approvals.policy) a policy file is invalid; carries every issue
    └── StoreError         (approvals.store) the database failed; nothing was decided or released

Errors are turned into HTTP responses and JSON-RPC errors in one place,
`approvals.proxy.handlers`; the CLI turns `ConfigError` into its printed list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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

    def __init__(self, code: int, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class UpstreamError(ApprovalsError):
    """The upstream MCP server is unreachable, died, or broke the protocol."""
