"""Jobs: the named changes and queries of the duties on the `jobs` table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, select, update

from jobqueue.core.states import JobStatus
from jobqueue.store.tables import jobs_table

if TYPE_CHECKING:
    from jobqueue.store.base import Store

J = JobStatus
_OPEN = [J.QUEUED.value, J.RUNNING.value]


def job_of_batch(store: Store, conn: Connection, batch: Row[Any]) -> Row[Any]:
    """The job a batch belongs to; there always is one (`batches.job_id` references it)."""
    job = store.get_job(conn, batch.job_id)
    if job is None:
        raise LookupError(f"batch {batch.id} belongs to job {batch.job_id}, which does not exist")
    return job


def start_if_queued(store: Store, conn: Connection, job_id: str, *, now: float) -> Row[Any] | None:
    """A batch of the job reached the remote: a queued job is `running` from now. Returns the
    job's row when this started it, else None."""
    job = store.get_job(conn, job_id)
    if job is None or job.status != J.QUEUED:
        return None
    return store.transition_job(conn, job_id, J.QUEUED, J.RUNNING, now=now)


def past_deadline(conn: Connection, now: float) -> list[str]:
    """Ids of the jobs still open whose deadline has passed."""
    j = jobs_table
    return list(
        conn.execute(
            select(j.c.id).where(
                j.c.status.in_(_OPEN), j.c.deadline_at.is_not(None), j.c.deadline_at <= now
            )
        )
        .scalars()
        .all()
    )


def mark_cancel_requested(conn: Connection, job_id: str, *, now: float) -> None:
    """The job's user asked for it to be cancelled."""
    j = jobs_table
    conn.execute(update(j).where(j.c.id == job_id).values(cancel_requested=True, updated_at=now))


def ended_before(conn: Connection, cutoff: float) -> list[str]:
    """Ids of the jobs that ended before `cutoff` and whose local files are not purged yet."""
    j = jobs_table
    return list(
        conn.execute(
            select(j.c.id).where(
                j.c.finished_at.is_not(None), j.c.finished_at < cutoff, j.c.purged_at.is_(None)
            )
        )
        .scalars()
        .all()
    )


def mark_purged(conn: Connection, job_id: str, *, now: float) -> None:
    """The job's local input and result files are deleted."""
    j = jobs_table
    conn.execute(update(j).where(j.c.id == job_id).values(purged_at=now))
