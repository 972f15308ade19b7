"""A job's lifecycle rules in the store: settling a job once nothing is left to do, and a
user's cancel."""

from __future__ import annotations

from jobqueue.store import Store
from jobqueue.store.lifecycle import request_cancel, settle_job
from tests.store.helpers import (
    NOW,
    add_job,
    events_of,
    get_batch,
    get_job,
    requests_of,
    set_requests,
)

# -- the operations under test ----------------------------------------------------------------


def settle(store: Store, job_id: str, now: float = NOW) -> str | None:
    with store.write() as conn:
        return settle_job(store, conn, job_id, now=now)


def cancel(store: Store, job_id: str, now: float = NOW) -> int:
    with store.write() as conn:
        return request_cancel(store, conn, job_id, now=now)


def _finish_requests(store: Store, job_id: str, outcome: str = "succeeded") -> None:
    set_requests(store, job_id, [r.position for r in requests_of(store, job_id)], outcome=outcome)


# -- settling ---------------------------------------------------------------------------------


def test_a_job_goes_on_while_a_batch_is_unsettled(store: Store) -> None:
    job_id, _ = add_job(
        store, {"status": "completed", "collected_at": NOW}, {"status": "completed"}
    )
    _finish_requests(store, job_id)
    assert settle(store, job_id) is None
    assert get_job(store, job_id).status == "running"
    assert events_of(store, job_id)[-1].type == "batch.queued"


def test_a_job_goes_on_while_a_request_waits_for_its_retry(store: Store) -> None:
    job_id, _ = add_job(store, {"status": "expired", "collected_at": NOW, "requests": 2})
    assert settle(store, job_id) is None
    assert get_job(store, job_id).status == "running"


SETTLED = [
    # (job columns, batch columns, every request's outcome, the job's end)
    ({}, {"status": "completed"}, "succeeded", "completed"),
    ({}, {"status": "expired"}, "failed", "completed"),  # a completed job may count failures
    ({"cancel_requested": True}, {"status": "cancelled"}, "failed", "cancelled"),
    ({"deadline_at": NOW}, {"status": "cancelled"}, "failed", "expired"),
    ({}, {"status": "failed", "last_error": "invalid input"}, "failed", "failed"),
    ({"status": "queued"}, {"status": "failed"}, "failed", "failed"),  # refused at submission
]


def test_a_job_settles_once_nothing_is_left(store: Store) -> None:
    for job, batch, outcome, dest in SETTLED:
        job_id, _ = add_job(store, {**batch, "collected_at": NOW, "requests": 2}, **job)
        source = get_job(store, job_id).status
        _finish_requests(store, job_id, outcome)
        assert settle(store, job_id, now=NOW + 1) == dest, (job, batch)
        row = get_job(store, job_id)
        assert (row.status, row.finished_at) == (dest, NOW + 1)
        assert row.error == batch.get("last_error")
        event = events_of(store, job_id)[-1]
        assert (event.type, event.from_status, event.to_status) == (f"job.{dest}", source, dest)
        # Settled once: a second call finds nothing to do.
        assert settle(store, job_id, now=NOW + 2) is None
        assert len([e for e in events_of(store, job_id) if e.type == f"job.{dest}"]) == 1


def test_settling_a_missing_job_does_nothing(store: Store) -> None:
    assert settle(store, "job_missing") is None


# -- a user's cancel --------------------------------------------------------------------------


def test_cancel_ends_queued_batches_and_flags_open_ones(store: Store) -> None:
    job_id, [queued, running, done] = add_job(
        store,
        {"requests": 2},
        {"status": "in_progress", "remote_id": "r1"},
        {"status": "completed", "remote_id": "r2", "collected_at": NOW - 1},
    )
    assert cancel(store, job_id) == 1  # one batch needs a remote cancel
    job = get_job(store, job_id)
    assert (job.cancel_requested, job.status, job.requests_failed) == (True, "running", 2)
    q = get_batch(store, queued)
    assert (q.status, q.cancelled_at, q.collected_at, q.cancel_requested) == (
        "cancelled",
        NOW,
        NOW,
        True,
    )
    assert get_batch(store, running).cancel_requested is True
    assert get_batch(store, running).status == "in_progress"
    assert get_batch(store, done).cancel_requested is False
    [event] = [e for e in events_of(store, job_id, batch_id=queued) if e.type == "batch.cancelled"]
    assert event.data["reason"] == "cancelled by user before submission"
    codes = {r.custom_id: (r.outcome, r.error_code) for r in requests_of(store, job_id)}
    assert codes["req-0"] == codes["req-1"] == ("failed", "batch_cancelled")
    assert codes["req-2"] == codes["req-3"] == (None, None)


def test_cancelling_a_job_of_queued_batches_ends_it_at_once(store: Store) -> None:
    job_id, _ = add_job(store, {}, {})
    assert cancel(store, job_id) == 0
    assert get_job(store, job_id).status == "cancelled"
    assert [e.type for e in events_of(store, job_id)][-3:] == [
        "batch.cancelled",
        "batch.cancelled",
        "job.cancelled",
    ]
