"""The request index: where each request of a job is now, and its outcome once it has one.

Outcomes are rows of `outcomes` (same key as `requests`): a request is pending while it has no
row, or a row whose `outcome` is NULL (a retryable failure waiting for its retry).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from jobqueue.store.keys import job_number_of, requests_of_batch
from jobqueue.store.tables import batches_table, jobs_table, outcomes_table, requests_table


def _outcome_of() -> ColumnElement[bool]:
    """ON / WHERE clause: a request row and its outcome row."""
    r, o = requests_table, outcomes_table
    return and_(o.c.job_number == r.c.job_number, o.c.position == r.c.position)


def fail_pending_requests(conn: Connection, job_id: str, batch_id: str, error_code: str) -> int:
    """Give every still-pending request of a batch a final `error_code` failure, counted on the
    job; return how many there were. A request with an outcome row keeps its line (the
    previous attempt's); one without gets a row without a line."""
    r, o = requests_table, outcomes_table
    of_batch = select(r.c.position).where(*requests_of_batch(job_id, batch_id))
    failed = (
        conn.execute(
            update(o)
            .where(
                o.c.job_number == job_number_of(job_id),
                o.c.position.in_(of_batch),
                o.c.outcome.is_(None),
            )
            .values(outcome="failed", error_code=error_code)
        ).rowcount
        or 0
    )
    failed += (
        conn.execute(
            insert(o).from_select(
                ["job_number", "position", "outcome", "error_code"],
                select(r.c.job_number, r.c.position, literal("failed"), literal(error_code)).where(
                    *requests_of_batch(job_id, batch_id), ~exists().where(_outcome_of())
                ),
            ),
            execution_options={"preserve_rowcount": True},  # an INSERT's count is not kept else
        ).rowcount
        or 0
    )
    _add_failed(conn, job_id, failed)
    return failed


def fail_exhausted(
    conn: Connection, job_id: str, job_number: int, *, max_attempts: int | None
) -> int:
    """Pending requests of the job's collected batches that may not go again get their last
    recorded error as their final outcome, counted on the job: those in attempt `max_attempts`
    or later, or every one of them when `max_attempts` is None (no retry allowed at all).
    Returns how many. (Every request of a collected batch has an outcome row: the pending ones
    are its rows with `outcome` NULL, found by the partial index `ix_outcomes_pending`.)"""
    r, b, o = requests_table, batches_table, outcomes_table
    collected = select(b.c.number).where(b.c.job_id == job_id, b.c.collected_at.is_not(None))
    held = [r.c.job_number == job_number, r.c.batch_number.in_(collected)]
    if max_attempts is not None:
        held.append(r.c.attempt >= max_attempts)
    of_row = [r.c.job_number == o.c.job_number, r.c.position == o.c.position]
    failed = (
        conn.execute(
            update(o)
            .where(
                o.c.job_number == job_number, o.c.outcome.is_(None), exists().where(*of_row, *held)
            )
            .values(outcome="failed")
        ).rowcount
        or 0
    )
    _add_failed(conn, job_id, failed)
    return failed


def _add_failed(conn: Connection, job_id: str, failed: int) -> None:
    if failed:
        j = jobs_table
        conn.execute(
            update(j).where(j.c.id == job_id).values(requests_failed=j.c.requests_failed + failed)
        )


def count_pending(conn: Connection, job_id: str) -> int:
    """Requests of the job without a final outcome: its requests less its final outcome rows
    (two counts on the job's key, no join)."""
    r, o = requests_table, outcomes_table
    number = job_number_of(job_id)
    requests = select(func.count()).select_from(r).where(r.c.job_number == number)
    final = (
        select(func.count())
        .select_from(o)
        .where(o.c.job_number == number, o.c.outcome.is_not(None))
    )
    return int(
        conn.execute(select(requests.scalar_subquery() - final.scalar_subquery())).scalar_one()
    )


def pending_by_batch(conn: Connection, job_id: str) -> list[tuple[str, int]]:
    """(collected batch id, how many of its requests are pending) for one job, by batch id:
    the rows of `outcomes` without an outcome (every request of a collected batch has a row),
    found by the partial index, not by a scan of the job's rows."""
    r, b, o = requests_table, batches_table, outcomes_table
    rows = conn.execute(
        select(b.c.id, func.count())
        .select_from(o)
        .join(r, _outcome_of())
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .where(
            o.c.job_number == job_number_of(job_id),
            o.c.outcome.is_(None),
            b.c.collected_at.is_not(None),
        )
        .group_by(b.c.id)
        .order_by(b.c.id)
    ).all()
    return [(batch_id, n) for batch_id, n in rows]


def pending_in_batches(conn: Connection, job_id: str, batch_ids: list[str]) -> list[Row[Any]]:
    """The pending requests the batches `batch_ids` of the job hold, in input order: position,
    custom_id, batch_id, batch_number, attempt, and the batch's input_path and model."""
    r, b, o = requests_table, batches_table, outcomes_table
    columns = (r.c.position, r.c.custom_id, b.c.id.label("batch_id"), r.c.batch_number,
               r.c.attempt, b.c.input_path, b.c.model)  # fmt: skip
    query = (
        select(*columns)
        .select_from(r)
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .outerjoin(o, _outcome_of())
        .where(r.c.job_number == job_number_of(job_id), o.c.outcome.is_(None))
    )
    return list(conn.execute(query.where(b.c.id.in_(batch_ids)).order_by(r.c.position)))


def pending_of_batch(
    conn: Connection, job_id: str, batch_id: str
) -> Iterator[tuple[str, int, int, int]]:
    """The pending requests batch `batch_id` of the job holds, as (custom_id, position,
    batch_number, attempt), read from the cursor as they come (a retry of many requests keeps
    no row objects)."""
    r, b, o = requests_table, batches_table, outcomes_table
    columns = (r.c.custom_id, r.c.position, r.c.batch_number, r.c.attempt)
    query = (
        select(*columns)
        .select_from(r)
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .outerjoin(o, _outcome_of())
        .where(r.c.job_number == job_number_of(job_id), o.c.outcome.is_(None))
        .where(b.c.id == batch_id)
        .order_by(r.c.position)
    )
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
                ~exists().where(_outcome_of(), outcomes_table.c.outcome.is_not(None)),
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
