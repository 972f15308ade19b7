"""Reconcile: refresh every open remote batch and apply what changed.

With few open batches each is retrieved; with many, the list endpoint is walked (100 a page,
newest first) so that ten thousand open batches cost about a hundred calls a cycle. Batches
nearest their remote deadline are refreshed first. Cancels the user asked for go out here too,
and the orphan sweep (`duties.orphans`) looks at what the list walk saw. With several daemons
only the leader runs this duty (see `service.daemon`).
"""

from __future__ import annotations

import time

from jobqueue.core.problems import Problem, ProblemSource
from jobqueue.duties import orphans, problems
from jobqueue.duties.context import DutyContext
from jobqueue.duties.observe import observe, observe_many
from jobqueue.logs import get_logger
from jobqueue.remote.base import NotFoundError, PermanentRemoteError, RemoteBatch, RemoteError
from jobqueue.store import Row
from jobqueue.store.problems import jobs_with_problem

log = get_logger("jobqueue.reconcile")
PAGE_SIZE = 100
# Stop walking pages once they hold batches this much older than our oldest open one.
_CLOCK_SLACK = 600


def reconcile_once(ctx: DutyContext) -> int:
    started = time.perf_counter()
    calls_before = ctx.stats.get("reconcile_calls", 0)
    moved = send_cancels(ctx)
    with ctx.store.read() as conn:
        rows = ctx.store.open_remote_batches(conn)
    seen: list[RemoteBatch] = []
    horizon = orphans.walk_horizon(ctx)
    if rows:
        failures: dict[str, Problem] = {}
        moved += observe_many(ctx, refresh(ctx, rows, failures, seen=seen, horizon=horizon))
        _record_problems(ctx, rows, failures)
    elif horizon is not None:
        seen = orphans.walk_back(ctx, horizon)
    orphans.sweep(ctx, seen, adopted={row.remote_id for row in rows})
    ctx.count("reconcile_cycles")
    ctx.count("reconcile_seconds", time.perf_counter() - started)
    ctx.stats["last_cycle_calls"] = ctx.stats.get("reconcile_calls", 0) - calls_before
    ctx.stats["last_cycle_batches"] = len(rows)
    return moved


def _record_problems(ctx: DutyContext, rows: list[Row], failures: dict[str, Problem]) -> None:
    """A job with a batch that could not be refreshed has a problem; one whose batches all were
    refreshed has none left from refreshing (a submit problem stays)."""
    for job_id, problem in failures.items():
        problems.report(ctx, job_id, problem, ProblemSource.REFRESH)
    with ctx.store.read() as conn:
        had = jobs_with_problem(conn, ProblemSource.REFRESH)
    fine = {row.job_id for row in rows} - set(failures)
    if had & fine:
        with ctx.store.write() as conn:
            problems.clear(ctx, conn, sorted(had & fine), ProblemSource.REFRESH)


def refresh(
    ctx: DutyContext,
    rows: list[Row],
    failures: dict[str, Problem] | None = None,
    *,
    seen: list[RemoteBatch] | None = None,
    horizon: float | None = None,
) -> list[tuple[Row, RemoteBatch]]:
    """The remote object of each row, by single retrieves or by walking list pages. A row that
    could not be refreshed puts its problem in `failures`, by job id.

    Every listed batch is added to `seen`. With a `horizon` (a creation time) the list is also
    walked back at least that far, for the orphan sweep (with single retrieves: on its own).
    """
    failures = {} if failures is None else failures
    seen = seen if seen is not None else []
    if len(rows) <= ctx.settings.list_threshold:
        retrieved = [
            (row, remote) for row in rows if (remote := _retrieve(ctx, row, failures)) is not None
        ]
        if horizon is not None:
            seen.extend(orphans.walk_back(ctx, horizon))
        return retrieved
    wanted = {row.remote_id: row for row in rows}
    found: dict[str, RemoteBatch] = {}
    oldest = min((row.validating_at or row.created_at) for row in rows) - _CLOCK_SLACK
    # Past this, no page holds a batch we look for, nor one the orphan sweep wants to see.
    limit = oldest if horizon is None else min(oldest, horizon)
    after: str | None = None
    while len(found) < len(wanted) or horizon is not None:
        try:
            page = ctx.provider.list_batches(after=after, limit=PAGE_SIZE)
        except RemoteError as exc:
            log.debug("listing batches failed; retrieving one by one", error=str(exc))
            if horizon is not None:
                orphans.state(ctx).next_walk_at = ctx.clock()  # the sweep's walk: next cycle
            break
        finally:
            ctx.count("reconcile_calls")
        seen.extend(page.data)
        for remote in page.data:
            if remote.id in wanted:
                found[remote.id] = remote
        if not page.has_more or not page.data or not page.last_id:
            break
        if _all_before(page.data, limit):
            break
        if len(found) == len(wanted) and horizon is not None and _all_before(page.data, horizon):
            break
        after = page.last_id
    out: list[tuple[Row, RemoteBatch]] = []
    for row in rows:  # keep nearest-deadline-first order
        remote = found.get(row.remote_id) or _retrieve(ctx, row, failures)
        if remote is not None:
            out.append((row, remote))
    return out


def _all_before(batches: list[RemoteBatch], when: float) -> bool:
    return all(r.created_at is not None and r.created_at < when for r in batches)


def _retrieve(ctx: DutyContext, row: Row, failures: dict[str, Problem]) -> RemoteBatch | None:
    ctx.count("reconcile_calls")
    try:
        return ctx.provider.retrieve_batch(row.remote_id)
    except RemoteError as exc:
        # Logged once, as the job's problem (see `problems.report`), not once a cycle.
        what = "remote batch not found" if isinstance(exc, NotFoundError) else "refresh failed"
        log.debug(what, batch_id=row.id, remote_id=row.remote_id, error=str(exc))
        failures.setdefault(row.job_id, problems.problem_of(exc, "refresh"))
    return None


def send_cancels(ctx: DutyContext) -> int:
    """Cancel remotely the batches whose job the user cancelled (or whose deadline passed)."""
    with ctx.store.read() as conn:
        rows = ctx.store.cancel_candidates(conn)
    moved = 0
    for row in rows:
        ctx.count("reconcile_calls")
        try:
            remote = ctx.provider.cancel_batch(row.remote_id)
        except PermanentRemoteError as exc:
            # 409: it ended meanwhile; the refresh below records how.
            log.info("remote cancel refused", batch_id=row.id, error=str(exc))
            continue
        except RemoteError as exc:
            log.warning("remote cancel failed, will retry", batch_id=row.id, error=str(exc))
            continue
        log.info("cancel sent", job_id=row.job_id, batch_id=row.id, remote_id=row.remote_id)
        moved += int(observe(ctx, row.id, remote))
    return moved
