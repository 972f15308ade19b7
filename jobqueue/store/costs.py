"""Costs in the database: usage summed by job and model, what a job has spent and has in flight,
and its budget (`jobs.max_cost`, with the `job.budget_exceeded` event written once).

Usage is what collection summed into each batch's token columns (NULL until collected). A batch
is priced by its collected usage; before that (in flight) by its estimate: its estimated input
tokens plus, where its requests bound them, its most output tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, func, select, update

from jobqueue.core.costs import KINDS, PriceTable, Usage, usage_data
from jobqueue.core.states import BatchStatus
from jobqueue.settings import packaged_prices
from jobqueue.store.coordination import wake
from jobqueue.store.events import add_event
from jobqueue.store.tables import batches_table, jobs_table

_PRICES: weakref.WeakKeyDictionary[Any, PriceTable] = weakref.WeakKeyDictionary()


def use_prices(store: Any, prices: PriceTable) -> None:
    """Price what `store` writes into events (a job's end) with `prices`: the config's table,
    set by whoever opened the store with its settings (`JobQueue`, the daemon)."""
    _PRICES[store] = prices


def prices_of(store: Any) -> PriceTable:
    """The table `use_prices` gave `store`, else the packaged one."""
    found = _PRICES.get(store)
    return found if found is not None else packaged_prices()


def job_usage_data(store: Any, conn: Connection, job_id: str) -> dict[str, Any]:
    """The usage part of a job event's data: its collected tokens and their cost."""
    found = usage_by_job_and_model(conn, [job_id])
    return usage_data(prices_of(store), {u.model: u.usage for u in found}, "collected")


def batch_estimate(prices: PriceTable, row: Any) -> float | None:
    """A batch's estimated cost: its input tokens, and its most output tokens where bounded
    (else the input alone). None when its model has no price."""
    estimate = prices.estimate(row.model, int(row.estimated_tokens or 0), row.max_output_tokens)
    return estimate.high if estimate.high is not None else estimate.low


@dataclass(frozen=True)
class Spending:
    """What a job has cost so far (`spent`: collected batches, priced by their usage) and what
    its submitted, uncollected batches are estimated to cost (`in_flight`); None when a price
    is unknown. `unpriced` names the models without a price."""

    spent: float | None
    in_flight: float | None
    unpriced: tuple[str, ...] = ()

    @property
    def total(self) -> float | None:
        if self.spent is None or self.in_flight is None:
            return None
        return self.spent + self.in_flight


def job_spending(conn: Connection, prices: PriceTable, job_id: str) -> Spending:
    """What the job has spent and has in flight (see `Spending`)."""
    b = batches_table
    rows = conn.execute(
        select(
            b.c.model, b.c.status, b.c.remote_id, b.c.collected_at, b.c.remote_completed,
            b.c.estimated_tokens, b.c.max_output_tokens, *(b.c[k] for k in KINDS),
        ).where(b.c.job_id == job_id, b.c.status != BatchStatus.QUEUED.value)
    ).all()  # fmt: skip
    spent: float = 0.0
    in_flight: float = 0.0
    unpriced: dict[str, None] = {}
    for row in rows:
        if row.remote_id is None and row.status != BatchStatus.SUBMITTING:
            continue  # ended without reaching the remote: nothing billed
        if row.collected_at is not None:
            usage = Usage.of_row(row)
            if usage is not None:
                cost = prices.cost(row.model, usage)
            elif row.status == BatchStatus.COMPLETED or row.remote_completed:
                cost = batch_estimate(prices, row)  # collected without its usage recorded
            else:
                cost = 0.0  # refused or cancelled before any request ran
            if cost is None:
                unpriced[row.model or "(no model)"] = None
            else:
                spent += cost
            continue
        estimate = batch_estimate(prices, row)
        if estimate is None:
            unpriced[row.model or "(no model)"] = None
        else:
            in_flight += estimate
    if unpriced:
        return Spending(None, None, tuple(unpriced))
    return Spending(spent, in_flight)


@dataclass(frozen=True)
class ModelUsage:
    """A job's collected usage of one model: tokens summed over the batches collected with
    their usage, and how many were (`batches`)."""

    job_id: str
    model: str | None
    usage: Usage
    batches: int


def usage_by_job_and_model(conn: Connection, job_ids: Iterable[str]) -> list[ModelUsage]:
    """The collected usage of these jobs, by job and model, in that order (the batch's
    `model`; None for batches without one): batches not collected yet (or collected before
    usage was recorded) count nothing, and a job with none has no line. The one query of a
    job's usage (`Job.usage` in `jobs`, `jobqueue cost`, the job's end event)."""
    wanted = list(job_ids)
    if not wanted:
        return []
    b = batches_table
    rows = conn.execute(
        select(
            b.c.job_id, b.c.model, func.count(),
            *(func.coalesce(func.sum(b.c[k]), 0) for k in KINDS),
        )
        .where(b.c.job_id.in_(wanted), b.c.input_tokens.is_not(None))
        .group_by(b.c.job_id, b.c.model)
        .order_by(b.c.job_id, b.c.model)
    ).all()  # fmt: skip
    return [
        ModelUsage(row[0], row[1], Usage(*(int(v) for v in row[3:])), int(row[2])) for row in rows
    ]


def first_attempt_estimates(conn: Connection, job_ids: Iterable[str]) -> list[Row[Any]]:
    """The estimate columns of these jobs' first-attempt batches (`job_id`, `number`,
    `shard_index`, `attempt`, `model`, `estimated_tokens`, `max_output_tokens`): what
    `jobqueue.core.costs.submitted_estimate` sums."""
    wanted = list(job_ids)
    if not wanted:
        return []
    b = batches_table
    return list(
        conn.execute(
            select(
                b.c.job_id, b.c.number, b.c.shard_index, b.c.attempt, b.c.model,
                b.c.estimated_tokens, b.c.max_output_tokens,
            ).where(b.c.job_id.in_(wanted), b.c.attempt == 1)
        )
    )  # fmt: skip


def usage_by_model(conn: Connection) -> dict[str | None, Usage]:
    """Every collected batch's tokens, summed by model (the Prometheus metrics)."""
    b = batches_table
    rows = conn.execute(
        select(b.c.model, *(func.coalesce(func.sum(b.c[k]), 0) for k in KINDS))
        .where(b.c.input_tokens.is_not(None))
        .group_by(b.c.model)
    ).all()
    return {row[0]: Usage(*(int(v) for v in row[1:])) for row in rows}


def jobs_for_costs(
    conn: Connection, job_ids: Iterable[str] | None = None, since: float | None = None
) -> list[Row[Any]]:
    """The jobs a cost report covers: `job_ids`, else every job (created at or after `since`
    when given), oldest first."""
    j = jobs_table
    query = select(j.c.id, j.c.name, j.c.user_metadata, j.c.created_at, j.c.max_cost)
    if job_ids is not None:
        query = query.where(j.c.id.in_(list(job_ids)))
    if since is not None:
        query = query.where(j.c.created_at >= since)
    return list(conn.execute(query.order_by(j.c.created_at, j.c.id)))


# -- budgets --------------------------------------------------------------------------------


def lock_budget(conn: Connection, job_id: str) -> Row[Any] | None:
    """The job's budget columns; when it has a budget, its row locked to the end of the
    transaction (PostgreSQL; a SQLite writer holds the database): two daemons checking one
    job's budget take turns, so each sees the batch the other claimed. A job without a budget
    is not locked (the claim then needs nothing of it)."""
    j = jobs_table
    query = select(j.c.id, j.c.status, j.c.max_cost, j.c.budget_exceeded_at).where(j.c.id == job_id)
    found = conn.execute(query).first()
    if found is None or found.max_cost is None:
        return found
    return conn.execute(query.with_for_update()).first()


def set_budget(conn: Connection, job_id: str, max_cost: float | None, *, now: float) -> bool:
    """Give the job a new budget (None: none), so that a `job.budget_exceeded` may be written
    again for it, and make its queued batches due now. False when there is no such job."""
    j = jobs_table
    changed = conn.execute(
        update(j)
        .where(j.c.id == job_id)
        .values(max_cost=max_cost, budget_exceeded_at=None, updated_at=now)
    ).rowcount
    if not changed:
        return False
    release_holds(conn, job_id)
    return True


def release_holds(conn: Connection, job_id: str) -> None:
    """Make the job's queued batches due now (the budget may allow them: it was raised, or a
    batch was collected and its real usage replaced its estimate), and wake the submit duty."""
    b = batches_table
    conn.execute(
        update(b)
        .where(
            b.c.job_id == job_id,
            b.c.status == BatchStatus.QUEUED.value,
            b.c.not_before.is_not(None),
        )
        .values(not_before=None)
    )
    wake(conn, "submit")


def set_estimates(conn: Connection, estimates: Mapping[str, tuple[int, int | None]]) -> None:
    """Record queued batches' estimates: batch id -> (input tokens, most output tokens)."""
    b = batches_table
    for batch_id, (input_tokens, max_output) in estimates.items():
        conn.execute(
            update(b)
            .where(b.c.id == batch_id, b.c.status == BatchStatus.QUEUED.value)
            .values(estimated_tokens=input_tokens, max_output_tokens=max_output)
        )


def hold_batch(conn: Connection, batch_id: str, until: float) -> None:
    """Keep a queued batch the budget stops from being a submit candidate until `until` (when
    it is looked at again; a new budget makes it due at once)."""
    b = batches_table
    conn.execute(
        update(b)
        .where(b.c.id == batch_id, b.c.status == BatchStatus.QUEUED.value)
        .values(not_before=until)
    )


def mark_budget_exceeded(
    conn: Connection, job_id: str, status: str, data: Mapping[str, Any], *, now: float
) -> bool:
    """Write `job.budget_exceeded` for the job unless written since its budget was set
    (compare-and-set on `budget_exceeded_at`); True when written."""
    j = jobs_table
    changed = conn.execute(
        update(j)
        .where(j.c.id == job_id, j.c.budget_exceeded_at.is_(None))
        .values(budget_exceeded_at=now)
    ).rowcount
    if not changed:
        return False
    add_event(
        conn, "job.budget_exceeded", job_id=job_id, from_status=status, to_status=status,
        data=dict(data), now=now,
    )  # fmt: skip
    return True
