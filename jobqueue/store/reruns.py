"""The failed requests of an ended job, for `jobqueue retry`: where each one's line is."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import and_, or_, select

from jobqueue.store import Store
from jobqueue.store.tables import batches_table, outcomes_table, requests_table


def failed_requests(
    store: Store,
    job_id: str,
    job_number: int,
    codes: Sequence[str] = (),
    *,
    chunk: int = 20_000,
) -> Iterator[list[Any]]:
    """The job's requests whose final outcome is a failure, in input order, a page of `chunk`
    at a time (each page its own read transaction): position, custom_id, error_code,
    status_code, and `input_path`, the shard that holds the request's line (its latest
    attempt's). With `codes`, only those whose error code or HTTP status is one of them."""
    r, b, o = requests_table, batches_table, outcomes_table
    names = [c for c in codes if not c.isdigit()]
    statuses = [int(c) for c in codes if c.isdigit()]
    condition = [r.c.job_number == job_number, o.c.outcome == "failed"]
    if codes:
        condition.append(or_(o.c.error_code.in_(names), o.c.status_code.in_(statuses)))
    query = (
        select(r.c.position, r.c.custom_id, o.c.error_code, o.c.status_code, b.c.input_path)
        .join(o, and_(o.c.job_number == r.c.job_number, o.c.position == r.c.position))
        .join(b, and_(b.c.job_id == job_id, b.c.number == r.c.batch_number))
        .where(*condition)
        .order_by(r.c.position)
        .limit(chunk)
    )
    last = -1
    while True:
        with store.read() as conn:
            rows = list(conn.execute(query.where(r.c.position > last)).all())
        if not rows:
            return
        yield rows
        last = rows[-1].position
