"""Putting problems on jobs from the duties, and logging each one once.

A refusal seen on every attempt (a wrong key, the remote down) is logged at warning the first
time it lands on a job, with its `job.problem` event, and at debug after that: the log says
when something went wrong and when it went away, not once per attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jobqueue.core.problems import Problem, ProblemSource, remote_problem
from jobqueue.duties.context import DutyContext
from jobqueue.logs import get_logger
from jobqueue.remote.base import RemoteError, TransientRemoteError
from jobqueue.store import Connection
from jobqueue.store.problems import clear_problem, set_problem

log = get_logger("jobqueue.problems")


def problem_of(exc: RemoteError, action: str) -> Problem:
    """The problem a failed remote call puts on its job."""
    return remote_problem(
        status=exc.status,
        code=exc.code,
        message=exc.message,
        transient=isinstance(exc, TransientRemoteError),
        action=action,
    )


def report(
    ctx: DutyContext,
    job_id: str,
    problem: Problem,
    source: ProblemSource,
    conn: Connection | None = None,
    **fields: Any,
) -> bool:
    """Put `problem` on the job (in `conn`'s transaction, else its own); log it at warning when
    it is new there, at debug when the job had it already. True when it was new."""
    now = ctx.clock()
    if conn is None:
        with ctx.store.write() as own:
            changed = set_problem(own, job_id, problem, source, now=now)
    else:
        changed = set_problem(conn, job_id, problem, source, now=now)
    # What this daemon saw in this run, by job: a one-shot run stops on a problem only the
    # operator can fix once it has seen it itself (not on one left from an earlier run).
    ctx.stats.setdefault("problems_seen", {})[job_id] = problem.kind.value
    if changed:
        log.warning(
            "job problem", job_id=job_id, problem=problem.text, kind=problem.kind.value, **fields
        )
    else:
        log.debug("job problem persists", job_id=job_id, problem=problem.text, **fields)
    return changed


def clear(ctx: DutyContext, conn: Connection, job_ids: Iterable[str], source: ProblemSource) -> int:
    """Take the problems `source` put on these jobs off them (it works again); log each."""
    cleared = 0
    now = ctx.clock()
    seen = ctx.stats.get("problems_seen", {})
    for job_id in job_ids:
        seen.pop(job_id, None)
        if clear_problem(conn, job_id, source, now=now):
            cleared += 1
            log.info("job problem cleared", job_id=job_id, source=source.value)
    return cleared
