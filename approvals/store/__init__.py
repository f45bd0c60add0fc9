"""The store adapters: where the core's durable ports (:mod:`approvals.core.ports`) live.

:class:`approvals.store.sqlite.SqliteStore` is one embedded SQLite file (the default); every method
is one round trip or one transaction, values are frozen records (:mod:`approvals.core.model`), and
nothing relies on SQLite-only behaviour (writes are upserts and conditional updates: ``UPDATE …
WHERE status IN (…) RETURNING``), so a PostgreSQL adapter can follow. Failures raise
:class:`approvals.errors.StoreError`: callers fail closed, a store error never releases a call.
"""
