"""Submit: claim a queued batch, upload its shard, create the remote batch, move to validating.

Idempotent across crashes: every remote batch carries `jobqueue_batch_id` in its metadata and
every uploaded file a name with the local batch id, so a batch found in `submitting` after a
crash is looked up remotely and adopted, or requeued when the remote never saw it.

Fenced against other daemons: batches are claimed one at a time, just before they are worked
on, each claim drawing a new lease token. Every write the holder makes carries its lease
(`jobqueue.store.batches.Lease`) and changes nothing once the lease was lost; the duty then
stops working on that batch. Right before each call that creates something remotely (the
upload, the create) the holder renews its lease to outlive the longest the call can take
(`provider.max_call_seconds`), and starts the call only if that renewal held. A lease is taken
over only once it has run out and its holder is not a live daemon (`recover_submitting`), so
no daemon recovers a batch while another's create may still take effect.

Overlapped: up to `submit_concurrency` claimed batches are uploaded and created at once, each in
a thread of its own under its own lease, as above. The claims themselves stay one at a time in
the duty's own thread (`claim_next`, the one place a batch is claimed), so the token budget of
each claim counts every batch in flight (claimed batches are `submitting`, which it counts).
"""

from __future__ import annotations

from collections.abc import Collection
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from jobqueue.core.backoff import backoff
from jobqueue.core.problems import ProblemSource
from jobqueue.core.states import BatchStatus
from jobqueue.duties import budget, problems
from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import adopt_remote
from jobqueue.duties.owners import live_owners
from jobqueue.logs import get_logger
from jobqueue.remote.base import (
    NotFoundError,
    PermanentRemoteError,
    RemoteBatch,
    RemoteError,
    TransientRemoteError,
)
from jobqueue.store import Row, batches, coordination, jobs
from jobqueue.store.batches import Lease
from jobqueue.store.lifecycle import settle_job

log = get_logger("jobqueue.submit")

METADATA_KEY = "jobqueue_batch_id"
JOB_METADATA_KEY = "jobqueue_job_id"
# How far back (seconds) to look for a remote batch created while we were not looking: covers
# clock skew between us and the remote.
_CLOCK_SLACK = 600
# Batches claimed (one at a time) in one run of the duty.
_CLAIM_LIMIT = 16
# A lease renewed before a create outlives the call's bound by this much (clock skew).
_CALL_MARGIN = 10.0
# After a create that may have happened, recovery looks for the remote batch this much later.
_UNCERTAIN_LEASE = 30.0


def submit_once(ctx: DutyContext) -> int:
    moved = recover_submitting(ctx)
    worked: set[str] = set()  # each batch once a run (a requeued one waits for the next)
    width = max(1, int(ctx.settings.submit_concurrency))
    if width == 1:
        for _ in range(_CLAIM_LIMIT):
            claimed = claim_next(ctx, skip=worked)
            if claimed is None:
                break
            worked.add(claimed[0].id)
            moved += submit_batch(ctx, *claimed)
        return moved
    return moved + _submit_overlapped(ctx, worked, width)


def _submit_overlapped(ctx: DutyContext, worked: set[str], width: int) -> int:
    """Up to `width` batches uploaded and created at once, each by `submit_batch` under its own
    lease in a thread of its own. The claims stay here, one at a time, each just before its
    batch's work starts: a claim moves the batch to `submitting`, so the token budget of the
    next claim counts every batch in flight. A failure of one batch (the database, say) stops
    the claims; those in flight finish, then it is raised."""
    moved = 0
    running: set[Future[int]] = set()
    failure: BaseException | None = None

    def settle(done: Collection[Future[int]]) -> None:
        nonlocal moved, failure
        for future in done:
            try:
                moved += future.result()
            except BaseException as exc:  # raised once every submission in flight is done
                if failure is None:
                    failure = exc
                else:
                    log.warning("submission failed", error=repr(exc))

    with ThreadPoolExecutor(width, thread_name_prefix="jobqueue-submit") as pool:
        try:
            claims = 0
            while claims < _CLAIM_LIMIT and failure is None:
                if len(running) >= width:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    settle(done)
                    continue
                claimed = claim_next(ctx, skip=worked)
                if claimed is None:
                    break
                worked.add(claimed[0].id)
                claims += 1
                running.add(pool.submit(submit_batch, ctx, *claimed))
        finally:
            settle(wait(running).done)
    if failure is not None:
        raise failure
    return moved


def claim_next(ctx: DutyContext, skip: Collection[str] = ()) -> tuple[Row, Lease] | None:
    """Move the next due queued batch that fits the token budget (and is not in `skip`) to
    `submitting` under our lease: the batch and its lease, or None when there is none (or we
    may not claim now)."""
    if not ctx.may_claim():
        return None
    store, now = ctx.store, ctx.clock()
    limited = ctx.settings.enqueued_token_limit is not None
    with store.write() as conn:
        if limited:
            coordination.serialize_claims(conn)  # the budget holds across daemons too
        candidates = [
            row
            for row in store.queued_candidates(conn, now, _CLAIM_LIMIT + len(skip))
            if row.id not in skip
        ]
        if not candidates:
            return None
        open_tokens = store.open_tokens_by_model(conn) if limited else {}
        for row in candidates:
            limit = ctx.settings.token_limit_for(row.model)
            if limit:
                in_flight = open_tokens.get(row.model, 0)
                # A batch bigger than the whole budget still goes alone, else it would never go.
                if in_flight and in_flight + row.estimated_tokens > limit:
                    continue
            if not budget.allows(ctx, conn, row):  # the job's max_cost, see duties.budget
                continue
            taken = batches.claim_queued(
                store, conn, row, owner=ctx.owner, now=now, lease_seconds=ctx.settings.lease_seconds
            )
            if taken is not None:
                return taken, Lease.of(taken)
    return None


def recover_submitting(ctx: DutyContext) -> int:
    """Batches left in `submitting` by a daemon that is gone (their lease ran out and their
    holder is not alive; or ours ran out): adopt their remote batch, or requeue them."""
    if not ctx.may_claim():
        return 0
    store, now, lease_seconds = ctx.store, ctx.clock(), ctx.settings.lease_seconds
    with store.read() as conn:
        live = live_owners(ctx, conn, now)
        stale = store.stale_submitting(conn, now, ctx.owner, live)
    moved = 0
    for row in stale:
        with store.write() as conn:
            lease = store.take_lease(
                conn, row.id, ctx.owner, now=now, seconds=lease_seconds,
                status=BatchStatus.SUBMITTING, live_owners=live,
            )  # fmt: skip
        if lease is None:
            continue
        log.info("recovering batch", batch_id=row.id, previous_owner=row.lease_owner)
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
            if not ctx.store.release_lease(lease):
                _lost(ctx, lease, "releasing it after a failed lookup")
            continue
        if found is not None:
            log.info("adopting remote batch after restart", batch_id=row.id, remote_id=found.id)
            done = adopt_remote(ctx, row, found, lease=lease)
        else:
            log.info("requeueing batch the remote never saw", batch_id=row.id)
            done = _requeue(ctx, lease, "recovered: the remote had no batch for it", 0.0)
        if done:
            moved += 1
        else:
            _lost(ctx, lease, "recovering it")
    return moved


def _renew_for_call(ctx: DutyContext, lease: Lease) -> Lease | None:
    """Renew `lease` right before a remote call that creates something, to outlive the longest
    that call can take (and `lease_seconds`); the renewed lease, or None when it was lost or
    would not outlive the call (the call must not start)."""
    # (A provider of the embedding program's that predates the attribute has no bound.)
    bound = float(getattr(ctx.provider, "max_call_seconds", 0.0))
    now = ctx.clock()
    until = now + max(ctx.settings.lease_seconds, bound + _CALL_MARGIN)
    with ctx.store.write() as conn:
        renewed = batches.renew_lease(conn, lease, until=until)
    if renewed is None or ctx.clock() + bound >= renewed.until:
        return None
    return renewed


def submit_batch(ctx: DutyContext, row: Row, lease: Lease) -> int:
    """Upload the batch's shard (unless uploaded before) and create its remote batch, under
    `lease`. Returns 1 when the batch moved on, 0 when the lease was lost on the way."""
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
            renewed = _renew_for_call(ctx, lease)
            if renewed is None:
                return _lost(ctx, lease, "before the upload")
            lease = renewed
            uploaded = provider.upload_file(
                Path(row.input_path),
                f"jobqueue-{row.id}.jsonl",
                expires_after=int(settings.output_expires_after),
            )
            input_file_id = uploaded.id
            with store.write() as conn:
                if not batches.set_input_file(conn, lease, input_file_id):
                    return _lost(ctx, lease, "recording the uploaded file", file_id=input_file_id)
        renewed = _renew_for_call(ctx, lease)
        if renewed is None:
            return _lost(ctx, lease, "before the create")
        lease = renewed
        remote = provider.create_batch(
            input_file_id=input_file_id,
            endpoint=job.endpoint,
            completion_window=job.completion_window,
            metadata=metadata,
            output_expires_after=int(settings.output_expires_after),
        )
    except TransientRemoteError as exc:
        if exc.maybe_created:
            return _after_ambiguous_create(ctx, row, lease, exc)
        bound.debug("submission failed, will retry", error=str(exc))
        delay = backoff(row.submit_attempts, base=5.0, cap=600.0)
        if not _requeue(ctx, lease, str(exc), delay):
            return _lost(ctx, lease, "requeueing it")
        _report(ctx, row, exc)
        return 1
    except NotFoundError as exc:
        # The uploaded input file is gone (expired or deleted): upload it again next time.
        bound.warning("input file missing remotely, uploading again", error=str(exc))
        with store.write() as conn:
            if not batches.set_input_file(conn, lease, None):
                return _lost(ctx, lease, "forgetting the missing file")
        return 1 if _requeue(ctx, lease, str(exc), 0.0) else _lost(ctx, lease, "requeueing it")
    except PermanentRemoteError as exc:
        if exc.status in (401, 403):
            # A key or permission problem is the operator's to fix; failing every batch of
            # every job for it would throw the work away.
            bound.debug("remote refused our credentials; batch stays queued", error=str(exc))
            delay = backoff(row.submit_attempts, base=30.0, cap=900.0)
            if not _requeue(ctx, lease, str(exc), delay):
                return _lost(ctx, lease, "requeueing it")
            _report(ctx, row, exc)
            return 1
        bound.error("remote refused the batch", error=str(exc))
        if not _fail(ctx, row, lease, exc):
            return _lost(ctx, lease, "failing it")
        _report(ctx, row, exc)
        return 1
    except OSError as exc:
        bound.error("cannot read the shard", error=str(exc))
        return 1 if _fail(ctx, row, lease, exc) else _lost(ctx, lease, "failing it")
    bound.info("submitted", remote_id=remote.id)
    if not adopt_remote(ctx, row, remote, lease=lease, input_file_id=input_file_id):
        return _lost(ctx, lease, "adopting its remote batch", remote_id=remote.id)
    return 1


def _after_ambiguous_create(ctx: DutyContext, row: Row, lease: Lease, exc: RemoteError) -> int:
    """The create may have reached the remote: look for it before trying again."""
    try:
        found: RemoteBatch | None = ctx.provider.find_batch_by_metadata(
            METADATA_KEY, row.id, created_after=int(ctx.clock() - _CLOCK_SLACK)
        )
    except RemoteError:
        found = None
    if found is not None:
        if not adopt_remote(ctx, row, found, lease=lease):
            return _lost(ctx, lease, "adopting its remote batch", remote_id=found.id)
        return 1
    _report(ctx, row, exc)
    # Not visible (yet): keep the batch in `submitting` with a short lease; recovery looks again
    # once it runs out, and only then requeues.
    with ctx.store.write() as conn:
        kept = batches.mark_create_uncertain(
            conn, lease, error=str(exc), lease_until=ctx.clock() + _UNCERTAIN_LEASE
        )
    return 1 if kept else _lost(ctx, lease, "after an uncertain create")


def _report(ctx: DutyContext, row: Row, exc: RemoteError) -> None:
    """The job of `row` has a problem: its batch cannot be submitted (logged once)."""
    problem = problems.problem_of(exc, "submit")
    problems.report(ctx, row.job_id, problem, ProblemSource.SUBMIT, batch_id=row.id)


def _lost(ctx: DutyContext, lease: Lease, step: str, **fields: object) -> int:
    """The lease on a batch was lost (taken over, or given back): stop working on it."""
    ctx.count("lost_leases")
    log.warning(
        "lease lost; leaving the batch to its new holder", batch_id=lease.batch_id, step=step,
        **fields,
    )  # fmt: skip
    return 0


def _requeue(ctx: DutyContext, lease: Lease, error: str, delay: float) -> bool:
    now = ctx.clock()
    with ctx.store.write() as conn:
        requeued = batches.requeue_submitting(
            ctx.store, conn, lease, error=error, delay=delay, now=now
        )
    return requeued is not None


def _fail(ctx: DutyContext, row: Row, lease: Lease, exc: Exception) -> bool:
    now = ctx.clock()
    code = getattr(exc, "code", None) or "submission_refused"
    with ctx.store.write() as conn:
        if not batches.fail_submission(
            ctx.store, conn, row, lease, code=code, error=str(exc), now=now
        ):
            return False
        settle_job(ctx.store, conn, row.job_id, now=now)
    return True
