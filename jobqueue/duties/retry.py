"""Retry: requests whose outcome is retryable (expired, cancelled by someone other than the user,
5xx or 429 answers, unreported) go into new batches of the same job, up to its `max_attempts`,
never past its deadline. Requests that may not be retried get their last error as final.

Retry shards are cut from the previous shards' lines (the bodies never enter the database),
grouped by model and packed up to the job's batch limits, so twenty expired batches with a few
leftovers each become one new batch, not twenty.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from jobqueue.core import memory
from jobqueue.core.ids import new_id
from jobqueue.core.lifecycle import job_may_retry
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.store import Connection, Row, batches, requests
from jobqueue.store.lifecycle import settle_job

log = get_logger("jobqueue.retry")


def retry_once(ctx: DutyContext) -> int:
    with ctx.store.read() as conn:
        job_ids = ctx.store.jobs_with_requests_to_retry(conn)
    moved = 0
    for job_id in job_ids:
        moved += retry_job(ctx, job_id)
        memory.trim()
    if moved:
        ctx.wake("submit")
    return moved


def retry_job(ctx: DutyContext, job_id: str) -> int:
    """Resubmit the job's retryable requests, a group of source batches at a time so memory
    stays bounded by the batch size; requests that may not be retried get a final outcome."""
    now = ctx.clock()
    with ctx.store.read() as conn:
        job = ctx.store.get_job(conn, job_id)
    if job is None:
        return 0
    may_retry = job_may_retry(
        cancel_requested=bool(job.cancel_requested), deadline_at=job.deadline_at, now=now
    )
    finalised = _finalise(ctx, job, retry_allowed=may_retry)
    made = retried = 0
    if may_retry:
        with ctx.store.read() as conn:
            pending = requests.pending_by_batch(conn, job_id)
        for group in _groups(pending, job.max_batch_requests):
            with ctx.store.read() as conn:
                rows = requests.pending_in_batches(conn, job_id, group)
            if not rows:
                continue
            shards = _write_retry_shards(ctx, job, rows)
            try:
                with ctx.store.write() as conn:
                    made += _record_retry_batches(conn, job, shards, now)
            except BaseException:
                for shard in shards:
                    Path(shard["path"]).unlink(missing_ok=True)
                raise
            retried += len(rows)
    if not made:
        with ctx.store.write() as conn:
            settle_job(ctx.store, conn, job_id, now=now)
    if made or finalised:
        log.info(
            "retrying requests", job_id=job_id, requests=retried, batches=made,
            final_failures=finalised,
        )  # fmt: skip
    return int(bool(made or finalised))


def _groups(pending: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Source batches packed greedily into groups of at most `limit` pending requests."""
    groups: list[list[str]] = []
    size = limit + 1
    for batch_id, n in pending:
        if size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(batch_id)
        size += n
    return groups


def _finalise(ctx: DutyContext, job: Row, *, retry_allowed: bool) -> int:
    """Pending requests of collected batches that may not be retried (attempts used up, or no
    retry allowed at all): their last recorded error becomes their final outcome."""
    with ctx.store.write() as conn:
        return requests.fail_exhausted(
            conn, job.id, job.number, max_attempts=job.max_attempts if retry_allowed else None
        )


def _write_retry_shards(ctx: DutyContext, job: Row, rows: list[Row]) -> list[dict[str, Any]]:
    """Copy the lines of `rows` from their previous shards into new shard files."""
    retry_dir = ctx.job_dir(job.id) / "input"
    retry_dir.mkdir(parents=True, exist_ok=True)
    by_source: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_source[row.input_path][row.custom_id] = row
    shards: list[dict[str, Any]] = []
    open_by_model: dict[str | None, dict[str, Any]] = {}

    def start(model: str | None, attempt: int) -> dict[str, Any]:
        shard_id = new_id("batch")
        path = retry_dir / f"retry-{shard_id}.jsonl"
        shard = {
            "id": shard_id, "path": path, "file": path.open("wb"), "model": model,
            "attempt": attempt, "requests": [], "bytes": 0, "tokens": 0,
        }  # fmt: skip
        shards.append(shard)
        open_by_model[model] = shard
        return shard

    try:
        for source, wanted in by_source.items():
            with open(source, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    custom_id = orjson.loads(line).get("custom_id")
                    request = wanted.get(custom_id)
                    if request is None:
                        continue
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    shard = open_by_model.get(request.model)
                    if (
                        shard is None
                        or len(shard["requests"]) >= job.max_batch_requests
                        or shard["bytes"] + len(line) > job.max_batch_bytes
                    ):
                        if shard is not None:
                            shard["file"].close()
                        shard = start(request.model, request.attempt + 1)
                    shard["file"].write(line)
                    shard["bytes"] += len(line)
                    shard["tokens"] += len(line) // 4
                    shard["attempt"] = max(shard["attempt"], request.attempt + 1)
                    shard["requests"].append(request)
    except BaseException:
        for shard in shards:
            shard["file"].close()
            Path(shard["path"]).unlink(missing_ok=True)
        raise
    for shard in shards:
        shard["file"].close()
    missing = len(rows) - sum(len(s["requests"]) for s in shards)
    if missing:
        log.error("retry lines not found in their shards", job_id=job.id, missing=missing)
    return shards


def _record_retry_batches(
    conn: Connection, job: Row, shards: list[dict[str, Any]], now: float
) -> int:
    next_index = batches.last_shard_index(conn, job.id) + 1
    for shard in shards:
        moving = shard["requests"]
        number = batches.next_batch_number(conn, job.id)
        moved = requests.move_to_retry_batch(
            conn, job.number, [(q.position, q.batch_number) for q in moving], number
        )
        if moved != len(moving):
            # Another daemon retried these first: undo by failing the transaction.
            raise RuntimeError(f"retry race on job {job.id}: {moved} of {len(moving)} moved")
        new = {
            "id": shard["id"], "job_id": job.id, "number": number, "shard_index": next_index,
            "attempt": shard["attempt"], "model": shard["model"], "input_path": str(shard["path"]),
            "request_count": len(moving), "bytes": shard["bytes"],
            "estimated_tokens": shard["tokens"],
        }  # fmt: skip
        batches.insert_queued_batches(
            conn, [new], now=now, data=[{"retry_of": sorted({q.batch_id for q in moving})}]
        )
        next_index += 1
    return len(shards)
