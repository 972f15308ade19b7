"""What the orphan sweep asks of the store: which local batches and jobs remote batches name,
and whether a remote file is still some local batch's input."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, select

from jobqueue.store.tables import batches_table, jobs_table


def local_batches(conn: Connection, batch_ids: Iterable[str]) -> dict[str, Row[Any]]:
    """The local batches with these ids (id, job, status, adopted remote id), by id."""
    ids = sorted(set(batch_ids))
    if not ids:
        return {}
    b = batches_table
    rows = conn.execute(
        select(b.c.id, b.c.job_id, b.c.status, b.c.remote_id).where(b.c.id.in_(ids))
    ).all()
    return {row.id: row for row in rows}


def known_jobs(conn: Connection, job_ids: Iterable[str]) -> set[str]:
    """Which of these job ids are jobs of this database."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    j = jobs_table
    return set(conn.execute(select(j.c.id).where(j.c.id.in_(ids))).scalars())


def input_file_in_use(conn: Connection, file_id: str) -> bool:
    """Whether a local batch records `file_id` as its uploaded input (a retry or a resubmission
    may share it with an orphan: then it is not the orphan's to delete)."""
    b = batches_table
    found = conn.execute(select(b.c.id).where(b.c.input_file_id == file_id).limit(1)).first()
    return found is not None
