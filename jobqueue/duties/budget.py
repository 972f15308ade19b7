"""The budget gate of the submit claim: no batch is submitted past its job's `max_cost`.

What counts is what the job has run (collected batches, priced by their usage) plus what it
has in flight (submitted, uncollected batches, priced by their estimates), plus the estimate of
the batch about to be claimed. The check runs in the claim's transaction with the job's row
locked (`store.costs.lock_budget`), so two daemons claiming batches of one job take turns and
each counts the batch the other claimed: a budget is never overrun by more than what the
estimates miss. A batch the budget stops puts a `budget` problem on its job, writes
`job.budget_exceeded` once (until the budget is set again), and is looked at again when a
batch of the job is collected (its real usage replaces its estimate: `settle_job`), when the
budget is raised (`JobQueue.set_budget`), and at the latest after `RECHECK_SECONDS`. A one-shot
run (`process`, `run --until-done`) stops on the budget once nothing of the job is in flight.
"""

from __future__ import annotations

from typing import Any

from jobqueue.core.costs import round_usd
from jobqueue.core.problems import ProblemSource, budget_problem
from jobqueue.duties import problems
from jobqueue.duties.context import DutyContext
from jobqueue.store import Connection, costs

RECHECK_SECONDS = 60.0


def allows(ctx: DutyContext, conn: Connection, row: Any) -> bool:
    """Whether queued batch `row` may be claimed within its job's budget, in the claim's
    transaction (`conn`). When it may not: the job's problem, its event, and the batch held."""
    job = costs.lock_budget(conn, row.job_id)
    if job is None or job.max_cost is None:
        return True
    prices = ctx.prices
    spending = costs.job_spending(conn, prices, row.job_id)
    estimate = costs.batch_estimate(prices, row)
    unpriced = spending.unpriced or (() if estimate is not None else (row.model or "?",))
    total = spending.total  # None when a price is unknown
    if total is not None and estimate is not None and total + estimate <= job.max_cost:
        return True
    now = ctx.clock()
    problem = budget_problem(float(job.max_cost), estimate, unpriced)
    problems.report(ctx, row.job_id, problem, ProblemSource.BUDGET, conn, batch_id=row.id)
    if spending.in_flight:
        # Not stuck yet: what is in flight may still run and be collected (then the job is
        # looked at again). A one-shot run stops on the budget only once nothing is.
        ctx.stats.get("problems_seen", {}).pop(row.job_id, None)
    costs.mark_budget_exceeded(
        conn, row.job_id, job.status,
        {
            "max_cost": job.max_cost,
            "spent": round_usd(spending.spent),
            "in_flight": round_usd(spending.in_flight),
            "next_batch_id": row.id,
            "next_batch_estimate": round_usd(estimate),
            "unpriced_models": list(unpriced),
        },
        now=now,
    )  # fmt: skip
    costs.hold_batch(conn, row.id, now + RECHECK_SECONDS)
    return False
