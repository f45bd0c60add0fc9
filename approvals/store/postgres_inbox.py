"""The inbox's shared state on PostgreSQL: used one-time login links and ended sessions.

Kept in the database so that every replica refuses a login link used on another one, and a logout
on one replica ends the session on all of them.
"""

from __future__ import annotations

# Migration 2 of approvals.store.postgres.MIGRATIONS.
MIGRATION = """
    CREATE TABLE used_login_links (
        nonce      TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE ended_inbox_sessions (
        session_id TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    );
"""
