"""What an incoming OpenAI webhook asks of the store: the batch its remote id names."""

from __future__ import annotations

from sqlalchemy import Connection, Row, select

from jobqueue.store.tables import batches_table


def batch_by_remote_id(conn: Connection, remote_id: str) -> Row | None:
    """The local batch the remote knows as `remote_id`, or None."""
    return conn.execute(select(batches_table).where(batches_table.c.remote_id == remote_id)).first()
