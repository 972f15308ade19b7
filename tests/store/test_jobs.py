"""The named changes and queries of the duties on jobs (`jobqueue.store.jobs`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import Row

from jobqueue.store import Store, jobs
from tests.store.helpers import NOW, add_job, events_of, get_batch, get_job

# -- the operations under test ----------------------------------------------------------------


def job_of_batch(store: Store, batch: Row | SimpleNamespace) -> Row:
    with store.read() as conn:
        return jobs.job_of_batch(store, conn, batch)  # type: ignore[arg-type]


def start_if_queued(store: Store, job_id: str) -> bool:
    with store.write() as conn:
        return jobs.start_if_queued(store, conn, job_id, now=NOW)


def past_deadline(store: Store, now: float) -> list[str]:
    with store.read() as conn:
        return jobs.past_deadline(conn, now)


def mark_cancel_requested(store: Store, job_id: str) -> None:
    with store.write() as conn:
        jobs.mark_cancel_requested(conn, job_id, now=NOW)


def ended_before(store: Store, cutoff: float) -> list[str]:
    with store.read() as conn:
        return jobs.ended_before(conn, cutoff)


def mark_purged(store: Store, job_id: str) -> None:
    with store.write() as conn:
        jobs.mark_purged(conn, job_id, now=NOW)


# -- tests ------------------------------------------------------------------------------------


def test_job_of_batch(store: Store) -> None:
    job_id, [batch_id] = add_job(store)
    assert job_of_batch(store, get_batch(store, batch_id)).id == job_id
    with pytest.raises(LookupError, match="job_gone"):
        job_of_batch(store, SimpleNamespace(id="batch_x", job_id="job_gone"))


def test_start_if_queued_starts_a_queued_job_once(store: Store) -> None:
    job_id, _ = add_job(store)
    assert start_if_queued(store, job_id)
    job = get_job(store, job_id)
    assert (job.status, job.started_at) == ("running", NOW)
    assert [e.type for e in events_of(store, job_id)][-1] == "job.running"
    assert not start_if_queued(store, job_id)
    assert not start_if_queued(store, "job_missing")
    assert [e.type for e in events_of(store, job_id)].count("job.running") == 1


def test_past_deadline_lists_open_jobs_whose_deadline_passed(store: Store) -> None:
    due, _ = add_job(store, deadline_at=NOW - 1)
    running_due, _ = add_job(store, {"status": "in_progress"}, deadline_at=NOW)
    add_job(store, deadline_at=NOW + 1)
    add_job(store)
    add_job(store, status="completed", deadline_at=NOW - 1)
    assert sorted(past_deadline(store, NOW)) == sorted([due, running_due])
    assert past_deadline(store, NOW - 10) == []


def test_mark_cancel_requested(store: Store) -> None:
    job_id, _ = add_job(store)
    mark_cancel_requested(store, job_id)
    job = get_job(store, job_id)
    assert (job.cancel_requested, job.updated_at, job.status) == (True, NOW, "queued")


def test_ended_before_and_purged(store: Store) -> None:
    old, _ = add_job(store, status="completed", finished_at=NOW - 100)
    recent, _ = add_job(store, status="failed", finished_at=NOW - 1)
    add_job(store)  # still open
    assert ended_before(store, NOW - 50) == [old]
    assert sorted(ended_before(store, NOW)) == sorted([old, recent])
    mark_purged(store, old)
    assert get_job(store, old).purged_at == NOW
    assert ended_before(store, NOW) == [recent]
