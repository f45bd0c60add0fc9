"""The store a config names, opened by a command that reads it while the gateway may be running
(`approvals audit`, `approvals policy replay`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from approvals.config import Settings
from approvals.errors import StoreError
from approvals.store.postgres import PostgresStore
from approvals.store.sqlite import SqliteStore

__all__ = ["existing_store"]


@asynccontextmanager
async def existing_store(settings: Settings, what: str) -> AsyncIterator[SqliteStore | PostgresStore]:
    """The store the config names, opened for a command to read (the gateway need not run).

    A missing SQLite file is a StoreError ("no {what} at PATH"), not a new, empty store made by
    the reading.
    """
    store: SqliteStore | PostgresStore
    if settings.store.url is not None:
        store = await PostgresStore.open(settings.store.url, max_connections=2)
    else:
        path = settings.store.path
        if not path.is_file():
            raise StoreError(f"no {what} at {path}: the gateway creates it on its first start")
        store = await SqliteStore.open(path)
    try:
        yield store
    finally:
        await store.close()
