"""The request index: where each request of a job is now, and its outcome once it has one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection, Row, Select, and_, bindparam, func, select, update

from jobqueue.store.keys import job_number_of, requests_of_batch
from jobqueue.store.tables import batches_table, jobs_table, requests_table


def fail_pending_requests(conn: Connection, job_id: str, batch_id: str, error_code: str) -> int:
    """Give every still-pending request of a batch a final `error_code` failure, counted on the
    job; return how many there were."""
    result = conn.execute(
        update(requests_table)
        .where(*requests_of_batch(job_id, batch_id), requests_table.c.outcome.is_(None))
        .values(outcome="failed", error_code=error_code)
    )
    failed = result.rowcount or 0
    _add_failed(conn, job_id, failed)
    return failed


def fail_exhausted(
    conn: Connection, job_id: str, job_number: int, *, max_attempts: int | None
) -> int:
    """Pending requests of the job's collected batches that may not go again get their last
    recorded error as their final outcome, counted on the job: those in attempt `max_attempts`
    or later, or every one of them when `max_attempts` is None (no retry allowed at all).
    Returns how many."""
    r, b = requests_table, batches_table
    collected = select(b.c.number).where(b.c.job_id == job_id, b.c.collected_at.is_not(None))
    condition = [
        r.c.job_number == job_number,
        r.c.outcome.is_(None),
        r.c.batch_number.in_(collected),
    ]
    if max_attempts is not None:
        condition.append(r.c.attempt >= max_attempts)
    failed = conn.execute(update(r).where(*condition).values(outcome="failed")).rowcount or 0
    _add_failed(conn, job_id, failed)
    return failed


def _add_failed(conn: Connection, job_id: str, failed: int) -> None:
    if failed:
        j = jobs_table
        conn.execute(
            update(j).where(j.c.id == job_id).values(requests_failed=j.c.requests_failed + failed)
        )


def count_pending(conn: Connection, job_id: str) -> int:
    """Requests of the job without a final outcome."""
    r = requests_table
    return int(
        conn.execute(
            select(func.count())
            .select_from(r)
            .where(r.c.job_number == job_number_of(job_id), r.c.outcome.is_(None))
        ).scalar_one()
    )


def _pending_of_job(query: Select[Any], job_id: str) -> Select[Any]:
    """`query` over the job's pending requests, each joined to the batch that holds it."""
    r, b = requests_table, batches_table
    return (
        query.select_from(r)
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .where(r.c.job_number == job_number_of(job_id), r.c.outcome.is_(None))
    )


def pending_by_batch(conn: Connection, job_id: str) -> list[tuple[str, int]]:
    """(collected batch id, how many of its requests are pending) for one job, by batch id."""
    b = batches_table
    query = _pending_of_job(select(b.c.id, func.count()), job_id)
    rows = conn.execute(
        query.where(b.c.collected_at.is_not(None)).group_by(b.c.id).order_by(b.c.id)
    ).all()
    return [(batch_id, n) for batch_id, n in rows]


def pending_in_batches(conn: Connection, job_id: str, batch_ids: list[str]) -> list[Row[Any]]:
    """The pending requests the batches `batch_ids` of the job hold, in input order: position,
    custom_id, batch_id, batch_number, attempt, and the batch's input_path and model."""
    r, b = requests_table, batches_table
    columns = (r.c.position, r.c.custom_id, b.c.id.label("batch_id"), r.c.batch_number,
               r.c.attempt, b.c.input_path, b.c.model)  # fmt: skip
    query = _pending_of_job(select(*columns), job_id)
    return list(conn.execute(query.where(b.c.id.in_(batch_ids)).order_by(r.c.position)).all())


def pending_of_batch(
    conn: Connection, job_id: str, batch_id: str
) -> Iterator[tuple[str, int, int, int]]:
    """The pending requests batch `batch_id` of the job holds, as (custom_id, position,
    batch_number, attempt), read from the cursor as they come (a retry of many requests keeps
    no row objects)."""
    r, b = requests_table, batches_table
    columns = (r.c.custom_id, r.c.position, r.c.batch_number, r.c.attempt)
    query = _pending_of_job(select(*columns), job_id).where(b.c.id == batch_id)
    return ((custom, pos, number, attempt) for custom, pos, number, attempt in conn.execute(query))


def move_to_retry_batch(
    conn: Connection, job_number: int, requests: Iterable[tuple[int, int]], batch_number: int
) -> int:
    """Move pending requests, given as (position, batch number holding it now), into the job's
    batch `batch_number` as their next attempt. A request no longer pending or no longer in that
    batch (another daemon moved it first) stays; returns how many moved."""
    r = requests_table
    params = [{"pos": position, "old_batch": old} for position, old in requests]
    if not params:
        return 0
    return (
        conn.execute(
            update(r)
            .where(
                r.c.job_number == job_number,
                r.c.position == bindparam("pos"),
                r.c.batch_number == bindparam("old_batch"),
                r.c.outcome.is_(None),
            )
            .values(batch_number=batch_number, attempt=r.c.attempt + 1),
            params,
        ).rowcount
        or 0
    )


def move_batch_requests(conn: Connection, job_id: str, batch_id: str, batch_number: int) -> int:
    """Move every request a batch holds into the job's batch `batch_number`, in the same
    attempt (the requests never ran); return how many moved."""
    result = conn.execute(
        update(requests_table)
        .where(*requests_of_batch(job_id, batch_id))
        .values(batch_number=batch_number)
    )
    return result.rowcount or 0
