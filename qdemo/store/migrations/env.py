"""Alembic's entry point for qdemo's store. `qdemo.store.migrate` runs it with an open connection inside a
transaction that already holds the migration lock; there is no offline (SQL script) mode and no alembic.ini."""

from __future__ import annotations

from alembic import context


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError("qdemo's store migrates through qdemo.store.migrate.upgrade, which passes a connection")
    # The caller's transaction is the migration's: alembic sees it open and commits nothing itself.
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
