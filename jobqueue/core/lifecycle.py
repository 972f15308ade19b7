"""The rules of a job's lifecycle: pure decisions over plain values, no I/O.

The store applies them (`jobqueue.store.lifecycle`, the collect and retry duties): which failed
requests are worth another attempt, whether a job may still start one, what a request the
remote never reported counts as, and which status a job ends with.
"""

from __future__ import annotations

from collections.abc import Iterable

from jobqueue.core.states import BatchStatus, JobStatus

B = BatchStatus
J = JobStatus

# The remote's code for a batch refused for the enqueued-token limit: not the user's failure, its
# requests are queued again (in the same attempt) after a backoff.
TOKEN_LIMIT_CODE = "token_limit_exceeded"
# Outcomes worth another attempt: the request never ran, or the remote failed it transiently.
RETRYABLE_CODES = frozenset({"batch_expired", "batch_cancelled", "missing_result"})
# What a request the ended batch's files do not mention counts as, by the batch's status.
_MISSING_CODES: dict[str, str] = {
    B.EXPIRED: "batch_expired",
    B.CANCELLED: "batch_cancelled",
    B.COMPLETED: "missing_result",
}


def is_retryable(status_code: int | None, error_code: str | None) -> bool:
    """A failed request is retried when it never ran, or the remote failed it transiently
    (5xx, 408, 429)."""
    if error_code in RETRYABLE_CODES:
        return True
    return status_code is not None and (status_code >= 500 or status_code in (408, 429))


def job_may_retry(*, cancel_requested: bool, deadline_at: float | None, now: float) -> bool:
    """A job starts no new attempt once its user cancelled it or its deadline passed."""
    return not cancel_requested and (deadline_at is None or now < deadline_at)


def batch_may_retry(
    *,
    attempt: int,
    max_attempts: int,
    cancel_requested: bool,
    deadline_at: float | None,
    now: float,
) -> bool:
    """The requests of a batch in its `attempt` may go again: attempts are left and the job
    may still retry."""
    return attempt < max_attempts and job_may_retry(
        cancel_requested=cancel_requested, deadline_at=deadline_at, now=now
    )


def missing_result_code(status: str, batch_error_code: str | None) -> str:
    """The error code of a request that an ended batch's files do not mention: the batch's
    end (expired, cancelled), else the remote's own error code for the batch, else a failure."""
    return _MISSING_CODES.get(status) or batch_error_code or "batch_failed"


def job_end_status(
    *,
    cancel_requested: bool,
    deadline_at: float | None,
    now: float,
    requests_succeeded: int,
    batch_statuses: Iterable[str],
    requests_total: int | None = None,
) -> JobStatus:
    """The status a job ends with once nothing is left to do: `cancelled` if its user asked,
    unless every one of its `requests_total` requests had succeeded by then (the cancel cut
    nothing short: `completed`), `expired` past its deadline, `failed` when nothing ran (every
    batch failed: validation, or refused at submission), else `completed` (which may count
    failed requests)."""
    all_succeeded = requests_total is not None and requests_succeeded >= requests_total
    if cancel_requested and not all_succeeded:
        return J.CANCELLED
    if deadline_at is not None and now >= deadline_at:
        return J.EXPIRED
    statuses = list(batch_statuses)
    if requests_succeeded == 0 and statuses and all(s == B.FAILED for s in statuses):
        return J.FAILED
    return J.COMPLETED
