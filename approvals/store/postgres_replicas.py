"""Replicas and the sessions they own, on PostgreSQL (being built).

Migration 3 of approvals.store.postgres.MIGRATIONS.
"""

from __future__ import annotations

MIGRATION = "SELECT 1"  # replaced by the replicas' tables
