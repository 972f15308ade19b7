"""What an incoming OpenAI webhook asks of the store: the batch its remote id names."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, Row, select

from jobqueue.store.tables import batches_table


def batch_by_remote_id(conn: Connection, remote_id: str) -> Row | None:
    """The local batch the remote knows as `remote_id`, or None."""
    return conn.execute(select(batches_table).where(batches_table.c.remote_id == remote_id)).first()


def batches_by_remote_ids(conn: Connection, remote_ids: Iterable[str]) -> dict[str, Row]:
    """The local batches the remote knows by these ids, by remote id (unknown ids are absent)."""
    ids = sorted(set(remote_ids))
    if not ids:
        return {}
    b = batches_table
    return {row.remote_id: row for row in conn.execute(select(b).where(b.c.remote_id.in_(ids)))}
