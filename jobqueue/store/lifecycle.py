"""Job-level rules shared by the embedded API, the CLI and the daemon's duties.

A job ends once every request has its final outcome and every file it needs is stored; its event
is written in the transaction that ends it, never before.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, func, select, update

from jobqueue.core.states import BATCH_TERMINAL, BatchStatus, JobStatus
from jobqueue.store import Store, job_number_of, requests_of_batch
from jobqueue.store.tables import batches_table, jobs_table, requests_table

B = BatchStatus
J = JobStatus
_TERMINAL = [s.value for s in BATCH_TERMINAL]


def fail_pending_requests(conn: Connection, job_id: str, batch_id: str, error_code: str) -> int:
    """Give every still-pending request of a batch a final `error_code` failure; count them."""
    result = conn.execute(
        update(requests_table)
        .where(*requests_of_batch(job_id, batch_id), requests_table.c.outcome.is_(None))
        .values(outcome="failed", error_code=error_code)
    )
    failed = result.rowcount or 0
    if failed:
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id)
            .values(requests_failed=jobs_table.c.requests_failed + failed)
        )
    return failed


def request_cancel(store: Store, conn: Connection, job_id: str, now: float | None = None) -> int:
    """Mark a job cancelled by its user. Queued batches end at once; others wait for the daemon.

    Returns how many batches still need a remote cancel.
    """
    now = time.time() if now is None else now
    conn.execute(
        update(jobs_table)
        .where(jobs_table.c.id == job_id)
        .values(cancel_requested=True, updated_at=now)
    )
    remote = 0
    for batch in store.job_batches(conn, job_id):
        if batch.status == B.QUEUED:
            ended = store.transition_batch(
                conn,
                batch.id,
                B.QUEUED,
                B.CANCELLED,
                values={"collected_at": now, "cancel_requested": True},
                data={"reason": "cancelled by user before submission"},
                now=now,
            )
            if ended is not None:
                fail_pending_requests(conn, job_id, batch.id, "batch_cancelled")
        elif batch.status not in _TERMINAL:
            conn.execute(
                update(batches_table)
                .where(batches_table.c.id == batch.id)
                .values(cancel_requested=True, updated_at=now)
            )
            remote += 1
    settle_job(store, conn, job_id, now=now)
    return remote


def settle_job(store: Store, conn: Connection, job_id: str, now: float | None = None) -> str | None:
    """End the job if nothing is left to do; return its new status, or None if it goes on."""
    now = time.time() if now is None else now
    job = store.get_job(conn, job_id)
    if job is None or job.status not in (J.QUEUED, J.RUNNING):
        return None
    if store.unsettled_batches(conn, job_id):
        return None
    pending = conn.execute(
        select(func.count())
        .select_from(requests_table)
        .where(
            requests_table.c.job_number == job_number_of(job_id),
            requests_table.c.outcome.is_(None),
        )
    ).scalar_one()
    if pending:
        # Every batch is done but some requests wait for a retry batch not yet made.
        return None
    values = {}
    if job.cancel_requested:
        dest = J.CANCELLED
    elif job.deadline_at is not None and now >= job.deadline_at:
        dest = J.EXPIRED
    elif (
        job.requests_succeeded == 0
        and (batches := store.job_batches(conn, job_id))
        and all(b.status == B.FAILED for b in batches)
    ):
        # Nothing ran: every batch failed (validation, or refused at submission).
        dest = J.FAILED
        if not job.error:
            values["error"] = next((b.last_error for b in batches if b.last_error), None)
    else:
        dest = J.COMPLETED
    row = store.transition_job(conn, job_id, job.status, dest, values=values, now=now)
    return dest if row is not None else None
