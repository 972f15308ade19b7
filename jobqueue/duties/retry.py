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
from sqlalchemy import Connection, Row, Select, and_, bindparam, func, select, update

from jobqueue.core.ids import new_id
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.store import job_number_of
from jobqueue.store.lifecycle import settle_job
from jobqueue.store.tables import batches_table, requests_table

log = get_logger("jobqueue.retry")


def retry_once(ctx: DutyContext) -> int:
    with ctx.store.read() as conn:
        job_ids = ctx.store.jobs_with_requests_to_retry(conn)
    moved = 0
    for job_id in job_ids:
        moved += retry_job(ctx, job_id)
    if moved:
        ctx.wake("submit")
    return moved


def _pending_of_job(query: Select[Any], job_id: str) -> Select[Any]:
    """`query` over the job's pending requests, each joined to the batch that holds it."""
    r, b = requests_table, batches_table
    return (
        query.select_from(r)
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .where(r.c.job_number == job_number_of(job_id), r.c.outcome.is_(None))
    )


def _pending_by_batch(conn: Connection, job_id: str) -> list[tuple[str, int]]:
    """(collected batch id, how many of its requests are pending) for one job."""
    b = batches_table
    query = _pending_of_job(select(b.c.id, func.count()), job_id)
    return [
        (batch_id, n)
        for batch_id, n in conn.execute(
            query.where(b.c.collected_at.is_not(None)).group_by(b.c.id).order_by(b.c.id)
        ).all()
    ]


def _pending_rows(conn: Connection, job_id: str, batch_ids: list[str]) -> list[Row]:
    r, b = requests_table, batches_table
    columns = (r.c.position, r.c.custom_id, b.c.id.label("batch_id"), r.c.batch_number,
               r.c.attempt, b.c.input_path, b.c.model)  # fmt: skip
    query = _pending_of_job(select(*columns), job_id)
    return list(conn.execute(query.where(b.c.id.in_(batch_ids)).order_by(r.c.position)).all())


def retry_job(ctx: DutyContext, job_id: str) -> int:
    """Resubmit the job's retryable requests, a group of source batches at a time so memory
    stays bounded by the batch size; requests that may not be retried get a final outcome."""
    now = ctx.clock()
    with ctx.store.read() as conn:
        job = ctx.store.get_job(conn, job_id)
    if job is None:
        return 0
    may_retry = not job.cancel_requested and (job.deadline_at is None or now < job.deadline_at)
    finalised = _finalise(ctx, job, retry_allowed=may_retry)
    made = requests = 0
    if may_retry:
        with ctx.store.read() as conn:
            pending = _pending_by_batch(conn, job_id)
        for group in _groups(pending, job.max_batch_requests):
            with ctx.store.read() as conn:
                rows = _pending_rows(conn, job_id, group)
            if not rows:
                continue
            shards = _write_retry_shards(ctx, job, rows)
            try:
                with ctx.store.write() as conn:
                    made += _record_retry_batches(ctx, conn, job, shards, now)
            except BaseException:
                for shard in shards:
                    Path(shard["path"]).unlink(missing_ok=True)
                raise
            requests += len(rows)
    if not made:
        with ctx.store.write() as conn:
            settle_job(ctx.store, conn, job_id, now=now)
    if made or finalised:
        log.info(
            "retrying requests", job_id=job_id, requests=requests, batches=made,
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
    r, b = requests_table, batches_table
    collected = select(b.c.number).where(b.c.job_id == job.id, b.c.collected_at.is_not(None))
    condition = [
        r.c.job_number == job.number,
        r.c.outcome.is_(None),
        r.c.batch_number.in_(collected),
    ]
    if retry_allowed:
        condition.append(r.c.attempt >= job.max_attempts)
    with ctx.store.write() as conn:
        failed = conn.execute(update(r).where(*condition).values(outcome="failed")).rowcount or 0
        ctx.store.add_job_counts(conn, job.id, 0, failed)
    return failed


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
                    row = wanted.get(custom_id)
                    if row is None:
                        continue
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    shard = open_by_model.get(row.model)
                    if (
                        shard is None
                        or len(shard["requests"]) >= job.max_batch_requests
                        or shard["bytes"] + len(line) > job.max_batch_bytes
                    ):
                        if shard is not None:
                            shard["file"].close()
                        shard = start(row.model, row.attempt + 1)
                    shard["file"].write(line)
                    shard["bytes"] += len(line)
                    shard["tokens"] += len(line) // 4
                    shard["attempt"] = max(shard["attempt"], row.attempt + 1)
                    shard["requests"].append(row)
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
    ctx: DutyContext, conn: Connection, job: Row, shards: list[dict[str, Any]], now: float
) -> int:
    r = requests_table
    made = 0
    index_base = conn.execute(
        select(batches_table.c.shard_index)
        .where(batches_table.c.job_id == job.id)
        .order_by(batches_table.c.shard_index.desc())
        .limit(1)
    ).scalar_one_or_none()
    next_index = (index_base or 0) + 1
    for shard in shards:
        requests = shard["requests"]
        number = ctx.store.next_batch_number(conn, job.id)
        moved = conn.execute(
            update(r)
            .where(
                and_(
                    r.c.job_number == job.number,
                    r.c.position == bindparam("pos"),
                    r.c.batch_number == bindparam("old_batch"),
                    r.c.outcome.is_(None),
                )
            )
            .values(batch_number=number, attempt=r.c.attempt + 1),
            [{"pos": q.position, "old_batch": q.batch_number} for q in requests],
        ).rowcount
        if moved != len(requests):
            # Another daemon retried these first: undo by failing the transaction.
            raise RuntimeError(f"retry race on job {job.id}: {moved} of {len(requests)} moved")
        conn.execute(
            batches_table.insert().values(
                id=shard["id"], job_id=job.id, number=number, status="queued",
                shard_index=next_index,
                attempt=shard["attempt"], model=shard["model"], input_path=str(shard["path"]),
                request_count=len(requests), bytes=shard["bytes"],
                estimated_tokens=shard["tokens"], created_at=now, updated_at=now,
            )
        )  # fmt: skip
        ctx.store.add_event(
            conn, "batch.queued", job_id=job.id, batch_id=shard["id"], to_status="queued",
            data={"attempt": shard["attempt"], "shard_index": next_index, "model": shard["model"],
                  "retry_of": sorted({q.batch_id for q in requests}),
                  "request_counts": {"total": len(requests), "completed": 0, "failed": 0}},
            now=now,
        )  # fmt: skip
        next_index += 1
        made += 1
    return made
