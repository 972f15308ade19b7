"""Retry: requests whose outcome is retryable (expired, cancelled by someone other than the user,
5xx or 429 answers, unreported) go into new batches of the same job, up to its `max_attempts`,
never past its deadline. Requests that may not be retried get their last error as final.

Retry shards are cut from the previous shards' lines (the bodies never enter the database),
grouped by model and packed up to the job's batch limits, so twenty expired batches with a few
leftovers each become one new batch, not twenty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from jobqueue import tokens
from jobqueue.core import memory
from jobqueue.core.costs import PriceTable
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
                sources = _pending_sources(ctx, conn, job_id, group)
            count = sum(len(source.wanted) for source in sources)
            if not count:
                continue
            shards = _write_retry_shards(ctx, job, sources, count)
            try:
                with ctx.store.write(bulk=True) as conn:
                    made += _record_retry_batches(conn, job, shards, now, ctx.prices)
            except BaseException:
                for shard in shards:
                    Path(shard["path"]).unlink(missing_ok=True)
                raise
            retried += count
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


@dataclass(slots=True)
class _Source:
    """A collected batch with requests to retry: its shard, its model, and for each pending
    custom id (position, batch_number, attempt). Plain tuples, no row objects: a group holds
    up to a whole batch's worth of requests (`max_batch_requests`)."""

    batch_id: str
    path: str
    model: str | None
    wanted: dict[str, tuple[int, int, int]]


def _pending_sources(
    ctx: DutyContext, conn: Connection, job_id: str, batch_ids: list[str]
) -> list[_Source]:
    sources = []
    for batch_id in batch_ids:
        batch = ctx.store.get_batch(conn, batch_id)
        if batch is None:
            continue
        wanted = {
            custom_id: (position, number, attempt)
            for custom_id, position, number, attempt in requests.pending_of_batch(
                conn, job_id, batch_id
            )
        }
        if wanted:
            sources.append(_Source(batch_id, batch.input_path, batch.model, wanted))
    return sources


def _write_retry_shards(
    ctx: DutyContext, job: Row, sources: list[_Source], count: int
) -> list[dict[str, Any]]:
    """Copy the pending lines of `sources` from their shards into new shard files."""
    retry_dir = ctx.job_dir(job.id) / "input"
    retry_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    open_by_model: dict[str | None, dict[str, Any]] = {}

    def start(model: str | None, attempt: int) -> dict[str, Any]:
        shard_id = new_id("batch")
        path = retry_dir / f"retry-{shard_id}.jsonl"
        shard = {
            "id": shard_id, "path": path, "file": path.open("wb"), "model": model,
            "attempt": attempt, "requests": [], "sources": set(), "bytes": 0, "tokens": 0,
            "max_output": 0,
        }  # fmt: skip
        shards.append(shard)
        open_by_model[model] = shard
        return shard

    try:
        for source in sources:
            wanted, model = source.wanted, source.model
            with open(source.path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    obj = orjson.loads(line)
                    request = wanted.get(obj.get("custom_id"))
                    if request is None:
                        continue
                    position, number, attempt = request
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    shard = open_by_model.get(model)
                    if (
                        shard is None
                        or len(shard["requests"]) >= job.max_batch_requests
                        or shard["bytes"] + len(line) > job.max_batch_bytes
                    ):
                        if shard is not None:
                            shard["file"].close()
                        shard = start(model, attempt + 1)
                    shard["file"].write(line)
                    shard["bytes"] += len(line)
                    # The same estimate as intake's (`jobqueue.tokens`), of the parsed line.
                    guess = tokens.estimate(job.endpoint, obj.get("body"))
                    shard["tokens"] += guess.input_tokens
                    if shard["max_output"] is not None:
                        bound = guess.max_output_tokens
                        shard["max_output"] = None if bound is None else shard["max_output"] + bound
                    shard["attempt"] = max(shard["attempt"], attempt + 1)
                    shard["requests"].append((position, number))
                    shard["sources"].add(source.batch_id)
    except BaseException:
        for shard in shards:
            shard["file"].close()
            Path(shard["path"]).unlink(missing_ok=True)
        raise
    for shard in shards:
        shard["file"].close()
    missing = count - sum(len(s["requests"]) for s in shards)
    if missing:
        log.error("retry lines not found in their shards", job_id=job.id, missing=missing)
    return shards


def _record_retry_batches(
    conn: Connection, job: Row, shards: list[dict[str, Any]], now: float, prices: PriceTable
) -> int:
    next_index = batches.last_shard_index(conn, job.id) + 1
    for shard in shards:
        moving = shard["requests"]
        number = batches.next_batch_number(conn, job.id)
        moved = requests.move_to_retry_batch(conn, job.number, moving, number)
        if moved != len(moving):
            # Another daemon retried these first: undo by failing the transaction.
            raise RuntimeError(f"retry race on job {job.id}: {moved} of {len(moving)} moved")
        new = {
            "id": shard["id"], "job_id": job.id, "number": number, "shard_index": next_index,
            "attempt": shard["attempt"], "model": shard["model"], "input_path": str(shard["path"]),
            "request_count": len(moving), "bytes": shard["bytes"],
            "estimated_tokens": shard["tokens"], "max_output_tokens": shard["max_output"],
        }  # fmt: skip
        batches.insert_queued_batches(
            conn, [new], now=now, data=[{"retry_of": sorted(shard["sources"])}], prices=prices
        )
        next_index += 1
    return len(shards)
