"""Alembic environment: run against the connection jobqueue hands over, or the configured URL."""

from __future__ import annotations

from sqlalchemy import Connection

from alembic import context
from jobqueue.store.tables import metadata

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
    # Run by the `alembic` command itself (development): a plain engine, no jobqueue store.
    import os

    from sqlalchemy import create_engine

    url = os.environ.get("JOBQUEUE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url or "")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # A table rebuild drops a referenced table: no foreign keys for this connection.
                conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
