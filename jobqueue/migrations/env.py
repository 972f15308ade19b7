"""Alembic environment: run against the connection jobqueue hands over, or the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from jobqueue.models import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    import os

    from jobqueue.migrations import migration_connection
    from jobqueue.store import Store

    url = os.environ.get("JOBQUEUE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    store = Store(url or "", migrate=False)
    try:
        with migration_connection(store) as conn:
            _run(conn)
    finally:
        store.close()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
