"""The pure rules of a job's lifecycle and the one backoff schedule, without a database."""

from __future__ import annotations

import random

import pytest

from jobqueue.core.backoff import backoff
from jobqueue.core.lifecycle import (
    batch_may_retry,
    is_retryable,
    job_end_status,
    job_may_retry,
    missing_result_code,
)
from jobqueue.core.states import JobStatus
from jobqueue.duties.observe import token_limit_delay

NOW = 1_700_000_000.0


def test_retryable_outcomes() -> None:
    assert is_retryable(None, "batch_expired") and is_retryable(None, "missing_result")
    assert is_retryable(500, None) and is_retryable(503, "server_error")
    assert is_retryable(429, None) and is_retryable(408, None)
    assert not is_retryable(400, "invalid_request") and not is_retryable(None, None)
    assert not is_retryable(200, None)


def test_retries_stop_at_cancel_deadline_and_attempts() -> None:
    assert job_may_retry(cancel_requested=False, deadline_at=None, now=NOW)
    assert job_may_retry(cancel_requested=False, deadline_at=NOW + 1, now=NOW)
    assert not job_may_retry(cancel_requested=False, deadline_at=NOW, now=NOW)
    assert not job_may_retry(cancel_requested=True, deadline_at=None, now=NOW)
    kwargs = {"max_attempts": 3, "cancel_requested": False, "deadline_at": None, "now": NOW}
    assert batch_may_retry(attempt=2, **kwargs)
    assert not batch_may_retry(attempt=3, **kwargs)
    assert not batch_may_retry(attempt=1, **{**kwargs, "cancel_requested": True})


def test_what_an_unreported_request_counts_as() -> None:
    assert missing_result_code("expired", "ignored") == "batch_expired"
    assert missing_result_code("cancelled", None) == "batch_cancelled"
    assert missing_result_code("completed", None) == "missing_result"
    assert missing_result_code("failed", "invalid_json_line") == "invalid_json_line"
    assert missing_result_code("failed", None) == "batch_failed"


@pytest.mark.parametrize(
    ("cancel", "deadline", "succeeded", "statuses", "total", "expected"),
    [
        (True, NOW - 1, 5, ["cancelled"], 8, JobStatus.CANCELLED),  # the user's cancel wins
        (True, None, 5, ["completed"], None, JobStatus.CANCELLED),  # total unknown
        # A cancel that came after every request had succeeded changed nothing.
        (True, None, 5, ["completed"], 5, JobStatus.COMPLETED),
        (True, None, 4, ["completed"], 5, JobStatus.CANCELLED),  # one failed: it stays
        (False, NOW, 5, ["completed"], 5, JobStatus.EXPIRED),
        (False, None, 0, ["failed", "failed"], 5, JobStatus.FAILED),  # nothing ran
        (False, None, 1, ["failed", "completed"], 5, JobStatus.COMPLETED),
        (False, None, 0, ["failed", "expired"], 5, JobStatus.COMPLETED),  # some of it ran
        (False, NOW + 1, 0, [], 0, JobStatus.COMPLETED),  # an empty job
    ],
)
def test_job_end_status(
    cancel: bool,
    deadline: float | None,
    succeeded: int,
    statuses: list[str],
    total: int | None,
    expected: JobStatus,
) -> None:
    got = job_end_status(
        cancel_requested=cancel,
        deadline_at=deadline,
        now=NOW,
        requests_succeeded=succeeded,
        batch_statuses=iter(statuses),
        requests_total=total,
    )
    assert got == expected


def test_backoff_without_jitter_is_the_capped_exponential() -> None:
    assert [backoff(n, base=5.0, cap=60.0, jitter=False) for n in range(0, 7)] == [
        5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0,
    ]  # fmt: skip
    assert backoff(10_000, base=1.0, cap=7.0, jitter=False) == 7.0
    rng = random.Random(3)
    delays = [backoff(4, base=1.0, cap=300.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= d < 8.0 for d in delays) and len(set(delays)) > 100


def test_token_limit_backoff_doubles_six_times_and_stays_under_six_hours() -> None:
    assert [token_limit_delay(300.0, n) for n in (0, 1, 2, 6, 7, 50)] == [
        300.0, 600.0, 1200.0, 19_200.0, 19_200.0, 19_200.0,
    ]  # fmt: skip
    assert token_limit_delay(600.0, 6) == 6 * 3600.0
