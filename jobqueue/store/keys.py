"""How the request index names jobs and batches: by their numbers, looked up from their ids."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect

from jobqueue.store.tables import batches_table, jobs_table, requests_table


def job_number_of(job_id: str) -> ScalarSelect[Any]:
    """The request index names a job by its number: this is the number of `job_id`."""
    return select(jobs_table.c.number).where(jobs_table.c.id == job_id).scalar_subquery()


def batch_number_of(batch_id: str) -> ScalarSelect[Any]:
    """The request index names a batch by its number within its job."""
    return select(batches_table.c.number).where(batches_table.c.id == batch_id).scalar_subquery()


def requests_of_batch(job_id: str, batch_id: str) -> list[ColumnElement[bool]]:
    """WHERE clauses for the request index rows a batch holds now."""
    r = requests_table
    return [r.c.job_number == job_number_of(job_id), r.c.batch_number == batch_number_of(batch_id)]
