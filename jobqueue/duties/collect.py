"""Collect: for batches that ended, stream their output and error files to the data dir and
record every request's outcome and tokens (summed on the batch, compared with the remote's own
usage); then the job may end.

Downloads go to a `.part` file, are size-checked and renamed only when whole (the provider does
that), so a half file is never taken for a whole one; a cut-short download is retried.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobqueue.core import memory
from jobqueue.core.lifecycle import batch_may_retry, missing_result_code
from jobqueue.core.states import BatchStatus
from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import error_code
from jobqueue.duties.owners import live_owners
from jobqueue.logs import get_logger
from jobqueue.remote.base import NotFoundError, RemoteError
from jobqueue.store import Row, batches, jobs
from jobqueue.store.batches import Lease
from jobqueue.store.lifecycle import settle_job
from jobqueue.store.results import record_outcomes
from jobqueue.store.usage import record_batch_tokens, usage_mismatch

log = get_logger("jobqueue.collect")
_CLAIM_LIMIT = 8


def collect_once(ctx: DutyContext) -> int:
    """Collect the batches that ended, a few at a time.

    Downloads run one batch ahead, in a helper thread: batch k+1's files stream to disk while
    batch k's outcomes are recorded (the download is mostly waiting on the network and the
    disk, the recording on the CPU and the database), so a round takes about the longer of the
    two instead of their sum. The write transaction is never held across a download.
    """
    if not ctx.may_claim():
        return 0
    now = ctx.clock()
    with ctx.store.read() as conn:
        rows = ctx.store.collectable(conn, now, _CLAIM_LIMIT)
        live = live_owners(ctx, conn, now) if rows else frozenset()
    moved = 0
    ahead: tuple[Row, Lease, Future[_Fetched]] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect-download") as pool:
        for row in rows:
            if not ctx.may_claim():
                break
            with ctx.store.write() as conn:
                lease = ctx.store.take_lease(
                    conn, row.id, ctx.owner, now=now, seconds=ctx.settings.lease_seconds,
                    status=row.status, live_owners=live,
                )  # fmt: skip
            if lease is None:
                continue
            fetching = pool.submit(fetch_results, ctx, row)
            if ahead is not None:
                moved += _record(ctx, ahead[0], ahead[1], ahead[2].result())
                memory.trim()
            ahead = (row, lease, fetching)
        if ahead is not None:
            moved += _record(ctx, ahead[0], ahead[1], ahead[2].result())
            memory.trim()
    if moved:
        ctx.wake("retry")
    return moved


def result_path(ctx: DutyContext, row: Row, kind: str) -> Path:
    return ctx.job_dir(row.job_id) / "results" / f"{row.id}.{kind}.jsonl"


@dataclass(slots=True)
class _Fetched:
    files: list[tuple[str, Path]]
    missing_code: str
    downloaded: int  # bytes
    failed: bool = False  # a download failed: release the batch for a later try


def fetch_results(ctx: DutyContext, row: Row) -> _Fetched:
    """Download the batch's output and error files (those not on disk yet). Touches neither the
    database nor `ctx.stats`, so it may run in another thread."""
    bound = log.bind(job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id)
    files: list[tuple[str, Path]] = []
    missing_code = missing_result_code(row.status, error_code(row.errors))
    downloaded = 0
    for kind, file_id in (("output", row.output_file_id), ("error", row.error_file_id)):
        if not file_id:
            continue
        dest = result_path(ctx, row, kind)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                downloaded += ctx.provider.download_file(file_id, dest)
            files.append((kind, dest))
        except NotFoundError as exc:
            # Gone remotely (output_expires_after passed): what it held is lost; the requests
            # count as unreported and are retried if they may be.
            bound.error("result file gone remotely", kind=kind, file_id=file_id, error=str(exc))
            missing_code = "missing_result"
        except (RemoteError, OSError) as exc:
            bound.warning("download failed, will retry", kind=kind, error=str(exc))
            return _Fetched(files, missing_code, downloaded, failed=True)
    return _Fetched(files, missing_code, downloaded)


def _record(ctx: DutyContext, row: Row, lease: Lease, fetched: _Fetched) -> int:
    """Record the outcomes of a batch whose files are on disk, in one write transaction, if
    we still hold it under `lease`."""
    if fetched.downloaded:
        ctx.count("collected_bytes", fetched.downloaded)
    bound = log.bind(job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id)
    if fetched.failed:
        if not ctx.store.release_lease(lease):
            _lost(ctx, bound)
        return 0
    files, missing_code = fetched.files, fetched.missing_code
    stored = dict(files)
    now = ctx.clock()
    with ctx.store.write(bulk=True) as conn:
        # Fenced, and first: nothing is recorded unless the batch is still ours (on
        # PostgreSQL its row stays locked from here to the commit).
        if not batches.mark_collected(
            conn,
            lease,
            output_path=str(stored["output"]) if "output" in stored else None,
            error_path=str(stored["error"]) if "error" in stored else None,
            now=now,
        ):
            return _lost(ctx, bound)
        job = jobs.job_of_batch(ctx.store, conn, row)
        can_retry = batch_may_retry(
            attempt=row.attempt,
            max_attempts=job.max_attempts,
            cancel_requested=bool(job.cancel_requested),
            deadline_at=job.deadline_at,
            now=now,
        )
        recorded = record_outcomes(
            ctx.store,
            conn,
            job_number=job.number,
            batch_number=row.number,
            files=files,
            can_retry=can_retry,
            missing_code=missing_code,
            # Only a retry batch holds requests that have an outcome already.
            replace=row.attempt > 1,
        )
        counts = recorded.counts
        record_batch_tokens(conn, row.id, recorded.tokens)
        ctx.store.add_job_counts(conn, row.job_id, counts["succeeded"], counts["failed"])
        settle_job(ctx.store, conn, row.job_id, now=now)
    bound.info("collected", status=row.status, **counts, **recorded.tokens)
    if row.status == BatchStatus.COMPLETED and not recorded.missing:
        # The remote's own sums cover the requests that ran: comparable when all of them did.
        mismatch = usage_mismatch(recorded.tokens, row.usage)
        if mismatch:
            bound.warning(
                "usage differs from the remote batch's",
                **{
                    k: {"responses": mine, "remote": theirs}
                    for k, (mine, theirs) in mismatch.items()
                },
            )
    return 1


def _lost(ctx: DutyContext, bound: Any) -> int:
    """Our lease on the batch was lost (another daemon collects it, or did): leave it."""
    ctx.count("lost_leases")
    bound.warning("lease lost; leaving the batch to its new holder")
    return 0
