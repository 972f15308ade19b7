"""Applying the job-level rules (`jobqueue.core.lifecycle`) in the database: cancelling a job,
and ending it once nothing is left to do.

A job ends once every request has its final outcome and every file it needs is stored; its event
is written in the transaction that ends it, never before.
"""

from __future__ import annotations

import time

from jobqueue.core.lifecycle import job_end_status
from jobqueue.core.problems import ProblemKind
from jobqueue.core.states import BATCH_TERMINAL, BatchStatus, JobStatus
from jobqueue.logs import get_logger
from jobqueue.store import Connection, Store
from jobqueue.store.batches import cancel_queued, request_remote_cancel
from jobqueue.store.costs import job_usage_data, release_holds
from jobqueue.store.jobs import mark_cancel_requested
from jobqueue.store.problems import problem_values_cleared
from jobqueue.store.requests import count_pending

log = get_logger("jobqueue.jobs")

B = BatchStatus
J = JobStatus


def request_cancel(store: Store, conn: Connection, job_id: str, now: float | None = None) -> int:
    """Mark a job cancelled by its user. Queued batches end at once; others wait for the daemon.

    Returns how many batches still need a remote cancel.
    """
    now = time.time() if now is None else now
    mark_cancel_requested(conn, job_id, now=now)
    remote = 0
    for batch in store.job_batches(conn, job_id):
        if batch.status == B.QUEUED:
            cancel_queued(
                store, conn, job_id, batch.id,
                reason="cancelled by user before submission", error_code="batch_cancelled",
                now=now, by_user=True,
            )  # fmt: skip
        elif batch.status not in BATCH_TERMINAL:
            request_remote_cancel(conn, batch.id, now)
            remote += 1
    settle_job(store, conn, job_id, now=now)
    return remote


def settle_job(
    store: Store, conn: Connection, job_id: str, now: float | None = None
) -> JobStatus | None:
    """End the job if nothing is left to do; return its new status, or None if it goes on."""
    now = time.time() if now is None else now
    job = store.get_job(conn, job_id)
    if job is None or job.status not in (J.QUEUED, J.RUNNING):
        return None
    if job.problem_kind == ProblemKind.BUDGET:
        release_holds(conn, job_id)  # a batch was collected: its usage may leave room now
    if store.unsettled_batches(conn, job_id):
        return None
    if count_pending(conn, job_id):
        # Every batch is done but some requests wait for a retry batch not yet made.
        return None
    batches = store.job_batches(conn, job_id)
    dest = job_end_status(
        cancel_requested=bool(job.cancel_requested),
        deadline_at=job.deadline_at,
        now=now,
        requests_succeeded=job.requests_succeeded,
        batch_statuses=(b.status for b in batches),
        requests_total=job.request_count,
    )
    values: dict[str, object] = problem_values_cleared()  # an ended job is not stuck
    if dest == J.FAILED and not job.error:
        values["error"] = next((b.last_error for b in batches if b.last_error), None)
    # Every batch is collected by now: the event carries the job's tokens and their cost.
    usage = job_usage_data(store, conn, job_id)
    if job.max_cost is not None:
        usage["max_cost"] = job.max_cost
    row = store.transition_job(conn, job_id, job.status, dest, values=values, data=usage, now=now)
    if row is None:
        return None
    log.info(
        "job ended", job_id=job_id, status=dest.value, requests=row.request_count,
        succeeded=row.requests_succeeded, failed=row.requests_failed, batches=len(batches),
        seconds=round(now - row.created_at, 1),
    )  # fmt: skip
    return dest
