"""A job's problem: why an open job is not moving, set and cleared with a `job.problem` event.

The problem is compare-and-set like a status: it changes only when its text does, so two
daemons seeing the same refusal write one event between them, and a problem seen again and
again (every submit attempt under a refused key) writes nothing after the first time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, or_, select, update

from jobqueue.core.problems import Problem, ProblemSource
from jobqueue.core.states import JobStatus
from jobqueue.store.events import add_event
from jobqueue.store.tables import jobs_table

_OPEN = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
_CLEARED = {"problem": None, "problem_kind": None, "problem_source": None, "problem_at": None}


def set_problem(
    conn: Connection, job_id: str, problem: Problem, source: ProblemSource, *, now: float
) -> bool:
    """Put `problem` on an open job unless it already has that one; True when it changed (and
    its `job.problem` event was written)."""
    j = jobs_table
    before = conn.execute(
        select(j.c.status, j.c.problem).where(j.c.id == job_id, j.c.status.in_(_OPEN))
    ).first()
    if before is None or before.problem == problem.text:
        return False
    changed = conn.execute(
        update(j)
        .where(
            j.c.id == job_id,
            j.c.status.in_(_OPEN),
            or_(j.c.problem.is_(None), j.c.problem != problem.text),
        )
        .values(
            problem=problem.text,
            problem_kind=problem.kind.value,
            problem_source=source.value,
            problem_at=now,
        )
    ).rowcount
    if not changed:
        return False
    add_event(
        conn, "job.problem", job_id=job_id, from_status=before.status, to_status=before.status,
        data={"problem": problem.text, "kind": problem.kind.value, "source": source.value,
              "previous": before.problem},
        now=now,
    )  # fmt: skip
    return True


def clear_problem(conn: Connection, job_id: str, source: ProblemSource, *, now: float) -> bool:
    """Take the problem `source` put on the job off it; True when there was one (and its
    `job.problem` event, with a null problem, was written)."""
    j = jobs_table
    before = conn.execute(
        select(j.c.status, j.c.problem).where(j.c.id == job_id, j.c.problem_source == source.value)
    ).first()
    if before is None:
        return False
    changed = conn.execute(
        update(j).where(j.c.id == job_id, j.c.problem_source == source.value).values(**_CLEARED)
    ).rowcount
    if not changed:
        return False
    add_event(
        conn, "job.problem", job_id=job_id, from_status=before.status, to_status=before.status,
        data={"problem": None, "kind": None, "source": source.value,
              "previous": before.problem},
        now=now,
    )  # fmt: skip
    return True


def jobs_with_problem(conn: Connection, source: ProblemSource) -> set[str]:
    """Ids of the jobs that carry a problem `source` put on them."""
    j = jobs_table
    return set(conn.execute(select(j.c.id).where(j.c.problem_source == source.value)).scalars())


def problem_values_cleared() -> dict[str, Any]:
    """The columns that take a problem off a job without an event (its end is the news)."""
    return dict(_CLEARED)


def open_problems(conn: Connection, job_ids: Iterable[str] | None = None) -> list[Any]:
    """(id, problem, problem_kind) of the open jobs with a problem, of `job_ids` or all."""
    j = jobs_table
    query = select(j.c.id, j.c.problem, j.c.problem_kind).where(
        j.c.status.in_(_OPEN), j.c.problem.is_not(None)
    )
    if job_ids is not None:
        query = query.where(j.c.id.in_(list(job_ids)))
    return list(conn.execute(query).all())


def retry_held_now(conn: Connection, job_ids: Iterable[str] | None = None) -> int:
    """Make the queued batches of open jobs held up by a problem only the operator can fix (a
    key, a permission, a quota) due now, not after their backoff: a one-shot run started after
    the fix tries them at once. Returns how many batches."""
    from jobqueue.core.problems import NEEDS_OPERATOR
    from jobqueue.store.tables import batches_table

    j, b = jobs_table, batches_table
    held = select(j.c.id).where(
        j.c.status.in_(_OPEN), j.c.problem_kind.in_([k.value for k in NEEDS_OPERATOR])
    )
    if job_ids is not None:
        held = held.where(j.c.id.in_(list(job_ids)))
    result = conn.execute(
        update(b)
        .where(
            b.c.status == JobStatus.QUEUED.value, b.c.job_id.in_(held), b.c.not_before.is_not(None)
        )
        .values(not_before=None)
    )
    return result.rowcount or 0
