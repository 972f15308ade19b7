"""Applying what the remote says about a batch: forward-only, through the state machine.

A stale or reordered observation (a late poll, a replayed webhook) never moves a batch back: the
edge is refused by the state machine, logged and counted. A batch that the remote failed for the
enqueued-token limit is not the user's failure: its requests go back to `queued` in a new local
batch, after a backoff.
"""

from __future__ import annotations

from typing import Any

from jobqueue.core.backoff import backoff
from jobqueue.core.costs import Usage, usage_data
from jobqueue.core.lifecycle import TOKEN_LIMIT_CODE
from jobqueue.core.problems import ProblemSource, remote_problem, token_limit_problem
from jobqueue.core.states import (
    BATCH_MACHINE,
    BATCH_TERMINAL,
    BATCH_TIME_COLUMN,
    BatchStatus,
    IllegalTransition,
)
from jobqueue.duties import problems
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.remote.base import RemoteBatch
from jobqueue.store import BatchChange, Connection, Row, batches, jobs
from jobqueue.store.batches import Lease
from jobqueue.store.lifecycle import request_cancel

log = get_logger("jobqueue.reconcile")

B = BatchStatus
_KNOWN = {s.value for s in BatchStatus}
# The token-limit backoff doubles from `token_limit_backoff` six times at most, and never
# passes six hours.
_TOKEN_LIMIT_DOUBLINGS = 6
_TOKEN_LIMIT_CAP = 6 * 3600.0


def observed_values(remote: RemoteBatch, row: Row, now: float) -> dict[str, Any]:
    """Columns to record from a remote batch object: counts, files, usage, errors, times."""
    values: dict[str, Any] = {
        "remote_total": remote.request_counts.total,
        "remote_completed": remote.request_counts.completed,
        "remote_failed": remote.request_counts.failed,
        "refreshed_at": now,
    }
    for name in ("output_file_id", "error_file_id"):
        if getattr(remote, name):
            values[name] = getattr(remote, name)
    if remote.usage:
        values["usage"] = remote.usage
    if remote.errors:
        values["errors"] = remote.errors
        values["last_error"] = describe_errors(remote.errors)[:4000]
    if remote.expires_at:
        values["expires_at"] = float(remote.expires_at)
    # Stamp every time the remote reports, including states a skipped edge jumped over.
    for column in BATCH_TIME_COLUMN.values():
        remote_time = getattr(remote, column, None)
        if remote_time and getattr(row, column, None) is None:
            values[column] = float(remote_time)
    return values


def describe_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        text = f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
        if err.get("line") is not None:
            text += f" (line {err['line']})"
        parts.append(text)
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts)


def error_code(errors: list[dict[str, Any]] | None) -> str | None:
    for err in errors or []:
        if err.get("code"):
            return str(err["code"])
    return None


def adopt_remote(
    ctx: DutyContext,
    row: Row,
    remote: RemoteBatch,
    *,
    lease: Lease,
    input_file_id: str | None = None,
) -> bool:
    """Record a remote batch created for a `submitting` batch we hold under `lease`, and start
    its job. False, and nothing written, when the lease was lost meanwhile."""
    now = ctx.clock()
    with ctx.store.write() as conn:
        values = observed_values(remote, row, now)
        values.update(
            remote_id=remote.id,
            input_file_id=input_file_id or remote.input_file_id or row.input_file_id,
            last_error=values.get("last_error"),
        )
        adopted = batches.mark_submitted(
            ctx.store,
            conn,
            lease,
            values,
            at=float(remote.created_at) if remote.created_at else None,
            now=now,
        )
        if adopted is None:
            return False
        started = jobs.start_if_queued(ctx.store, conn, row.job_id, now=now)
        problems.clear(ctx, conn, [row.job_id], ProblemSource.SUBMIT)
        if remote.status != B.VALIDATING:
            apply_observation(ctx, conn, adopted, remote)
    if started is not None:
        log.info(
            "job started", job_id=row.job_id, requests=started.request_count,
            endpoint=started.endpoint,
        )  # fmt: skip
    ctx.wake("reconcile")
    ctx.wake("webhooks")  # a webhook for it may have come before it was known
    return True


def observe(ctx: DutyContext, batch_id: str, remote: RemoteBatch) -> bool:
    """Apply one observation in its own transaction; True when the batch changed status."""
    with ctx.store.write() as conn:
        row = ctx.store.get_batch(conn, batch_id)
        if row is None:
            return False
        moved = apply_observation(ctx, conn, row, remote)
    if moved and remote.status in BATCH_TERMINAL:
        ctx.wake("collect")
        ctx.wake("submit")  # a slot in the enqueued-token budget may have opened
    return moved


def observe_many(
    ctx: DutyContext, observations: list[tuple[Row, RemoteBatch]], chunk: int = 500
) -> int:
    """Apply observations `chunk` batches a transaction; return how many changed status.

    One commit (one fsync) per chunk, not per batch, and a few statements per chunk, not a
    few per batch: each chunk's rows are read again with one query, the status changes among
    them applied together (`apply_observations`), and what changed of the others recorded
    with one statement per set of columns.
    """
    moved = 0
    ended = False
    for start in range(0, len(observations), chunk):
        part = observations[start : start + chunk]
        with ctx.store.write() as conn:
            fresh = ctx.store.get_batches(conn, [row.id for row, _ in part])
            pairs = [(fresh[row.id], remote) for row, remote in part if row.id in fresh]
            for _row, remote in apply_observations(ctx, conn, pairs):
                moved += 1
                ended = ended or remote.status in BATCH_TERMINAL
    if ended:
        ctx.wake("collect")
        ctx.wake("submit")
    return moved


def apply_observations(
    ctx: DutyContext, conn: Connection, pairs: list[tuple[Row, RemoteBatch]]
) -> list[tuple[Row, RemoteBatch]]:
    """`apply_observation` for many batches (each row as just read in this transaction):
    the plain status changes go through the store's grouped compare-and-set; a token-limit
    refusal, an unknown or an illegal edge, and a batch seen twice take the one-by-one path.
    The pairs whose batch changed status, in order."""
    now = ctx.clock()
    changes: list[BatchChange] = []
    changing: list[tuple[Row, RemoteBatch]] = []
    observed: list[tuple[str, dict[str, Any]]] = []
    one_by_one: list[tuple[Row, RemoteBatch]] = []
    seen: set[str] = set()
    for row, remote in pairs:
        dest = remote.status
        if row.id in seen or dest not in _KNOWN:
            one_by_one.append((row, remote))
            continue
        seen.add(row.id)
        values = observed_values(remote, row, now)
        if dest == row.status:
            changed = _changed(row, values)
            if changed:
                observed.append((row.id, {**changed, "refreshed_at": now}))
            continue
        if (dest == B.FAILED and error_code(remote.errors) == TOKEN_LIMIT_CODE) or not (
            BATCH_MACHINE.is_legal(row.status, dest)
        ):
            one_by_one.append((row, remote))
            continue
        at = getattr(remote, BATCH_TIME_COLUMN.get(BatchStatus(dest), ""), None)
        changes.append(
            BatchChange(
                row.id,
                row.status,
                dest,
                values=values,
                at=float(at) if at else None,
                data=remote_usage_data(ctx, row, remote) if dest in BATCH_TERMINAL else None,
            )
        )
        changing.append((row, remote))
    batches.record_observed_many(conn, observed)
    out: list[tuple[Row, RemoteBatch]] = []
    moved = ctx.store.transition_batches(conn, changes, now=now) if changes else []
    for (row, remote), new in zip(changing, moved, strict=True):
        if new is not None:
            _moved(ctx, conn, row, remote)
            out.append((row, remote))
    for row, remote in one_by_one:
        current = ctx.store.get_batch(conn, row.id) if row.id in seen else row
        if current is not None and apply_observation(ctx, conn, current, remote):
            out.append((row, remote))
    return out


def _changed(row: Row, values: dict[str, Any]) -> dict[str, Any]:
    """The observed values that differ from the row's, `refreshed_at` left out."""
    changed = {k: v for k, v in values.items() if getattr(row, k, None) != v}
    changed.pop("refreshed_at", None)
    return changed


def apply_observation(ctx: DutyContext, conn: Connection, row: Row, remote: RemoteBatch) -> bool:
    now = ctx.clock()
    values = observed_values(remote, row, now)
    dest = remote.status
    if dest not in _KNOWN or dest == row.status:
        changed = _changed(row, values)
        # Nothing new (the common case for a long-running batch): write nothing, so a cycle
        # over thousands of open batches costs reads, not commits.
        if changed:
            batches.record_observed(conn, row.id, {**changed, "refreshed_at": now})
        if dest not in _KNOWN:
            log.warning("unknown remote status", batch_id=row.id, status=dest)
        return False
    if dest == B.FAILED and error_code(remote.errors) == TOKEN_LIMIT_CODE:
        return _requeue_for_token_limit(ctx, conn, row, values, now)
    at = getattr(remote, BATCH_TIME_COLUMN.get(BatchStatus(dest), ""), None)
    try:
        moved = ctx.store.transition_batch(
            conn, row.id, row.status, dest, values=values, at=float(at) if at else None,
            now=now, data=remote_usage_data(ctx, row, remote) if dest in BATCH_TERMINAL else None,
        )  # fmt: skip
    except IllegalTransition:
        ctx.count("refused_transitions")
        return False
    if moved is None:
        return False
    _moved(ctx, conn, row, remote)
    return True


def _moved(ctx: DutyContext, conn: Connection, row: Row, remote: RemoteBatch) -> None:
    """What follows a batch moving to the remote's status: the log line, and the problem of
    a batch the remote failed."""
    dest = remote.status
    log.info(
        "batch status", job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id,
        source=row.status, dest=dest,
    )  # fmt: skip
    if dest == B.FAILED and remote.errors:
        # The remote refused what it was given (a model it does not know, a bad line): the
        # job goes on with its other batches, but shows why this one failed.
        problem = remote_problem(
            status=None, code=error_code(remote.errors), message=describe_errors(remote.errors),
            transient=False, action="run a batch",
        )  # fmt: skip
        problems.report(ctx, row.job_id, problem, ProblemSource.SUBMIT, conn, batch_id=row.id)


def remote_usage_data(ctx: DutyContext, row: Row, remote: RemoteBatch) -> dict[str, Any]:
    """The usage part of a terminal batch event: when it ends, only the remote batch object's
    own `usage` is known (the responses' are summed when it is collected, and the job's end
    event carries those), so the event has that and what it costs."""
    found = Usage.of_remote(remote.usage)
    by_model = {row.model: found} if found is not None else {}
    return usage_data(ctx.prices, by_model, "remote")


def _requeue_for_token_limit(
    ctx: DutyContext, conn: Connection, row: Row, values: dict[str, Any], now: float
) -> bool:
    """The remote refused the batch for the enqueued-token limit: fail this remote batch, and
    queue its requests again in a new local batch (same shard, same uploaded file) after a
    growing backoff. It costs no attempt: the requests never ran."""
    delay = token_limit_delay(ctx.settings.token_limit_backoff, row.token_limit_refusals)
    try:
        requeued = batches.requeue_after_token_limit(
            ctx.store, conn, row, values, delay=delay, now=now
        )
    except IllegalTransition:
        ctx.count("refused_transitions")
        return False
    if requeued is None:
        return False
    log.info(
        "enqueued token limit reached; batch requeued", job_id=row.job_id, batch_id=row.id,
        requeued_as=requeued, retry_in_seconds=round(delay, 1),
    )  # fmt: skip
    problems.report(
        ctx, row.job_id, token_limit_problem(delay), ProblemSource.SUBMIT, conn, batch_id=row.id
    )
    job = ctx.store.get_job(conn, row.job_id)
    if job is not None and job.cancel_requested:
        request_cancel(ctx.store, conn, row.job_id, now=now)
    return True


def token_limit_delay(base: float, refusals: int) -> float:
    """Seconds before a shard refused `refusals` times already (0 the first time) goes again:
    `base` doubled per earlier refusal, no jitter (the refusals are the remote's own pace)."""
    return backoff(
        refusals + 1,
        base=base,
        cap=min(_TOKEN_LIMIT_CAP, base * 2**_TOKEN_LIMIT_DOUBLINGS),
        jitter=False,
    )
