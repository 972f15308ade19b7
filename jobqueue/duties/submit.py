"""Submit: claim queued batches, upload their shard, create the remote batch, move to validating.

Idempotent across crashes: every remote batch carries `jobqueue_batch_id` in its metadata and
every uploaded file a name with the local batch id, so a batch found in `submitting` after a
crash is looked up remotely and adopted, or requeued when the remote never saw it. Never two
remote batches for one local batch.
"""

from __future__ import annotations

from pathlib import Path

from jobqueue.core.backoff import backoff
from jobqueue.core.problems import ProblemSource
from jobqueue.core.states import BatchStatus
from jobqueue.duties import problems
from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import adopt_remote
from jobqueue.duties.owners import dead_local_owners
from jobqueue.logs import get_logger
from jobqueue.remote.base import (
    NotFoundError,
    PermanentRemoteError,
    RemoteBatch,
    RemoteError,
    TransientRemoteError,
)
from jobqueue.store import Row, batches, jobs
from jobqueue.store.lifecycle import settle_job

log = get_logger("jobqueue.submit")

METADATA_KEY = "jobqueue_batch_id"
JOB_METADATA_KEY = "jobqueue_job_id"
# How far back (seconds) to look for a remote batch created while we were not looking: covers
# clock skew between us and the remote.
_CLOCK_SLACK = 600
_CLAIM_LIMIT = 16


def submit_once(ctx: DutyContext) -> int:
    moved = recover_submitting(ctx)
    for row in claim_batches(ctx):
        moved += submit_batch(ctx, row)
    return moved


def claim_batches(ctx: DutyContext) -> list[Row]:
    """Move due queued batches to `submitting` under our lease, within the token budget."""
    store, now = ctx.store, ctx.clock()
    limit = ctx.settings.enqueued_token_limit
    claimed: list[Row] = []
    with store.write() as conn:
        candidates = store.queued_candidates(conn, now, _CLAIM_LIMIT)
        if not candidates:
            return []
        open_tokens = store.open_tokens_by_model(conn) if limit else {}
        for row in candidates:
            if limit:
                in_flight = open_tokens.get(row.model, 0)
                # A batch bigger than the whole budget still goes alone, else it would never go.
                if in_flight and in_flight + row.estimated_tokens > limit:
                    continue
                open_tokens[row.model] = in_flight + row.estimated_tokens
            taken = batches.claim_queued(
                store, conn, row, owner=ctx.owner, now=now, lease_seconds=ctx.settings.lease_seconds
            )
            if taken is not None:
                claimed.append(taken)
    return claimed


def recover_submitting(ctx: DutyContext) -> int:
    """Batches left in `submitting` by a dead daemon: adopt their remote batch, or requeue."""
    store, now = ctx.store, ctx.clock()
    with store.read() as conn:
        dead = dead_local_owners(store.lease_owners(conn), ctx.owner)
        stale = store.stale_submitting(conn, now, dead)
    moved = 0
    for row in stale:
        with store.write() as conn:
            if not store.take_lease(
                conn, row.id, ctx.owner, now=now, seconds=ctx.settings.lease_seconds,
                status=BatchStatus.SUBMITTING, free_owners=dead,
            ):  # fmt: skip
                continue
        try:
            found = ctx.provider.find_batch_by_metadata(
                METADATA_KEY, row.id, created_after=int((row.submitting_at or now) - _CLOCK_SLACK)
            )
        except RemoteError as exc:
            log.debug("recovery lookup failed", batch_id=row.id, error=str(exc))
            problems.report(
                ctx, row.job_id, problems.problem_of(exc, "submit"), ProblemSource.SUBMIT,
                batch_id=row.id,
            )  # fmt: skip
            ctx.store.release_lease(row.id)
            continue
        if found is not None:
            log.info("adopting remote batch after restart", batch_id=row.id, remote_id=found.id)
            adopt_remote(ctx, row, found)
        else:
            log.info("requeueing batch the remote never saw", batch_id=row.id)
            _requeue(ctx, row, "recovered after a restart: the remote had no batch for it", 0.0)
        moved += 1
    return moved


def submit_batch(ctx: DutyContext, row: Row) -> int:
    store, provider, settings = ctx.store, ctx.provider, ctx.settings
    with store.read() as conn:
        job = jobs.job_of_batch(store, conn, row)
    bound = log.bind(job_id=row.job_id, batch_id=row.id)
    metadata = {
        **{str(k): str(v) for k, v in (job.user_metadata or {}).items()},
        METADATA_KEY: row.id,
        JOB_METADATA_KEY: row.job_id,
    }
    input_file_id = row.input_file_id
    try:
        if not input_file_id:
            uploaded = provider.upload_file(
                Path(row.input_path),
                f"jobqueue-{row.id}.jsonl",
                expires_after=int(settings.output_expires_after),
            )
            input_file_id = uploaded.id
            with store.write() as conn:
                batches.set_input_file(conn, row.id, input_file_id)
        remote = provider.create_batch(
            input_file_id=input_file_id,
            endpoint=job.endpoint,
            completion_window=job.completion_window,
            metadata=metadata,
            output_expires_after=int(settings.output_expires_after),
        )
    except TransientRemoteError as exc:
        if exc.maybe_created:
            return _after_ambiguous_create(ctx, row, exc)
        bound.debug("submission failed, will retry", error=str(exc))
        _requeue(ctx, row, str(exc), backoff(row.submit_attempts, base=5.0, cap=600.0))
        _report(ctx, row, exc)
        return 1
    except NotFoundError as exc:
        # The uploaded input file is gone (expired or deleted): upload it again next time.
        bound.warning("input file missing remotely, uploading again", error=str(exc))
        with store.write() as conn:
            batches.set_input_file(conn, row.id, None)
        _requeue(ctx, row, str(exc), 0.0)
        return 1
    except PermanentRemoteError as exc:
        if exc.status in (401, 403):
            # A key or permission problem is the operator's to fix; failing every batch of
            # every job for it would throw the work away.
            bound.debug("remote refused our credentials; batch stays queued", error=str(exc))
            _requeue(ctx, row, str(exc), backoff(row.submit_attempts, base=30.0, cap=900.0))
            _report(ctx, row, exc)
            return 1
        bound.error("remote refused the batch", error=str(exc))
        _fail(ctx, row, exc)
        _report(ctx, row, exc)
        return 1
    except OSError as exc:
        bound.error("cannot read the shard", error=str(exc))
        _fail(ctx, row, exc)
        return 1
    bound.info("submitted", remote_id=remote.id)
    adopt_remote(ctx, row, remote, input_file_id=input_file_id)
    return 1


def _after_ambiguous_create(ctx: DutyContext, row: Row, exc: RemoteError) -> int:
    """The create may have reached the remote: look for it before trying again."""
    try:
        found: RemoteBatch | None = ctx.provider.find_batch_by_metadata(
            METADATA_KEY, row.id, created_after=int(ctx.clock() - _CLOCK_SLACK)
        )
    except RemoteError:
        found = None
    if found is not None:
        adopt_remote(ctx, row, found)
        return 1
    _report(ctx, row, exc)
    # Not visible (yet): keep the batch in `submitting` with a short lease; recovery looks again
    # once it runs out, and only then requeues.
    with ctx.store.write() as conn:
        batches.mark_create_uncertain(conn, row.id, error=str(exc), lease_until=ctx.clock() + 30.0)
    return 1


def _report(ctx: DutyContext, row: Row, exc: RemoteError) -> None:
    """The job of `row` has a problem: its batch cannot be submitted (logged once)."""
    problem = problems.problem_of(exc, "submit")
    problems.report(ctx, row.job_id, problem, ProblemSource.SUBMIT, batch_id=row.id)


def _requeue(ctx: DutyContext, row: Row, error: str, delay: float) -> None:
    now = ctx.clock()
    with ctx.store.write() as conn:
        batches.requeue_submitting(ctx.store, conn, row.id, error=error, delay=delay, now=now)


def _fail(ctx: DutyContext, row: Row, exc: Exception) -> None:
    now = ctx.clock()
    code = getattr(exc, "code", None) or "submission_refused"
    with ctx.store.write() as conn:
        if batches.fail_submission(ctx.store, conn, row, code=code, error=str(exc), now=now):
            settle_job(ctx.store, conn, row.job_id, now=now)
