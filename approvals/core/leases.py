"""Whose release leases are still held: a process that stopped mid-call leaves a lease behind.

A release is leased to the process that sends it (its ``owner``: host, pid and a per-start token)
for the upstream's call timeout plus a grace. A lease that ran out means its owner stopped; on the
same host a gone process is known at once, without waiting for the lease.
"""

from __future__ import annotations

import os
import socket

__all__ = ["LIVE_OWNERS", "owner_gone"]

# The owners of the services running in this process: a lease of this pid whose owner is not
# among them is an earlier start's (a container's pid 1 restarted), so that owner is gone.
LIVE_OWNERS: set[str] = set()


def owner_gone(owner: str | None, me: str) -> bool:
    """Whether a lease's owner is a process of this host that no longer runs (or an earlier
    start of this one). An owner on another host is never judged gone: only its lease says so."""
    host, _, rest = (owner or "").partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit() or owner == me:
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in LIVE_OWNERS  # this pid: gone unless a service of this process runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False
