"""The one secret of a gateway's replicas, from which every signing key is derived.

It signs the inbox's cookies and login links, and the `requestState` the gateway hands to
2026-07-28 clients (each use derives its own key from it, so one never serves for another).
``APPROVALS_SESSION_SECRET`` wins. Without it, replicas sharing a database (a store URL) keep one in
the database, made by whichever starts first — or a cookie or a request state made by one replica
would be refused by the next; one process on SQLite keeps a random key (None here), as before.
"""

from __future__ import annotations

import secrets
from typing import Protocol, runtime_checkable

from approvals.config import Settings
from approvals.errors import StoreError

__all__ = ["SharedSecretStore", "gateway_secret"]


@runtime_checkable
class SharedSecretStore(Protocol):
    """A store shared by replicas that keeps the gateway's secret for all of them."""

    async def shared_session_secret(self, proposed: str) -> str:
        """The key in the store, first storing ``proposed`` when there is none (one key for all)."""
        ...


async def gateway_secret(settings: Settings, store: object) -> str | None:
    """The replicas' shared secret; None when this one process may use a random key of its own."""
    if settings.inbox.session_secret is not None or settings.store.url is None:
        return settings.inbox.session_secret
    if not isinstance(store, SharedSecretStore):
        # Failing closed rather than starting with a key no other replica knows.
        raise StoreError(
            "this store cannot keep the gateway's secret for every replica; set APPROVALS_SESSION_SECRET"
        )
    return await store.shared_session_secret(secrets.token_urlsafe(48))
