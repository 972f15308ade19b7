"""Expire: job deadlines, overdue and stuck batches, and purging old local files.

The remote stays the source of truth for its own statuses: an overdue or stuck batch raises an
event (`batch.overdue`, `batch.stuck`) once, it is never moved by jobqueue's own clock.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Literal

from jobqueue.core.states import BATCH_REMOTE_OPEN, BATCH_TIME_COLUMN, BatchStatus
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.store import batches, jobs, outbox
from jobqueue.store.lifecycle import settle_job

log = get_logger("jobqueue.expire")
B = BatchStatus
# The slow statuses: a batch that sits in one longer than the configured `stuck_after` (a
# multiple of what the remote documents, e.g. cancelling up to ~10 minutes) counts as stuck.
_STUCK_COLUMNS = {s: BATCH_TIME_COLUMN[s] for s in (B.VALIDATING, B.FINALIZING, B.CANCELLING)}
_ORPHAN_STAGING_AGE = 3600.0


def expire_once(ctx: DutyContext) -> int:
    return enforce_deadlines(ctx) + report_overdue_and_stuck(ctx) + purge_old_files(ctx)


def enforce_deadlines(ctx: DutyContext) -> int:
    """Past its deadline a job starts nothing new: queued batches end, open ones are cancelled
    remotely, and the job ends `expired` with what it has once they are collected."""
    now = ctx.clock()
    with ctx.store.read() as conn:
        due = jobs.past_deadline(conn, now)
    moved = 0
    for job_id in due:
        with ctx.store.write() as conn:
            for batch in ctx.store.job_batches(conn, job_id):
                if batch.status == B.QUEUED:
                    if batches.cancel_queued(
                        ctx.store, conn, job_id, batch.id,
                        reason="job deadline passed", error_code="batch_expired", now=now,
                    ):  # fmt: skip
                        moved += 1
                elif batch.status in BATCH_REMOTE_OPEN and not batch.cancel_requested:
                    batches.request_remote_cancel(conn, batch.id, now)
                    moved += 1
            if settle_job(ctx.store, conn, job_id, now=now):
                moved += 1
        if moved:
            log.info("job deadline passed", job_id=job_id)
            ctx.wake("reconcile")
            ctx.wake("retry")
    return moved


def report_overdue_and_stuck(ctx: DutyContext) -> int:
    now, settings = ctx.clock(), ctx.settings
    with ctx.store.read() as conn:
        rows = batches.open_unreported(conn)
    raised = 0
    for row in rows:
        events: list[tuple[Literal["overdue", "stuck"], dict[str, Any]]] = []
        if (
            row.overdue_reported_at is None
            and row.expires_at is not None
            and now > row.expires_at + settings.overdue_grace
        ):
            events.append(("overdue", {"expires_at": row.expires_at, "status": row.status}))
        column = _STUCK_COLUMNS.get(row.status)
        entered = getattr(row, column) if column else None
        if (
            row.stuck_reported_at is None
            and entered is not None
            and now - entered > settings.stuck_after
        ):
            events.append(
                ("stuck", {"status": row.status, "since": entered, "seconds": round(now - entered)})
            )
        if not events:
            continue
        with ctx.store.write() as conn:
            for kind, data in events:
                if batches.report_once(conn, row, kind, data, now=now):
                    raised += 1
                    log.warning(f"batch {kind}", job_id=row.job_id, batch_id=row.id, **data)
    return raised


def purge_old_files(ctx: DutyContext) -> int:
    """Delete the local files of jobs that ended longer ago than the retention."""
    now = ctx.clock()
    cutoff = now - ctx.settings.result_retention
    with ctx.store.read() as conn:
        old = jobs.ended_before(conn, cutoff)
    for job_id in old:
        shutil.rmtree(ctx.job_dir(job_id), ignore_errors=True)
        with ctx.store.write() as conn:
            jobs.mark_purged(conn, job_id, now=now)
        log.info("purged local files", job_id=job_id)
    # Hook delivery attempts are an audit trail with the same retention.
    with ctx.store.write() as conn:
        outbox.purge_attempts(conn, cutoff)
    # Staging dirs of submissions that died before recording their job.
    jobs_dir = ctx.data_dir / "jobs"
    if jobs_dir.is_dir():
        for staging in jobs_dir.glob("*.staging"):
            try:
                if time.time() - staging.stat().st_mtime > _ORPHAN_STAGING_AGE:
                    shutil.rmtree(staging, ignore_errors=True)
            except OSError:
                pass
    return len(old)
