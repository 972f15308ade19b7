"""Counts read at scrape time (`GET /metrics`) and for summaries: plain numbers, no rows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from jobqueue.store import job_number_of, outbox
from jobqueue.store.tables import batches_table, jobs_table, requests_table


@dataclass(frozen=True)
class MetricCounts:
    """What the Prometheus collector reports from the database."""

    jobs: dict[str, int]  # by status; a status with no job is absent
    batches: dict[str, int]  # likewise
    requests_total: int
    requests_succeeded: int
    requests_failed: int
    deliveries_pending: int
    deliveries_dead: int
    # Events not yet handed to every one of the given sinks (0 without sinks).
    outbox_waiting: int


def counts_for_metrics(conn: Connection, sinks: Iterable[str]) -> MetricCounts:
    """Jobs and batches by status, requests by outcome, hook deliveries pending and dead, and
    the outbox backlog of `sinks` (this daemon's)."""
    j, b = jobs_table, batches_table
    jobs = {
        s: int(n) for s, n in conn.execute(select(j.c.status, func.count()).group_by(j.c.status))
    }
    batches = {
        s: int(n) for s, n in conn.execute(select(b.c.status, func.count()).group_by(b.c.status))
    }
    total, succeeded, failed = conn.execute(
        select(
            func.coalesce(func.sum(j.c.request_count), 0),
            func.coalesce(func.sum(j.c.requests_succeeded), 0),
            func.coalesce(func.sum(j.c.requests_failed), 0),
        )
    ).one()
    names = list(sinks)
    return MetricCounts(
        jobs=jobs,
        batches=batches,
        requests_total=int(total),
        requests_succeeded=int(succeeded),
        requests_failed=int(failed),
        deliveries_pending=outbox.pending_count(conn),
        deliveries_dead=outbox.dead_count(conn),
        outbox_waiting=outbox.backlog(conn, names) if names else 0,
    )


def retried_request_count(conn: Connection, job_id: str) -> int:
    """How many of the job's requests are past their first attempt."""
    r = requests_table
    return int(
        conn.execute(
            select(func.count())
            .select_from(r)
            .where(r.c.job_number == job_number_of(job_id), r.c.attempt > 1)
        ).scalar_one()
    )
