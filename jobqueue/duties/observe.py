"""Applying what the remote says about a batch: forward-only, through the state machine.

A stale or reordered observation (a late poll, a replayed webhook) never moves a batch back: the
edge is refused by the state machine, logged and counted. A batch that the remote failed for the
enqueued-token limit is not the user's failure: its requests go back to `queued` in a new local
batch, after a backoff.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, Row, update

from jobqueue.core.ids import new_id
from jobqueue.core.states import BATCH_TERMINAL, BATCH_TIME_COLUMN, BatchStatus, IllegalTransition
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.remote.base import RemoteBatch
from jobqueue.store import requests_of_batch
from jobqueue.store.tables import batches_table, requests_table

log = get_logger("jobqueue.reconcile")

TOKEN_LIMIT_CODE = "token_limit_exceeded"
_KNOWN = {s.value for s in BatchStatus}
_TERMINAL = {s.value for s in BATCH_TERMINAL}


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
    ctx: DutyContext, row: Row, remote: RemoteBatch, *, input_file_id: str | None = None
) -> None:
    """Record a remote batch created for a `submitting` batch, and start its job."""
    now = ctx.clock()
    with ctx.store.write() as conn:
        values = observed_values(remote, row, now)
        values.update(
            remote_id=remote.id,
            input_file_id=input_file_id or remote.input_file_id or row.input_file_id,
            lease_owner=None,
            lease_until=None,
            last_error=values.get("last_error"),
        )
        adopted = ctx.store.transition_batch(
            conn,
            row.id,
            "submitting",
            "validating",
            values=values,
            at=float(remote.created_at) if remote.created_at else None,
            now=now,
        )
        if adopted is None:
            return
        job = ctx.store.get_job(conn, row.job_id)
        if job is not None and job.status == "queued":
            ctx.store.transition_job(conn, row.job_id, "queued", "running", now=now)
        if remote.status != "validating":
            apply_observation(ctx, conn, adopted, remote)
    ctx.wake("reconcile")


def observe(ctx: DutyContext, batch_id: str, remote: RemoteBatch) -> bool:
    """Apply one observation in its own transaction; True when the batch changed status."""
    with ctx.store.write() as conn:
        row = ctx.store.get_batch(conn, batch_id)
        if row is None:
            return False
        moved = apply_observation(ctx, conn, row, remote)
    if moved and remote.status in _TERMINAL:
        ctx.wake("collect")
        ctx.wake("submit")  # a slot in the enqueued-token budget may have opened
    return moved


def observe_many(
    ctx: DutyContext, observations: list[tuple[Row, RemoteBatch]], chunk: int = 200
) -> int:
    """Apply observations `chunk` batches a transaction; return how many changed status.

    One commit (one fsync) per chunk, not per batch: a cycle over ten thousand open batches
    would otherwise spend its time committing `refreshed_at` one row at a time.
    """
    moved = 0
    ended = False
    for start in range(0, len(observations), chunk):
        with ctx.store.write() as conn:
            for row, remote in observations[start : start + chunk]:
                fresh = ctx.store.get_batch(conn, row.id)
                if fresh is not None and apply_observation(ctx, conn, fresh, remote):
                    moved += 1
                    ended = ended or remote.status in _TERMINAL
    if ended:
        ctx.wake("collect")
        ctx.wake("submit")
    return moved


def apply_observation(ctx: DutyContext, conn: Connection, row: Row, remote: RemoteBatch) -> bool:
    now = ctx.clock()
    values = observed_values(remote, row, now)
    dest = remote.status
    if dest not in _KNOWN or dest == row.status:
        changed = {k: v for k, v in values.items() if getattr(row, k, None) != v}
        changed.pop("refreshed_at", None)
        # Nothing new (the common case for a long-running batch): write nothing, so a cycle
        # over thousands of open batches costs reads, not commits.
        if changed:
            ctx.store.update_batch(conn, row.id, **changed, refreshed_at=now)
        if dest not in _KNOWN:
            log.warning("unknown remote status", batch_id=row.id, status=dest)
        return False
    if dest == "failed" and error_code(remote.errors) == TOKEN_LIMIT_CODE:
        return _requeue_for_token_limit(ctx, conn, row, values, now)
    at = getattr(remote, BATCH_TIME_COLUMN.get(BatchStatus(dest), ""), None)
    try:
        moved = ctx.store.transition_batch(
            conn, row.id, row.status, dest, values=values, at=float(at) if at else None, now=now
        )
    except IllegalTransition:
        ctx.count("refused_transitions")
        return False
    if moved is None:
        return False
    log.info(
        "batch status", job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id,
        source=row.status, dest=dest,
    )  # fmt: skip
    return True


def _requeue_for_token_limit(
    ctx: DutyContext, conn: Connection, row: Row, values: dict[str, Any], now: float
) -> bool:
    """The remote refused the batch for the enqueued-token limit: fail this remote batch, and
    queue its requests again in a new local batch (same shard, same uploaded file) after a
    growing backoff. It costs no attempt: the requests never ran."""
    try:
        failed = ctx.store.transition_batch(
            conn, row.id, row.status, "failed",
            values={**values, "collected_at": now}, now=now,
            data={"reason": TOKEN_LIMIT_CODE},
        )  # fmt: skip
    except IllegalTransition:
        ctx.count("refused_transitions")
        return False
    if failed is None:
        return False
    job = ctx.store.get_job(conn, row.job_id)
    requeues = _token_limit_refusals(row.last_error)
    delay = min(ctx.settings.token_limit_backoff * (2 ** min(requeues, 6)), 6 * 3600)
    new_id_ = new_id("batch")
    cancelled = bool(job is not None and job.cancel_requested)
    new_row = {
        "id": new_id_,
        "job_id": row.job_id,
        "number": ctx.store.next_batch_number(conn, row.job_id),
        "status": "queued",
        "shard_index": row.shard_index,
        "attempt": row.attempt,
        "model": row.model,
        "input_path": row.input_path,
        "request_count": row.request_count,
        "bytes": row.bytes,
        "estimated_tokens": row.estimated_tokens,
        "input_file_id": row.input_file_id,
        "not_before": now + delay,
        "last_error": f"{TOKEN_LIMIT_CODE} x{requeues + 1}",
        "created_at": now,
        "updated_at": now,
    }
    conn.execute(batches_table.insert().values(**new_row))
    conn.execute(
        update(requests_table)
        .where(*requests_of_batch(row.job_id, row.id))
        .values(batch_number=new_row["number"])
    )
    ctx.store.add_event(
        conn, "batch.queued", job_id=row.job_id, batch_id=new_id_, to_status="queued",
        data={"requeued_from": row.id, "reason": TOKEN_LIMIT_CODE,
              "retry_in_seconds": round(delay, 1), "attempt": row.attempt,
              "request_counts": {"total": row.request_count, "completed": 0, "failed": 0}},
        now=now,
    )  # fmt: skip
    log.warning(
        "enqueued token limit reached; batch requeued", job_id=row.job_id, batch_id=row.id,
        requeued_as=new_id_, retry_in_seconds=round(delay, 1),
    )  # fmt: skip
    if cancelled:
        from jobqueue.store.lifecycle import request_cancel

        request_cancel(ctx.store, conn, row.job_id, now=now)
    return True


def _token_limit_refusals(last_error: str | None) -> int:
    """How many times this shard was already refused for the token limit (0 the first time)."""
    found = re.search(rf"{TOKEN_LIMIT_CODE} x(\d+)", last_error or "")
    return int(found.group(1)) if found else 0
