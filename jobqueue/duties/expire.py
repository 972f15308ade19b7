"""Expire: job deadlines, overdue and stuck batches, and purging old local files.

The remote stays the source of truth for its own statuses: an overdue or stuck batch raises an
event (`batch.overdue`, `batch.stuck`) once, it is never moved by jobqueue's own clock.
"""

from __future__ import annotations

import shutil
import time

from sqlalchemy import select, update

from jobqueue.core.states import BATCH_REMOTE_OPEN
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.store import outbox
from jobqueue.store.lifecycle import fail_pending_requests, settle_job
from jobqueue.store.tables import batches_table, jobs_table

log = get_logger("jobqueue.expire")
# How long a batch may sit in each slow status before it counts as stuck: a multiple of what
# the remote documents (cancelling up to ~10 minutes), or the configured `stuck_after`.
_STUCK_COLUMNS = {
    "validating": "validating_at",
    "finalizing": "finalizing_at",
    "cancelling": "cancelling_at",
}
_ORPHAN_STAGING_AGE = 3600.0


def expire_once(ctx: DutyContext) -> int:
    return enforce_deadlines(ctx) + report_overdue_and_stuck(ctx) + purge_old_files(ctx)


def enforce_deadlines(ctx: DutyContext) -> int:
    """Past its deadline a job starts nothing new: queued batches end, open ones are cancelled
    remotely, and the job ends `expired` with what it has once they are collected."""
    now = ctx.clock()
    j = jobs_table
    with ctx.store.read() as conn:
        due = (
            conn.execute(
                select(j.c.id).where(
                    j.c.status.in_(["queued", "running"]),
                    j.c.deadline_at.is_not(None),
                    j.c.deadline_at <= now,
                )
            )
            .scalars()
            .all()
        )
    moved = 0
    for job_id in due:
        with ctx.store.write() as conn:
            for batch in ctx.store.job_batches(conn, job_id):
                if batch.status == "queued":
                    ended = ctx.store.transition_batch(
                        conn, batch.id, "queued", "cancelled",
                        values={"collected_at": now}, data={"reason": "job deadline passed"},
                        now=now,
                    )  # fmt: skip
                    if ended is not None:
                        fail_pending_requests(conn, job_id, batch.id, "batch_expired")
                        moved += 1
                elif batch.status in BATCH_REMOTE_OPEN and not batch.cancel_requested:
                    ctx.store.update_batch(conn, batch.id, cancel_requested=True, updated_at=now)
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
    b = batches_table
    with ctx.store.read() as conn:
        rows = conn.execute(
            select(b).where(
                b.c.status.in_(list(BATCH_REMOTE_OPEN)),
                (b.c.overdue_reported_at.is_(None)) | (b.c.stuck_reported_at.is_(None)),
            )
        ).all()
    raised = 0
    for row in rows:
        events: list[tuple[str, dict]] = []
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
                result = conn.execute(
                    update(b)
                    .where(b.c.id == row.id, getattr(b.c, f"{kind}_reported_at").is_(None))
                    .values(**{f"{kind}_reported_at": now})
                )
                if result.rowcount:
                    ctx.store.add_event(
                        conn, f"batch.{kind}", job_id=row.job_id, batch_id=row.id,
                        from_status=row.status, to_status=row.status,
                        data={"remote_id": row.remote_id, **data}, now=now,
                    )  # fmt: skip
                    raised += 1
                    log.warning(f"batch {kind}", job_id=row.job_id, batch_id=row.id, **data)
    return raised


def purge_old_files(ctx: DutyContext) -> int:
    """Delete the local files of jobs that ended longer ago than the retention."""
    now = ctx.clock()
    j = jobs_table
    cutoff = now - ctx.settings.result_retention
    with ctx.store.read() as conn:
        old = (
            conn.execute(
                select(j.c.id).where(
                    j.c.finished_at.is_not(None), j.c.finished_at < cutoff, j.c.purged_at.is_(None)
                )
            )
            .scalars()
            .all()
        )
    for job_id in old:
        shutil.rmtree(ctx.job_dir(job_id), ignore_errors=True)
        with ctx.store.write() as conn:
            conn.execute(update(j).where(j.c.id == job_id).values(purged_at=now))
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
